"""Fault injection for the real runner: run `saferollout run` and SIGKILL it (or the platform) at a chosen point.

Everything goes through the `saferollout` command and the public `saferollout.get_backend`, so the harness
does not depend on the package's inner layout. A kill point is a line of the runner's console output (a step
boundary is `ok NN <step>`, a step's start `>> NN <step>`, a line a notebook prints `  <step> | ...`) and a
delay after it. Killing the runner kills its whole process tree (the runner, its kernels and its traffic
generator: jupyter and the generator each start a new session, so a process group would miss them), as a
lost CI machine or laptop would. The platform is started by the harness, outside that tree.

While a run goes on, a `TrafficSampler` reads the endpoint every few hundred milliseconds and records any
moment live traffic sits on a deployment that is missing or not Succeeded (or tagged failed).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "runbooks" / "safe_rollout.yaml"
BIN = Path(sys.executable).parent / "saferollout"
ROLLOUT_TAGS = ("PROD_DEPLOYMENT", "RC_DEPLOYMENT", "OLD_PROD_DEPLOYMENT", "ROLLOUT_LOCK", "RC_SMOKE_TESTED",
                "RC_GATES_PASSED", "BASELINE_DEPLOYMENT")

# Short windows so one rollout takes about a minute: no server error from the RC in two 5-second intervals
# that saw its requests, within 20 s. 429s are left out: on a busy 2-core machine one-instance deployments
# shed load (PROD as much as the RC), which is the machine's noise, not the model's.
QUICK_GATES = json.dumps([{"kind": "threshold", "name": "quick-errors", "metric": "RequestsPerMinute",
                           "aggregation": "Total", "condition": "lte", "threshold": 0, "grain": "PT5S",
                           "intervals": 2,
                           "filter": "deployment eq '{rc}' and (statusCodeClass eq '5xx' or statusCode eq '424')"}])
QUICK = {"gates": QUICK_GATES, "gate_window_s": 20, "bake_window_s": 17, "poll_s": 1, "rps": 10,
         "warmup_requests": 5, "traffic_steps": "50,100"}
RUN_TIMEOUT_S = 420.0  # one invocation of the runbook, killed or not (a busy 2-core machine)


# ---- processes ------------------------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (by /proc children), parents first."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        found.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                queue += [int(p) for p in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
            except OSError:
                pass
    return found


def kill_tree(pid: int, spare: set[int] = frozenset()) -> list[int]:
    """SIGKILL `pid` and its descendants (stopped first, so none forks or cleans up in between)."""
    tree = [p for p in descendants(pid) if p not in spare]
    for p in tree:
        try:
            os.kill(p, signal.SIGSTOP)
        except OSError:
            pass
    tree = list(dict.fromkeys(tree + [p for q in tree for p in descendants(q) if p not in spare]))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    return tree


def cli(home: Path, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, SAFEROLLOUT_HOME=str(home))
    done = subprocess.run([str(BIN), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and done.returncode != 0:
        raise RuntimeError(f"saferollout {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
    return done


@contextlib.contextmanager
def first_release(home: Path, endpoint: str) -> Iterator[tuple[Path, str, Path]]:
    """A private platform in `home` with `endpoint` at its first release: (home, endpoint, runs folder).

    The platform is stopped at the end, even when the first release or a test fails.
    """
    os.chmod(home, 0o700)
    runs = home / "runs"
    try:
        cli(home, "local", "start", timeout=180)
        first = run_runbook(home, endpoint, None, runs)
        assert first.returncode == 0, first.tail
        yield home, endpoint, runs
    finally:
        cli(home, "local", "stop", timeout=120, check=False)


def platform_pid(home: Path) -> int | None:
    try:
        return int(json.loads((home / "platform.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


# ---- one invocation of the runbook ------------------------------------------------------------------

@dataclass
class KillPoint:
    """Kill when a console line matches `pattern`, `delay_s` after it; `target` is "runner" or "platform"."""

    name: str
    pattern: str | None  # None: never (the run goes to its end)
    delay_s: float = 0.0
    target: str = "runner"
    restart_after_s: float = 1.0  # platform kills: the harness starts it again this long after


@dataclass
class Invocation:
    command: list[str]
    returncode: int | None
    output: list[str]
    killed_at: float | None = None
    killed_pids: list[int] = field(default_factory=list)
    platform_down_s: float | None = None
    duration_s: float = 0.0
    matched: str | None = None

    @property
    def tail(self) -> str:
        return "\n".join(self.output[-40:])


def run_runbook(home: Path, endpoint: str, run_dir: Path | None, runs_dir: Path, kill: KillPoint | None = None,
                extra: dict[str, Any] | None = None, timeout_s: float = RUN_TIMEOUT_S) -> Invocation:
    """`saferollout run runbooks/safe_rollout.yaml` (resuming `run_dir` if given), killed at `kill`."""
    parameters = {**QUICK, "endpoint_name": endpoint, **(extra or {})}
    command = [str(BIN), "run", str(RUNBOOK)]
    for key, value in parameters.items():
        command += ["-p", f"{key}={value}"]
    command += ["-p", f"runs_dir={runs_dir}"]
    if run_dir is not None:
        command += ["--run-dir", str(run_dir)]
    env = dict(os.environ, SAFEROLLOUT_HOME=str(home), PYTHONUNBUFFERED="1", COLUMNS="200", TERM="dumb")
    started = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, start_new_session=True, bufsize=1)
    result = Invocation(command, None, [])
    pattern = re.compile(kill.pattern) if kill and kill.pattern else None
    fire_at: float | None = None
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen = 0
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if now - started > timeout_s:
                kill_tree(proc.pid, spare=_platform_tree(home))
                raise TimeoutError(f"saferollout run did not end within {timeout_s:.0f} s:\n" + "\n".join(lines[-40:]))
            while seen < len(lines):
                line = lines[seen]
                seen += 1
                if pattern is not None and fire_at is None and pattern.search(line):
                    fire_at, result.matched = now + kill.delay_s, line
            if fire_at is not None and now >= fire_at and result.killed_at is None:
                assert kill is not None
                result.killed_at = time.time()
                if kill.target == "runner":
                    result.killed_pids = kill_tree(proc.pid, spare=_platform_tree(home))
                else:
                    result.platform_down_s = kill_platform(home, kill.restart_after_s)
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid, spare=_platform_tree(home))
        proc.wait(timeout=30)
        reader.join(timeout=10)
    result.returncode, result.output = proc.returncode, lines
    result.duration_s = time.monotonic() - started
    return result


def _platform_tree(home: Path) -> set[int]:
    pid = platform_pid(home)
    return set(descendants(pid)) if pid else set()


def kill_platform(home: Path, restart_after_s: float) -> float:
    """SIGKILL the platform process (its instances keep running as orphans, as after a crash), wait, start
    it again with `saferollout local start`; returns the seconds the control plane and gateway were down.
    A client may restart it on demand before we do: then that is the restart."""
    pid = platform_pid(home)
    if pid is None:
        raise RuntimeError(f"no platform runs for {home}")
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    time.sleep(restart_after_s)
    cli(home, "local", "start", timeout=180)
    return time.monotonic() - killed


def run_dir_of(invocation: Invocation) -> Path | None:
    for line in invocation.output:
        match = re.search(r"^run \S+ -> (.+)$", line.strip())
        if match:
            return Path(match.group(1).strip())
    return None


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


# ---- watching the endpoint ------------------------------------------------------------------------

class TrafficSampler(threading.Thread):
    """Reads the endpoint's traffic and deployments every `interval_s`; records each sample in which live
    traffic sits on a deployment that is missing, not Succeeded, or tagged as the failed RC."""

    def __init__(self, home: Path, endpoint: str, interval_s: float = 0.25):
        super().__init__(daemon=True)
        self.home, self.endpoint, self.interval_s = home, endpoint, interval_s
        self.samples = 0
        self.unreachable = 0  # samples taken while the platform was down
        self.violations: list[dict[str, Any]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        os.environ["SAFEROLLOUT_HOME"] = str(self.home)
        from saferollout import get_backend

        backend = get_backend("local")
        while not self._halt.is_set():
            try:
                self.check(backend)
            except Exception:  # noqa: BLE001 (the platform is down, or restarting)
                self.unreachable += 1
            self._halt.wait(self.interval_s)

    def check(self, backend: Any) -> None:
        ep = backend.get_endpoint(self.endpoint)
        deployments = {d.name: d for d in backend.list_deployments(self.endpoint)}
        self.samples += 1
        failed_rc = ep.tags.get("FAILED_RC_DEPLOYMENT")
        for name, percent in {**ep.traffic, **(ep.mirror_traffic or {})}.items():
            if not percent:
                continue
            state = deployments[name].provisioning_state if name in deployments else "missing"
            if state != "Succeeded" or name == failed_rc:
                self.violations.append({"at": time.time(), "deployment": name, "percent": percent, "state": state,
                                        "failed_rc": failed_rc, "traffic": dict(ep.traffic)})

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def endpoint_problems(home: Path, endpoint: str) -> tuple[list[str], dict[str, Any]]:
    """What is wrong with the endpoint after a rollout ended (completed or rolled back), and what it is."""
    os.environ["SAFEROLLOUT_HOME"] = str(home)
    from saferollout import get_backend

    backend = get_backend("local")
    ep = backend.get_endpoint(endpoint)
    deployments = {d.name: d.provisioning_state for d in backend.list_deployments(endpoint)}
    tags = {k: v for k, v in ep.tags.items() if k in ROLLOUT_TAGS or k in ("FAILED_RC_DEPLOYMENT",)}
    state = {"traffic": dict(ep.traffic), "mirror": dict(ep.mirror_traffic or {}), "tags": tags,
             "deployments": deployments}
    problems = []
    prod = ep.tags.get("PROD_DEPLOYMENT")
    if not prod or deployments.get(prod) != "Succeeded":
        problems.append(f"PROD {prod!r} is not a Succeeded deployment ({deployments})")
    if ep.traffic.get(prod or "", 0) != 100:
        problems.append(f"PROD {prod!r} does not have 100% of the traffic: {ep.traffic}")
    for tag in ("ROLLOUT_LOCK", "RC_DEPLOYMENT", "OLD_PROD_DEPLOYMENT", "BASELINE_DEPLOYMENT", "RC_SMOKE_TESTED",
                "RC_GATES_PASSED"):
        if ep.tags.get(tag):
            problems.append(f"tag {tag} is left: {ep.tags[tag]}")
    if any(ep.mirror_traffic.values()) if ep.mirror_traffic else False:
        problems.append(f"mirror traffic left on: {ep.mirror_traffic}")
    extra = sorted(set(deployments) - {prod, ep.tags.get("FAILED_RC_DEPLOYMENT")})
    if extra:
        problems.append(f"deployments left beside PROD and the failed RC: {extra}")
    return problems, state


def client_failures(run_dir: Path, since: float | None = None, until: float | None = None) -> dict[str, Any]:
    """The generator's client-side outcomes in `traffic.jsonl`: failed requests by serving deployment and
    status, optionally only those sent in [since, until]."""
    path = run_dir / "traffic.jsonl"
    counts: dict[str, Any] = {"sent": 0, "failed": 0, "by": {}}
    if not path.exists():
        return counts
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        sent = float(row.get("ts") or 0)
        if since is not None and sent and sent < since:
            continue
        if until is not None and sent and sent > until:
            continue
        counts["sent"] += 1
        status = row.get("status")
        if not (isinstance(status, int) and 200 <= status < 300):
            counts["failed"] += 1
            key = f"{row.get('deployment') or '(none)'}:{status}"
            counts["by"][key] = counts["by"].get(key, 0) + 1
    return counts
