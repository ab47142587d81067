"""`saferollout local start|stop|status`: the local platform of this workspace.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from saferollout.cli.options import (add_group, add_verb, common_options, note, print_result)


def register(commands: Any) -> None:
    common = common_options()
    verbs = add_group(commands, "local", "Start, stop or inspect the local platform of this workspace.")
    add_verb(verbs, "start", "Start the local platform (and everything it keeps) unless it runs.", common, local_start)
    add_verb(verbs, "stop", "Stop the local platform and its instances.", common, local_stop)
    add_verb(verbs, "status", "Show whether the local platform runs, its ports and deployments.", common,
          local_status)



# ---- local ----------------------------------------------------------------------------------

def local_start(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    from saferollout.backends.local.client import platform_status, start_platform
    from saferollout.backends.local.workspace import resolve_home

    home = resolve_home()
    if not platform_status(home)["running"]:
        note(f"starting the local platform for {home}")
    return print_result(args, start_platform(home))


def local_stop(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    from saferollout.backends.local.client import stop_platform
    from saferollout.backends.local.workspace import resolve_home

    home = resolve_home()
    stopped = stop_platform(home)
    note(f"stopped the local platform for {home}" if stopped else f"no local platform was running for {home}")
    return 0


def local_status(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    from saferollout.backends.local.client import platform_status

    return print_result(args, platform_status())

