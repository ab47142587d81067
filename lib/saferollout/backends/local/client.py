"""The client side of the local platform: start it on demand (one per workspace), ask its status, stop it.

What `LocalBackend`, the CLI and the runner need, without the platform's own imports: the platform runs in
its own process (`python -m saferollout.backends.local.daemon`), which a client spawns and waits for.
"""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from saferollout.backends.local.workspace import LOG_NAME, OUTPUT_NAME, admin_token, resolve_home
from saferollout.errors import BackendError
from saferollout.processes import pid_alive


START_TIMEOUT_S = 120.0


def _read_info(home: Path) -> dict[str, Any] | None:
    try:
        return json.loads((home / "platform.json").read_text())
    except (OSError, ValueError):
        return None


def _status(home: Path, info: dict[str, Any], timeout: float = 2.0) -> dict[str, Any] | None:
    try:
        resp = requests.get(f"http://127.0.0.1:{info['control_port']}/api/status",
                            headers={"Authorization": f"Bearer {admin_token(home)}"}, timeout=timeout)
        return resp.json() if resp.status_code == 200 else None
    except requests.RequestException:
        return None


def platform_status(home: str | os.PathLike | None = None) -> dict[str, Any]:
    """{'running': bool, ...status fields} for the workspace at `home`."""
    home = resolve_home(home)
    info = _read_info(home)
    if info and pid_alive(info["pid"]):
        status = _status(home, info)
        if status:
            return {"running": True, **status}
    return {"running": False, "home": str(home)}


def start_platform(home: str | os.PathLike | None = None, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
    """Start the platform for `home` unless it runs; return once every kept deployment is back.

    If the platform process exits while we wait, fail at once with the reason it gave.
    """
    home = resolve_home(home)
    admin_token(home)  # the workspace made (or checked) private, and its token, before any platform
    with open(home / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two clients starting at once start one platform
        status = platform_status(home)
        process = None if status["running"] else _spawn(home)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = platform_status(home)
            if status["running"] and status.get("reconciled"):
                return status
            if process is not None and process.poll() is not None:
                raise BackendError(f"the local platform for {home} did not start: {_exit_reason(home, process)}")
            time.sleep(0.1)
    raise BackendError(f"the local platform did not start within {timeout:.0f} s; see {home / LOG_NAME}")


def _exit_reason(home: Path, process: subprocess.Popen) -> str:
    """The last `error:` line the platform printed, else its last line, else its exit code."""
    try:
        lines = [line.strip() for line in (home / OUTPUT_NAME).read_text(errors="replace").splitlines()]
    except OSError:
        lines = []
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("error:")]
    reason = (errors or lines or [f"it exited with code {process.returncode}"])[-1]
    return reason.removeprefix("error: ") + f" (see {home / LOG_NAME})"


def _spawn(home: Path) -> subprocess.Popen:
    stale = home / "platform.json"
    if stale.exists():
        stale.unlink()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[3]),
                                                      env.get("PYTHONPATH")]))
    fd = os.open(home / OUTPUT_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "saferollout.backends.local.daemon", "--home", str(home)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                env=env, cwd=str(home))


def stop_platform(home: str | os.PathLike | None = None, timeout: float = 30.0) -> bool:
    """Stop the platform gracefully (instances drained and stopped); False if none was running."""
    home = resolve_home(home)
    info = _read_info(home)
    if not info or not pid_alive(info["pid"]):
        return False
    try:
        requests.post(f"http://127.0.0.1:{info['control_port']}/api/shutdown",
                      headers={"Authorization": f"Bearer {admin_token(home)}"}, timeout=5)
    except requests.RequestException:
        os.kill(info["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(info["pid"]):
        time.sleep(0.05)
    if pid_alive(info["pid"]):
        os.kill(info["pid"], signal.SIGKILL)
    return True
