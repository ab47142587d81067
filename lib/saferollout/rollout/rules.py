"""Which action is allowed in which phase: one table (`RULES`) and one guard that builds the refusal.

An action acts in its rule's `allowed` phases, has nothing to do in its `done` phases (the caller returns the
state as it is), and is refused in every other phase with the rule's message.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping

from saferollout.errors import Conflict, NotFound, SafeRolloutError
from saferollout.rollout.state import Phase, RolloutState


class Action(str, Enum):
    """What may be done to a rollout; `RULES` says in which phases."""

    DEPLOY = "deploy"  # deploy_candidate: a first release or an RC
    DEPLOY_RC = "deploy_rc"  # deploy_candidate, once it is clear the candidate is not PROD's model already
    DEPLOY_BASELINE = "deploy_baseline"
    MARK_SMOKE_TESTED = "mark_smoke_tested"
    MARK_GATE_PASSED = "mark_gate_passed"
    SHIFT = "shift"
    PROMOTE = "promote"
    DELETE_OLD_PROD = "delete_old_prod"
    ROLLBACK = "rollback"

    def __str__(self) -> str:
        return self.value


ALL_PHASES = frozenset(Phase)
AT_ZERO = frozenset({Phase.RC_CREATED, Phase.SMOKE_TESTED})  # an RC without live traffic
TESTED = frozenset({Phase.SMOKE_TESTED, Phase.SHIFTING})  # an RC whose traffic may grow
IN_FLIGHT = frozenset({Phase.RC_CREATED, Phase.SMOKE_TESTED, Phase.SHIFTING})


@dataclass(frozen=True)
class Rule:
    """When an action acts (`allowed`), has nothing to do (`done`: the state is returned as it is), or is
    refused (every other phase) with `refusal`, formatted with the endpoint, the phase, the state and the
    phase's `hints` entry (or the default one, under None)."""

    allowed: frozenset[Phase]
    refusal: str = "cannot {action} on {endpoint!r} in phase {phase}{hint}"
    done: frozenset[Phase] = frozenset()
    hints: Mapping[Phase | None, str] = field(default_factory=dict)
    error: type[SafeRolloutError] = Conflict


RULES: dict[Action, Rule] = {
    Action.DEPLOY: Rule(
        ALL_PHASES - {Phase.NO_ENDPOINT}, "endpoint {endpoint!r} does not exist: create it first (ensure_endpoint)",
        error=NotFound),
    Action.DEPLOY_RC: Rule(
        ALL_PHASES - {Phase.NO_ENDPOINT, Phase.PROMOTED},
        "endpoint {endpoint!r} has a promoted rollout that is not finished ({state.old_prod} is still kept for a "
        "rollback): pass the bake gate and delete the old PROD, or roll back, before deploying another candidate"),
    Action.DEPLOY_BASELINE: Rule(
        AT_ZERO, "a baseline is deployed beside an RC at 0%, but {endpoint!r} is in phase {phase}"),
    Action.MARK_SMOKE_TESTED: Rule(
        frozenset({Phase.RC_CREATED}), "endpoint {endpoint!r} has no RC to mark smoke-tested (phase {phase})",
        done=frozenset({Phase.SMOKE_TESTED, Phase.SHIFTING, Phase.PROMOTED})),
    # a bake gate (PROMOTED) or a stale call has nothing to remember
    Action.MARK_GATE_PASSED: Rule(frozenset({Phase.SHIFTING}), done=ALL_PHASES - {Phase.SHIFTING}),
    Action.SHIFT: Rule(TESTED, hints={Phase.RC_CREATED: ": smoke-test the RC first (smoke_test, then mark_smoke_tested)",
                                      Phase.PROMOTED: ": the RC is already promoted"}),
    Action.PROMOTE: Rule(TESTED, done=frozenset({Phase.PROMOTED, Phase.STABLE}),
                         hints={Phase.RC_CREATED: ": smoke-test the RC first",
                                Phase.ROLLED_BACK: ": the RC {state.failed_rc!r} was rolled back"}),
    Action.DELETE_OLD_PROD: Rule(ALL_PHASES - IN_FLIGHT, hints={None: ": promote first"}),
    Action.ROLLBACK: Rule(ALL_PHASES - {Phase.NO_ENDPOINT}, "endpoint {endpoint!r} does not exist: nothing to roll back",
                          error=NotFound),
}
ACTION_WORDS = {Action.SHIFT: "shift traffic", Action.PROMOTE: "promote", Action.DELETE_OLD_PROD: "delete the old PROD"}


def refusal(action: Action, state: RolloutState) -> SafeRolloutError:
    """The error an action not allowed in `state.phase` raises, its message built from `RULES`."""
    rule = RULES[action]
    hint = rule.hints.get(state.phase, rule.hints.get(None, ""))
    values = {"action": ACTION_WORDS.get(action, action.value), "endpoint": state.endpoint,
              "phase": state.phase.value, "state": state}
    return rule.error(rule.refusal.format(**values, hint=hint.format(**values)))


def guard(action: Action, state: RolloutState) -> bool:
    """True: `action` may act in this phase; False: it has nothing to do (return the state as it is);
    otherwise raise the refusal (Conflict, or NotFound for an endpoint that does not exist)."""
    rule = RULES[action]
    if state.phase in rule.allowed:
        return True
    if state.phase in rule.done:
        return False
    raise refusal(action, state)
