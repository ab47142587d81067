"""The rollout state machine: phases, tags, lock, resume, promote, rollback.

Nothing lives only in memory. The state of a rollout is the endpoint as the backend reports it: its tags
(`PROD_DEPLOYMENT`, `RC_DEPLOYMENT`, `OLD_PROD_DEPLOYMENT`, the lock, a few markers) and its traffic.
Every function reads that state, decides, acts, and returns the state it left behind, so each step can
run alone (one CI job per step), run twice, or resume after the runner was killed at any point.

Rules every transition keeps:
- PROD is never deleted, and its traffic and its tag change in the same update;
- traffic (live or mirrored) only ever grows on a deployment that is Succeeded;
- the tag that names a deployment is written after the deployment exists and removed after it is gone,
  so a crash in between leaves a state `read_state` still understands (a stale tag is ignored);
- rollback is idempotent: it can run after any failure, any number of times.

Endpoint tags (the state):
    PROD_DEPLOYMENT        the deployment serving production
    RC_DEPLOYMENT          the release candidate, from its creation until promotion or rollback
    OLD_PROD_DEPLOYMENT    the former PROD after a promotion, kept at 0% for a rollback until the bake gate
    BASELINE_DEPLOYMENT    with `baseline`: a fresh deployment of PROD's model beside the RC, taking the same
                           share of traffic, which the gates compare the RC with; removed at promotion
                           and at rollback
    ROLLOUT_LOCK           {"owner", "since", "run"} while a rollout runs
    RC_SMOKE_TESTED        the RC's name once its smoke test passed (its traffic may grow from then on)
    RC_GATES_PASSED        "10,50": the RC's traffic steps whose gate passed (so a resumed run skips them)
    FAILED_RC_DEPLOYMENT   the candidate a rollback (or a failed start) left, kept for its logs
    ROLLBACK_REASON        why
Deployment tags (set at creation): role ("prod" for a first release, "rc"), model (the resolved model
reference) and fingerprint (a hash of model, code, environment variables and sizing: two deployments
with the same fingerprint are interchangeable, which is how a re-run recognises its own RC).
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Callable, NoReturn

from saferollout.backends.base import Backend, Deployment, Endpoint, Progress
from saferollout.errors import BackendError, Conflict, DeploymentFailed, GateFailed, NotFound
from saferollout.processes import pid_alive
from saferollout.specs import DeploymentSpec, EndpointSpec, parse_model_ref

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

DEPLOYMENT_NAMES = ("blue", "green")  # the RC takes the name PROD does not use
BASELINE_NAME = "baseline"
DEPLOY_TIMEOUT_S = float(os.environ.get("SAFEROLLOUT_DEPLOY_TIMEOUT_S", "900"))
LOCK_SETTLE_S = 0.5  # pause between writing the lock and reading it back (see acquire_lock)
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
        lock=_parse_lock(tags.get(LOCK_TAG)),
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


def _parse_lock(value: str | None) -> dict | None:
    if not value:
        return None
    try:
        lock = json.loads(value)
    except ValueError:
        return {"owner": value, "since": 0.0, "run": ""}  # written by hand: still a lock
    return lock if isinstance(lock, dict) else {"owner": str(lock), "since": 0.0, "run": ""}


def _parse_percents(value: str | None) -> list[int]:
    return sorted({int(p) for p in (value or "").split(",") if p.strip().isdigit()})


def next_step(state: RolloutState, traffic_steps: list[int], *, model: str | None = None) -> str:
    """What a resumed run must do next.

    Returns "deploy" | "smoke" | "shift:<n>" | "gate:<n>" | "promote" | "bake" | "done". `traffic_steps`
    are the RC's traffic percentages in order (e.g. [10, 50, 100]); reaching 100 means "promote". A gate
    that passed is remembered only when the runner called `mark_gate_passed`; otherwise the gate at the
    current percentage runs again, which is the safe choice. With `model` (the reference being rolled
    out), a STABLE endpoint already serving it, or a rollout of it that was rolled back, is "done".
    """
    steps = sorted({int(s) for s in traffic_steps if 0 < int(s) <= 100})
    phase = state.phase
    if phase in (Phase.NO_ENDPOINT, Phase.EMPTY):
        return "deploy"
    if phase == Phase.STABLE:
        return "done" if model is not None and _same_model(state.prod_model, model) else "deploy"
    if phase == Phase.ROLLED_BACK:
        failed_model = state.models.get(state.failed_rc or "")
        return "done" if model is not None and _same_model(failed_model, model) else "deploy"
    if phase == Phase.PROMOTED:
        return "bake"
    if state.deployments.get(state.rc or "") != "Succeeded" and phase == Phase.RC_CREATED:
        return "deploy"  # still provisioning (the runner was killed while waiting): deploy waits for it
    if phase == Phase.RC_CREATED:
        return "smoke"
    if phase == Phase.SMOKE_TESTED:
        first = steps[0] if steps else 100
        return "promote" if first >= 100 else f"shift:{first}"
    # SHIFTING
    current = state.rc_percent
    if current >= 100:
        return "promote"
    if current not in state.gates_passed:
        return f"gate:{current}"
    later = [s for s in steps if s > current]
    if not later or later[0] >= 100:
        return "promote"
    return f"shift:{later[0]}"


def _same_model(served: str | None, model: str) -> bool:
    # `model` should be resolved (resolve_model_ref): "@latest" names no version to compare
    return bool(served) and served == model


# ---- endpoint and lock -------------------------------------------------------------------------

def ensure_endpoint(backend: Backend, spec: EndpointSpec) -> Endpoint:
    """The endpoint named by `spec`, created (without traffic) if it does not exist yet."""
    try:
        return backend.get_endpoint(spec.name)
    except NotFound:
        pass
    bare = EndpointSpec(name=spec.name, auth_mode=spec.auth_mode, description=spec.description,
                        tags=dict(spec.tags), properties=dict(spec.properties), extra=dict(spec.extra))
    try:
        return backend.create_endpoint(bare)
    except Conflict:  # created meanwhile by someone else: theirs is as good as ours
        return backend.get_endpoint(spec.name)


def default_owner() -> str:
    """Who holds a lock: user@host, enough for a human to find the holder."""
    try:
        user = getpass.getuser()  # USER, LOGNAME..., else the password database (CI runners set no USER)
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


RUNNER_PID_ENV = "SAFEROLLOUT_RUNNER_PID"  # set by the runbook runner for its kernels: the lock's holder


def holder_pid() -> int:
    """The process that holds a lock taken here: the runbook runner when there is one, else this process."""
    value = os.environ.get(RUNNER_PID_ENV, "")
    return int(value) if value.isdigit() else os.getpid()


def _holder_is_gone(held: dict) -> bool:
    """A lock taken on this machine by a process that no longer runs (a killed runner) holds nothing."""
    pid = held.get("pid")
    return held.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)


def acquire_lock(backend: Backend, endpoint: str, owner: str, run_id: str = "", *,
                 break_stale_after_s: float | None = None, force: bool = False) -> dict:
    """Take the endpoint's rollout lock, or raise Conflict naming its holder and how to break it.

    Re-entrant: the same owner and run id get their lock back (a resumed run). A lock older than
    `break_stale_after_s` seconds, or any lock with `force`, is broken; so is a lock whose holder ran on
    this machine and is gone (a killed runner), so that running the runbook again after a kill goes on
    to a completed rollout or a clean rollback. Tags have no compare-and-swap, so the lock is written,
    then read back after a short pause: of two runs racing, the one whose write landed last keeps it and
    the other gets Conflict.
    """
    ep = backend.get_endpoint(endpoint)
    held = _parse_lock(ep.tags.get(LOCK_TAG))
    now = time.time()
    if held is not None and not (held.get("owner") == owner and held.get("run", "") == run_id):
        age = now - float(held.get("since") or 0.0)
        stale = (break_stale_after_s is not None and age > break_stale_after_s) or _holder_is_gone(held)
        if not (force or stale):
            raise Conflict(_lock_message(endpoint, held, age))
    if held is not None and held.get("owner") == owner and held.get("run", "") == run_id:
        return held
    lock = {"owner": owner, "since": now, "run": run_id, "host": socket.gethostname(), "pid": holder_pid()}
    _update(backend, endpoint, set_tags={LOCK_TAG: json.dumps(lock, separators=(",", ":"))})
    time.sleep(LOCK_SETTLE_S)  # let a racing writer land before we read back
    mine = _parse_lock(backend.get_endpoint(endpoint).tags.get(LOCK_TAG))
    if mine != lock:
        raise Conflict(_lock_message(endpoint, mine or {"owner": "unknown"}, 0.0))
    return lock


def reclaim_lock(backend: Backend, endpoint: str, run_id: str) -> dict | None:
    """A continued run takes its own lock back: the holder becomes this process, on this machine.

    The lock a run took names the runner that took it; once that runner was killed, another run could
    take the lock over (its holder is gone) while the resumed run goes on. None if the endpoint, the lock
    or a lock of this run is not there.
    """
    try:
        held = _parse_lock(backend.get_endpoint(endpoint).tags.get(LOCK_TAG))
    except NotFound:
        return None
    if held is None or not run_id or held.get("run") != run_id:
        return None
    lock = dict(held, host=socket.gethostname(), pid=holder_pid())
    if lock != held:
        _update(backend, endpoint, set_tags={LOCK_TAG: json.dumps(lock, separators=(",", ":"))})
    return lock


def _lock_message(endpoint: str, held: dict, age: float) -> str:
    run = f" (run {held['run']})" if held.get("run") else ""
    return (f"endpoint {endpoint!r} is locked by {held.get('owner')}{run} for {age:.0f} s: another rollout "
            f"is running. Wait for it to finish, or break a stale lock: `saferollout rollout unlock -n {endpoint} "
            f"--older-than SECONDS` (or `--force`), acquire_lock(..., break_stale_after_s=...) or force=True")


def release_lock(backend: Backend, endpoint: str, owner: str | None = None) -> None:
    """Remove the rollout lock; with `owner`, only if that owner holds it (Conflict otherwise)."""
    try:
        ep = backend.get_endpoint(endpoint)
    except NotFound:
        return
    held = _parse_lock(ep.tags.get(LOCK_TAG))
    if held is None:
        return
    if owner is not None and held.get("owner") != owner:
        raise Conflict(f"cannot release the lock on {endpoint!r}: it is held by {held.get('owner')}, not {owner}")
    _update(backend, endpoint, remove_tags=(LOCK_TAG,))


# ---- deploying a candidate -----------------------------------------------------------------------

def deploy_candidate(backend: Backend, endpoint: str, spec: DeploymentSpec, model_ref: str, *,
                     progress: Progress | None = None) -> RolloutState:
    """Deploy `model_ref` with `spec` as the first release (PROD at 100%) or as the RC at 0%.

    Idempotent: a deployment of the same model and settings that is already there (ready or still
    starting) is reused; when PROD already runs exactly this, nothing happens. A failed RC left by a
    rollback is deleted first. A deployment that fails to start is tagged failed (it never gets traffic)
    and DeploymentFailed is raised with its reason and log.
    """
    state = read_state(backend, endpoint)
    if state.phase == Phase.NO_ENDPOINT:
        raise NotFound(f"endpoint {endpoint!r} does not exist: create it first (ensure_endpoint)")
    model = resolve_model_ref(backend, model_ref)
    fingerprint = _fingerprint(spec, model)
    deployments = {d.name: d for d in backend.list_deployments(endpoint)}
    if state.prod is not None and deployments[state.prod].tags.get(FINGERPRINT_TAG) == fingerprint:
        if state.rc is not None:  # another candidate is in flight: continuing it is not what was asked
            raise Conflict(f"PROD {state.prod!r} on {endpoint!r} already serves {model}, and RC {state.rc!r} "
                           f"({state.rc_model}) is in flight at {state.rc_percent}%: finish or roll back that "
                           "rollout first")
        _say(progress, f"{endpoint}: PROD {state.prod} already serves {model}: nothing to deploy")
        return state
    if state.phase == Phase.EMPTY:
        live = " ".join(f"{k}={v}" for k, v in sorted(state.traffic.items()) if v > 0)
        if live:  # not ours (an endpoint made without saferollout): a first release would take it all at once
            raise Conflict(f"endpoint {endpoint!r} has no {PROD_TAG} tag but serves live traffic ({live}): a first "
                           f"release would move all of it to {model} at once. Name the deployment serving production "
                           f"and run again: `saferollout online-endpoint update -n {endpoint} "
                           f"--set tags.{PROD_TAG}=<deployment>`")
        return _first_release(backend, state, deployments, spec, model, fingerprint, progress)
    if state.phase == Phase.PROMOTED:
        raise Conflict(f"endpoint {endpoint!r} has a promoted rollout that is not finished ({state.old_prod} "
                       "is still kept for a rollback): pass the bake gate and delete the old PROD, or roll back, "
                       "before deploying another candidate")
    name = next(n for n in DEPLOYMENT_NAMES if n != state.prod) if state.prod in DEPLOYMENT_NAMES \
        else DEPLOYMENT_NAMES[0]
    existing = deployments.get(name)
    if existing is not None:
        same = existing.tags.get(FINGERPRINT_TAG) == fingerprint and name != state.failed_rc
        if same and existing.provisioning_state != "Failed":
            _say(progress, f"{endpoint}: reusing {name} ({existing.provisioning_state}) for {model}")
            if state.rc != name:
                _update(backend, endpoint, set_tags={RC_TAG: name},
                        remove_tags=(SMOKE_TESTED_TAG, GATES_PASSED_TAG, FAILED_RC_TAG, ROLLBACK_REASON_TAG))
            return _wait_for_rc(backend, endpoint, name, progress)
        if same and state.rc == name:  # it failed and the run died before marking it: finish that now
            _fail_rc(backend, endpoint, name, existing.reason or "the deployment failed")
        if state.traffic.get(name, 0) > 0:
            raise Conflict(f"deployment {name!r} on {endpoint!r} serves another candidate "
                           f"({state.models.get(name)}) at {state.traffic[name]}%: roll it back first")
        _say(progress, f"{endpoint}: deleting {name} ({existing.provisioning_state}, "
                       f"{state.models.get(name) or 'unknown model'}) to make room for the RC")
        _delete(backend, endpoint, name, state)
    rc_spec = _tagged(spec, endpoint, name, model, fingerprint, "rc")
    _say(progress, f"{endpoint}: creating RC {name} with {model} at 0% traffic")
    backend.create_deployment(rc_spec, wait=False, progress=progress)
    # tag right after creating: a run killed while waiting finds its RC and waits again
    _update(backend, endpoint, set_tags={RC_TAG: name},
            remove_tags=(SMOKE_TESTED_TAG, GATES_PASSED_TAG, FAILED_RC_TAG, ROLLBACK_REASON_TAG))
    return _wait_for_rc(backend, endpoint, name, progress)


def _first_release(backend: Backend, state: RolloutState, deployments: dict[str, Deployment],
                   spec: DeploymentSpec, model: str, fingerprint: str, progress: Progress | None) -> RolloutState:
    endpoint, name = state.endpoint, DEPLOYMENT_NAMES[0]
    prod_spec = _tagged(spec, endpoint, name, model, fingerprint, "prod")
    _create_unless_there(backend, state, deployments.get(name), prod_spec, "the first release", progress)
    try:
        _wait(backend, endpoint, name, progress)
    except DeploymentFailed as exc:
        _update(backend, endpoint, set_tags={FAILED_RC_TAG: name, ROLLBACK_REASON_TAG: _clip(exc.reason or str(exc))})
        raise
    # traffic and the PROD tag in one update: never a PROD without its traffic
    _update(backend, endpoint, traffic={name: 100},
            set_tags={PROD_TAG: name},
            remove_tags=(RC_TAG, OLD_PROD_TAG, FAILED_RC_TAG, ROLLBACK_REASON_TAG, SMOKE_TESTED_TAG,
                         GATES_PASSED_TAG))
    _say(progress, f"{endpoint}: first release: {name} is PROD at 100%")
    return read_state(backend, endpoint)


def _create_unless_there(backend: Backend, state: RolloutState, existing: Deployment | None, spec: DeploymentSpec,
                         purpose: str, progress: Progress | None) -> None:
    """Create `spec` (tagged), unless a deployment of the same fingerprint is there and not failed (a re-run
    reuses it); a different or failed one under that name is deleted first."""
    endpoint, name = state.endpoint, spec.name
    if existing is not None and (existing.tags.get(FINGERPRINT_TAG) != spec.tags[FINGERPRINT_TAG]
                                 or existing.provisioning_state == "Failed"):
        _say(progress, f"{endpoint}: deleting {name} ({existing.provisioning_state}) before {purpose}")
        _delete(backend, endpoint, name, state)
        existing = None
    if existing is None:
        _say(progress, f"{endpoint}: {purpose}: creating {name} with {spec.model}")
        backend.create_deployment(spec, wait=False, progress=progress)


def _wait_for_rc(backend: Backend, endpoint: str, name: str, progress: Progress | None) -> RolloutState:
    try:
        _wait(backend, endpoint, name, progress)
    except DeploymentFailed as exc:
        _fail_rc(backend, endpoint, name, exc.reason or str(exc), exc)
    return read_state(backend, endpoint)


def _fail_rc(backend: Backend, endpoint: str, name: str, reason: str,
             cause: DeploymentFailed | None = None) -> NoReturn:
    """A candidate that never became ready: no traffic, tagged failed, kept for its logs; then raise."""
    state = read_state(backend, endpoint)
    traffic = None
    if state.traffic.get(name, 0) > 0 and state.prod:
        traffic = {state.prod: 100, name: 0}
    mirror = {} if name in state.mirror_traffic else None
    _update(backend, endpoint, traffic=traffic, mirror=mirror,
            set_tags={FAILED_RC_TAG: name, ROLLBACK_REASON_TAG: _clip(f"RC failed to start: {reason}")},
            remove_tags=(RC_TAG, SMOKE_TESTED_TAG, GATES_PASSED_TAG))
    if cause is not None:
        raise cause
    logs = ""
    try:
        logs = backend.get_deployment_logs(endpoint, name, lines=40)
    except Exception:  # the logs are a courtesy; the failure is the news
        pass
    raise DeploymentFailed(f"deployment {name!r} on {endpoint!r} failed: {reason}", reason, logs)


def resolve_model_ref(backend: Backend, model_ref: str) -> str:
    """`azureml:name@latest` (or without a version) -> `azureml:name:<version>`; other references as given."""
    if not model_ref.startswith("azureml:"):
        return model_ref
    name, version = parse_model_ref(model_ref)
    if version is not None:
        return f"azureml:{name}:{version}"
    return backend.get_model(name).ref


def _fingerprint(spec: DeploymentSpec, model: str) -> str:
    """What makes two deployments interchangeable: same model, code, settings and environment variables."""
    data = {"model": model, "code": spec.code_path, "script": spec.scoring_script,
            "env": dict(sorted(spec.environment_variables.items())), "type": spec.instance_type,
            "count": spec.instance_count, "request": asdict(spec.request_settings),
            "readiness": asdict(spec.readiness_probe), "liveness": asdict(spec.liveness_probe)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tagged(spec: DeploymentSpec, endpoint: str, name: str, model: str, fingerprint: str,
            role: str) -> DeploymentSpec:
    tags = dict(spec.tags, **{ROLE_TAG: role, MODEL_TAG: model, FINGERPRINT_TAG: fingerprint})
    return spec.with_changes(name=name, endpoint_name=endpoint, model=model, tags=tags)


def _wait(backend: Backend, endpoint: str, name: str, progress: Progress | None,
          timeout_s: float = DEPLOY_TIMEOUT_S) -> Deployment:
    """Poll until the deployment is Succeeded (returned) or Failed (DeploymentFailed)."""
    started, last = time.monotonic(), ""
    while True:
        dep = backend.get_deployment(endpoint, name)
        if dep.provisioning_state == "Succeeded":
            return dep
        if dep.provisioning_state == "Failed":
            try:
                logs = backend.get_deployment_logs(endpoint, name, lines=40)
            except Exception:  # the logs are a courtesy; the failure is the news
                logs = ""
            raise DeploymentFailed(f"deployment {name!r} on {endpoint!r} failed: {dep.reason}", dep.reason, logs)
        elapsed = time.monotonic() - started
        if elapsed > timeout_s:
            raise BackendError(f"deployment {name!r} on {endpoint!r} is still {dep.provisioning_state} "
                               f"after {timeout_s:.0f} s")
        line = f"{endpoint}/{name}: {dep.provisioning_state}"
        if line != last:
            _say(progress, line)
            last = line
        time.sleep(0.25)


def _delete(backend: Backend, endpoint: str, name: str, state: RolloutState) -> None:
    if name == state.prod:  # the one rule above all others
        raise Conflict(f"refusing to delete {name!r} on {endpoint!r}: it is PROD")
    if name in state.mirror_traffic:
        _update(backend, endpoint, mirror={})
    try:
        backend.delete_deployment(endpoint, name)
    except NotFound:
        pass


# ---- smoke test --------------------------------------------------------------------------------

@dataclass
class SmokeResult:
    """The RC's answers to sample requests sent to it directly (through the deployment header)."""

    ok: bool
    n: int
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # milliseconds, one per request
    deployment: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def raise_if_failed(self) -> "SmokeResult":
        """Raise GateFailed (carrying this result) when the smoke test did not pass."""
        if not self.ok:
            shown = "; ".join(self.failures[:3]) or "no requests were sent"
            raise GateFailed(f"smoke test of {self.deployment!r} failed: {len(self.failures)} of {self.n} "
                             f"requests ({shown})", self)
        return self


def smoke_test(backend: Backend, endpoint: str, deployment: str, bodies: list[bytes], *,
               reference: str | None = None, check: Callable[[Any], str | None] | None = None) -> SmokeResult:
    """Send each body to `deployment` only (pinned with the deployment header) and check each answer.

    An answer fails when its status is not 200, when another deployment served it, when it is not JSON,
    when it has another structure than `reference`'s answer to the same body (PROD's: JSON types, keys and
    list lengths; both answers are shown), or when `check(answer)` returns a message. Without a reference
    (a first release) a 200 with valid JSON passes. No bodies is a failed smoke test.
    """
    failures: list[str] = []
    latencies: list[float] = []
    for index, body in enumerate(bodies):
        result = backend.invoke(endpoint, body, deployment=deployment, timeout_s=30.0)
        latencies.append(result.latency_ms)
        problem = _smoke_problem(result, deployment, check)
        if problem is None and reference is not None:
            problem = _compare_with_reference(backend, endpoint, reference, body, result.json())
        if problem:
            failures.append(f"request {index}: {problem}")
    return SmokeResult(ok=bool(bodies) and not failures, n=len(bodies), failures=failures, latencies=latencies,
                       deployment=deployment)


def _smoke_problem(result: Any, deployment: str, check: Callable[[Any], str | None] | None) -> str | None:
    if result.status != 200:
        return f"status {result.status}: {result.text[:200]}"
    if result.deployment and result.deployment != deployment:
        return f"served by {result.deployment!r}, not {deployment!r}"
    try:
        answer = result.json()
    except ValueError:
        return f"answer is not JSON: {result.text[:200]}"
    return check(answer) if check is not None else None


def _compare_with_reference(backend: Backend, endpoint: str, reference: str, body: bytes, answer: Any) -> str | None:
    """None when `reference` answers `body` with the structure of `answer`; otherwise what differs."""
    theirs = backend.invoke(endpoint, body, deployment=reference, timeout_s=30.0)
    if theirs.status != 200:  # no structure to compare with is never a pass
        return f"PROD {reference!r} answered status {theirs.status}, so the answer's structure cannot be compared"
    try:
        expected = theirs.json()
    except ValueError:
        return f"PROD {reference!r} answered no JSON, so the answer's structure cannot be compared"
    difference = structure_difference(answer, expected)
    if difference is None:
        return None
    return (f"the answer's structure differs from PROD's ({difference}): RC answered {_shown(answer)}, "
            f"PROD {reference!r} answered {_shown(expected)}")


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "list", str: "string", type(None): "null"}.get(type(value), type(value).__name__)


def structure_difference(answer: Any, expected: Any, where: str = "$") -> str | None:
    """Where two decoded JSON answers differ in structure (JSON type, object keys, list lengths), or None.

    Values may differ (that is what a new model is for); an integer and a float are both numbers.
    """
    mine, theirs = _json_type(answer), _json_type(expected)
    if mine != theirs:
        article = lambda kind: ("an " if kind[0] in "aeiou" else "a ") + kind  # noqa: E731
        return f"{where} is {article(mine)}, PROD's {article(theirs)}"
    if isinstance(answer, dict):
        if set(answer) != set(expected):
            extra, missing = sorted(set(answer) - set(expected)), sorted(set(expected) - set(answer))
            parts = ([f"extra key(s) {', '.join(extra)}"] if extra else []) + (
                [f"missing key(s) {', '.join(missing)}"] if missing else [])
            return f"{where} has {' and '.join(parts)}"
        return next((d for k in answer if (d := structure_difference(answer[k], expected[k], f"{where}.{k}"))), None)
    if isinstance(answer, list):
        if len(answer) != len(expected):
            return f"{where} has {len(answer)} items, PROD's {len(expected)}"
        return next((d for i, (a, e) in enumerate(zip(answer, expected))
                     if (d := structure_difference(a, e, f"{where}[{i}]"))), None)
    return None


def _shown(answer: Any, width: int = 200) -> str:
    text = json.dumps(answer, default=str)
    return text if len(text) <= width else text[:width - 3] + "..."


def mark_smoke_tested(backend: Backend, endpoint: str) -> RolloutState:
    """Record that the RC passed its smoke test: from here its traffic may grow."""
    state = read_state(backend, endpoint)
    if state.phase in (Phase.SMOKE_TESTED, Phase.SHIFTING, Phase.PROMOTED):
        return state
    if state.phase != Phase.RC_CREATED or state.rc is None:
        raise Conflict(f"endpoint {endpoint!r} has no RC to mark smoke-tested (phase {state.phase.value})")
    _require_succeeded(state, state.rc)
    _update(backend, endpoint, set_tags={SMOKE_TESTED_TAG: state.rc})
    return read_state(backend, endpoint)


def mark_gate_passed(backend: Backend, endpoint: str, percent: int | None = None) -> RolloutState:
    """Record that the gate at the RC's current traffic passed, so a resumed run does not repeat it."""
    state = read_state(backend, endpoint)
    if state.phase != Phase.SHIFTING:
        return state  # a bake gate (PROMOTED) or a stale call: nothing to remember
    percent = state.rc_percent if percent is None else int(percent)
    if percent not in state.gates_passed:
        passed = ",".join(str(p) for p in sorted({*state.gates_passed, percent}))
        _update(backend, endpoint, set_tags={GATES_PASSED_TAG: passed})
    return read_state(backend, endpoint)


# ---- traffic, promotion, cleanup, rollback -------------------------------------------------------

def _require_succeeded(state: RolloutState, name: str) -> None:
    status = state.deployments.get(name)
    if status != "Succeeded":
        raise Conflict(f"cannot route traffic to {name!r} on {state.endpoint!r}: its state is {status or 'missing'}")


def shift_traffic(backend: Backend, endpoint: str, percent: int) -> RolloutState:
    """Give the RC `percent`% of live traffic and PROD the rest. Idempotent.

    Refused (Conflict) unless the endpoint has a smoke-tested RC in state Succeeded and a PROD.
    """
    percent = int(percent)
    if not 0 <= percent <= 100:
        raise ValueError(f"percent must be between 0 and 100, got {percent}")
    state = read_state(backend, endpoint)
    if state.phase not in (Phase.SMOKE_TESTED, Phase.SHIFTING):
        hint = {Phase.RC_CREATED: ": smoke-test the RC first (smoke_test, then mark_smoke_tested)",
                Phase.PROMOTED: ": the RC is already promoted"}.get(state.phase, "")
        raise Conflict(f"cannot shift traffic on {endpoint!r} in phase {state.phase.value}{hint}")
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
        _require_succeeded(state, state.rc)
        if state.baseline:
            _require_succeeded(state, state.baseline)
    traffic = {name: 0 for name in state.traffic}
    traffic.update(target)
    # a deployment with live traffic cannot also be mirrored to
    mirror = {} if percent > 0 and state.rc in state.mirror_traffic else None
    _update(backend, endpoint, traffic=traffic, mirror=mirror)
    return read_state(backend, endpoint)


def promote(backend: Backend, endpoint: str) -> RolloutState:
    """RC to 100%, tags swapped (PROD = RC, OLD_PROD = the former PROD, kept at 0% for a rollback)."""
    state = read_state(backend, endpoint)
    if state.phase in (Phase.PROMOTED, Phase.STABLE):
        return state  # done already (a re-run), or nothing to promote
    if state.phase not in (Phase.SMOKE_TESTED, Phase.SHIFTING):
        hint = {Phase.RC_CREATED: ": smoke-test the RC first",
                Phase.ROLLED_BACK: f": the RC {state.failed_rc!r} was rolled back"}.get(state.phase, "")
        raise Conflict(f"cannot promote on {endpoint!r} in phase {state.phase.value}{hint}")
    assert state.prod is not None and state.rc is not None
    _require_succeeded(state, state.rc)
    traffic = {name: 0 for name in state.traffic}
    traffic.update({state.rc: 100, state.prod: 0})
    _update(backend, endpoint, traffic=traffic, mirror={} if state.mirror_traffic else None,
            set_tags={PROD_TAG: state.rc, OLD_PROD_TAG: state.prod},
            remove_tags=(RC_TAG, SMOKE_TESTED_TAG, GATES_PASSED_TAG))
    return remove_baseline(backend, endpoint)


def delete_old_prod(backend: Backend, endpoint: str) -> RolloutState:
    """After the bake gate: delete the former PROD. Never deletes PROD; idempotent."""
    state = read_state(backend, endpoint)
    if state.phase in (Phase.SMOKE_TESTED, Phase.SHIFTING, Phase.RC_CREATED):
        raise Conflict(f"cannot delete the old PROD on {endpoint!r} in phase {state.phase.value}: promote first")
    if state.phase == Phase.PROMOTED and state.old_prod:
        old = state.old_prod
        if state.traffic.get(old, 0) > 0:
            raise Conflict(f"cannot delete the old PROD {old!r} on {endpoint!r}: it still has "
                           f"{state.traffic[old]}% live traffic")
        _delete(backend, endpoint, old, state)
        state = read_state(backend, endpoint)
    state = remove_baseline(backend, endpoint)  # a promotion killed before it removed the baseline
    stale = backend.get_endpoint(endpoint).tags.get(OLD_PROD_TAG) if state.phase != Phase.NO_ENDPOINT else None
    if stale and stale not in state.deployments:  # deleted above, or by a run killed before untagging
        _update(backend, endpoint, remove_tags=(OLD_PROD_TAG,))
        state = read_state(backend, endpoint)
    return state


def rollback(backend: Backend, endpoint: str, reason: str) -> RolloutState:
    """Traffic to PROD 100%, mirror off, RC tagged failed (kept for its logs), lock released. Idempotent.

    After a promotion (the bake gate failed) the former PROD, still kept, becomes PROD again.
    """
    state = read_state(backend, endpoint)
    if state.phase == Phase.NO_ENDPOINT:
        raise NotFound(f"endpoint {endpoint!r} does not exist: nothing to roll back")
    remove = [LOCK_TAG, RC_TAG, SMOKE_TESTED_TAG, GATES_PASSED_TAG]
    set_tags: dict[str, str] = {}
    if state.phase == Phase.PROMOTED:
        assert state.old_prod is not None and state.prod is not None
        _require_succeeded(state, state.old_prod)
        prod, failed = state.old_prod, state.prod
        set_tags[PROD_TAG] = prod
        remove.append(OLD_PROD_TAG)
    elif state.phase in (Phase.RC_CREATED, Phase.SMOKE_TESTED, Phase.SHIFTING):
        prod, failed = state.prod, state.rc
    else:  # STABLE, ROLLED_BACK, EMPTY: nothing routed to a candidate; just make sure PROD has it all
        prod, failed = state.prod, None
    if failed is not None:
        set_tags.update({FAILED_RC_TAG: failed, ROLLBACK_REASON_TAG: _clip(reason)})
    traffic = None
    if prod is not None:
        target = {name: 0 for name in state.traffic}
        target[prod] = 100
        if target != state.traffic:
            traffic = target
    _update(backend, endpoint, traffic=traffic, mirror={} if state.mirror_traffic else None,
            set_tags=set_tags, remove_tags=tuple(remove))
    return remove_baseline(backend, endpoint)


# ---- the baseline: PROD's model deployed afresh beside the RC --------------------------------------

def deploy_baseline(backend: Backend, endpoint: str, spec: DeploymentSpec, *,
                    progress: Progress | None = None) -> RolloutState:
    """Deploy PROD's model again, with `spec`'s code and settings, as the baseline at 0%. Idempotent.

    A release is compared with PROD, which has been warm and serving for hours; a baseline started at the
    same time as the RC, on the same code and sizing, differs from it only by the model, as in Kayenta and
    Netflix's canary analysis. Only while an RC is at 0% (created or smoke-tested): the baseline then
    takes the RC's share at every traffic step and is removed at promotion or rollback.
    """
    state = read_state(backend, endpoint)
    if state.phase not in (Phase.RC_CREATED, Phase.SMOKE_TESTED) or state.prod_model is None:
        raise Conflict(f"a baseline is deployed beside an RC at 0%, but {endpoint!r} is in phase {state.phase.value}")
    if BASELINE_NAME in (state.prod, state.rc):
        raise Conflict(f"deployment name {BASELINE_NAME!r} is taken on {endpoint!r} by PROD or the RC")
    model = state.prod_model
    fingerprint = _fingerprint(spec, model)
    existing = {d.name: d for d in backend.list_deployments(endpoint)}.get(BASELINE_NAME)
    baseline_spec = _tagged(spec, endpoint, BASELINE_NAME, model, fingerprint, "baseline")
    _create_unless_there(backend, state, existing, baseline_spec, "the baseline (PROD's model, 0% traffic)", progress)
    _update(backend, endpoint, set_tags={BASELINE_TAG: BASELINE_NAME})
    try:
        _wait(backend, endpoint, BASELINE_NAME, progress)
    except DeploymentFailed:
        remove_baseline(backend, endpoint)
        raise
    return read_state(backend, endpoint)


def remove_baseline(backend: Backend, endpoint: str) -> RolloutState:
    """Delete the baseline once it has no traffic, then its tag. Idempotent; a no-op without one."""
    state = read_state(backend, endpoint)
    if state.phase == Phase.NO_ENDPOINT:
        return state
    name = backend.get_endpoint(endpoint).tags.get(BASELINE_TAG)
    if not name or name in (state.prod, state.rc, state.old_prod):
        return state
    if name in state.deployments:
        if state.traffic.get(name, 0) > 0:
            raise Conflict(f"cannot remove the baseline {name!r} on {endpoint!r}: it still has "
                           f"{state.traffic[name]}% live traffic")
        _delete(backend, endpoint, name, state)
    _update(backend, endpoint, remove_tags=(BASELINE_TAG,))
    return read_state(backend, endpoint)


# ---- the one way rollout state is written ---------------------------------------------------------

def _update(backend: Backend, endpoint: str, *, traffic: dict[str, int] | None = None,
            mirror: dict[str, int] | None = None, set_tags: dict[str, str] | None = None,
            remove_tags: tuple[str, ...] | list[str] = ()) -> Endpoint:
    """One endpoint update: traffic, mirror and tags together, so no crash separates them.

    Endpoint tags are replaced as a whole by the backend, so read them, change ours, write them all.
    """
    ep = backend.get_endpoint(endpoint)
    tags = dict(ep.tags)
    for key in remove_tags:
        tags.pop(key, None)
    tags.update(set_tags or {})
    tags_changed = tags != ep.tags
    if traffic is None and mirror is None and not tags_changed:
        return ep
    return backend.update_endpoint(endpoint, traffic=traffic, mirror_traffic=mirror,
                                   tags=tags if tags_changed else None)


def _clip(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_TAG_CHARS else text[:MAX_TAG_CHARS - 3] + "..."


def _say(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)


# ---- the `saferollout rollout` command ---------------------------------------------------------------

def register(subparsers: Any) -> None:
    """Add `saferollout rollout show|unlock|rollback -n ENDPOINT`: look at, unstick or undo a rollout."""
    from saferollout.cli import common_options

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
    from saferollout.errors import SpecError
    from saferollout.output import emit

    try:
        steps = [int(s) for s in str(args.traffic_steps).replace(",", " ").split()]
    except ValueError:
        raise SpecError(f"--traffic-steps must be percentages like 10,50,100, got {args.traffic_steps!r}") from None
    state = read_state(backend_factory(), args.name)
    emit(dict(state.to_dict(), next_step=next_step(state, steps)), args.output, args.query)
    return 0


def _unlock_command(args: Any, backend_factory: Callable[[], Backend]) -> int:
    from saferollout.errors import SpecError
    from saferollout.output import emit

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
    from saferollout.output import emit

    state = rollback(backend_factory(), args.name, args.reason)
    emit(state.to_dict(), args.output, args.query)
    return 0
