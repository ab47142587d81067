"""Where a rollout stands, read from the endpoint: its tags, its traffic and its deployments.

`read_state` derives the phase from what the backend reports (a tag naming a missing deployment is stale and
ignored); `write_state` is the one way rollout state is written: traffic, mirror and tags in one endpoint
update, so no crash separates them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from saferollout.backends.base import Backend, Deployment, Endpoint, Progress
from saferollout.errors import Conflict, NotFound

PROD_TAG = "PROD_DEPLOYMENT"
OLD_PROD_TAG = "OLD_PROD_DEPLOYMENT"
RC_TAG = "RC_DEPLOYMENT"
LOCK_TAG = "ROLLOUT_LOCK"  # value: JSON {"owner": ..., "since": unix seconds, "run": run id}
# Markers of progress inside a rollout (endpoint tags too, so a resumed run sees them).
FAILED_RC_TAG = "FAILED_RC_DEPLOYMENT"  # the RC a rollback (or a failed start) left behind, kept for its logs
ROLLBACK_REASON_TAG = "ROLLBACK_REASON"
SMOKE_TESTED_TAG = "RC_SMOKE_TESTED"  # value: the RC's name, once its smoke test passed
GATES_PASSED_TAG = "RC_GATES_PASSED"  # value: "10,50": traffic percentages whose gate passed for this RC
BASELINE_TAG = "BASELINE_DEPLOYMENT"  # a fresh copy of PROD's model the RC is compared with (optional)
ROLLOUT_TAGS = (PROD_TAG, OLD_PROD_TAG, RC_TAG, LOCK_TAG, FAILED_RC_TAG, ROLLBACK_REASON_TAG,
                SMOKE_TESTED_TAG, GATES_PASSED_TAG, BASELINE_TAG)

# Deployment tags (set when the deployment is created).
ROLE_TAG = "role"  # the role the deployment was created for: "prod" (first release) or "rc"
MODEL_TAG = "model"  # the model reference it serves, resolved to a version
FINGERPRINT_TAG = "fingerprint"  # hash of what it runs: model, code, environment variables, sizing

MAX_TAG_CHARS = 256  # Azure's limit for a tag value


class Phase(str, Enum):
    NO_ENDPOINT = "NO_ENDPOINT"
    EMPTY = "EMPTY"  # the endpoint exists, no PROD
    STABLE = "STABLE"  # PROD at 100%, no RC
    RC_CREATED = "RC_CREATED"  # RC at 0%
    SMOKE_TESTED = "SMOKE_TESTED"  # RC at 0%, smoke test passed
    SHIFTING = "SHIFTING"  # RC at n%
    PROMOTED = "PROMOTED"  # RC at 100%, tags swapped, old PROD still there (for a rollback until the bake)
    ROLLED_BACK = "ROLLED_BACK"  # PROD at 100%, the RC tagged failed

    def __str__(self) -> str:
        return self.value


@dataclass
class RolloutState:
    """Where a rollout stands on one endpoint, as read from the backend."""

    endpoint: str
    phase: Phase
    prod: str | None = None
    rc: str | None = None
    old_prod: str | None = None
    rc_percent: int = 0
    traffic: dict[str, int] = field(default_factory=dict)
    mirror_traffic: dict[str, int] = field(default_factory=dict)
    lock: dict | None = None
    failed_rc: str | None = None
    # additions beyond the first contract: what each deployment serves and how far the RC got
    deployments: dict[str, str] = field(default_factory=dict)  # name -> provisioning state
    models: dict[str, str] = field(default_factory=dict)  # name -> model reference
    smoke_tested: bool = False
    gates_passed: list[int] = field(default_factory=list)
    rollback_reason: str | None = None
    baseline: str | None = None

    @property
    def control(self) -> str | None:
        """What the gates compare the RC with: the baseline when there is one (both fresh), else PROD."""
        return self.baseline or self.prod

    @property
    def prod_model(self) -> str | None:
        return self.models.get(self.prod) if self.prod else None

    @property
    def rc_model(self) -> str | None:
        return self.models.get(self.rc) if self.rc else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["phase"] = self.phase.value
        return data

    def describe(self) -> str:
        """One line for logs and notebooks."""
        split = " ".join(f"{k}={v}" for k, v in sorted(self.traffic.items())) or "no traffic"
        parts = [f"{self.endpoint}: {self.phase.value}", f"PROD={self.prod or '-'}", f"RC={self.rc or '-'}"]
        if self.baseline:
            parts.append(f"BASELINE={self.baseline}")
        if self.old_prod:
            parts.append(f"OLD_PROD={self.old_prod}")
        if self.failed_rc:
            parts.append(f"FAILED_RC={self.failed_rc}")
        parts.append(f"traffic: {split}")
        if self.lock:
            parts.append(f"locked by {self.lock.get('owner')}")
        return ", ".join(parts)


# ---- reading the state -------------------------------------------------------------------------

def read_state(backend: Backend, endpoint: str) -> RolloutState:
    """The rollout state of `endpoint`, derived from its tags, its traffic and its deployments."""
    try:
        ep = backend.get_endpoint(endpoint)
    except NotFound:
        return RolloutState(endpoint=endpoint, phase=Phase.NO_ENDPOINT)
    deployments = {d.name: d for d in backend.list_deployments(endpoint)}
    return _derive(ep, deployments)


def _derive(ep: Endpoint, deployments: dict[str, Deployment]) -> RolloutState:
    tags = ep.tags

    def existing(tag: str) -> str | None:
        name = tags.get(tag) or None
        return name if name in deployments else None  # a tag naming a missing deployment is stale

    prod, rc, old_prod, failed = existing(PROD_TAG), existing(RC_TAG), existing(OLD_PROD_TAG), existing(FAILED_RC_TAG)
    traffic = {k: int(v) for k, v in ep.traffic.items()}
    state = RolloutState(
        endpoint=ep.name, phase=Phase.EMPTY, prod=prod, traffic=traffic,
        mirror_traffic={k: int(v) for k, v in ep.mirror_traffic.items() if int(v) > 0},
        lock=parse_lock(tags.get(LOCK_TAG)),
        deployments={name: d.provisioning_state for name, d in deployments.items()},
        models={name: d.tags.get(MODEL_TAG) or d.model or "" for name, d in deployments.items()},
        rollback_reason=tags.get(ROLLBACK_REASON_TAG) or None,
    )
    if prod is None:
        state.failed_rc = failed
        return state
    baseline = existing(BASELINE_TAG)
    state.baseline = baseline if baseline not in (prod, rc) else None
    if rc is not None and rc != prod:
        state.rc = rc
        state.rc_percent = traffic.get(rc, 0)
        state.smoke_tested = tags.get(SMOKE_TESTED_TAG) == rc
        state.gates_passed = _parse_percents(tags.get(GATES_PASSED_TAG))
        if state.rc_percent > 0:
            state.phase = Phase.SHIFTING
        elif state.smoke_tested:
            state.phase = Phase.SMOKE_TESTED
        else:
            state.phase = Phase.RC_CREATED
        return state
    if old_prod is not None and old_prod != prod:
        state.old_prod = old_prod
        state.phase = Phase.PROMOTED
        return state
    if failed is not None and failed != prod:
        state.failed_rc = failed
        state.phase = Phase.ROLLED_BACK
        return state
    state.phase = Phase.STABLE
    return state


def parse_lock(value: str | None) -> dict | None:
    if not value:
        return None
    try:
        lock = json.loads(value)
    except ValueError:
        return {"owner": value, "since": 0.0, "run": ""}  # written by hand: still a lock
    return lock if isinstance(lock, dict) else {"owner": str(lock), "since": 0.0, "run": ""}


def _parse_percents(value: str | None) -> list[int]:
    return sorted({int(p) for p in (value or "").split(",") if p.strip().isdigit()})


def require_succeeded(state: RolloutState, name: str) -> None:
    status = state.deployments.get(name)
    if status != "Succeeded":
        raise Conflict(f"cannot route traffic to {name!r} on {state.endpoint!r}: its state is {status or 'missing'}")



def write_state(backend: Backend, endpoint: str, *, traffic: dict[str, int] | None = None,
                mirror: dict[str, int] | None = None, set_tags: dict[str, str] | None = None,
                remove_tags: tuple[str, ...] | list[str] = ()) -> Endpoint:
    """One endpoint update: traffic, mirror and tags together, so no crash separates them.

    Only our tags are sent, as changes (`set_tags` / `remove_tags`): the backend applies them to the tags the
    endpoint has when the update lands, so a tag someone else set meanwhile is kept. Nothing is sent when
    nothing would change.
    """
    ep = backend.get_endpoint(endpoint)
    changes = {k: v for k, v in (set_tags or {}).items() if ep.tags.get(k) != v}
    gone = [k for k in remove_tags if k in ep.tags and k not in changes]
    if traffic is None and mirror is None and not changes and not gone:
        return ep
    return backend.update_endpoint(endpoint, traffic=traffic, mirror_traffic=mirror,
                                   set_tags=changes or None, remove_tags=gone)


def clip(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_TAG_CHARS else text[:MAX_TAG_CHARS - 3] + "..."


def say(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)


