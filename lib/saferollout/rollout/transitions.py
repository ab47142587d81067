"""Transitions: what a resumed run does next, and the actions that move traffic and tags (smoke-tested and
gate-passed marks, shift, promote, delete the old PROD, roll back).

Every action reads the state, asks `rules.guard` whether it may act (or has nothing left to do, or is
refused with the message the table builds), acts through `write_state`, and returns the state it left behind.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from saferollout.backends.base import Backend
from saferollout.errors import Conflict
from saferollout.rollout.deploy import delete_deployment, remove_baseline
from saferollout.rollout.rules import IN_FLIGHT, Action, guard
from saferollout.rollout.state import (FAILED_RC_TAG, GATES_PASSED_TAG, LOCK_TAG, OLD_PROD_TAG, PROD_TAG, RC_TAG,
                                       ROLLBACK_REASON_TAG, SMOKE_TESTED_TAG, Phase, RolloutState, clip, read_state,
                                       require_succeeded, write_state)


# ---- what a resumed run does next ----------------------------------------------------------------

class Next(str, Enum):
    DEPLOY = "deploy"
    SMOKE = "smoke"
    SHIFT = "shift"  # to `NextAction.percent`
    GATE = "gate"  # at `NextAction.percent`
    PROMOTE = "promote"
    BAKE = "bake"
    DONE = "done"


@dataclass(frozen=True)
class NextAction:
    """The step a resumed run takes next; `percent` for a shift (to) or a gate (at). `str()` gives the
    short form `rollout show` prints: "deploy", "shift:50", "gate:10"..."""

    kind: Next
    percent: int | None = None

    def __str__(self) -> str:
        return self.kind.value if self.percent is None else f"{self.kind.value}:{self.percent}"


def next_step(state: RolloutState, traffic_steps: list[int], *, model: str | None = None) -> NextAction:
    """What a resumed run must do next.

    `traffic_steps` are the RC's traffic percentages in order (e.g. [10, 50, 100]); reaching 100 means
    PROMOTE. A gate that passed is remembered only when the runner called `mark_gate_passed`; otherwise the
    gate at the current percentage runs again, which is the safe choice. With `model` (the reference being
    rolled out), a STABLE endpoint already serving it, or a rollout of it that was rolled back, is DONE.
    """
    steps = sorted({int(s) for s in traffic_steps if 0 < int(s) <= 100})
    phase = state.phase
    if phase in (Phase.NO_ENDPOINT, Phase.EMPTY):
        return NextAction(Next.DEPLOY)
    if phase == Phase.STABLE:
        return NextAction(Next.DONE if model is not None and _same_model(state.prod_model, model) else Next.DEPLOY)
    if phase == Phase.ROLLED_BACK:
        failed_model = state.models.get(state.failed_rc or "")
        return NextAction(Next.DONE if model is not None and _same_model(failed_model, model) else Next.DEPLOY)
    if phase == Phase.PROMOTED:
        return NextAction(Next.BAKE)
    if state.deployments.get(state.rc or "") != "Succeeded" and phase == Phase.RC_CREATED:
        return NextAction(Next.DEPLOY)  # still provisioning (the runner was killed while waiting): deploy waits
    if phase == Phase.RC_CREATED:
        return NextAction(Next.SMOKE)
    if phase == Phase.SMOKE_TESTED:
        first = steps[0] if steps else 100
        return NextAction(Next.PROMOTE) if first >= 100 else NextAction(Next.SHIFT, first)
    # SHIFTING
    current = state.rc_percent
    if current >= 100:
        return NextAction(Next.PROMOTE)
    if current not in state.gates_passed:
        return NextAction(Next.GATE, current)
    later = [s for s in steps if s > current]
    if not later or later[0] >= 100:
        return NextAction(Next.PROMOTE)
    return NextAction(Next.SHIFT, later[0])


def _same_model(served: str | None, model: str) -> bool:
    # `model` should be resolved (resolve_model_ref): "@latest" names no version to compare
    return bool(served) and served == model


# ---- marks ------------------------------------------------------------------------------------------

def mark_smoke_tested(backend: Backend, endpoint: str) -> RolloutState:
    """Record that the RC passed its smoke test: from here its traffic may grow."""
    state = read_state(backend, endpoint)
    if not guard(Action.MARK_SMOKE_TESTED, state):
        return state
    assert state.rc is not None  # RC_CREATED has an RC
    require_succeeded(state, state.rc)
    write_state(backend, endpoint, set_tags={SMOKE_TESTED_TAG: state.rc})
    return read_state(backend, endpoint)


def mark_gate_passed(backend: Backend, endpoint: str, percent: int | None = None) -> RolloutState:
    """Record that the gate at the RC's current traffic passed, so a resumed run does not repeat it."""
    state = read_state(backend, endpoint)
    if not guard(Action.MARK_GATE_PASSED, state):
        return state
    percent = state.rc_percent if percent is None else int(percent)
    if percent not in state.gates_passed:
        passed = ",".join(str(p) for p in sorted({*state.gates_passed, percent}))
        write_state(backend, endpoint, set_tags={GATES_PASSED_TAG: passed})
    return read_state(backend, endpoint)


# ---- traffic, promotion, cleanup, rollback -------------------------------------------------------

def shift_traffic(backend: Backend, endpoint: str, percent: int) -> RolloutState:
    """Give the RC `percent`% of live traffic and PROD the rest. Idempotent.

    Refused (Conflict) unless the endpoint has a smoke-tested RC in state Succeeded and a PROD.
    """
    percent = int(percent)
    if not 0 <= percent <= 100:
        raise ValueError(f"percent must be between 0 and 100, got {percent}")
    state = read_state(backend, endpoint)
    guard(Action.SHIFT, state)
    assert state.prod is not None and state.rc is not None
    target = {state.prod: 100 - percent, state.rc: percent}
    if state.baseline:  # the baseline takes the RC's share, so both new deployments see the same load
        if 2 * percent > 100:
            raise Conflict(f"cannot give the RC {percent}% on {endpoint!r}: with the baseline {state.baseline!r} "
                           "taking the same share, each can have at most 50% before the promotion")
        target = {state.prod: 100 - 2 * percent, state.rc: percent, state.baseline: percent}
    if all(state.traffic.get(k, 0) == v for k, v in target.items()) and sum(state.traffic.values()) == 100:
        return state
    if percent > state.rc_percent:  # growing the RC's share needs a ready RC; shrinking it never waits
        require_succeeded(state, state.rc)
        if state.baseline:
            require_succeeded(state, state.baseline)
    traffic = {name: 0 for name in state.traffic}
    traffic.update(target)
    # a deployment with live traffic cannot also be mirrored to
    mirror: dict[str, int] | None = {} if percent > 0 and state.rc in state.mirror_traffic else None
    write_state(backend, endpoint, traffic=traffic, mirror=mirror)
    return read_state(backend, endpoint)


def promote(backend: Backend, endpoint: str) -> RolloutState:
    """RC to 100%, tags swapped (PROD = RC, OLD_PROD = the former PROD, kept at 0% for a rollback)."""
    state = read_state(backend, endpoint)
    if not guard(Action.PROMOTE, state):
        return state  # done already (a re-run), or nothing to promote
    assert state.prod is not None and state.rc is not None
    require_succeeded(state, state.rc)
    traffic = {name: 0 for name in state.traffic}
    traffic.update({state.rc: 100, state.prod: 0})
    write_state(backend, endpoint, traffic=traffic, mirror={} if state.mirror_traffic else None,
                set_tags={PROD_TAG: state.rc, OLD_PROD_TAG: state.prod},
                remove_tags=(RC_TAG, SMOKE_TESTED_TAG, GATES_PASSED_TAG))
    return remove_baseline(backend, endpoint)


def delete_old_prod(backend: Backend, endpoint: str) -> RolloutState:
    """After the bake gate: delete the former PROD. Never deletes PROD; idempotent."""
    state = read_state(backend, endpoint)
    guard(Action.DELETE_OLD_PROD, state)
    if state.phase == Phase.PROMOTED and state.old_prod:
        old = state.old_prod
        if state.traffic.get(old, 0) > 0:
            raise Conflict(f"cannot delete the old PROD {old!r} on {endpoint!r}: it still has "
                           f"{state.traffic[old]}% live traffic")
        delete_deployment(backend, endpoint, old, state)
        state = read_state(backend, endpoint)
    state = remove_baseline(backend, endpoint)  # a promotion killed before it removed the baseline
    stale = backend.get_endpoint(endpoint).tags.get(OLD_PROD_TAG) if state.phase != Phase.NO_ENDPOINT else None
    if stale and stale not in state.deployments:  # deleted above, or by a run killed before untagging
        write_state(backend, endpoint, remove_tags=(OLD_PROD_TAG,))
        state = read_state(backend, endpoint)
    return state


def rollback(backend: Backend, endpoint: str, reason: str) -> RolloutState:
    """Traffic to PROD 100%, mirror off, RC tagged failed (kept for its logs), lock released. Idempotent.

    After a promotion (the bake gate failed) the former PROD, still kept, becomes PROD again.
    """
    state = read_state(backend, endpoint)
    guard(Action.ROLLBACK, state)
    remove = [LOCK_TAG, RC_TAG, SMOKE_TESTED_TAG, GATES_PASSED_TAG]
    set_tags: dict[str, str] = {}
    prod: str | None
    failed: str | None
    if state.phase == Phase.PROMOTED:
        assert state.old_prod is not None and state.prod is not None
        require_succeeded(state, state.old_prod)
        prod, failed = state.old_prod, state.prod
        set_tags[PROD_TAG] = prod
        remove.append(OLD_PROD_TAG)
    elif state.phase in IN_FLIGHT:
        prod, failed = state.prod, state.rc
    else:  # STABLE, ROLLED_BACK, EMPTY: nothing routed to a candidate; just make sure PROD has it all
        prod, failed = state.prod, None
    if failed is not None:
        set_tags.update({FAILED_RC_TAG: failed, ROLLBACK_REASON_TAG: clip(reason)})
    traffic = None
    if prod is not None:
        target = {name: 0 for name in state.traffic}
        target[prod] = 100
        if target != state.traffic:
            traffic = target
    write_state(backend, endpoint, traffic=traffic, mirror={} if state.mirror_traffic else None,
                set_tags=set_tags, remove_tags=tuple(remove))
    return remove_baseline(backend, endpoint)
