"""The platform process: `python -m saferollout.backends.local.daemon --home HOME`, one per workspace.

One per workspace (`SAFEROLLOUT_HOME`, default `./.saferollout`). Clients start it on demand
(`client.start_platform`); `saferollout local stop` stops it. It serves two loopback ports: the gateway
(stable, kept in the store so scoring URIs survive restarts) and the control API (authenticated with the
workspace admin token kept in a 0600 file). On start it reads the store and brings every deployment back.
"""

import argparse
import asyncio
import fcntl
import json
import logging
import logging.handlers
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from saferollout.backends.local.gateway import run_event_loop
from saferollout.backends.local.control import control_app
from saferollout.backends.local.instances import free_port
from saferollout.backends.local.platform import Platform
from saferollout.backends.local.workspace import LOG_NAME, PRIVATE_UMASK, log_max_bytes, private_home, resolve_home
from saferollout.errors import SafeRolloutError

log = logging.getLogger("saferollout.platform")


async def serve(home: Path, user_umask: int | None = None) -> int:
    platform = Platform(home, user_umask=user_umask)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, platform.stopping.set)
    control_runner = web.AppRunner(control_app(platform), access_log=None)
    await control_runner.setup()
    platform.restore()
    try:
        gateway_server = await platform.gateway.serve("127.0.0.1", platform.gateway_port, backlog=1024)
    except OSError as exc:
        print(f"error: gateway port {platform.gateway_port} is in use ({exc}); scoring URIs are stable, so free "
              "it or remove the workspace", file=sys.stderr)
        return 3
    platform.control_port = free_port()
    await web.TCPSite(control_runner, "127.0.0.1", platform.control_port).start()
    info = {"pid": os.getpid(), "control_port": platform.control_port, "gateway_port": platform.gateway_port,
            "started_at": platform.started_at}
    tmp = home / "platform.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.replace(home / "platform.json")
    reconcile = asyncio.create_task(platform.reconcile())
    sampler = asyncio.create_task(platform.sample_instances())
    await platform.stopping.wait()
    reconcile.cancel()
    sampler.cancel()
    await gateway_server.close()  # stop accepting; answers under way finish first, and are recorded
    await platform.gateway.close()
    await platform.shutdown()
    await control_runner.cleanup()
    info_path = home / "platform.json"
    if info_path.exists() and json.loads(info_path.read_text()).get("pid") == os.getpid():
        info_path.unlink()
    return 0


def setup_logging(home: Path) -> None:
    """platform.log, rotated (SAFEROLLOUT_LOG_MAX_BYTES, default 10 MB, three old files kept)."""
    handler = logging.handlers.RotatingFileHandler(home / LOG_NAME, maxBytes=log_max_bytes(), backupCount=3)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saferollout-platform")
    parser.add_argument("--home", default=None)
    args = parser.parse_args(argv)
    home = resolve_home(args.home)
    user_umask = os.umask(PRIVATE_UMASK)  # every file the platform writes is private from its first byte
    try:
        private_home(home)
        setup_logging(home)
    except SafeRolloutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    lock = open(home / "platform.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"error: a platform is already running for {home}", file=sys.stderr)
        return 3
    try:
        return run_event_loop(serve(home, user_umask))
    except Exception as exc:  # the reason goes to the log, and (one line) to the client waiting for us
        log.exception("the platform stopped: %s", exc)
        print(f"error: the platform stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
