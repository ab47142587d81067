"""The CI workflow parses, and everything it names exists: runbooks, their notebooks, parameters and steps."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from saferollout.runbook import load_runbook, plan, resolve_parameters

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "safe-rollout.yml"


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def run_commands(workflow: dict) -> list[tuple[str, str]]:
    """(job, command) for every `saferollout run` in the workflow."""
    found = []
    for name, job in workflow["jobs"].items():
        for step in job.get("steps", []):
            if "saferollout run" in str(step.get("run", "")):
                found.append((name, step["run"]))
    return found


def test_workflow_is_dispatchable_with_the_runbook_parameter_names(workflow):
    trigger = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    inputs = trigger["workflow_dispatch"]["inputs"]
    assert inputs["backend"]["options"] == ["local", "azure"] and inputs["backend"]["default"] == "local"
    book = load_runbook(ROOT / workflow["env"]["RUNBOOK"])
    assert set(inputs) <= set(book.parameters)


def test_every_p_parameter_is_declared_by_the_runbook(workflow):
    book = load_runbook(ROOT / workflow["env"]["RUNBOOK"])
    params = dict(p.split("=", 1) for p in re.findall(r"-p (\S+=\S+)", workflow["env"]["PARAMS"]))
    assert set(params) <= set(book.parameters)
    assert "backend" in params and "traffic_steps" in params


def test_every_step_a_job_runs_is_in_the_runbook_plan(workflow):
    book = load_runbook(ROOT / workflow["env"]["RUNBOOK"])
    steps_param = re.search(r"traffic_steps=(\S+)", workflow["env"]["PARAMS"]).group(1)
    planned = [s.id for s in plan(book, resolve_parameters(book, {"traffic_steps": steps_param}))]
    known = set(planned) | {s.id for s in book.on_failure}
    seen = set()
    for job, command in run_commands(workflow):
        args = shlex.split(command.replace("$PARAMS", "").replace('"$RUNBOOK"', "RUNBOOK"))
        if "--steps" in args:
            ids = args[args.index("--steps") + 1].split(",")
            assert set(ids) <= known, f"job {job} runs unknown step(s) {set(ids) - known}"
            seen.update(ids)
    assert set(planned) <= seen, f"no job runs {set(planned) - seen}"
    assert "rollback" in seen


def test_runbooks_reference_existing_notebooks():
    for path in (ROOT / "runbooks").glob("*.yaml"):
        book = load_runbook(path)  # refuses a missing notebook or an undeclared notebook parameter
        notebooks = {s.notebook for s in plan(book, resolve_parameters(book, {}))} | {s.notebook for s in
                                                                                       book.on_failure}
        assert all(nb.is_file() and nb.parent == ROOT / "notebooks" for nb in notebooks)


def test_azure_jobs_gate_on_environments_and_keep_the_run_directory(workflow):
    jobs = workflow["jobs"]
    assert jobs["canary-10"]["environment"] == "canary" and jobs["promote"]["environment"] == "production"
    assert "failure()" in jobs["rollback"]["if"]
    for name in ("register", "deploy", "canary-10", "canary-50", "promote", "rollback"):
        uses = [s.get("uses", "") for s in jobs[name]["steps"]]
        assert any(u.startswith("actions/download-artifact") for u in uses), name
        assert any(u.startswith("actions/upload-artifact") for u in uses), name
    local = [s.get("uses", "") for s in jobs["local-rollout"]["steps"]]
    assert any(u.startswith("actions/upload-artifact") for u in local)


def test_secrets_the_workflow_uses_are_documented_in_its_header(workflow):
    text = WORKFLOW.read_text()
    header = text.split("name: safe-rollout", 1)[0]
    for secret in set(re.findall(r"secrets\.(\w+)", text)) | set(re.findall(r"vars\.(\w+)", text)):
        assert secret in header, f"{secret} is used but not documented"


def test_make_demo_is_the_local_twin(workflow):
    makefile = (ROOT / "Makefile").read_text()
    demo = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert demo.count("saferollout run runbooks/safe_rollout.yaml") == 2
