"""The rollout notebooks, for real, on the session's local platform.

- nbmake runs every notebook at its default parameters (each is then a self-contained demo on its own
  endpoint, which it deletes);
- the runner runs them under papermill with injected parameters: a first release, a healthy safe rollout
  of a second model, then a release candidate with injected errors that the gates catch and roll back.
Windows are short (one gate at 50%, a few seconds of bake, ~10 rps) so the whole file stays near 3 minutes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from saferollout import rollout
from saferollout.runner import run_runbook

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SAFE = ROOT / "runbooks" / "safe_rollout.yaml"
# one gate at 50%, then promote: enough samples per deployment within a short window at 10 rps
# gates with wider margins than the defaults, so ~100 requests per deployment decide either way
TEST_GATES = json.dumps([
    {"kind": "sequential", "name": "errors-sequential", "metric": "errors", "margin": 10.0, "min_samples": 20},
    {"kind": "sequential", "name": "latency-sequential", "metric": "latency", "margin": 3.0, "min_samples": 20,
     "calibration_samples": 30},
    {"kind": "ml_quality", "name": "offline-quality"},
    {"kind": "ml_agreement", "name": "prediction-agreement", "source": "header", "min_agreement": 0.8,
     "max_distance": 0.5, "n": 20, "batch_size": 5},
])
QUICK = {"traffic_steps": "50,100", "gate_window_s": "60", "bake_window_s": "20", "poll_s": "1", "rps": "10",
         "gates": TEST_GATES}

pytestmark = pytest.mark.slow


def test_the_seven_notebooks_exist_without_outputs_and_with_a_parameters_cell():
    import nbformat

    assert [p.stem for p in NOTEBOOKS] == ["deploy", "promote", "register", "rollback", "shift_traffic", "train",
                                           "validate"]
    for path in NOTEBOOKS:
        nb = nbformat.read(str(path), as_version=4)
        assert nb.cells[0].cell_type == "markdown" and ("Decides" in nb.cells[0].source or "Shows" in nb.cells[0].source)
        assert "parameters" in nb.cells[1].metadata.get("tags", []), path.name
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
        assert all(len(c.source.splitlines()) <= 15 for c in nb.cells), f"{path.name}: logic belongs in lib/"


def test_every_notebook_runs_at_its_defaults_under_nbmake(platform_home, tmp_path):
    # two nbmake processes side by side: the notebooks mostly wait for deployments to start
    env = {**os.environ, "SAFEROLLOUT_HOME": str(platform_home)}
    groups = [NOTEBOOKS[0::2], NOTEBOOKS[1::2]]
    procs = [subprocess.Popen([sys.executable, "-m", "pytest", "--nbmake", "-q", "-p", "no:cacheprovider",
                               "--rootdir", str(tmp_path), "-o", "testpaths=", *map(str, group)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for group in groups]
    try:
        outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, output, group in zip(procs, outputs, groups):
        assert proc.returncode == 0, output[-5000:]
        assert f"{len(group)} passed" in output


def _client_failures(summary: dict, deployment: str) -> int:
    return (summary["traffic"] or {}).get("per_deployment", {}).get(deployment, {}).get("failed", 0)


def test_first_release_then_a_safe_rollout_then_a_faulty_rc_rolls_back(local_backend, unique_name, tmp_path):
    endpoint = unique_name("rb")
    common = {"endpoint_name": endpoint, "model_name": f"model-{endpoint}", **QUICK}
    try:
        first = run_runbook(SAFE, common, runs_dir=tmp_path, echo=False)
        assert first.exit_code == 0 and first.status == "completed" and first.summary["first_release"]
        assert [s["status"] for s in first.summary["steps"]][3:] == ["skipped"] * 3
        prod = rollout.read_state(local_backend, endpoint).prod
        assert rollout.read_state(local_backend, endpoint).traffic == {prod: 100}

        second = run_runbook(SAFE, {**common, "model_family": "gradient_boosting"}, runs_dir=tmp_path, echo=False)
        summary = second.summary
        assert second.exit_code == 0, summary["failure"]
        assert [s["id"] for s in summary["steps"] if s["status"] == "ok"] == [
            "train", "register", "deploy", "shift-50", "validate-50", "promote"]
        assert summary["gates"]["validate-50"]["decision"] == "pass"
        assert summary["gates"]["promote"]["decision"] == "pass"  # the bake gate
        state = rollout.read_state(local_backend, endpoint)
        new_prod = summary["records"]["deploy"]["rc"]
        assert state.phase == rollout.Phase.STABLE and state.prod == new_prod != prod
        assert state.traffic == {new_prod: 100} and state.old_prod is None and state.lock is None
        assert summary["traffic"]["sent"] > 0 and _client_failures(summary, prod) == 0
        report = (second.run_dir / "report.html").read_text()
        assert "data:image/png;base64" in report and "validate-50" in report
        assert (second.run_dir / "traffic.jsonl").exists()

        # latency passes the smoke test (answers are right, only slow), so the gate must catch it under live
        # traffic; errors are often caught earlier, by the smoke test (a 20% error rate over 5 requests)
        faulty = run_runbook(SAFE, {**common, "fault": "latency"}, runs_dir=tmp_path, echo=False)
        summary = faulty.summary
        assert faulty.exit_code == 1 and faulty.status == "rolled_back"
        assert summary["failure"]["step"] == "validate-50" and summary["failure"]["ename"] == "GateFailed"
        assert summary["gates"]["validate-50"]["decision"] == "fail"
        state = rollout.read_state(local_backend, endpoint)
        assert state.prod == new_prod and state.traffic.get(new_prod) == 100
        assert state.failed_rc == summary["records"]["deploy"]["rc"] and state.lock is None
        assert _client_failures(summary, new_prod) == 0  # the clients never saw PROD fail
        assert summary["gates"]["validate-50"]["verdicts"]  # the evidence is kept
        on_disk = json.loads((faulty.run_dir / "summary.json").read_text())
        assert on_disk["status"] == "rolled_back" and on_disk["steps"][-1]["id"] == "rollback"
    finally:
        local_backend.delete_endpoint(endpoint)
