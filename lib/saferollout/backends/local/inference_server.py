"""An instance's process: Azure's own inference server (`azmlinfsrv`), bound to loopback, workers tied to it.

`azmlinfsrv` hard-codes gunicorn's bind address to 0.0.0.0 (`amlserver.DEFAULT_HOST`, passed as `-b` on the
command line, so neither a gunicorn config file nor `GUNICORN_CMD_ARGS` can override it). This entry point
runs the very same `amlserver.run()` (its argument parsing, environment, logging config and gunicorn
settings, serving `azureml_inference_server_http.server.entry:app`) with that one constant set to 127.0.0.1.

The gunicorn master dies with the platform (PR_SET_PDEATHSIG, set by instances.py before exec); each worker
it forks asks Linux to kill it when the master dies, so a `kill -9` of the master never leaves a worker
serving on the old port (gunicorn's sync worker would otherwise notice only after `timeout / 2` seconds).

    python -m saferollout.backends.local.inference_server --entry_script score.py --port 5001
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

LOOPBACK = "127.0.0.1"
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent exits (no-op where prctl is missing)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(PR_SET_PDEATHSIG, sig)


_master_pid = 0
_forked_by = 0


def _before_fork() -> None:
    global _forked_by
    _forked_by = os.getpid()


def _after_fork_in_child() -> None:
    """In a process gunicorn's master just forked (a worker); a fork in user code is left alone."""
    if _forked_by != _master_pid:
        return
    die_with_parent(signal.SIGKILL)
    if os.getppid() != _master_pid:  # the master died between fork and prctl
        os._exit(1)


def main() -> None:
    from azureml_inference_server_http import amlserver

    if getattr(amlserver, "DEFAULT_HOST", None) is None:
        sys.exit("error: this azureml-inference-server-http has no amlserver.DEFAULT_HOST; "
                 "saferollout cannot bind its instances to loopback with it")
    global _master_pid
    amlserver.DEFAULT_HOST = LOOPBACK
    _master_pid = os.getpid()
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)  # gunicorn uses os.fork
    _no_control_socket()
    sys.argv[0] = "azmlinfsrv"
    amlserver.run()


def _no_control_socket() -> None:
    """gunicorn 25.1+ opens a control socket by default (`gunicornc` resizes, reloads or stops the server through
    it) at $XDG_RUNTIME_DIR/gunicorn.ctl or ~/.gunicorn/gunicorn.ctl: one path outside the workspace for every
    instance, each new one taking it over. The platform alone manages its instances, so it is turned off, through
    GUNICORN_CMD_ARGS (azmlinfsrv builds gunicorn's command line itself; gunicorn adds these settings to it)."""
    from gunicorn import config

    if hasattr(config, "ControlSocketDisable"):
        os.environ["GUNICORN_CMD_ARGS"] = f"{os.environ.get('GUNICORN_CMD_ARGS', '')} --no-control-socket".strip()


if __name__ == "__main__":
    main()
