"""`saferollout rollout show|unlock|rollback -n ENDPOINT`: look at, unstick or undo an endpoint's rollout."""
from __future__ import annotations

import time
from typing import Any, Callable

from saferollout.backends.base import Backend
from saferollout.cli.options import common_options
from saferollout.errors import Conflict, SpecError
from saferollout.output import emit
from saferollout.rollout import next_step, read_state, release_lock, rollback


def register(subparsers: Any) -> None:
    """Add `saferollout rollout show|unlock|rollback -n ENDPOINT`: look at, unstick or undo a rollout."""
    group = subparsers.add_parser("rollout", help="show, unlock or roll back an endpoint's rollout",
                                  description="The rollout state machine of an endpoint, read from its tags "
                                              "and traffic.")
    verbs = group.add_subparsers(dest="verb", metavar="VERB", required=True)
    show = verbs.add_parser("show", help="the rollout state and what a resumed run would do next",
                            parents=[common_options()])
    show.add_argument("-n", "--name", required=True, help="endpoint name")
    show.add_argument("--traffic-steps", default="10,50,100", help="RC traffic steps (default 10,50,100)")
    show.set_defaults(handler=_show_command)
    unlock = verbs.add_parser("unlock", help="break a stale rollout lock", parents=[common_options()])
    unlock.add_argument("-n", "--name", required=True, help="endpoint name")
    unlock.add_argument("--older-than", type=float, metavar="SECONDS",
                        help="break the lock only if it was taken more than SECONDS ago")
    unlock.add_argument("--force", action="store_true", help="break the lock whatever its age")
    unlock.set_defaults(handler=_unlock_command)
    back = verbs.add_parser("rollback", help="traffic to PROD 100%%, mirror off, RC tagged failed, lock released",
                            parents=[common_options()])
    back.add_argument("-n", "--name", required=True, help="endpoint name")
    back.add_argument("--reason", default="rolled back by hand", help="recorded on the endpoint")
    back.set_defaults(handler=_rollback_command)


def _show_command(args: Any, backend_factory: Callable[[], Backend]) -> int:
    try:
        steps = [int(s) for s in str(args.traffic_steps).replace(",", " ").split()]
    except ValueError:
        raise SpecError(f"--traffic-steps must be percentages like 10,50,100, got {args.traffic_steps!r}") from None
    state = read_state(backend_factory(), args.name)
    emit(dict(state.to_dict(), next_step=str(next_step(state, steps))), args.output, args.query)
    return 0


def _unlock_command(args: Any, backend_factory: Callable[[], Backend]) -> int:
    if args.older_than is None and not args.force:
        raise SpecError("say which lock to break: --older-than SECONDS (a stale one) or --force (any)")
    backend = backend_factory()
    backend.get_endpoint(args.name)  # NotFound names a mistyped endpoint
    held = read_state(backend, args.name).lock
    if held is None:
        emit({"endpoint": args.name, "released": None}, args.output, args.query)
        return 0
    age = time.time() - float(held.get("since") or 0.0)
    if not args.force and age <= args.older_than:
        raise Conflict(f"the lock on {args.name!r} is held by {held.get('owner')}"
                       f"{' (run ' + held['run'] + ')' if held.get('run') else ''} for {age:.0f} s, not more than "
                       f"{args.older_than:g} s: it is not stale; use --force to break it anyway")
    release_lock(backend, args.name)
    emit({"endpoint": args.name, "released": held}, args.output, args.query)
    return 0


def _rollback_command(args: Any, backend_factory: Callable[[], Backend]) -> int:
    state = rollback(backend_factory(), args.name, args.reason)
    emit(state.to_dict(), args.output, args.query)
    return 0
