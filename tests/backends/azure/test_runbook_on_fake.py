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

    assert_no_key_in(result.run_dir, backend)


def assert_no_key_in(run_dir: Path, backend) -> None:
    keys = backend.get_credentials(ENDPOINT)
    for path in run_dir.rglob("*"):
        if path.is_file():
            text = path.read_bytes().decode("utf-8", "replace")
            assert keys.primary_key not in text and keys.secondary_key not in text, f"a key leaked into {path}"


# the step that fails and what its message names; an RC with random errors fails its smoke test or its first gate
WHY_ROLLED_BACK = {"errors": {"deploy": "smoke test of 'green' failed", "validate-50": "error rate: RC"},
                   "crash": {"deploy": "crashed in init()"},
                   "flip": {"validate-50": "gate 'prediction-agreement' (ml_agreement) failed"}}


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(WHY_ROLLED_BACK))
def test_safe_rollout_runbook_rolls_back_a_faulty_release_candidate_on_azure(fake_workspace_env, fault):
    """errors: the error gate fails at the first step; crash: the RC's init() fails, so its deployment
    fails on Azure before it gets traffic; flip: inverted predictions, the agreement gate fails."""
    backend = get_backend("azure", poll_interval_s=0.05)
    first = pipeline.deploy(backend, ENDPOINT, pipeline.demo_model(backend, "credit-model"), progress=lambda _: None)
    assert first["prod"] == "blue"

    result = run_runbook(ROOT / "runbooks" / "safe_rollout.yaml",
                         {"backend": "azure", "endpoint_name": ENDPOINT, "model_name": "credit-model",
                          "traffic_steps": "50,100", "gate_window_s": 60, "bake_window_s": 0, "rps": 40,
                          "fault": fault},
                         runs_dir=fake_workspace_env / "runs", echo=False)

    assert result.status == "rolled_back", result.summary
    failure = result.summary["failure"]
    assert WHY_ROLLED_BACK[fault].get(failure["step"], "(not this step)") in failure["message"], failure
    state = rollout.read_state(backend, ENDPOINT)
    assert state.prod == "blue" and state.rc is None and state.lock is None
    assert state.failed_rc == "green" and state.rollback_reason
    assert {k: v for k, v in state.traffic.items() if v} == {"blue": 100}
    assert not any(state.mirror_traffic.values())
    assert backend.get_deployment(ENDPOINT, "blue").model == "azureml:credit-model:1"
    assert_no_key_in(result.run_dir, backend)
