"""examples/simple_rollout.sh, the seed's `az ml` script with `saferollout --backend azure`, over the wire fake.

The script runs as a user runs it (bash, the `saferollout` command, the real SDK), reaching the fake
workspace through the documented environment settings only (docs/azure.md, section 6).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fakes.azure_wire import fake_azure
from saferollout.backends.azure import AzureBackend

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "examples" / "simple_rollout.sh"
BIN = Path(sys.executable).parent


def printed(done: subprocess.CompletedProcess) -> tuple[dict, dict]:
    """What the script printed: the smoke test's answer (one line), then the endpoint's traffic (JSON)."""
    smoke, _, traffic = done.stdout.partition("\n")
    return json.loads(smoke), json.loads(traffic)


def run_script(state_dir: Path, model_dir: Path, **settings: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=os.pathsep.join([str(BIN), os.environ["PATH"]]),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p),
               SAFEROLLOUT_AZURE_CLIENT_FACTORY="fakes.azure_wire:client_factory",
               SAFEROLLOUT_AZURE_FAKE_DIR=str(state_dir), MODEL_DIR=str(model_dir), PAUSE_S="0", **settings)
    env.pop("SAFEROLLOUT_BACKEND", None)
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)  # a bound for a loaded machine; ~1 min alone


@pytest.mark.slow
def test_the_simple_rollout_script_releases_then_rolls_out_over_azure(tmp_path_factory, credit_model_dir):
    state_dir = tmp_path_factory.mktemp("fake-azure")
    first = run_script(state_dir, credit_model_dir, NEW="blue")
    assert first.returncode == 0, first.stderr
    smoke, traffic = printed(first)
    assert len(smoke["predictions"]) == 1 and traffic == {"blue": 100}

    second = run_script(state_dir, credit_model_dir)  # NEW=green replaces OLD=blue
    assert second.returncode == 0, second.stderr
    for split in ("traffic blue=90 green=10", "traffic blue=50 green=50", "traffic blue=0 green=100",
                  "delete the old deployment blue"):
        assert split in second.stderr
    smoke, traffic = printed(second)
    assert len(smoke["predictions"]) == 1 and traffic == {"green": 100}

    fake = fake_azure(state_dir)
    azure = AzureBackend(ml_client=fake.ml_client, metrics_client=fake.metrics_client,
                         http_session=fake.http_session, poll_interval_s=0.01)
    assert [d.name for d in azure.list_deployments("credit-risk")] == ["green"]
    assert azure.get_endpoint("credit-risk").traffic == {"green": 100}
    assert azure.get_deployment("credit-risk", "green").model == "azureml:credit-model:2"
    # each smoke test went to the new deployment alone, through the deployment header
    served_by = [row[2] for row in fake.state.request_rows("credit-risk", 0, float("inf"))]
    assert served_by == ["blue", "green"]


def test_the_script_says_what_is_missing_without_a_model(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT)], env={k: v for k, v in os.environ.items() if k != "MODEL_DIR"},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "set MODEL_DIR to the model folder (or file) to register" in done.stderr
