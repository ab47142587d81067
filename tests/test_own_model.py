"""A model we did not write, rolled out through the real runbook on the local platform: the diabetes
regression example (scikit-learn, its own scoring script answering a bare list, its own endpoint and
deployment YAML and a .jsonl of requests). Nothing is trained by saferollout; the runbook takes the files
unchanged. A first release, a healthy second version, then a version that answers a constant (200s in the
right shape: only the prediction-agreement gate can tell) is rolled back.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from saferollout import rollout
from saferollout.runner import run_runbook

ROOT = Path(__file__).resolve().parents[1]
SAFE = ROOT / "runbooks" / "safe_rollout.yaml"
EXAMPLE = ROOT / "examples" / "diabetes-regression"
# wide margins, so ~100 requests per deployment decide within a short window at 10 rps (as the notebook tests);
# the agreement gate gets its requests, n and task from the runbook's request_file (nothing set here)
TEST_GATES = json.dumps([
    {"kind": "sequential", "name": "errors-sequential", "metric": "errors", "margin": 10.0, "min_samples": 20},
    {"kind": "sequential", "name": "latency-sequential", "metric": "latency", "margin": 3.0, "min_samples": 20,
     "calibration_samples": 30},
    {"kind": "ml_agreement", "name": "prediction-agreement", "source": "header"},
])
QUICK = {"traffic_steps": "50,100", "gate_window_s": "60", "bake_window_s": "20", "poll_s": "1", "rps": "10",
         "gates": TEST_GATES}

pytestmark = pytest.mark.slow


def train(out_dir: Path, *args: str) -> Path:
    subprocess.run([sys.executable, str(EXAMPLE / "train.py"), str(out_dir), *args], check=True, capture_output=True)
    return out_dir


@pytest.fixture
def example(tmp_path) -> Path:
    """A copy of the example as a user has it: their files, and ./model trained next to deployment.yml."""
    copy = tmp_path / "diabetes"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("model", "__pycache__"))
    train(copy / "model")
    return copy


@pytest.mark.timeout(900)
def test_a_regression_model_with_its_own_files_rolls_out_and_a_constant_model_rolls_back(
        local_backend, unique_name, tmp_path, example):
    endpoint = unique_name("own")
    common = {"endpoint_name": endpoint, "deployment_file": str(example / "deployment.yml"),
              "endpoint_file": str(example / "endpoint.yml"), "request_file": str(example / "requests.jsonl"),
              **QUICK}
    try:
        first = run_runbook(SAFE, common, runs_dir=tmp_path / "runs", echo=False)
        assert first.exit_code == 0, first.summary["failure"]
        steps = {s["id"]: s for s in first.summary["steps"]}
        assert steps["train"]["status"] == "skipped"
        assert steps["train"]["skipped_because"] == "nothing to train: the model is the one given (deployment_file or model)"
        register = steps["register"]["records"]
        assert register["model_ref"] == f"azureml:{endpoint}-model:1"
        assert register["source"] == f"registered from {example / 'model'}"  # the YAML's model, relative to it
        assert steps["deploy"]["records"]["smoke"]["ok"]  # first release: 200s with JSON
        assert local_backend.get_endpoint(endpoint).description.startswith("Diabetes progression")

        v2 = train(tmp_path / "v2", "--alpha", "0.8")
        second = run_runbook(SAFE, {**common, "model": str(v2)}, runs_dir=tmp_path / "runs", echo=False)
        summary = second.summary
        assert second.exit_code == 0, summary["failure"]
        assert [s["id"] for s in summary["steps"] if s["status"] == "ok"] == [
            "register", "deploy", "shift-50", "validate-50", "promote"]
        smoke = summary["records"]["deploy"]["smoke"]
        assert smoke["ok"] and smoke["n"] == 5  # shaped like PROD's answers
        assert summary["records"]["deploy"]["warmup"] == {**summary["records"]["deploy"]["warmup"], "n": 50, "failed": 0}
        agreement = next(v for v in summary["gates"]["validate-50"]["verdicts"] if v["gate"] == "prediction-agreement")
        assert agreement["decision"] == "pass", agreement["reason"]
        assert agreement["evidence"]["task"] == "regression" and agreement["evidence"]["rows"] == 80
        assert agreement["evidence"]["task_inferred"] == "the predictions are numbers, not all whole"
        assert summary["traffic"]["source"] == "generator"
        assert summary["traffic"]["request_file"] == str(example / "requests.jsonl")
        assert summary["traffic"]["sent"] > 0 and summary["traffic"]["failed"] == 0
        report = (second.run_dir / "report.html").read_text()
        assert f"live traffic: generator: 10.0 rps replaying {example / 'requests.jsonl'}" in report
        # it opens with the rollout timeline: the endpoint over the whole run, every gate's decisions below
        # on the same time axis
        assert report.index("<h3>Timeline</h3>") < report.index("<h3>Steps</h3>")
        assert report.count('alt="rollout timeline"') == 1
        state = rollout.read_state(local_backend, endpoint)
        assert state.prod == summary["records"]["deploy"]["rc"] and state.traffic == {state.prod: 100}
        assert state.prod_model == f"azureml:{endpoint}-model:2"

        constant = train(tmp_path / "constant", "--constant")
        faulty = run_runbook(SAFE, {**common, "model": str(constant)}, runs_dir=tmp_path / "runs", echo=False)
        summary = faulty.summary
        assert faulty.exit_code == 1 and faulty.status == "rolled_back"
        assert summary["failure"]["step"] == "validate-50" and summary["failure"]["ename"] == "GateFailed"
        agreement = next(v for v in summary["gates"]["validate-50"]["verdicts"] if v["gate"] == "prediction-agreement")
        assert agreement["decision"] == "fail" and "agreement below 95.0%" in agreement["reason"]  # the gate default
        after = rollout.read_state(local_backend, endpoint)
        assert after.prod == state.prod and after.traffic.get(state.prod) == 100 and after.lock is None
        assert after.failed_rc == summary["records"]["deploy"]["rc"]
    finally:
        local_backend.delete_endpoint(endpoint)
