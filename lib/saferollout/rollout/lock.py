"""The rollout lock: one rollout per endpoint, held in an endpoint tag, re-entrant for a resumed run.
"""
from __future__ import annotations

import getpass
import json
import os
import socket
import time

from saferollout.backends.base import Backend
from saferollout.errors import Conflict, NotFound
from saferollout.processes import pid_alive
from saferollout.rollout.state import (LOCK_TAG, parse_lock, write_state)

LOCK_SETTLE_S = 0.5  # pause between writing the lock and reading it back (see acquire_lock)


def default_owner() -> str:
    """Who holds a lock: user@host, enough for a human to find the holder."""
    try:
        user = getpass.getuser()  # USER, LOGNAME..., else the password database (CI runners set no USER)
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


RUNNER_PID_ENV = "SAFEROLLOUT_RUNNER_PID"  # set by the runbook runner for its kernels: the lock's holder


def holder_pid() -> int:
    """The process that holds a lock taken here: the runbook runner when there is one, else this process."""
    value = os.environ.get(RUNNER_PID_ENV, "")
    return int(value) if value.isdigit() else os.getpid()


def _holder_is_gone(held: dict) -> bool:
    """A lock taken on this machine by a process that no longer runs (a killed runner) holds nothing."""
    pid = held.get("pid")
    return held.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)


def acquire_lock(backend: Backend, endpoint: str, owner: str, run_id: str = "", *,
                 break_stale_after_s: float | None = None, force: bool = False) -> dict:
    """Take the endpoint's rollout lock, or raise Conflict naming its holder and how to break it.

    Re-entrant: the same owner and run id get their lock back (a resumed run). A lock older than
    `break_stale_after_s` seconds, or any lock with `force`, is broken; so is a lock whose holder ran on
    this machine and is gone (a killed runner), so that running the runbook again after a kill goes on
    to a completed rollout or a clean rollback. Tags have no compare-and-swap, so the lock is written,
    then read back after a short pause: of two runs racing, the one whose write landed last keeps it and
    the other gets Conflict.
    """
    ep = backend.get_endpoint(endpoint)
    held = parse_lock(ep.tags.get(LOCK_TAG))
    now = time.time()
    if held is not None and not (held.get("owner") == owner and held.get("run", "") == run_id):
        age = now - float(held.get("since") or 0.0)
        stale = (break_stale_after_s is not None and age > break_stale_after_s) or _holder_is_gone(held)
        if not (force or stale):
            raise Conflict(_lock_message(endpoint, held, age))
    if held is not None and held.get("owner") == owner and held.get("run", "") == run_id:
        return held
    lock = {"owner": owner, "since": now, "run": run_id, "host": socket.gethostname(), "pid": holder_pid()}
    write_state(backend, endpoint, set_tags={LOCK_TAG: json.dumps(lock, separators=(",", ":"))})
    time.sleep(LOCK_SETTLE_S)  # let a racing writer land before we read back
    mine = parse_lock(backend.get_endpoint(endpoint).tags.get(LOCK_TAG))
    if mine != lock:
        raise Conflict(_lock_message(endpoint, mine or {"owner": "unknown"}, 0.0))
    return lock


def reclaim_lock(backend: Backend, endpoint: str, run_id: str) -> dict | None:
    """A continued run takes its own lock back: the holder becomes this process, on this machine.

    The lock a run took names the runner that took it; once that runner was killed, another run could
    take the lock over (its holder is gone) while the resumed run goes on. None if the endpoint, the lock
    or a lock of this run is not there.
    """
    try:
        held = parse_lock(backend.get_endpoint(endpoint).tags.get(LOCK_TAG))
    except NotFound:
        return None
    if held is None or not run_id or held.get("run") != run_id:
        return None
    lock = dict(held, host=socket.gethostname(), pid=holder_pid())
    if lock != held:
        write_state(backend, endpoint, set_tags={LOCK_TAG: json.dumps(lock, separators=(",", ":"))})
    return lock


def _lock_message(endpoint: str, held: dict, age: float) -> str:
    run = f" (run {held['run']})" if held.get("run") else ""
    return (f"endpoint {endpoint!r} is locked by {held.get('owner')}{run} for {age:.0f} s: another rollout "
            f"is running. Wait for it to finish, or break a stale lock: `saferollout rollout unlock -n {endpoint} "
            f"--older-than SECONDS` (or `--force`), acquire_lock(..., break_stale_after_s=...) or force=True")


def release_lock(backend: Backend, endpoint: str, owner: str | None = None) -> None:
    """Remove the rollout lock; with `owner`, only if that owner holds it (Conflict otherwise)."""
    try:
        ep = backend.get_endpoint(endpoint)
    except NotFound:
        return
    held = parse_lock(ep.tags.get(LOCK_TAG))
    if held is None:
        return
    if owner is not None and held.get("owner") != owner:
        raise Conflict(f"cannot release the lock on {endpoint!r}: it is held by {held.get('owner')}, not {owner}")
    write_state(backend, endpoint, remove_tags=(LOCK_TAG,))

