"""One `azmlinfsrv` process per instance: start, readiness, liveness, restart, stop.

The user's scoring script runs unchanged under the official Azure ML inference server, with
`AZUREML_MODEL_DIR` pointing at the registered model as on Azure, listening on 127.0.0.1 only (see
`inference_server.py`). Each instance is a process group of its own (the gunicorn master and its workers):
the master dies with the platform (PR_SET_PDEATHSIG), the workers die with the master, and stopping or
restarting an instance signals the whole group, even when the master is already gone, so no worker is
left serving on an old port.
"""
from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import aiohttp

from saferollout.backends.local.inference_server import die_with_parent
from saferollout.specs import ProbeSettings
READINESS_POLL_S = 0.1
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
# A starting instance (importing libraries, loading the model) runs at this niceness until it is ready, so
# that on a small machine it does not starve the instances already serving live traffic: without it, an
# RC starting on 2 cores slowed PROD into the 429 limit.
STARTUP_NICENESS = 10


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
    code_dir: str
    scoring_script: str
    model_dir: str | None
    environment_variables: dict[str, str]
    readiness: ProbeSettings
    liveness: ProbeSettings
    log_path: Path
    umask: int | None = None  # the user's umask for the scoring script (the platform's own is 077)


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
        self._stopping = False
        self._ready_event = asyncio.Event()

    @property
    def name(self) -> str:
        return f"{self.config.deployment}-{self.config.index}"

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def score(self, body: bytes, content_type: str) -> tuple[int, bytes]:
        """POST `body` to this instance's /score: (HTTP status, answer). OSError if it cannot be reached.

        One HTTP/1.0 exchange on a fresh connection, sent in one write. The inference server's gunicorn sync
        worker closes every connection after one answer, so a pooling client has nothing to reuse; this
        costs about 40% less CPU per request than aiohttp's client (measured for bench/gateway.py).
        """
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(b"POST /score HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: %s\r\nContent-Length: %d"
                         b"\r\n\r\n%s" % (content_type.encode("latin-1"), len(body), body))
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(head[0].split(" ", 2)[1])
            length = next((int(line.split(":", 1)[1]) for line in head[1:]
                           if line.lower().startswith("content-length:")), None)
            return status, await (reader.read() if length is None else reader.readexactly(length))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as exc:
            raise ConnectionError(f"{self.name} sent an incomplete or malformed answer: {exc}") from exc
        finally:
            writer.close()

    async def get(self, path: str) -> tuple[int, bytes]:
        """GET `path` from this instance (e.g. its /swagger.json): (HTTP status, answer)."""
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{self.port}{path}",
                                   timeout=aiohttp.ClientTimeout(total=30)) as resp:
                return resp.status, await resp.read()

    def describe(self) -> dict:
        return {"name": self.name, "state": self.state, "port": self.port, "restarts": self.restarts,
                "pid": self.process.pid if self.process else None, "reason": self.reason}

    async def start(self) -> bool:
        """Start the process and wait until it is ready; False (with `reason`) if it never gets there."""
        ok = await self._spawn_until_ready()
        if ok:
            self._supervisor = asyncio.create_task(self._supervise())
        return ok

    async def _spawn_until_ready(self) -> bool:
        self._set_state("starting")
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
        env["AZUREML_ENTRY_SCRIPT"] = cfg.scoring_script
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
                *server_command(), "--entry_script", str(Path(cfg.code_dir) / cfg.scoring_script),
                "--port", str(self.port), "--health_port", str(self.health_port), cwd=cfg.code_dir, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=log, preexec_fn=functools.partial(_before_exec, cfg.umask))
        finally:
            log.close()

    async def _probe(self, session: aiohttp.ClientSession, timeout_s: float) -> bool:
        try:
            async with session.get(f"http://127.0.0.1:{self.port}/",
                                   timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def _wait_ready(self) -> bool:
        """Poll readiness until `success_threshold` passes; give up when the process exits or the budget ends.

        Locally the first probe runs at once rather than after `initial_delay`: the budget is still
        initial_delay + period * failure_threshold, as on Azure, but a fast init is noticed fast.
        """
        probe = self.config.readiness
        budget = probe.initial_delay + probe.period * probe.failure_threshold
        deadline = time.monotonic() + budget
        successes = 0
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process is None or self.process.returncode is not None:
                    code = self.process.returncode if self.process else None
                    self.reason = f"the inference server exited with code {code} before it was ready " \
                                  f"(the scoring script's init() probably failed)"
                    return False
                if await self._probe(session, probe.timeout):
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
        async with aiohttp.ClientSession() as session:
            while not self._stopping:
                exit_wait = asyncio.create_task(self.process.wait())
                done, _ = await asyncio.wait({exit_wait}, timeout=probe.period)
                if self._stopping:
                    exit_wait.cancel()
                    return
                if exit_wait in done:
                    failures = probe.failure_threshold
                    self.reason = f"process exited with code {self.process.returncode}"
                else:
                    exit_wait.cancel()
                    failures = 0 if await self._probe(session, probe.timeout) else failures + 1
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
        if self._supervisor is not None:
            self._supervisor.cancel()
        await self._kill()

    async def _kill(self) -> None:
        """Stop the instance's whole process group: SIGTERM, then SIGKILL whatever is left after 3 s.

        The group is signalled even when the master already exited: its workers may still be serving.
        """
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
    """The running (not zombie) processes of process group `pgid`, from /proc (Linux)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
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


def tail(path: Path, lines: int | None = None) -> str:
    if not path.exists():
        return ""
    with open(path, "r", errors="replace") as handle:
        if lines is None:
            return handle.read()
        return "".join(deque(handle, maxlen=lines))
