"""The whole safe-rollout runbook with backend=azure, on the fake Azure workspace.

Every step runs in its own notebook kernel and the live traffic in its own process: they all reach the
same fake workspace through the client factory named in the environment (as a real run reaches Azure
through the workspace named in the environment). Also checks that no endpoint key reaches the run
directory (executed notebooks, summary.json, report.html), which is archived by CI.
"""
import os
from pathlib import Path

import pytest

from saferollout import pipeline, rollout
from saferollout.backends import get_backend
from saferollout.runner import run_runbook

ROOT = Path(__file__).resolve().parents[3]
TESTS = ROOT / "tests"
ENDPOINT = "credit-risk"


@pytest.fixture
def fake_workspace_env(tmp_path, monkeypatch):
    """Point this process and every child (kernels, the traffic process) at one fake workspace."""
    monkeypatch.setenv("SAFEROLLOUT_AZURE_CLIENT_FACTORY", "fakes.azure_wire:client_factory")
    monkeypatch.setenv("SAFEROLLOUT_AZURE_FAKE_DIR", str(tmp_path / "fake-workspace"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.delenv("SAFEROLLOUT_BACKEND", raising=False)
    return tmp_path


@pytest.mark.slow
def test_safe_rollout_runbook_promotes_a_release_candidate_on_azure(fake_workspace_env):
    backend = get_backend("azure", poll_interval_s=0.05)
    # what is in production before this rollout: a first release of the same model family
    first = pipeline.deploy(backend, ENDPOINT, pipeline.demo_model(backend, "credit-model"), progress=lambda _: None)
    assert first["first_release"] and first["prod"] == "blue"

    result = run_runbook(ROOT / "runbooks" / "safe_rollout.yaml",
                         {"backend": "azure", "endpoint_name": ENDPOINT, "model_name": "credit-model",
                          "traffic_steps": "50,100", "gate_window_s": 90, "bake_window_s": 0, "rps": 40},
                         runs_dir=fake_workspace_env / "runs", echo=False)

    assert result.status == "completed", result.summary
    state = rollout.read_state(backend, ENDPOINT)
    assert state.prod == "green" and state.rc is None and state.lock is None
    assert {k: v for k, v in state.traffic.items() if v} == {"green": 100}
    assert backend.get_deployment(ENDPOINT, "green").model == "azureml:credit-model:2"

    keys = backend.get_credentials(ENDPOINT)
    for path in result.run_dir.rglob("*"):
        if path.is_file():
            text = path.read_bytes().decode("utf-8", "replace")
            assert keys.primary_key not in text and keys.secondary_key not in text, f"a key leaked into {path}"
