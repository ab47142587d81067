"""Options and output every `saferollout` command shares: the parser that fails in one line, the leaf
flags (`-o`, `--query`, `--backend`, `--debug`), name flags checked by Azure's rules, and progress on stderr.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from saferollout.errors import (SafeRolloutError, SpecError, UsageError)
from saferollout.output import OUTPUT_FORMATS, emit
from saferollout.specs import (validate_model_name, validate_name)


BACKEND_ENV = "SAFEROLLOUT_BACKEND"

Handler = Callable[[argparse.Namespace, Callable[[], Any]], int]


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def common_options() -> ArgumentParser:
    """Leaf-level options every subcommand accepts, as `az` accepts them after the verb."""
    parent = ArgumentParser(add_help=False)
    parent.add_argument("-o", "--output", choices=OUTPUT_FORMATS, type=str.lower,
                        default=argparse.SUPPRESS, help="output format (default json)")
    parent.add_argument("--query", default=argparse.SUPPRESS, help="JMESPath query applied to the result")
    parent.add_argument("--backend", choices=("local", "azure"), default=argparse.SUPPRESS,
                        help=f"backend (default ${BACKEND_ENV}, else local)")
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of a failure")
    # az's workspace flags: accepted so az scripts run unchanged; the backend reads its environment
    parent.add_argument("-g", "--resource-group", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parent.add_argument("-w", "--workspace-name", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parent.add_argument("--subscription", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parent



def add_group(commands: Any, name: str, help_text: str) -> Any:
    group = commands.add_parser(name, help=help_text, description=help_text)
    return group.add_subparsers(dest="verb", metavar="VERB", required=True)


def add_verb(verbs: Any, name: str, help_text: str, common: ArgumentParser, handler: Handler) -> ArgumentParser:
    leaf = verbs.add_parser(name, help=help_text, description=help_text, parents=[common])
    leaf.set_defaults(handler=handler)
    return leaf


def name_type(what: str) -> Callable[[str], str]:
    """An argparse `type` that checks a name by Azure's rules, so `-n a/b` is a usage error naming the flag."""
    def check(value: str) -> str:
        try:
            return validate_model_name(value) if what == "model" else validate_name(value, what)
        except SpecError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    check.__name__ = f"{what} name"
    return check


def add_name(leaf: ArgumentParser, what: str, required: bool = True) -> None:
    leaf.add_argument("-n", "--name", required=required, type=name_type(what), help=f"{what} name")


def add_endpoint_name(leaf: ArgumentParser, required: bool = True) -> None:
    leaf.add_argument("-e", "--endpoint-name", required=required, type=name_type("endpoint"), help="endpoint name")


def add_set_remove(leaf: ArgumentParser, remove: bool = True) -> None:
    leaf.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                      help="set properties, e.g. tags.owner=me traffic.blue=100 instance_count=2")
    if remove:
        leaf.add_argument("--remove", action="append", default=[], metavar="KEY",
                          help="remove a property, e.g. tags.owner")


def add_wait_flags(leaf: ArgumentParser) -> None:
    leaf.add_argument("--no-wait", action="store_true", help="return at once, without waiting")


def add_yes(leaf: ArgumentParser) -> None:
    leaf.add_argument("-y", "--yes", action="store_true", help="do not prompt for confirmation")



def print_result(args: argparse.Namespace, result: Any) -> int:
    emit(result, args.output, args.query)
    return 0


def note(message: str) -> None:
    """A progress or status line on stderr (stdout stays parseable)."""
    stderr_console().print(message, highlight=False, markup=False, soft_wrap=True)


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


class ProgressLine:
    """Progress of a long operation on stderr: a live spinner on a terminal, plain lines otherwise."""

    def __init__(self, title: str):
        self.console = stderr_console()
        self.title = title
        self.status: Any = None

    def __enter__(self) -> "ProgressLine":
        if self.console.is_terminal:
            self.status = self.console.status(self.title)
            self.status.__enter__()
        else:
            self.console.print(self.title, highlight=False, markup=False, soft_wrap=True)
        return self

    def __call__(self, line: str) -> None:
        if self.status is not None:
            self.status.update(line)
        else:
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def __exit__(self, *exc: Any) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)



def confirm(args: argparse.Namespace, what: str) -> None:
    if args.yes:
        return
    if sys.stdin is not None and sys.stdin.isatty():
        answer = input(f"Are you sure you want to delete {what}? (y/n): ")
        if answer.strip().lower() in ("y", "yes"):
            return
        raise SafeRolloutError(f"not deleting {what}")
    raise UsageError(f"deleting {what} needs confirmation and no terminal is attached: pass --yes")

