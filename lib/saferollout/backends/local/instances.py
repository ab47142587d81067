"""One `azmlinfsrv` process per instance: start, readiness, liveness, restart, stop.

The user's scoring script (or, for a no-code MLflow deployment, our `mlflow_scoring.py`) runs unchanged
under the official Azure ML inference server, with `AZUREML_MODEL_DIR` pointing at the registered model as
on Azure, listening on 127.0.0.1 only (see `inference_server.py`). Each instance is a process group of its
own (the gunicorn master and its workers): the master dies with the platform (PR_SET_PDEATHSIG), the workers
die with the master, and stopping or restarting an instance signals the whole group, even when the master
is already gone, so no worker is left serving on an old port.

Each instance's stdout and stderr go to its log file under the workspace, which rotates as `platform.log`
does: past `log_max_bytes` it is copied to `<log>.1` (older copies shift to `.2`, ... up to `log_backups`) and
emptied in place. The server keeps the file open in append mode, so emptying it is safe; a line written in
the instant between the copy and the emptying may be lost (logrotate's copytruncate has the same window).
`tail` reads across the rotated files, so the recent lines are shown even just after a rotation.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httptools

from saferollout.backends.local import mlflow_scoring
from saferollout.backends.local.inference_server import die_with_parent
from saferollout.specs import ProbeSettings
READINESS_POLL_S = 0.1
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
# A starting instance (importing libraries, loading the model) runs at this niceness until it is ready, so
# that on a small machine it does not starve the instances already serving live traffic: without it, an
# RC starting on 2 cores slowed PROD into the 429 limit.
STARTUP_NICENESS = 10
LOG_MAX_BYTES = 10 * 1024 * 1024  # as platform.log (SAFEROLLOUT_LOG_MAX_BYTES)
LOG_BACKUPS = 3
LOG_CHECK_S = 5.0  # how often a running instance's log size is checked
SPARE_IDLE_S = 0.2  # a connection opened ahead that no request took by then is closed (see Instance._exchange)
GET_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _before_exec(umask: int | None) -> None:
    """Runs in the child before exec: ask Linux to SIGTERM us when the platform process dies."""
    die_with_parent(signal.SIGTERM)  # gunicorn's master then stops its workers gracefully
    os.setpgrp()  # own process group, so stop() reaches the server's workers too
    if umask is not None:  # the user's own, not the platform's private one
        os.umask(umask)
    os.nice(STARTUP_NICENESS)


def _serve_at_normal_priority(pgid: int) -> None:
    """Give a ready instance (every process of its group) the platform's own priority back."""
    try:
        os.setpriority(os.PRIO_PGRP, pgid, os.getpriority(os.PRIO_PROCESS, 0))
    except (PermissionError, ProcessLookupError):  # lowering niceness needs CAP_SYS_NICE: stay niced
        pass


def server_command() -> list[str]:
    """azmlinfsrv, bound to loopback (it takes azmlinfsrv's own arguments)."""
    return [sys.executable, "-m", "saferollout.backends.local.inference_server"]


@dataclass
class InstanceConfig:
    endpoint: str
    deployment: str
    index: int
    code_dir: str | None  # None, with scoring_script None: a no-code MLflow deployment (mlflow_scoring.py)
    scoring_script: str | None
    model_dir: str | None
    environment_variables: dict[str, str]
    readiness: ProbeSettings
    liveness: ProbeSettings
    log_path: Path
    umask: int | None = None  # the user's umask for the scoring script (the platform's own is 077)
    log_max_bytes: int = LOG_MAX_BYTES
    log_backups: int = LOG_BACKUPS


class _Exchange(asyncio.Protocol):
    """One connection to an instance, for one request: the request written in one write, the answer parsed by
    httptools on a bare protocol (no stream reader or writer). Opened before its request is known (see
    `Instance._exchange`), so it may also be closed by the instance before `send`: then `closed` is set."""

    def __init__(self, instance: str):
        self._instance = instance
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._answer: asyncio.Future[tuple[int, bytes]] | None = None
        self._body: list[bytes] = []
        self._status = 0
        self._length_given = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bytes]]:
        """Write `request`; the future resolves to (HTTP status, answer) or fails with ConnectionError."""
        self._answer = asyncio.get_running_loop().create_future()
        self._transport.write(request)  # type: ignore[union-attr]
        return self._answer

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"{exc}")

    def on_header(self, name: bytes, _value: bytes) -> None:
        if name.lower() == b"content-length":
            self._length_given = True

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_result((self._status, b"".join(self._body)))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._answer is None:  # closed by the instance before a request was sent
            self.closed = True
            return
        if self._answer.done():
            return
        if self._status and not self._length_given:  # an HTTP/1.0 answer without a length ends at close
            self._answer.set_result((self._status, b"".join(self._body)))
        else:
            self._fail(f"the connection closed {'before the answer was complete' if self._status else 'without an answer'}"
                       + (f" ({exc})" if exc else ""))

    def _fail(self, why: str) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(ConnectionError(f"{self._instance} sent an incomplete or malformed answer: {why}"))


@dataclass
class _Opened:
    """A connection to an instance opened ahead of the request that will use it."""
    task: asyncio.Task  # loop.create_connection: (transport, _Exchange)
    idle: asyncio.TimerHandle | None = None

    def discard(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        if not self.task.done():
            self.task.cancel()
        elif not self.task.cancelled() and self.task.exception() is None:  # exception() also marks it seen
            self.task.result()[1].close()


class Instance:
    """A supervised `azmlinfsrv` process serving one deployment instance on a loopback port."""

    def __init__(self, config: InstanceConfig, on_change: Callable[[], None]):
        self.config = config
        self.port = 0
        self.health_port = 0
        self.state = "new"  # new | starting | ready | restarting | failed | stopped
        self.reason = ""
        self.in_flight = 0
        self.restarts = 0
        self.process: asyncio.subprocess.Process | None = None
        self._on_change = on_change
        self._supervisor: asyncio.Task | None = None
        self._log_rotation: asyncio.Task | None = None
        self._stopping = False
        self._ready_event = asyncio.Event()
        self._opened: deque[_Opened] = deque()  # connections opened ahead, oldest first

    @property
    def name(self) -> str:
        return f"{self.config.deployment}-{self.config.index}"

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def score(self, body: bytes, content_type: str) -> tuple[int, bytes]:
        """POST `body` to this instance's /score: (HTTP status, answer). OSError if it cannot be reached."""
        return await self._exchange(
            b"POST /score HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (content_type.encode("latin-1"), len(body), body))

    async def get(self, path: str, timeout_s: float = GET_TIMEOUT_S) -> tuple[int, bytes]:
        """GET `path` from this instance (e.g. its /swagger.json): (HTTP status, answer); TimeoutError after
        `timeout_s`."""
        if not path.startswith("/") or not all(0x21 <= ord(c) < 0x7f for c in path):
            raise ValueError(f"not a path to ask an instance for: {path!r}")
        return await asyncio.wait_for(self._exchange(b"GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" % path.encode()),
                                      timeout_s)

    async def _exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send `request` on the oldest connection opened ahead (a new one if there is none), open the next one.

        The inference server's gunicorn sync worker closes every connection after one answer, so there is nothing
        to keep alive; instead the connection for the next request is opened as soon as one is taken. That takes
        the connect, and the worker's accept, out of the next request's time: at concurrency 1 on the credit model
        the gateway's p50 went from 1.06 to 1.00-1.03 of the direct path's in the medians of bench/gateway.py.
        A sync worker that accepted a connection waits on it for its request, so every request the platform sends
        an instance (scoring, mirror copies, probes, swagger) comes through here and takes the oldest connection:
        the kernel's accept queue is first in, first out, so the one connection left waiting is always the last
        in the worker's queue, and when no request comes for SPARE_IDLE_S it is closed, freeing the worker. A
        caller from outside the platform (nothing on Azure can reach an instance) may wait that long for it.
        A connection the instance closed before its request was sent, or that could not be opened, is skipped
        once for the next; an answer that breaks after the request was sent is never retried.
        """
        failure: OSError | None = None
        for _ in range(2):
            opened = self._opened.popleft() if self._opened else self._open(spare=False)
            if not self._opened:
                self._opened.append(self._open(spare=True))
            if opened.idle is not None:
                opened.idle.cancel()
            try:
                _, exchange = await opened.task
            except OSError as exc:
                failure = exc
                continue
            except asyncio.CancelledError:  # timed out while connecting: a connection made meanwhile is closed
                opened.discard()
                raise
            if exchange.closed:
                failure = ConnectionError(f"{self.name} closed the connection before the request was sent")
                continue
            try:
                return await exchange.send(request)
            finally:
                exchange.close()
        assert failure is not None
        raise failure

    def _open(self, spare: bool) -> _Opened:
        loop = asyncio.get_running_loop()
        opened = _Opened(loop.create_task(loop.create_connection(functools.partial(_Exchange, self.name),
                                                                 "127.0.0.1", self.port)))
        if spare:
            opened.idle = loop.call_later(SPARE_IDLE_S, self._drop_spare, opened)
        return opened

    def _drop_spare(self, opened: _Opened) -> None:
        """The connection opened ahead waited SPARE_IDLE_S for a request: close it, freeing the worker it holds."""
        self._opened.remove(opened)  # still there: taking or discarding it cancels this timer
        opened.discard()

    def close_connections(self) -> None:
        """Close the connections opened ahead (the instance is stopping, or restarting on a new port)."""
        while self._opened:
            self._opened.popleft().discard()

    def describe(self) -> dict:
        return {"name": self.name, "state": self.state, "port": self.port, "restarts": self.restarts,
                "pid": self.process.pid if self.process else None, "reason": self.reason}

    async def start(self) -> bool:
        """Start the process and wait until it is ready; False (with `reason`) if it never gets there."""
        self._log_rotation = asyncio.create_task(self._rotate_logs())
        ok = await self._spawn_until_ready()
        if ok:
            self._supervisor = asyncio.create_task(self._supervise())
        else:
            self._log_rotation.cancel()
        return ok

    async def _rotate_logs(self) -> None:
        """Keep the log within its size while the instance runs (its server holds the file open)."""
        cfg = self.config
        while not self._stopping:
            await asyncio.sleep(LOG_CHECK_S)
            try:
                await asyncio.to_thread(rotate_log, cfg.log_path, cfg.log_max_bytes, cfg.log_backups)
            except OSError as exc:  # a full disk must not stop the instance; the next check tries again
                logging.getLogger(__name__).warning("could not rotate %s: %s", cfg.log_path, exc)

    async def _spawn_until_ready(self) -> bool:
        self._set_state("starting")
        self.close_connections()  # opened to the old port
        self.port, self.health_port = free_port(), free_port()
        await self._spawn()
        ready = await self._wait_ready()
        if not ready:
            await self._kill()
            self._set_state("failed")
        return ready

    async def _spawn(self) -> None:
        cfg = self.config
        env = dict(os.environ)
        env.update(cfg.environment_variables)
        entry_script = Path(cfg.code_dir) / cfg.scoring_script if cfg.code_dir and cfg.scoring_script \
            else Path(mlflow_scoring.__file__)
        env["AZUREML_ENTRY_SCRIPT"] = cfg.scoring_script or entry_script.name
        if cfg.model_dir:
            env["AZUREML_MODEL_DIR"] = cfg.model_dir
        env.setdefault("WORKER_COUNT", "1")
        # Instances share this machine's cores (on Azure each has its own VM): one math thread each unless the
        # deployment or the environment says otherwise, so idle BLAS threads do not spin on shared cores.
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")
        env["PYTHONUNBUFFERED"] = "1"
        cfg.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(cfg.log_path, "ab")
        log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {self.name} on port {self.port}\n".encode())
        log.flush()
        try:
            self.process = await asyncio.create_subprocess_exec(
                *server_command(), "--entry_script", str(entry_script),
                "--port", str(self.port), "--health_port", str(self.health_port),
                cwd=cfg.code_dir or cfg.model_dir or str(cfg.log_path.parent), env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=log, preexec_fn=functools.partial(_before_exec, cfg.umask))
        finally:
            log.close()

    async def _probe(self, timeout_s: float) -> bool:
        """GET / (the inference server's health route) answers 200 within `timeout_s`."""
        try:
            status, _ = await self.get("/", timeout_s)
        except (OSError, asyncio.TimeoutError):
            return False
        return status == 200

    async def _wait_ready(self) -> bool:
        """Poll readiness until `success_threshold` passes; give up when the process exits or the budget ends.

        Locally the first probe runs at once rather than after `initial_delay`: the budget is still
        initial_delay + period * failure_threshold, as on Azure, but a fast init is noticed fast.
        """
        probe = self.config.readiness
        budget = probe.initial_delay + probe.period * probe.failure_threshold
        deadline = time.monotonic() + budget
        successes = 0
        while time.monotonic() < deadline:
            if self.process is None or self.process.returncode is not None:
                code = self.process.returncode if self.process else None
                self.reason = f"the inference server exited with code {code} before it was ready " \
                              f"(the scoring script's init() probably failed)"
                return False
            if await self._probe(probe.timeout):
                successes += 1
                if successes >= probe.success_threshold:
                    _serve_at_normal_priority(self.process.pid)
                    self._set_state("ready")
                    return True
            else:
                successes = 0
            await asyncio.sleep(READINESS_POLL_S)
        self.reason = f"readiness probe did not pass within {budget} s"
        return False

    async def _supervise(self) -> None:
        """Liveness: restart on exit or after `failure_threshold` failed probes in a row."""
        probe = self.config.liveness
        failures = 0
        while not self._stopping:
            process = self.process  # a restart below replaces it
            if process is None:
                raise RuntimeError(f"{self.name}: supervised before it was started")
            exit_wait = asyncio.create_task(process.wait())
            done, _ = await asyncio.wait({exit_wait}, timeout=probe.period)
            if self._stopping:
                exit_wait.cancel()
                return
            if exit_wait in done:
                failures = probe.failure_threshold
                self.reason = f"process exited with code {process.returncode}"
            else:
                exit_wait.cancel()
                failures = 0 if await self._probe(probe.timeout) else failures + 1
                if failures:
                    self.reason = f"liveness probe failed {failures} time(s)"
            if failures >= probe.failure_threshold:
                await self._restart()
                failures = 0

    async def _restart(self) -> None:
        self._set_state("restarting")
        await self._kill()
        delay = RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)]
        self.restarts += 1
        while not self._stopping:
            if await self._spawn_until_ready():
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_BACKOFF_S[-1])

    async def stop(self, drain_s: float = 5.0) -> None:
        """Stop taking requests, let in-flight ones finish (up to `drain_s`), then stop the process."""
        self._stopping = True
        self._set_state("stopped")
        deadline = time.monotonic() + drain_s
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in (self._supervisor, self._log_rotation):
            if task is not None:
                task.cancel()
        await self._kill()

    async def _kill(self) -> None:
        """Stop the instance's whole process group: SIGTERM, then SIGKILL whatever is left after 3 s.

        The group is signalled even when the master already exited: its workers may still be serving.
        """
        self.close_connections()  # a sync worker waiting on one would not stop at SIGTERM
        proc = self.process
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return  # nothing of the group is left
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                if proc.returncode is None:
                    try:
                        await asyncio.wait_for(proc.wait(), 0.05)
                    except asyncio.TimeoutError:
                        continue
                if not _group_alive(proc.pid):
                    return
                await asyncio.sleep(0.05)

    def _set_state(self, state: str) -> None:
        self.state = state
        self._on_change()


def group_members(pgid: int) -> list[int]:
    """The running (not zombie) processes of process group `pgid`, from /proc (Linux).

    Read as bytes with plain open(): the platform samples every instance's group every few seconds, in a thread
    that shares the GIL with the gateway, and pathlib's text reads cost three times as much per process.
    """
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split(maxsplit=3)
        except OSError:
            continue
        if len(fields) > 2 and fields[0] != b"Z" and int(fields[2]) == pgid:
            members.append(int(name))
    return members


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # orphaned workers that exited may stay zombies a while if nobody reaps them: they serve nothing
    return not Path("/proc/self/stat").exists() or bool(group_members(pgid))


def rotated_files(path: Path) -> list[Path]:
    """`path` and its rotated copies `path.1`, `path.2`, ... that exist, oldest first."""
    if not path.parent.is_dir():
        return []
    pattern = re.compile(re.escape(path.name) + r"\.(\d+)")
    numbered = [(int(match.group(1)), entry) for entry in path.parent.glob(path.name + ".*")
                if (match := pattern.fullmatch(entry.name))]
    return [entry for _, entry in sorted(numbered, reverse=True)] + ([path] if path.exists() else [])


def rotate_log(path: Path, max_bytes: int, backups: int) -> bool:
    """Past `max_bytes`, copy the log to `path.1` (shifting older copies, keeping `backups`) and empty it.

    Copy and empty rather than rename: the instance's server writes to the file it opened (in append mode),
    so the same file must stay in place. True if it rotated.
    """
    try:
        if path.stat().st_size < max_bytes:
            return False
    except FileNotFoundError:
        return False
    for old in rotated_files(path)[:-1]:
        number = int(old.name.rsplit(".", 1)[1])
        if number >= backups:
            old.unlink(missing_ok=True)
        else:
            old.replace(old.with_name(f"{path.name}.{number + 1}"))
    if backups > 0:
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    os.truncate(path, 0)
    return True


def tail(path: Path, lines: int | None = None) -> str:
    """The last `lines` lines of a log (all of it if None), read on into its rotated copies when needed."""
    kept: deque[str] = deque(maxlen=lines)
    for part in rotated_files(path):
        with open(part, "r", errors="replace") as handle:
            kept.extend(handle)
    return "".join(kept)
