"""Live-traffic simulator: replay request bodies to an endpoint at a fixed rate, like production clients.

The schedule is open-loop: request i is sent at `start + i / rps` whether or not earlier requests have
answered, as independent clients would, so a slow deployment does not slow the load down and hide its
own latency (a closed loop would). Requests in flight are bounded (`max_in_flight`); a tick that finds
the bound reached is counted as `dropped`, not sent late. Each request's client-side outcome is appended
to a JSON-lines file as it completes, so the record survives a kill:

    {"ts": 1764230000.12, "status": 200, "deployment": "green", "latency_ms": 11.3, "request_id": "..."}

`status` is 0 when no answer came back (connection refused, client timeout); `error` then says why.

`saferollout traffic -n ENDPOINT --rps R --duration D` (`saferollout.cli.traffic`) replays held-out rows of
the German credit data, or the bodies of a request file (`--request-file`, see `load_request_bodies`);
`python -m saferollout.traffic ...` is the same command, which `start_background` runs as a detached process
for the gates of a runbook.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Sequence

from saferollout.errors import BackendError, SpecError
from saferollout.processes import pid_alive

DEFAULT_MAX_IN_FLIGHT = 32
DEFAULT_TIMEOUT_S = 30.0
UNBOUNDED_CAP_S = 4 * 3600.0  # a background generator nobody stops still ends (a runner that died)
PROGRESS_EVERY_S = 0.5
START_TIMEOUT_S = 60.0  # a background process imports pandas and loads the data before its first request
NO_DEPLOYMENT = "(none)"


@dataclass
class TrafficResult:
    """Client-side outcome of a traffic run: counts, statuses, who served, latency percentiles."""

    sent: int = 0
    ok: int = 0
    failed: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    by_deployment: dict[str, int] = field(default_factory=dict)
    latencies_ms: dict[str, float | None] = field(default_factory=dict)  # p50, p90, p99, mean, max
    started_at: float = 0.0
    ended_at: float = 0.0
    dropped: int = 0  # ticks skipped because max_in_flight requests were still waiting
    rps: float = 0.0  # the target rate
    failed_by_deployment: dict[str, int] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return max(0.0, self.ended_at - self.started_at)

    def to_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "ok": self.ok, "failed": self.failed, "dropped": self.dropped,
                "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                "by_deployment": dict(sorted(self.by_deployment.items())),
                "failed_by_deployment": dict(sorted(self.failed_by_deployment.items())),
                "latencies_ms": dict(self.latencies_ms), "started_at": self.started_at,
                "ended_at": self.ended_at, "duration_s": round(self.duration_s, 3), "rps": self.rps}

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]], *, started_at: float | None = None,
                     ended_at: float | None = None, dropped: int = 0, rps: float = 0.0) -> "TrafficResult":
        result = cls(dropped=dropped, rps=rps)
        latencies: list[float] = []
        first = last = None
        for row in records:
            status = int(row.get("status") or 0)
            deployment = str(row.get("deployment") or NO_DEPLOYMENT)
            result.sent += 1
            result.by_status[status] = result.by_status.get(status, 0) + 1
            result.by_deployment[deployment] = result.by_deployment.get(deployment, 0) + 1
            if 200 <= status < 300:
                result.ok += 1
            else:
                result.failed_by_deployment[deployment] = result.failed_by_deployment.get(deployment, 0) + 1
            if status:
                latencies.append(float(row.get("latency_ms") or 0.0))
            ts = float(row.get("ts") or 0.0)
            first = ts if first is None else min(first, ts)
            last = ts if last is None else max(last, ts + float(row.get("latency_ms") or 0.0) / 1000.0)
        result.failed = result.sent - result.ok
        result.latencies_ms = latency_summary(latencies)
        result.started_at = started_at if started_at is not None else (first or 0.0)
        result.ended_at = ended_at if ended_at is not None else (last or result.started_at)
        return result


def load_request_bodies(path: str | Path) -> list[bytes]:
    """The request bodies of a user's request file: one JSON body (what `az ml online-endpoint invoke
    --request-file` takes), or a `.jsonl` file with one body per line (blank lines skipped).

    Each body is sent as the file holds it (re-encoded compactly). SpecError names the file, and the line,
    of anything that is not a JSON body.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"request_file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix == ".jsonl":
        lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    else:
        lines = [(0, text)]
    bodies = []
    for number, line in lines:
        try:
            body = json.loads(line)
        except ValueError as exc:
            where = f" line {number}" if number else ""
            several = not number and "Extra data" in str(exc)
            hint = " (one body per line? name the file .jsonl)" if several else ""
            raise SpecError(f"request_file {str(path)!r}{where} is not JSON: {exc}{hint}") from None
        bodies.append(json.dumps(body).encode())
    if not bodies:
        raise SpecError(f"request_file {str(path)!r} holds no request body")
    return bodies


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/mean/max in milliseconds; None for each when there were no answers."""
    if not latencies_ms:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    import numpy as np

    values = np.asarray(latencies_ms, dtype=float)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3),
            "mean": round(float(values.mean()), 3), "max": round(float(values.max()), 3)}


class LoadGenerator:
    """Replays `bodies` round-robin to `endpoint` at `rps` (open-loop) from a thread pool.

    `duration_s=None` runs until `stop()`. `progress`, if given, is called about twice a second with the
    running TrafficResult. Use `run()` to block for the duration, or `start()` ... `stop()`.
    """

    def __init__(self, backend: Any, endpoint: str, bodies: list[bytes], rps: float,
                 duration_s: float | None = None, *, results_path: str | Path | None = None,
                 progress: Callable[[TrafficResult], None] | None = None,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, timeout_s: float = DEFAULT_TIMEOUT_S):
        if not bodies:
            raise SpecError("the load generator needs at least one request body")
        if not rps or rps <= 0:
            raise SpecError(f"rps must be a positive number, got {rps!r}")
        if duration_s is not None and duration_s < 0:
            raise SpecError(f"duration must be positive, got {duration_s!r}")
        if max_in_flight < 1:
            raise SpecError(f"max_in_flight must be at least 1, got {max_in_flight!r}")
        self.backend = backend
        self.endpoint = endpoint
        self.bodies = list(bodies)
        self.rps = float(rps)
        self.duration_s = duration_s
        self.results_path = Path(results_path) if results_path is not None else None
        self.progress = progress
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []
        self._in_flight = 0
        self._dropped = 0
        self._file: IO[str] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._scheduler: threading.Thread | None = None
        self._started_at = 0.0
        self._ended_at: float | None = None

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin sending on schedule from a background thread; returns at once."""
        if self._scheduler is not None:
            raise RuntimeError("this load generator was already started")
        if self.results_path is not None:
            self.results_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.results_path.open("a", buffering=1)  # line-buffered: every record lands
        self._pool = ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="traffic")
        self._started_at = time.time()
        self._scheduler = threading.Thread(target=self._schedule, name="traffic-scheduler", daemon=True)
        self._scheduler.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the schedule ends (the duration is over, or stop() was called); True if it did."""
        if self._scheduler is None:
            return True
        self._scheduler.join(timeout)
        return not self._scheduler.is_alive()

    def request_stop(self) -> None:
        """End the schedule soon (safe from a signal handler); stop() then collects the result."""
        self._stop.set()

    def stop(self) -> TrafficResult:
        """Stop scheduling, wait for the requests in flight, close the results file, return the result."""
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._ended_at is None:
            self._ended_at = time.time()
        if self._file is not None:
            self._file.close()
            self._file = None
        result = self.snapshot()
        if self.progress is not None:
            self.progress(result)
        return result

    def run(self) -> TrafficResult:
        """Send for `duration_s` (until interrupted when None) and return the result."""
        self.start()
        try:
            self.wait()
        finally:
            result = self.stop()
        return result

    def snapshot(self) -> TrafficResult:
        """The result so far (requests still in flight are not counted yet)."""
        with self._lock:
            records = list(self._records)
            dropped = self._dropped
        ended = self._ended_at if self._ended_at is not None else time.time()
        return TrafficResult.from_records(records, started_at=self._started_at, ended_at=ended, dropped=dropped,
                                          rps=self.rps)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ---- the schedule -----------------------------------------------------------------------------
    def _schedule(self) -> None:
        origin = time.monotonic()
        limit = self.duration_s if self.duration_s is not None else UNBOUNDED_CAP_S
        next_progress = origin + PROGRESS_EVERY_S
        index = 0
        assert self._pool is not None
        while not self._stop.is_set():
            offset = index / self.rps  # seconds after the start (compared as such: no float drift)
            if offset >= limit:
                break
            delay = origin + offset - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            with self._lock:
                full = self._in_flight >= self.max_in_flight
                if full:
                    self._dropped += 1
                else:
                    self._in_flight += 1
            if not full:
                self._pool.submit(self._send, self.bodies[index % len(self.bodies)])
            index += 1
            now = time.monotonic()
            if self.progress is not None and now >= next_progress:
                next_progress = now + PROGRESS_EVERY_S
                self.progress(self.snapshot())
        self._ended_at = time.time()

    def _send(self, body: bytes) -> None:
        sent_at = time.time()
        record: dict[str, Any]
        try:
            answer = self.backend.invoke(self.endpoint, body, timeout_s=self.timeout_s)
            record = {"ts": round(sent_at, 6), "status": answer.status, "deployment": answer.deployment,
                      "latency_ms": round(answer.latency_ms, 3), "request_id": answer.request_id}
        except Exception as exc:  # no answer at all is an outcome to record, not a crash of the generator
            record = {"ts": round(sent_at, 6), "status": 0, "deployment": None,
                      "latency_ms": round((time.time() - sent_at) * 1000.0, 3), "request_id": None,
                      "error": " ".join(str(exc).split())[:300] or type(exc).__name__}
        with self._lock:
            self._records.append(record)
            self._in_flight -= 1
            if self._file is not None:
                self._file.write(json.dumps(record) + "\n")


# ---- results files ------------------------------------------------------------------------------

def read_results(results_path: str | Path) -> list[dict[str, Any]]:
    """The records of a results file; a last line cut short by a kill is skipped."""
    path = Path(results_path)
    if not path.exists():
        raise SpecError(f"traffic results file not found: {path}")
    records = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            records.append(row)
    return records


def summarize(results_path: str | Path) -> TrafficResult:
    """The TrafficResult of a JSON-lines results file written by a LoadGenerator."""
    return TrafficResult.from_records(read_results(results_path))


# ---- the background process ---------------------------------------------------------------------

def start_background(endpoint: str, rps: float, *, duration_s: float | None, results_path: str | Path,
                     backend: str = "local", home: str | None = None, batch_size: int = 1,
                     wait_started: bool = True, stop_with_pid: int | None = None,
                     request_file: str | Path | None = None) -> subprocess.Popen:
    """Run `python -m saferollout.traffic` (the `saferollout traffic` command) detached from the caller.

    Its output goes to `<results>.log` and its pid to `<results>.pid`. With `wait_started`, returns once
    the generator has begun (its results file exists), or raises BackendError with the log if it died.
    `duration_s=None` runs until `stop_background` (at most UNBOUNDED_CAP_S), or until the process
    `stop_with_pid` ends (a runner that was killed leaves no live traffic behind). `request_file` replays
    the user's request bodies instead of the German credit rows.
    """
    results_path = Path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "saferollout.traffic", "-n", endpoint, "--rps", str(rps),
               "--duration", str(duration_s if duration_s else 0), "--results", str(results_path),
               "--batch-size", str(batch_size), "--backend", backend, "--quiet", "-o", "none"]
    if stop_with_pid is not None:
        command += ["--stop-with", str(stop_with_pid)]
    if request_file:
        command += ["--request-file", str(Path(request_file).resolve())]
    env = dict(os.environ)
    if home:
        env["SAFEROLLOUT_HOME"] = str(home)
    log_path = results_path.with_suffix(".log")
    with log_path.open("ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    proc.results_path = results_path  # type: ignore[attr-defined]  # for stop_background
    results_path.with_suffix(".pid").write_text(str(proc.pid))
    if wait_started:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not results_path.exists():
            if proc.poll() is not None:
                raise BackendError(f"the traffic generator exited with code {proc.returncode} before sending: "
                                   f"{_tail(log_path)}")
            if time.monotonic() > deadline:
                stop_background(proc)
                raise BackendError(f"the traffic generator did not start within {START_TIMEOUT_S:.0f} s: "
                                   f"{_tail(log_path)}")
            time.sleep(0.1)
    return proc


def stop_background(proc: subprocess.Popen | int | str | Path, timeout_s: float = 20.0) -> TrafficResult | None:
    """Stop a background generator (a Popen, a pid, or its results path) and summarize its results.

    SIGTERM lets it finish the requests in flight and close its file; SIGKILL follows after `timeout_s`.
    Returns None when there is no results file to read.
    """
    results_path: Path | None = None
    if isinstance(proc, (str, Path)):
        results_path = Path(proc)
        pid_file = results_path.with_suffix(".pid")
        if pid_file.exists():
            _stop_pid(int(pid_file.read_text()), timeout_s)
    elif isinstance(proc, int):
        _stop_pid(proc, timeout_s)
    else:
        results_path = getattr(proc, "results_path", None)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if results_path is None or not Path(results_path).exists():
        return None
    return summarize(results_path)


def _stop_pid(pid: int, timeout_s: float) -> None:
    """Stop a generator we did not start ourselves (no Popen): SIGTERM, wait for it to go, SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"
