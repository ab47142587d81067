"""`saferollout run RUNBOOK`: execute a runbook into a run directory; the exit code says how the rollout ended."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from saferollout.errors import SafeRolloutError
from saferollout.runbook import find_runbook, parse_overrides
from saferollout.runner import run_runbook


def register(subparsers: Any) -> None:
    """Add `saferollout run RUNBOOK [-p key=value ...] [--runs-dir DIR]`."""
    parser = subparsers.add_parser("run", help="run a runbook (papermill notebooks) into a run directory",
                                   description="Run a runbook: its notebooks in order under papermill, into "
                                               "runs/<UTC timestamp>-<runbook>/, with summary.json and report.html. "
                                               "Exit code 0 only when the rollout completed.")
    parser.add_argument("runbook", help="runbook YAML path, or a name under ./runbooks")
    parser.add_argument("-p", "--parameter", dest="parameters", action="append", default=[], metavar="KEY=VALUE",
                        help="override a runbook parameter (repeatable)")
    parser.add_argument("--runs-dir", default=None, help="where run directories go (default: parameter runs_dir)")
    parser.add_argument("--run-dir", default=None,
                        help="continue (or resume after a kill) the run in this directory: steps it completed "
                             "are skipped and their recorded values read back")
    parser.add_argument("--steps", default=None, metavar="ID,ID",
                        help="run only these steps (e.g. one CI job per step, with --run-dir)")
    parser.add_argument("--quiet", action="store_true", help="do not echo notebook output lines")
    parser.set_defaults(handler=handle_run)


def handle_run(args: Any, backend_factory: Any = None) -> int:
    """CLI handler: run the runbook and return the exit code (0 only when the rollout completed)."""
    only = [s.strip() for s in args.steps.split(",") if s.strip()] if getattr(args, "steps", None) else None
    result = run_runbook(find_runbook(args.runbook), parse_overrides(args.parameters), runs_dir=args.runs_dir,
                         echo=not getattr(args, "quiet", False), run_dir=getattr(args, "run_dir", None), only=only)
    return result.exit_code


def main(argv: list[str] | None = None) -> int:
    """The run command on its own (same as `saferollout run ...`): `argv` without the word `run`."""
    parser = argparse.ArgumentParser(prog="saferollout")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["run", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.handler(args, None)
    except SafeRolloutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
