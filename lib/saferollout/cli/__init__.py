"""The `saferollout` command: the `az ml` verbs, so scripts written for `az ml` run on any backend.

Replace `az ml` by `saferollout` in a script and it runs against the local platform (or, with
`--backend azure`, against Azure ML):

    saferollout online-endpoint create|show|list|update|delete|invoke|get-credentials|regenerate-keys
    saferollout online-deployment create|show|list|update|delete|get-logs
    saferollout model create|show|list
    saferollout local start|stop|status
    saferollout metrics -e ENDPOINT --metric RequestsPerMinute ... | --samples

Flags follow `az ml` (`-n`, `-e`, `-f`, `--set`, `--remove`, `--traffic`, `--query`, `-o`...), and
argparse's prefix matching gives az's abbreviations (`--endpoint` for `--endpoint-name`). az's
workspace flags (`-g`, `-w`, `--subscription`) are accepted so scripts run unchanged: the Azure backend
takes them as its settings (else its environment variables), the local backend ignores them (its one
workspace is `SAFEROLLOUT_HOME`, default `./.saferollout`).

Exit codes: 0 success, 2 usage or spec errors (`UsageError`, `SpecError`), 1 every other failure
(including an unreachable platform), 130 when interrupted. Failures print exactly one line,
`error: <message>`, on stderr; `--debug` adds the traceback. Progress of long operations goes to
stderr too, so stdout stays parseable.

The package: this module is `main` and the parser; `options` holds what every command shares, `editor`
the `--set/--remove` editor, `backend_factory` the backend a command runs against, and one module per verb
group (`endpoints`, `deployments`, `models`, `local`, `metrics`, `traffic`, `run`, `rollout`). Imports go
one way: the CLI uses the library; nothing in the library imports `saferollout.cli`.

Extending the command (the contract for `saferollout traffic`, `saferollout run` and later ones)
-----------------------------------------------------------------------------------------------
`EXTRA_COMMAND_MODULES` lists modules that add a subcommand. Each exposes

    def register(subparsers) -> None

which calls `subparsers.add_parser(...)` (pass `parents=[saferollout.cli.common_options()]` to get the
leaf flags `-o`, `--query`, `--backend`, `--debug`) and `set_defaults(handler=handler)`, where

    def handler(args: argparse.Namespace, backend_factory: Callable[[], Backend]) -> int

returns the exit code. `backend_factory()` returns the backend chosen by `--backend` (made on the first
call and reused), so a command that never needs one never starts a platform. A handler reports failures
by raising `SafeRolloutError` (or a subclass); `main` alone turns it into the one-line error and the exit
code, for every command. Results are printed with `saferollout.output.emit(result, args.output,
args.query)`. Keep heavy imports inside the handler: every `saferollout` invocation imports the
registered modules.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Sequence

from saferollout.cli import deployments, endpoints, local, metrics, models
from saferollout.cli.backend_factory import AZURE_SETTINGS_FLAGS, BackendFactory
from saferollout.cli.editor import apply_remove, apply_set, parse_assignment
from saferollout.cli.metrics import metrics_window
from saferollout.cli.options import BACKEND_ENV, ArgumentParser, common_options, name_type
from saferollout.errors import SafeRolloutError
from saferollout.output import OUTPUT_FORMATS, compile_query

__all__ = ["AZURE_SETTINGS_FLAGS", "BackendFactory", "EXTRA_COMMAND_MODULES", "apply_remove", "apply_set",
           "build_parser", "common_options", "main", "metrics_window", "name_type", "parse_assignment"]

EXTRA_COMMAND_MODULES: list[str] = ["saferollout.cli.traffic", "saferollout.cli.run", "saferollout.cli.rollout"]


def build_parser(extra_modules: Sequence[str] | None = None) -> ArgumentParser:
    """The whole command tree: the az ml verbs, local, metrics, and the registered extra commands."""
    parser = ArgumentParser(prog="saferollout", description="Safe rollouts of ML models: the az ml verbs "
                            "on the local platform or Azure ML.")
    parser.add_argument("--version", action="version", version=f"saferollout {_version()}")
    parser.add_argument("--backend", choices=("local", "azure"),
                        default=os.environ.get(BACKEND_ENV) or "local",
                        help=f"backend (default ${BACKEND_ENV}, else local)")
    parser.add_argument("-o", "--output", choices=OUTPUT_FORMATS, type=str.lower, default="json")
    parser.add_argument("--query", default=None, help="JMESPath query applied to the result")
    parser.add_argument("--debug", action="store_true", help="print the traceback of a failure")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in (endpoints, deployments, models, local, metrics):
        group.register(commands)
    for module_name in EXTRA_COMMAND_MODULES if extra_modules is None else extra_modules:
        importlib.import_module(module_name).register(commands)
    return parser


def _version() -> str:
    from saferollout import __version__

    return __version__


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "failed"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `saferollout` command; returns the exit code (0 ok, 2 usage/spec error, 1 other failure)."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        compile_query(args.query)  # a bad --query fails before anything changes
        return int(args.handler(args, BackendFactory.from_args(args)) or 0)
    except SafeRolloutError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the platform or a file could not be reached; requests' errors are OSErrors too
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(str(exc) or type(exc).__name__)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else 0
