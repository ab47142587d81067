"""Execute a runbook: papermill runs each step's notebook into runs/<UTC timestamp>-<runbook>/NN-<step>.ipynb.

The executed notebooks are the record (papermill keeps timings, parameters and the failing cell in them);
`summary.json` indexes them (status, step timings, recorded values, gate verdicts, failure, client-side
traffic) and `report.html` renders them for a browser. Live traffic (saferollout.traffic) runs in a separate
process from the first `live_traffic` step to the end of the run, on_failure steps included, so a rollback
is observed by the same clients that saw the failure.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from rich.console import Console
from rich.text import Text

from saferollout.errors import SpecError
from saferollout.expressions import evaluate, resolve
from saferollout.records import GATE_RECORD, LEFT_OUT_RECORD, PROD_RECORD, one_line, read_records
from saferollout.runbook import LIVE_TRAFFIC, Runbook, Step, load_runbook, plan, resolve_parameters

REQUEST_LOG_LINE = re.compile(r"gunicorn\.access|azmlinfsrv - (GET|POST|HEAD) /")  # a model server's per-request line
STATUS_COMPLETED, STATUS_FAILED, STATUS_ROLLED_BACK = "completed", "failed", "rolled_back"
STATUS_IN_PROGRESS = "in_progress"  # a run continued step by step, with steps still to come
STATUS_RUNNING = "running"  # written after each step while the run goes on (a killed run keeps it)


@dataclass
class StepResult:
    id: str
    notebook: str
    output: str = ""
    status: str = "pending"  # ok | failed | skipped
    started_at: float | None = None
    duration_s: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)
    skipped_because: str = ""
    error: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RunResult:
    run_dir: Path
    status: str
    summary: dict[str, Any]

    @property
    def exit_code(self) -> int:
        return exit_code(self.status)


def exit_code(status: str) -> int:
    """0 when the rollout completed (or, run step by step, when the steps asked for did); 1 otherwise."""
    return 0 if status in (STATUS_COMPLETED, STATUS_IN_PROGRESS) else 1


def _load_previous(run_dir: Path) -> dict[str, Any]:
    """What earlier invocations on this run directory did: step results, recorded values, failure."""
    previous: dict[str, Any] = {"steps": [], "records": {}, "failure": None, "traffic": None, "started_at": None,
                                "last_index": 0}
    path = run_dir / "summary.json"
    if not path.exists():
        return previous
    summary = json.loads(path.read_text())
    previous["steps"] = [StepResult(**step) for step in summary.get("steps", [])]
    for result in previous["steps"]:
        output = run_dir / result.output if result.output else None
        previous["records"][result.id] = read_records(output) if output and output.exists() else result.records
        if result.output:
            previous["last_index"] = max(previous["last_index"], int(result.output.split("-", 1)[0]))
    previous.update({k: summary.get(k) for k in ("failure", "traffic", "started_at")})
    return previous


class _Echo:
    """A file-like sink for papermill's stdout/stderr: prints kernel output lines under the step's id, but
    not the inference server's per-request lines a notebook may show (they stay in the notebook)."""

    def __init__(self, console: Console, step_id: str, enabled: bool):
        self.console, self.step_id, self.enabled, self._buffer = console, step_id, enabled, ""

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            if self.enabled and line.strip() and not REQUEST_LOG_LINE.search(line):
                self.console.print(Text.assemble((f"  {self.step_id} | ", "dim"), line), soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass


KERNEL_LOG = "kernels.log"


def kernel_manager_for(run_dir: Path) -> type:
    """A kernel manager class whose kernel processes write their own output (ipykernel's warning that it
    talks TCP without encryption, the output of processes a kernel starts) to `run_dir/kernels.log` instead
    of the runner's console. Cell output is not affected: it reaches the console through papermill."""
    from jupyter_client.manager import AsyncKernelManager

    log_path = (Path(run_dir) / KERNEL_LOG).resolve()  # papermill runs the kernel from the notebook's folder

    class RunKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
            with log_path.open("ab") as log:
                await super()._async_launch_kernel(kernel_cmd, **{**kw, "stdout": log, "stderr": log})

    return RunKernelManager


def new_run_dir(runs_dir: str | Path, name: str) -> Path:
    """runs/<UTC timestamp>-<runbook>, made unique if two runs start within the same second."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = Path(runs_dir) / f"{stamp}-{name}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def _failure(step: Step, exc: BaseException) -> dict[str, Any]:
    """What went wrong, with the failing cell when papermill tells us which one."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        return {"step": step.id, "ename": exc.ename, "evalue": exc.evalue, "message": f"{exc.ename}: {exc.evalue}",
                "cell_index": exc.cell_index, "execution_count": exc.exec_count, "cell_source": exc.source}
    return {"step": step.id, "ename": type(exc).__name__, "evalue": str(exc),
            "message": f"{type(exc).__name__}: {exc}", "cell_index": None, "execution_count": None,
            "cell_source": None}


class Runner:
    """Runs one planned runbook into one run directory."""

    def __init__(self, book: Runbook, parameters: Mapping[str, Any], run_dir: Path, *,
                 console: Console | None = None, echo: bool = True, kernel_name: str = "python3",
                 only: set[str] | None = None):
        self.book, self.parameters, self.run_dir = book, dict(parameters), run_dir
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.echo, self.kernel_name = echo, kernel_name
        self.steps = plan(book, parameters)
        self.results: list[StepResult] = []
        self.recorded: dict[str, dict[str, Any]] = {}
        self.traffic_proc: Any = None
        self.traffic_source: dict[str, Any] | None = None  # which live traffic the gates judged (live_traffic)
        self.traffic_started_at: float | None = None
        self.started_at = time.time()
        self.only = only
        self.previous = _load_previous(run_dir)  # a run continued step by step (one CI job per step)
        self.recorded.update({sid: records for sid, records in self.previous["records"].items()})

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def context(self, failure: dict[str, Any] | None = None) -> dict[str, Any]:
        ctx: dict[str, Any] = {"parameters": self.parameters, "steps": self.recorded,
                               "run": {"id": self.run_id, "dir": str(self.run_dir.resolve()),
                                       "started_at": self.started_at}}
        if failure is not None:
            ctx["failure"] = failure
        return ctx

    def plan_lines(self) -> list[str]:
        """The plan, for the console: the steps in order (a `when` runs or skips each when it comes), and for
        a gated step with a named gate list (auto, aggregate) the gates it holds and those known now to be
        left out, with why; the validate step leaves out the rest it finds without evidence, and says so."""
        on_failure = ", ".join(s.id for s in self.book.on_failure)
        lines = ["plan: " + " > ".join(s.id + ("?" if s.when else "") for s in self.steps)
                 + (f"; on failure: {on_failure}" if on_failure else "") + "  (?: decided when it comes)"]
        ctx = self.context()
        for step in self.steps:
            if "gates" not in step.parameters:
                continue
            try:
                gates = resolve(step.parameters["gates"], ctx)
            except SpecError:
                continue
            from saferollout.gates.registry import preview_gates  # imported when a plan has a gated step

            preview = preview_gates(gates, self.parameters)
            if preview is not None:
                names, left_out = preview
                lines.append(f"gates of {step.id}: {', '.join(names)}")
                lines += [f"  left out: {g['name']} ({g['kind']}): {g['reason']}" for g in left_out]
                break  # every gated step of the plan holds the same named list
        return lines

    # ---- one step -----------------------------------------------------------------------------------
    def execute(self, step: Step, index: int, failure: dict[str, Any] | None = None) -> StepResult:
        import papermill

        result = StepResult(step.id, str(step.notebook))
        self.results.append(result)
        ctx = self.context(failure)
        try:
            if step.when and not evaluate(step.when, ctx):
                reason = str(resolve(step.skip_reason, ctx)) if step.skip_reason else f"when: {step.when}"
                result.status, result.skipped_because = "skipped", reason
                self.recorded[step.id] = {}
                self.console.print(f"[dim]-- {index:02d} {step.id}: skipped ({reason})[/dim]", highlight=False)
                return result
            result.parameters = resolve(step.parameters, ctx)
        except SpecError as exc:
            result.status, result.error = "failed", _failure(step, exc)
            self.console.print(f"[red]xx {index:02d} {step.id}: {exc}[/red]")
            return result
        if step.live_traffic:
            try:
                self.start_traffic()
            except Exception as exc:  # noqa: BLE001 (no live traffic for the gates: the step fails, on_failure runs)
                result.status, result.error = "failed", _failure(step, exc)
                self.recorded[step.id] = result.records
                self.checkpoint()
                self.console.print(f"[red]xx {index:02d} {step.id}: {exc}[/red]", highlight=False)
                return result
        output = self.run_dir / f"{index:02d}-{step.id}.ipynb"
        result.output, result.started_at = output.name, time.time()
        self.console.print(f"[bold]>> {index:02d} {step.id}[/bold] ({step.notebook.name})")
        sink = _Echo(self.console, step.id, self.echo)
        try:
            papermill.execute_notebook(str(step.notebook), str(output), parameters=result.parameters,
                                       kernel_name=self.kernel_name, progress_bar=False, stdout_file=sink,
                                       stderr_file=sink, cwd=str(step.notebook.parent),
                                       kernel_manager_class=kernel_manager_for(self.run_dir))
            result.status = "ok"
        except Exception as exc:  # noqa: BLE001 (any failure of a step is recorded, then on_failure runs)
            result.status, result.error = "failed", _failure(step, exc)
        result.duration_s = round(time.time() - result.started_at, 3)
        if output.exists():
            result.records = read_records(output)
        self.recorded[step.id] = result.records
        self.checkpoint()
        if result.status == "ok":
            shown = ", ".join(f"{k}={_short(v)}" for k, v in result.records.items()
                              if k not in (GATE_RECORD, LEFT_OUT_RECORD))
            self.console.print(f"[green]ok {index:02d} {step.id}[/green] {result.duration_s:.1f}s {shown}",
                               highlight=False)
        else:
            message = (result.error or {}).get("message", "")
            self.console.print(f"[red]xx {index:02d} {step.id}[/red] {result.duration_s:.1f}s {message}",
                               highlight=False)
        for gate in result.records.get(LEFT_OUT_RECORD) or []:
            self.console.print(f"[yellow]   {step.id} left out gate {gate.get('name')} ({gate.get('kind')}): "
                               f"{gate.get('reason')}[/yellow]", highlight=False)
        return result

    # ---- live traffic ---------------------------------------------------------------------------------
    def live_traffic(self) -> dict[str, Any]:
        """Which live traffic the gates judge: `generator` (ours, replaying the request file or the credit
        rows) or `none` (the traffic real clients send, the normal case on Azure)."""
        settings = resolve(self.book.traffic, self.context())
        source = str(settings.get("live_traffic") or "generator")
        if source not in LIVE_TRAFFIC:
            raise SpecError(f"live_traffic must be one of {', '.join(LIVE_TRAFFIC)}, got {source!r}")
        if source == "none":
            return {"source": "none", "endpoint": settings.get("endpoint"),
                    "description": "none: no generator ran; the gates judged the traffic real clients sent"}
        request_file = str(settings.get("request_file") or "")
        replayed = request_file or "held-out German credit rows"
        return {"source": "generator", "endpoint": settings.get("endpoint"), "rps": settings.get("rps"),
                "request_file": request_file or None,
                "description": f"generator: {settings.get('rps')} rps replaying {replayed}"}

    def start_traffic(self) -> None:
        if self.traffic_proc is not None or self.traffic_source is not None or not self.book.traffic:
            return
        from saferollout import traffic

        settings = resolve(self.book.traffic, self.context())
        self.traffic_source = self.live_traffic()
        self.console.print(f"[cyan]~~ live traffic to {settings.get('endpoint')}: "
                           f"{self.traffic_source['description']}[/cyan]", highlight=False)
        if self.traffic_source["source"] == "none":
            return
        self.traffic_started_at = time.time()
        self.traffic_proc = traffic.start_background(
            str(settings["endpoint"]), float(settings.get("rps") or 10), duration_s=None,
            results_path=self.run_dir / "traffic.jsonl", backend=str(settings.get("backend") or "local"),
            home=os.environ.get("SAFEROLLOUT_HOME"), stop_with_pid=os.getpid(),
            request_file=self.traffic_source.get("request_file"))

    def stop_orphaned_traffic(self) -> None:
        """A run killed while its live traffic flowed left the generator running: stop it before resuming."""
        from saferollout import traffic

        pid = orphaned_generator(self.run_dir / "traffic.pid")
        if pid is not None:
            self.console.print(f"[yellow]stopping the live traffic a killed invocation left running (pid {pid})[/yellow]")
            traffic.stop_background(pid)
        (self.run_dir / "traffic.pid").unlink(missing_ok=True)

    def stop_traffic(self) -> dict[str, Any] | None:
        if self.traffic_proc is None:
            return dict(self.traffic_source) if self.traffic_source else None
        from saferollout import traffic

        result = traffic.stop_background(self.traffic_proc)
        self.traffic_proc = None
        (self.run_dir / "traffic.pid").unlink(missing_ok=True)  # only a killed run leaves its pid behind
        path = self.run_dir / "traffic.jsonl"
        if result is None and path.exists():
            result = traffic.summarize(path)
        summary = result.to_dict() if result is not None else {}
        summary["per_deployment"] = client_outcomes(path)
        summary["results_file"] = path.name
        return {**(self.traffic_source or {}), **summary}

    def reclaim_lock(self) -> None:
        """A continued run (resumed, or the next CI job) holds its rollout lock as this runner process."""
        if not self.previous["steps"] or not self.book.traffic:
            return
        from saferollout import get_backend, rollout

        settings = resolve(self.book.traffic, self.context())
        backend = get_backend(str(settings.get("backend") or "local"))
        if rollout.reclaim_lock(backend, str(settings["endpoint"]), self.run_id) is not None:
            self.console.print(f"[dim]== the rollout lock on {settings['endpoint']} is held by this runner again[/dim]")

    # ---- the whole run ----------------------------------------------------------------------------------
    def _selected(self, step: Step) -> bool:
        """Run this step now? With --steps, if named; otherwise unless an earlier invocation on this run
        directory completed it (a resumed run: the rollout's own state is read from the endpoint)."""
        if self.only is not None:
            return step.id in self.only
        done = any(r.id == step.id and r.status == "ok" for r in self.previous["steps"])
        if done:
            self.console.print(f"[dim]== {step.id}: done in an earlier invocation of this run[/dim]")
        return not done

    def run(self) -> RunResult:
        started = self.started_at = time.time()
        self.console.print(f"[bold]run {self.run_id}[/bold] -> {self.run_dir}")
        for line in self.plan_lines():
            self.console.print(f"[dim]{line}[/dim]", highlight=False)
        self.stop_orphaned_traffic()
        self.reclaim_lock()
        failure: dict[str, Any] | None = self.earlier_failure()
        on_failure_ok: bool | None = None
        try:
            for index, step in enumerate(self.steps, start=1):
                if failure is not None:  # an earlier invocation failed (killed while rolling back): roll back
                    break
                if not self._selected(step):
                    continue
                result = self.execute(step, index)
                if result.status == "failed":
                    failure = result.error
                    break
            requested = [s for s in self.book.on_failure if self.only is not None and s.id in self.only]
            if failure is not None or requested:
                # a failure here rolls back at once; a job may also ask for on_failure steps by id (CI)
                failure = failure or self.previous["failure"] or {"step": "unknown", "message": "rollback requested",
                                                                  "ename": "", "evalue": ""}
                on_failure_ok = True
                executed = [int(r.output.split("-", 1)[0]) for r in self.results if r.output]
                number = max([self.previous["last_index"], len(self.steps)] if self.only is not None
                             else [self.previous["last_index"], *executed, len(self.results)]) + 1
                for offset, step in enumerate(self.book.on_failure, start=number):
                    on_failure_ok = self.execute(step, offset, failure).status != "failed" and on_failure_ok
        finally:
            traffic_summary = self.stop_traffic()
        status = self.status(failure, on_failure_ok)
        summary = self.summary(status, started, failure, traffic_summary)
        from saferollout.report import write_report, write_summary

        write_summary(self.run_dir, summary)
        try:
            write_report(self.run_dir, summary, self.timeline(summary))
        except Exception as exc:  # noqa: BLE001 (the run's outcome stands even if rendering fails)
            self.console.print(f"[yellow]report.html not written: {exc}[/yellow]")
        colour = "green" if status in (STATUS_COMPLETED, STATUS_IN_PROGRESS) else "red"
        self.console.print(f"[bold {colour}]{status}[/bold {colour}] in {summary['duration_s']:.0f}s: "
                           f"{self.run_dir / 'summary.json'}, {self.run_dir / 'report.html'}")
        return RunResult(self.run_dir, status, summary)

    def timeline(self, summary: dict[str, Any]) -> str:
        """The report's rollout timeline, from the endpoint's metrics over the run; empty (with a note on the
        console) when the runbook names no endpoint or its metrics cannot be read."""
        if not self.book.traffic or not any(PROD_RECORD in r.records for r in self.merged_results()):
            return ""  # nothing was deployed by this run: no endpoint to draw (nor a platform to start)
        from saferollout import get_backend
        from saferollout.report import rollout_timeline

        settings = resolve(self.book.traffic, self.context())
        try:
            backend = get_backend(str(settings.get("backend") or "local"))
            return rollout_timeline(backend, str(settings["endpoint"]), summary, backend.finest_grain)
        except Exception as exc:  # noqa: BLE001 (the report is written without it)
            self.console.print(f"[yellow]no rollout timeline in report.html: {exc}[/yellow]", highlight=False)
            return ""

    def earlier_failure(self) -> dict[str, Any] | None:
        """A resumed run (not step by step) whose earlier invocation had a step fail: that failure, so the run
        goes on to on_failure. Running the failed step again could pass a gate that failed, and promote."""
        if self.only is not None:
            return None
        planned = {s.id for s in self.steps}
        failed = [r for r in self.previous["steps"] if r.id in planned and r.status == "failed"]
        return (self.previous["failure"] or failed[-1].error) if failed else None

    def checkpoint(self) -> None:
        """summary.json after every step (status `running`): a killed run leaves its record, and resumes from it."""
        from saferollout.report import write_summary

        write_summary(self.run_dir, self.summary(STATUS_RUNNING, self.started_at, None, None))

    def status(self, failure: dict[str, Any] | None, on_failure_ok: bool | None) -> str:
        if failure is not None:
            return STATUS_ROLLED_BACK if on_failure_ok else STATUS_FAILED
        done = {r.id for r in self.merged_results() if r.status in ("ok", "skipped")}
        return STATUS_COMPLETED if all(s.id in done for s in self.steps) else STATUS_IN_PROGRESS

    def merged_results(self) -> list[StepResult]:
        """This invocation's step results, after those of earlier invocations on the same run directory."""
        now = {r.id for r in self.results}
        return [r for r in self.previous["steps"] if r.id not in now] + self.results

    def summary(self, status: str, started: float, failure: dict[str, Any] | None,
                traffic_summary: dict[str, Any] | None) -> dict[str, Any]:
        ended = time.time()
        results = self.merged_results()
        gates = {r.id: r.records[GATE_RECORD] for r in results if GATE_RECORD in r.records}
        return {
            "runbook": self.book.name, "runbook_path": str(self.book.path), "run_id": self.run_id,
            "status": status, "exit_code": exit_code(status),
            "first_release": any(r.records.get("first_release") is True for r in results),
            "started_at": self.previous["started_at"] or started, "ended_at": ended,
            "duration_s": round(ended - (self.previous["started_at"] or started), 3),
            "parameters": self.parameters,
            "steps": [r.to_dict() for r in results],
            "records": {r.id: {k: v for k, v in r.records.items() if k != GATE_RECORD} for r in results},
            "gates": {step: {"decision": g.get("decision"),
                             "verdicts": g.get("verdicts", [])} for step, g in gates.items()},
            "gates_left_out": {r.id: r.records[LEFT_OUT_RECORD] for r in results if r.records.get(LEFT_OUT_RECORD)},
            "failure": failure, "traffic": traffic_summary or self.previous["traffic"], "python": sys.executable,
        }


def orphaned_generator(pid_file: Path) -> int | None:
    """The pid in `pid_file` if that process is still a saferollout traffic generator (a pid may be reused)."""
    try:
        pid = int(pid_file.read_text().strip())
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except (OSError, ValueError):
        return None
    return pid if b"saferollout.traffic" in command else None


def client_outcomes(results_path: Path) -> dict[str, dict[str, int]]:
    """Client-side outcome per serving deployment from the traffic results file: sent, ok, failed."""
    outcomes: dict[str, dict[str, int]] = {}
    if not results_path.exists():
        return outcomes
    for line in results_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short when the generator was stopped
        counts = outcomes.setdefault(str(row.get("deployment") or "(none)"), {"sent": 0, "ok": 0, "failed": 0})
        counts["sent"] += 1
        status = row.get("status")
        counts["ok" if isinstance(status, int) and 200 <= status < 300 else "failed"] += 1
    return outcomes


def _short(value: Any, width: int = 60) -> str:
    if not isinstance(value, str):
        return one_line(value, width)
    return value if len(value) <= width else value[:width - 3] + "..."


def check_local_workspace() -> None:
    """The local workspace, if it exists, is the user's own and closed to others (BackendError naming the file
    and the fix); a missing one is created private by the platform later."""
    from saferollout.backends.local.workspace import check_workspace, resolve_home

    home = resolve_home()
    if home.exists() or home.is_symlink():
        check_workspace(home)


def run_runbook(path: str | Path, overrides: Mapping[str, Any] | None = None, *, runs_dir: str | Path | None = None,
                console: Console | None = None, echo: bool = True, run_dir: str | Path | None = None,
                only: list[str] | None = None) -> RunResult:
    """Load, validate (before anything runs) and execute a runbook; returns the run's result.

    `run_dir` continues a run in that directory (it is created if missing) and `only` runs just the named
    steps there, reading earlier steps' recorded values from the directory: one CI job per step.
    """
    book = load_runbook(path)
    overrides = dict(overrides or {})
    parameters = resolve_parameters(book, overrides)
    runs_dir = runs_dir or parameters.get("runs_dir") or "runs"
    if "runs_dir" in parameters:
        parameters["runs_dir"] = str(runs_dir)
    steps = plan(book, parameters)  # expansion errors surface before the run directory exists
    if str(parameters.get("backend") or "local") == "local":
        check_local_workspace()  # refused now, not at the first step that starts the platform

    if only is not None:
        known = [s.id for s in steps] + [s.id for s in book.on_failure]
        unknown = sorted(set(only) - set(known))
        if unknown:
            raise SpecError(f"--steps names unknown step(s) {', '.join(unknown)}; this plan has {', '.join(known)}")
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        target = Path(run_dir)
    else:
        target = new_run_dir(runs_dir, book.name)
    runner = Runner(book, parameters, target, console=console, echo=echo, only=set(only) if only is not None else None)
    # kernels run in the notebooks' folder: give them (and the traffic process) this workspace by absolute path,
    # or a relative default (./.saferollout) would name another platform there
    from saferollout.backends.local.workspace import resolve_home

    # and the runner's pid, so a rollout lock taken in a kernel names this process as its holder: if the
    # runner is killed, running the runbook again finds the lock's holder gone and may take it over
    from saferollout.rollout import RUNNER_PID_ENV

    settings = {"SAFEROLLOUT_HOME": str(resolve_home()), RUNNER_PID_ENV: str(os.getpid())}
    previous = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        return runner.run()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
