"""Runbooks and the runner: parameters refused before anything runs, references, when/where/foreach,
on_failure, summary.json, report.html and exit codes. Steps are a tiny notebook (tests/notebooks/echo.ipynb),
so these tests pay for kernels, not for deployments; the rollout itself is tested in tests/notebooks/."""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import nbformat
import pytest

from saferollout.errors import SpecError
from saferollout.cli.run import main
from saferollout.runbook import (RECORD_MIMETYPE, evaluate, load_runbook, parse_overrides, percent_list,
                                 plan, read_records, resolve, resolve_parameters)
from saferollout.runner import client_outcomes, run_runbook

ROOT = Path(__file__).resolve().parents[1]
ECHO = Path(__file__).parent / "notebooks" / "echo.ipynb"


def write_runbook(tmp_path: Path, body: str, name: str = "book.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body).replace("ECHO", str(ECHO)))
    return path


BASIC = """
name: basic
parameters:
  greeting: {default: hi}
  rps: {default: 10, type: float, min: 0.1}
  fault: {default: none, choices: [none, errors]}
  steps_list: {default: "10,100", type: percent_list}
steps:
  - id: first
    notebook: ECHO
    parameters: {value: "${parameters.greeting}"}
  - id: second
    notebook: ECHO
    parameters: {value: "${steps.first.echo} again", extra: {rps: "${parameters.rps}"}}
"""


# ---- parameters --------------------------------------------------------------------------------------
def test_unknown_parameters_are_refused_by_name(tmp_path):
    book = load_runbook(write_runbook(tmp_path, BASIC))
    with pytest.raises(SpecError, match=r"unknown parameter\(s\) colour, size for runbook basic"):
        resolve_parameters(book, {"size": "1", "colour": "red"})


@pytest.mark.parametrize("name,value,message", [
    ("rps", "fast", "parameter rps='fast' is not a valid float"),
    ("rps", "0", "parameter rps='0' must be at least 0.1"),
    ("rps", "inf", "parameter rps='inf' is not a valid float: not a finite number"),  # a gate that never times out
    ("fault", "boom", "parameter fault='boom' must be one of none, errors"),
    ("steps_list", "50,10,100", "percents must increase strictly"),
    ("steps_list", "10,50", "the last step must be 100"),
])
def test_ill_typed_parameters_are_refused_with_the_parameter_named(tmp_path, name, value, message):
    book = load_runbook(write_runbook(tmp_path, BASIC))
    with pytest.raises(SpecError, match=message):
        resolve_parameters(book, {name: value})


def test_overrides_are_coerced_to_the_declared_type(tmp_path):
    book = load_runbook(write_runbook(tmp_path, BASIC))
    values = resolve_parameters(book, {"rps": "2.5", "steps_list": "5, 20,100"})
    assert values["rps"] == 2.5 and values["steps_list"] == [5, 20, 100] and values["greeting"] == "hi"


def test_a_preset_fills_parameters_that_p_did_not_set(tmp_path):
    book = load_runbook(write_runbook(tmp_path, BASIC.replace("steps:\n", """  preset:
    default: quick
    presets: {quick: {}, slow: {rps: 1, greeting: slowly}}
steps:
""", 1)))
    values = resolve_parameters(book, {"preset": "slow", "greeting": "mine"})
    assert values["rps"] == 1.0 and values["greeting"] == "mine"
    with pytest.raises(SpecError, match="must be one of quick, slow"):
        resolve_parameters(book, {"preset": "medium"})


def test_p_without_equals_is_refused():
    assert parse_overrides(["a=1", "b=x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(SpecError, match="use -p key=value"):
        parse_overrides(["rps"])


def test_percent_list_parses_steps():
    assert percent_list("10,50,100") == [10, 50, 100]
    with pytest.raises(ValueError, match="whole percents"):
        percent_list("ten,100")


# ---- the runbook file ------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,message", [
    ("name: x\nsteps: []\n", "has no steps"),
    ("name: x\ncolour: red\nsteps: [{id: a, notebook: ECHO}]\n", r"unknown key\(s\) colour"),
    ("name: x\nsteps: [{id: a, notebook: missing.ipynb}]\n", "notebook not found"),
    ("name: x\nsteps: [{id: A-b, notebook: ECHO}]\n", "must be lower-case"),
    ("name: x\nsteps: [{id: a, notebook: ECHO, parameters: {nope: 1}}]\n", r"has no parameter\(s\) nope"),
    ("name: x\nsteps: [{id: a, notebook: ECHO, parameters: {value: '${parameters.nope}'}}]\n",
     "names unknown parameter 'nope'"),
    ("name: x\nsteps: [{id: a, notebook: ECHO, parameters: {value: '${steps.later.v}'}}, {id: later, notebook: ECHO}]\n",
     "names no earlier step"),
    ("name: x\nparameters: {rps: {default: fast, type: float}}\nsteps: [{id: a, notebook: ECHO}]\n",
     "parameter rps='fast' is not a valid float"),
])
def test_malformed_runbooks_are_refused_with_a_message(tmp_path, body, message):
    with pytest.raises(SpecError, match=message):
        load_runbook(write_runbook(tmp_path, body))


def test_the_shipped_runbooks_load_and_plan():
    for name in ("safe_rollout", "simple_rollout"):
        book = load_runbook(ROOT / "runbooks" / f"{name}.yaml")
        ids = [s.id for s in plan(book, resolve_parameters(book, {}))]
        assert ids[:3] == ["train", "register", "deploy"] and ids[-1] == "promote"
    safe = load_runbook(ROOT / "runbooks" / "safe_rollout.yaml")
    ids = [s.id for s in plan(safe, resolve_parameters(safe, {"traffic_steps": "5,25,60,100"}))]
    assert ids == ["train", "register", "deploy", "shift-5", "validate-5", "shift-25", "validate-25", "shift-60",
                   "validate-60", "promote"]


def test_seed_preset_restores_the_seeds_gate_settings():
    book = load_runbook(ROOT / "runbooks" / "safe_rollout.yaml")
    values = resolve_parameters(book, {"gate_preset": "seed"})
    gates = json.loads(values["gates"])
    assert values["rps"] == 15 and {g["preset"] for g in gates} == {"errors", "latency"}
    assert all(g["intervals"] == 5 and g["grain"] == "PT1M" for g in gates)


def test_a_bad_gate_list_is_refused_before_anything_is_deployed():
    # found only by the validate notebook, it would come after the RC was given live traffic
    book = load_runbook(ROOT / "runbooks" / "safe_rollout.yaml")
    with pytest.raises(SpecError, match=r"parameter gates=.*unknown gate kind 'bogus'"):
        resolve_parameters(book, {"gates": '[{"kind": "bogus"}]'})
    with pytest.raises(SpecError, match=r"parameter gates=.*unknown setting\(s\) treshold"):
        resolve_parameters(book, {"gates": "[{kind: threshold, preset: errors, treshold: 3}]"})
    assert resolve_parameters(book, {"gates": "aggregate"})["gates"] == "aggregate"


def test_a_gate_list_the_backend_cannot_feed_is_refused_before_anything_is_deployed():
    book = load_runbook(ROOT / "runbooks" / "safe_rollout.yaml")
    sequential = '[{"kind": "sequential", "metric": "errors"}]'
    with pytest.raises(SpecError, match=r"parameter gates: gate 'errors-sequential' \(sequential\) needs raw request "
                                        r"samples, which the azure backend does not provide: use kind: compare"):
        resolve_parameters(book, {"backend": "azure", "gates": sequential})
    assert resolve_parameters(book, {"backend": "local", "gates": sequential})["gates"] == sequential


def test_a_workspace_open_to_others_is_refused_before_the_run_starts(tmp_path, monkeypatch, capsys):
    home = tmp_path / "workspace"
    home.mkdir(mode=0o755)  # as `mkdir` makes it
    home.chmod(0o755)
    monkeypatch.setenv("SAFEROLLOUT_HOME", str(home))
    runs = tmp_path / "runs"
    assert main([str(write_runbook(tmp_path, BASIC)), "--runs-dir", str(runs)]) != 0
    err = capsys.readouterr().err
    assert f"refusing workspace folder {home}: other users may open it (mode 0755)" in err and "chmod" in err
    assert not runs.exists()  # nothing ran, no run directory was made
    home.chmod(0o700)
    assert main([str(write_runbook(tmp_path, BASIC)), "--runs-dir", str(runs)]) == 0


# ---- references and conditions --------------------------------------------------------------------------
def test_a_whole_reference_keeps_its_type_and_partial_ones_interpolate():
    ctx = {"parameters": {"n": 3, "steps": [10, 100]}, "steps": {"a": {"ok": True}}}
    assert resolve("${parameters.n}", ctx) == 3
    assert resolve("n=${parameters.n} steps=${parameters.steps}", ctx) == "n=3 steps=10,100"
    assert resolve({"x": ["${steps.a.ok}"]}, ctx) == {"x": [True]}


def test_a_missing_recorded_value_names_what_the_step_recorded():
    ctx = {"steps": {"train": {"model_dir": "/m"}}}
    with pytest.raises(SpecError, match=r"step 'train' recorded no 'metrics' \(it recorded model_dir\)"):
        resolve("${steps.train.metrics}", ctx)
    with pytest.raises(SpecError, match="step 'deploy' has not run"):
        resolve("${steps.deploy.rc}", ctx)


def test_when_expressions_allow_only_comparisons_and_logic():
    ctx = {"steps": {"deploy": {"first_release": False}}, "parameters": {"p": 50}}
    assert evaluate("not ${steps.deploy.first_release} and ${parameters.p} < 100", ctx) is True
    assert evaluate("${parameters.p} in [10, 20]", ctx) is False
    with pytest.raises(SpecError, match="may use only references"):
        evaluate("__import__('os')", ctx)


def test_read_records_reads_the_record_mimetype_and_the_last_value_wins():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("")
    cell.outputs = [nbformat.v4.new_output("display_data", data={RECORD_MIMETYPE: {"name": "x", "value": 1}}),
                    nbformat.v4.new_output("display_data", data={"text/plain": "noise"}),
                    nbformat.v4.new_output("display_data", data={RECORD_MIMETYPE: {"name": "x", "value": 2}})]
    nb.cells = [cell]
    assert read_records(nb) == {"x": 2}


# ---- running -------------------------------------------------------------------------------------------
def test_a_run_passes_recorded_values_and_writes_summary_and_report(tmp_path):
    import io

    from rich.console import Console

    out = io.StringIO()
    result = run_runbook(write_runbook(tmp_path, BASIC), {"greeting": "bonjour"}, runs_dir=tmp_path / "runs",
                         echo=False, console=Console(file=out, width=200))
    lines = out.getvalue().splitlines()
    assert [line.split()[0] + " " + line.split()[2] for line in lines if line.startswith(("ok ", "xx "))] == [
        "ok first", "ok second"]  # one verdict line per step, and no failure line for a step that passed
    assert result.status == "completed" and result.exit_code == 0
    assert result.run_dir.parent == tmp_path / "runs" and result.run_dir.name.endswith("-basic")
    assert sorted(p.name for p in result.run_dir.glob("*.ipynb")) == ["01-first.ipynb", "02-second.ipynb"]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["exit_code"] == 0 and summary["failure"] is None
    assert summary["records"]["second"] == {"echo": "bonjour again", "extra": {"rps": 10.0},
                                            "after_fail_check": True}
    assert [s["status"] for s in summary["steps"]] == ["ok", "ok"]
    assert all(s["duration_s"] > 0 for s in summary["steps"])
    report = (result.run_dir / "report.html").read_text()
    assert "echo bonjour again" in report and "<table>" in report and 'id="second"' in report


FAILING = """
name: failing
parameters:
  fail_second: {default: true}
steps:
  - {id: first, notebook: ECHO, parameters: {value: one}}
  - {id: second, notebook: ECHO, parameters: {value: two, fail: "${parameters.fail_second}"}}
  - {id: third, notebook: ECHO, parameters: {value: three}}
on_failure:
  - id: cleanup
    notebook: ECHO
    parameters: {value: "${failure.step} said ${failure.message}", fail: CLEANUP_FAILS}
"""


def test_a_failed_step_runs_on_failure_and_exits_non_zero_as_rolled_back(tmp_path):
    book = write_runbook(tmp_path, FAILING.replace("CLEANUP_FAILS", "false"))
    result = run_runbook(book, {}, runs_dir=tmp_path / "runs", echo=False)
    assert result.status == "rolled_back" and result.exit_code == 1
    summary = result.summary
    assert [(s["id"], s["status"]) for s in summary["steps"]] == [("first", "ok"), ("second", "failed"),
                                                                  ("cleanup", "ok")]
    failure = summary["failure"]
    assert failure["step"] == "second" and failure["ename"] == "ValueError" and failure["evalue"] == "boom: two"
    assert "raise ValueError" in failure["cell_source"]
    assert summary["records"]["cleanup"]["echo"] == "second said ValueError: boom: two"
    assert (result.run_dir / "03-cleanup.ipynb").exists() and not (result.run_dir / "03-third.ipynb").exists()
    assert "boom: two" in (result.run_dir / "report.html").read_text()


def test_saferollout_run_exits_1_and_reports_failed_when_on_failure_fails_too(tmp_path):
    from saferollout.cli import main as cli_main

    code = cli_main(["run", str(write_runbook(tmp_path, FAILING.replace("CLEANUP_FAILS", "true"))),
                     "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    summary = json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())
    assert code == 1 and summary["status"] == "failed" and summary["exit_code"] == 1


def test_when_skips_steps_and_where_filters_foreach_items(tmp_path):
    body = """
    name: loop
    parameters:
      steps_list: {default: "10,50,100", type: percent_list}
    steps:
      - {id: first, notebook: ECHO, parameters: {value: "yes"}}
      - foreach: ${parameters.steps_list}
        where: ${item} < 100
        steps:
          - {id: at, notebook: ECHO, parameters: {value: "at ${item}"}}
      - {id: never, notebook: ECHO, when: "${steps.first.echo} == 'no'"}
    """
    result = run_runbook(write_runbook(tmp_path, body), {"steps_list": "20,100"}, runs_dir=tmp_path, echo=False)
    assert result.exit_code == 0
    assert [(s["id"], s["status"]) for s in result.summary["steps"]] == [("first", "ok"), ("at-20", "ok"),
                                                                        ("never", "skipped")]
    assert result.summary["records"]["at-20"]["echo"] == "at 20"


def test_bad_parameters_are_refused_before_any_run_directory_exists(tmp_path, capsys):
    book = write_runbook(tmp_path, BASIC)
    code = main([str(book), "-p", "rps=fast", "-p", "nope=1", "--runs-dir", str(tmp_path / "runs")])
    assert code == 2
    assert "unknown parameter(s) nope" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_client_outcomes_count_failures_per_serving_deployment(tmp_path):
    path = tmp_path / "traffic.jsonl"
    rows = [{"status": 200, "deployment": "blue"}, {"status": 500, "deployment": "green"},
            {"status": 200, "deployment": "green"}, {"status": 404, "deployment": None}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"status\": 2")  # last line cut short
    assert client_outcomes(path) == {"blue": {"sent": 1, "ok": 1, "failed": 0},
                                     "green": {"sent": 2, "ok": 1, "failed": 1},
                                     "(none)": {"sent": 1, "ok": 0, "failed": 1}}


def test_a_run_continued_step_by_step_reads_earlier_values_from_its_directory(tmp_path):
    book = write_runbook(tmp_path, BASIC)
    run_dir = tmp_path / "runs" / "ci"
    first = run_runbook(book, {"greeting": "salut"}, run_dir=run_dir, only=["first"], echo=False)
    assert first.status == "in_progress" and first.exit_code == 0
    second = run_runbook(book, {"greeting": "salut"}, run_dir=run_dir, only=["second"], echo=False)
    assert second.status == "completed" and second.exit_code == 0
    assert [s["id"] for s in second.summary["steps"]] == ["first", "second"]
    assert second.summary["records"]["second"]["echo"] == "salut again"
    with pytest.raises(SpecError, match=r"--steps names unknown step\(s\) third"):
        run_runbook(book, {}, run_dir=run_dir, only=["third"], echo=False)


def test_kernels_get_the_callers_workspace_by_absolute_path(tmp_path, monkeypatch):
    # a relative default (./.saferollout) read from the notebooks' folder would start another platform there
    monkeypatch.delenv("SAFEROLLOUT_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    body = """
    name: home
    steps:
      - {id: where, notebook: ECHO, parameters: {value: "${parameters.x}"}}
    parameters:
      x: {default: unused}
    """
    book = write_runbook(tmp_path, body.replace('"${parameters.x}"', "here"))
    nb = tmp_path / "home.ipynb"
    nb.write_text(ECHO.read_text().replace('record(\\"echo\\", value)',
                                           'import os; record(\\"echo\\", os.environ[\\"SAFEROLLOUT_HOME\\"])'))
    book.write_text(book.read_text().replace(str(ECHO), str(nb)))
    result = run_runbook(book, {}, runs_dir=tmp_path / "runs", echo=False)
    assert result.summary["records"]["where"]["echo"] == str(tmp_path / ".saferollout")
    assert "SAFEROLLOUT_HOME" not in os.environ  # the caller's environment is left as it was


def test_a_run_resumed_in_its_directory_skips_the_steps_already_done(tmp_path):
    book = write_runbook(tmp_path, BASIC)
    run_dir = tmp_path / "runs" / "killed"
    run_runbook(book, {}, run_dir=run_dir, only=["first"], echo=False)  # as if killed after `first`
    assert json.loads((run_dir / "summary.json").read_text())["steps"][0]["status"] == "ok"
    first_output = (run_dir / "01-first.ipynb").stat().st_mtime_ns
    resumed = run_runbook(book, {}, run_dir=run_dir, echo=False)
    assert resumed.status == "completed" and resumed.summary["records"]["second"]["echo"] == "hi again"
    assert (run_dir / "01-first.ipynb").stat().st_mtime_ns == first_output


def test_only_a_live_traffic_generator_counts_as_orphaned(tmp_path):
    import subprocess
    import sys
    import time

    from saferollout.runner import orphaned_generator

    def started(proc):  # /proc/<pid>/cmdline can still show the parent's just after Popen returns
        deadline = time.monotonic() + 10
        while b"time.sleep" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        return proc

    pid_file = tmp_path / "traffic.pid"
    assert orphaned_generator(pid_file) is None  # no file
    other = started(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]))
    try:
        pid_file.write_text(str(other.pid))
        assert orphaned_generator(pid_file) is None  # a reused pid is not ours to stop
    finally:
        other.kill()
        other.wait()
    generator = started(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "saferollout.traffic"]))
    try:
        pid_file.write_text(str(generator.pid))
        assert orphaned_generator(pid_file) == generator.pid
    finally:
        generator.kill()
        generator.wait()


def test_a_runner_killed_between_steps_resumes_and_completes(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    body = """
    name: killed
    steps:
      - {id: first, notebook: ECHO, parameters: {value: one}}
      - {id: second, notebook: ECHO, parameters: {value: two, sleep_s: 60}}
      - {id: third, notebook: ECHO, parameters: {value: "${steps.first.echo} three"}}
    """
    book = write_runbook(tmp_path, body)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "saferollout", "run", str(book), "--run-dir", str(run_dir)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        for line in proc.stderr:  # kill as soon as `second` started: `first` is done and checkpointed
            if ">> 02 second" in line:
                break
        os.killpg(proc.pid, signal.SIGKILL)  # the runner and its kernel, as a crash would
    finally:
        proc.wait(timeout=30)
    killed = json.loads((run_dir / "summary.json").read_text())
    assert killed["status"] == "running" and [s["id"] for s in killed["steps"]] == ["first"]
    book.write_text(book.read_text().replace("sleep_s: 60", "sleep_s: 0"))
    resumed = run_runbook(book, {}, run_dir=run_dir, echo=False)
    assert resumed.status == "completed"
    assert [(s["id"], s["status"]) for s in resumed.summary["steps"]] == [("first", "ok"), ("second", "ok"),
                                                                          ("third", "ok")]
    assert resumed.summary["records"]["third"]["echo"] == "one three"


def test_a_run_killed_while_rolling_back_resumes_the_rollback_not_the_failed_step(tmp_path):
    import signal
    import subprocess
    import sys

    # `second` fails while a flag file exists: a gate that failed once but could pass on another look
    flag = tmp_path / "gate-fails"
    flag.write_text("")
    nb = tmp_path / "flaky.ipynb"
    nb.write_text(ECHO.read_text().replace('"if fail:\\n"', f'"fail = __import__(\\"os\\").path.exists({str(flag)!r})\\n", "if fail:\\n"'))
    body = """
    name: killed-rollback
    steps:
      - {id: first, notebook: ECHO, parameters: {value: one}}
      - {id: second, notebook: FLAKY, parameters: {value: two}}
      - {id: third, notebook: ECHO, parameters: {value: three}}
    on_failure:
      - {id: cleanup, notebook: ECHO, parameters: {value: "${failure.step}", sleep_s: 60}}
    """
    book = write_runbook(tmp_path, body.replace("FLAKY", str(nb)))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "saferollout", "run", str(book), "--run-dir", str(run_dir)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        for line in proc.stderr:  # kill as soon as the rollback started: `second` failed and is checkpointed
            if "cleanup" in line and ">>" in line:
                break
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    killed = json.loads((run_dir / "summary.json").read_text())
    assert [(s["id"], s["status"]) for s in killed["steps"]] == [("first", "ok"), ("second", "failed")]
    flag.unlink()
    book.write_text(book.read_text().replace("sleep_s: 60", "sleep_s: 0"))
    resumed = run_runbook(book, {}, run_dir=run_dir, echo=False)
    assert resumed.status == "rolled_back" and resumed.exit_code == 1
    assert [(s["id"], s["status"]) for s in resumed.summary["steps"]] == [("first", "ok"), ("second", "failed"),
                                                                          ("cleanup", "ok")]
    assert resumed.summary["failure"]["step"] == "second"
    assert resumed.summary["records"]["cleanup"]["echo"] == "second"
    assert resumed.summary["steps"][-1]["output"] == "03-cleanup.ipynb"  # numbered after the failed step


def test_live_traffic_that_cannot_start_fails_the_step_and_rolls_back(tmp_path):
    body = """
    name: no-traffic
    traffic: {endpoint: nowhere, rps: 5, backend: no-such-backend}
    steps:
      - {id: first, notebook: ECHO, parameters: {value: one}}
      - {id: shift, notebook: ECHO, parameters: {value: two}, live_traffic: true}
      - {id: third, notebook: ECHO, parameters: {value: three}}
    on_failure:
      - {id: cleanup, notebook: ECHO, parameters: {value: "${failure.step}"}}
    """
    result = run_runbook(write_runbook(tmp_path, body), {}, runs_dir=tmp_path / "runs", echo=False)
    assert result.status == "rolled_back" and result.exit_code == 1
    assert [(s["id"], s["status"]) for s in result.summary["steps"]] == [("first", "ok"), ("shift", "failed"),
                                                                        ("cleanup", "ok")]
    assert result.summary["failure"]["step"] == "shift" and "traffic generator" in result.summary["failure"]["message"]
    assert (result.run_dir / "summary.json").exists()


# ---- the user's own files, skipped steps with a reason, fallbacks, live traffic none -------------------
OWN = """
name: own
parameters:
  deployment_file: {default: "", type: deployment_file}
  endpoint_file: {default: "", type: endpoint_file}
  request_file: {default: "", type: request_file}
  model: {default: "", type: model}
  live_traffic: {default: generator, choices: [generator, none]}
traffic: {endpoint: ep-own, rps: 5, live_traffic: "${parameters.live_traffic}", request_file: "${parameters.request_file}"}
steps:
  - id: train
    notebook: ECHO
    when: ${parameters.model} == ''
    skip_reason: "nothing to train: model ${parameters.model} was given"
    parameters: {value: trained}
  - id: register
    notebook: ECHO
    live_traffic: true
    parameters: {value: "${steps.train.echo ?? 'from the user'}"}
"""


def test_a_skipped_step_records_its_reason_and_a_fallback_stands_in_for_its_values(tmp_path):
    model = tmp_path / "model.pkl"
    model.write_text("x")
    result = run_runbook(write_runbook(tmp_path, OWN), {"model": str(model), "live_traffic": "none"},
                         runs_dir=tmp_path / "runs", echo=False)
    assert result.exit_code == 0, result.summary["failure"]
    train, register = result.summary["steps"]
    assert train["status"] == "skipped" and train["skipped_because"] == f"nothing to train: model {model} was given"
    assert register["records"]["echo"] == "from the user"
    report = (result.run_dir / "report.html").read_text()
    assert f"nothing to train: model {model} was given" in report


def test_a_foreach_group_gives_its_skip_reason_to_each_step_it_skips(tmp_path):
    book = write_runbook(tmp_path, """
        name: grouped
        parameters:
          first: {default: true, type: bool}
          steps_list: {default: "10,50,100", type: percent_list}
        steps:
          - id: deploy
            notebook: ECHO
            parameters: {value: "${parameters.first}"}
          - foreach: ${parameters.steps_list}
            when: not ${parameters.first}
            skip_reason: "no traffic steps: first release ${parameters.first}"
            steps:
              - id: shift
                notebook: ECHO
                parameters: {value: "${item}"}
        """)
    result = run_runbook(book, {}, runs_dir=tmp_path / "runs", echo=False)
    assert result.exit_code == 0, result.summary["failure"]
    skipped = {s["id"]: s.get("skipped_because") for s in result.summary["steps"] if s["status"] == "skipped"}
    assert skipped == dict.fromkeys(["shift-10", "shift-50", "shift-100"], "no traffic steps: first release true")


def test_live_traffic_none_starts_no_generator_and_the_summary_and_report_say_so(tmp_path):
    result = run_runbook(write_runbook(tmp_path, OWN), {"live_traffic": "none"}, runs_dir=tmp_path / "runs", echo=False)
    assert result.exit_code == 0, result.summary["failure"]
    traffic = result.summary["traffic"]
    assert traffic["source"] == "none" and "sent" not in traffic
    assert traffic["description"] == "none: no generator ran; the gates judged the traffic real clients sent"
    assert not (result.run_dir / "traffic.jsonl").exists()
    assert "live traffic: none: no generator ran" in (result.run_dir / "report.html").read_text()


def test_a_fallback_is_used_only_when_the_first_reference_has_no_value():
    context = {"parameters": {"x": "given"}, "steps": {"train": {"model_dir": "/m"}, "skipped": {}}}
    assert resolve("${steps.train.model_dir ?? ''}", context) == "/m"
    assert resolve("${steps.skipped.model_dir ?? ''}", context) == ""
    assert resolve("${steps.skipped.model_dir ?? parameters.x}", context) == "given"
    assert resolve("${steps.skipped.n ?? 3}", context) == 3
    with pytest.raises(SpecError, match="step 'skipped' recorded no 'model_dir'"):
        resolve("${steps.skipped.model_dir}", context)


def test_a_fallback_naming_an_unknown_parameter_is_refused_when_the_runbook_loads(tmp_path):
    body = OWN.replace("${steps.train.echo ?? 'from the user'}", "${steps.train.echo ?? parameters.nosuch}")
    with pytest.raises(SpecError, match=r"names unknown parameter 'nosuch'"):
        load_runbook(write_runbook(tmp_path, body))


@pytest.mark.parametrize("name, value, message", [
    ("deployment_file", "nope.yml", "parameter deployment_file='nope.yml' is not a valid deployment_file: no such file: "),
    ("deployment_file", "BAD_DEPLOYMENT", "bad-deployment.yml: code_configuration needs both code and scoring_script"),
    ("endpoint_file", "DEPLOYMENT", "is not a valid endpoint_file: unknown key(s) in endpoint file"),
    ("request_file", "BAD_REQUESTS", "is not a valid request_file: request_file '{tmp}/bad.jsonl' line 2 is not JSON"),
    ("model", "/no/such/model", "is not a valid model: no such model file or folder (or use azureml:NAME:VERSION): "
                                "/no/such/model"),
    ("model", "azureml:", "invalid model reference 'azureml:'"),
])
def test_the_users_files_are_checked_before_anything_is_deployed(tmp_path, name, value, message):
    (tmp_path / "bad.jsonl").write_text('{"data": [1]}\n{"data": \n')
    (tmp_path / "bad-deployment.yml").write_text("name: x\nendpoint_name: y\ncode_configuration: {code: ./}\n")
    files = {"BAD_DEPLOYMENT": tmp_path / "bad-deployment.yml", "DEPLOYMENT": ROOT / "examples" / "credit-risk" /
             "deployment.yml", "BAD_REQUESTS": tmp_path / "bad.jsonl"}
    book = load_runbook(write_runbook(tmp_path, OWN))
    with pytest.raises(SpecError) as caught:
        resolve_parameters(book, {name: str(files.get(value, value))})
    assert message.format(tmp=tmp_path) in str(caught.value)


def test_the_users_files_are_passed_on_by_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    book = load_runbook(write_runbook(tmp_path, OWN))
    values = resolve_parameters(book, {"deployment_file": "examples/diabetes-regression/deployment.yml",
                                       "request_file": "examples/diabetes-regression/requests.jsonl"})
    assert values["deployment_file"] == str(ROOT / "examples" / "diabetes-regression" / "deployment.yml")
    assert values["request_file"] == str(ROOT / "examples" / "diabetes-regression" / "requests.jsonl")


def test_a_record_shows_one_short_line_in_the_notebook():
    from saferollout.runbook import one_line

    report = {"decision": "pass", "verdicts": [{"gate": "g", "evidence": {"x": list(range(50))}}] * 4,
              "started_at": 1764230000.5, "reason": "r" * 80}
    shown = one_line(report)
    assert shown.startswith('{decision: "pass", verdicts: [4 items], started_at: "2025-11-27T07:53:20Z", reason: "rr')
    assert len(shown) <= 100 and "\n" not in shown
    assert one_line({"n": 5}) == '{"n": 5}' and one_line("x" * 200).endswith("...")
    # a person reads four significant digits, and big numbers whole
    assert one_line({"first_ms": 5.859613999746216, "auc": 0.784229, "bytes": 123456.7, "ok": True}) == \
        '{"first_ms": 5.86, "auc": 0.7842, "bytes": 123457, "ok": true}'


def test_the_kernels_own_output_goes_to_the_run_directory_not_the_console(tmp_path):
    import subprocess
    import sys

    book = write_runbook(tmp_path, BASIC)
    # a relative runs dir, as `make demo` has it: the kernels run from the notebook's folder
    proc = subprocess.run([sys.executable, "-m", "saferollout", "run", str(book), "--runs-dir", "runs"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "first | echo hi" in proc.stderr  # cell output still shows, under the step's id
    assert "[IPKernelApp]" not in proc.stderr + proc.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "[IPKernelApp]" in (run_dir / "kernels.log").read_text()  # ipykernel's TCP warning, kept for reading


def test_the_plan_printed_at_the_start_lists_the_gates_and_those_left_out_with_why(tmp_path):
    """A user's model folder is registered without offline metrics: the plan says offline-quality is left out
    before anything runs; the credit demo (trained, with metrics) keeps all four gates."""
    from saferollout.runbook import resolve_parameters
    from saferollout.runner import Runner

    book = load_runbook(ROOT / "runbooks" / "safe_rollout.yaml")
    model = tmp_path / "model"
    model.mkdir()
    own = Runner(book, resolve_parameters(book, {"endpoint_name": "house", "model": str(model)}), tmp_path / "own")
    lines = own.plan_lines()
    assert lines[0].startswith("plan: train? > register > deploy > shift-10? > validate-10? > ")
    assert lines[0].endswith("; on failure: rollback  (?: decided when it comes)")
    assert lines[1] == ("gates of validate-10: errors-sequential, latency-sequential, offline-quality, "
                        "prediction-agreement")
    assert lines[2].startswith(f"  left out: offline-quality (ml_quality): the model {model} is registered "
                               "without offline metrics")
    demo = Runner(book, resolve_parameters(book, {"endpoint_name": "credit"}), tmp_path / "demo")
    assert len(demo.plan_lines()) == 2
    azure = Runner(book, resolve_parameters(book, {"endpoint_name": "credit", "backend": "azure"}), tmp_path / "az")
    assert azure.plan_lines()[1].startswith("gates of validate-10: errors-compare, latency-compare")
    given = json.dumps([{"kind": "compare", "name": "mine", "metric": "errors"}])
    assert len(Runner(book, resolve_parameters(book, {"endpoint_name": "credit", "gates": given}),
                      tmp_path / "g").plan_lines()) == 1
