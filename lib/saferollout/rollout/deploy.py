"""Deploying: the endpoint, the first release (PROD at 100%), the RC at 0%, and the baseline beside it.

A deployment of the same model and settings (its fingerprint) that is already there is reused, so a re-run
or a resumed run never deploys twice; one that fails to start is tagged failed and never gets traffic.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from typing import NoReturn

from saferollout.backends.base import Backend, Deployment, Endpoint, Progress
from saferollout.errors import BackendError, Conflict, DeploymentFailed, NotFound
from saferollout.specs import DeploymentSpec, EndpointSpec, parse_model_ref
from saferollout.rollout.rules import Action, guard, refusal
from saferollout.rollout.state import (BASELINE_TAG, FAILED_RC_TAG, FINGERPRINT_TAG, GATES_PASSED_TAG, MODEL_TAG,
                                       OLD_PROD_TAG, PROD_TAG, RC_TAG, ROLE_TAG, ROLLBACK_REASON_TAG, SMOKE_TESTED_TAG,
                                       Phase, RolloutState, clip, read_state, say, write_state)

DEPLOYMENT_NAMES = ("blue", "green")  # the RC takes the name PROD does not use
BASELINE_NAME = "baseline"
DEPLOY_TIMEOUT_S = float(os.environ.get("SAFEROLLOUT_DEPLOY_TIMEOUT_S", "900"))


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



def deploy_candidate(backend: Backend, endpoint: str, spec: DeploymentSpec, model_ref: str, *,
                     progress: Progress | None = None) -> RolloutState:
    """Deploy `model_ref` with `spec` as the first release (PROD at 100%) or as the RC at 0%.

    Idempotent: a deployment of the same model and settings that is already there (ready or still
    starting) is reused; when PROD already runs exactly this, nothing happens. A failed RC left by a
    rollback is deleted first. A deployment that fails to start is tagged failed (it never gets traffic)
    and DeploymentFailed is raised with its reason and log.
    """
    state = read_state(backend, endpoint)
    guard(Action.DEPLOY, state)
    model = resolve_model_ref(backend, model_ref)
    fingerprint = _fingerprint(spec, model)
    deployments = {d.name: d for d in backend.list_deployments(endpoint)}
    if state.prod is not None and deployments[state.prod].tags.get(FINGERPRINT_TAG) == fingerprint:
        if state.rc is not None:  # another candidate is in flight: continuing it is not what was asked
            raise Conflict(f"PROD {state.prod!r} on {endpoint!r} already serves {model}, and RC {state.rc!r} "
                           f"({state.rc_model}) is in flight at {state.rc_percent}%: finish or roll back that "
                           "rollout first")
        say(progress, f"{endpoint}: PROD {state.prod} already serves {model}: nothing to deploy")
        return state
    if state.phase == Phase.EMPTY:
        live = " ".join(f"{k}={v}" for k, v in sorted(state.traffic.items()) if v > 0)
        if live:  # not ours (an endpoint made without saferollout): a first release would take it all at once
            raise Conflict(f"endpoint {endpoint!r} has no {PROD_TAG} tag but serves live traffic ({live}): a first "
                           f"release would move all of it to {model} at once. Name the deployment serving production "
                           f"and run again: `saferollout online-endpoint update -n {endpoint} "
                           f"--set tags.{PROD_TAG}=<deployment>`")
        return _first_release(backend, state, deployments, spec, model, fingerprint, progress)
    guard(Action.DEPLOY_RC, state)
    name = next(n for n in DEPLOYMENT_NAMES if n != state.prod) if state.prod in DEPLOYMENT_NAMES \
        else DEPLOYMENT_NAMES[0]
    existing = deployments.get(name)
    if existing is not None:
        same = existing.tags.get(FINGERPRINT_TAG) == fingerprint and name != state.failed_rc
        if same and existing.provisioning_state != "Failed":
            say(progress, f"{endpoint}: reusing {name} ({existing.provisioning_state}) for {model}")
            if state.rc != name:
                write_state(backend, endpoint, set_tags={RC_TAG: name},
                        remove_tags=(SMOKE_TESTED_TAG, GATES_PASSED_TAG, FAILED_RC_TAG, ROLLBACK_REASON_TAG))
            return _wait_for_rc(backend, endpoint, name, progress)
        if same and state.rc == name:  # it failed and the run died before marking it: finish that now
            _fail_rc(backend, endpoint, name, existing.reason or "the deployment failed")
        if state.traffic.get(name, 0) > 0:
            raise Conflict(f"deployment {name!r} on {endpoint!r} serves another candidate "
                           f"({state.models.get(name)}) at {state.traffic[name]}%: roll it back first")
        say(progress, f"{endpoint}: deleting {name} ({existing.provisioning_state}, "
                       f"{state.models.get(name) or 'unknown model'}) to make room for the RC")
        delete_deployment(backend, endpoint, name, state)
    rc_spec = _tagged(spec, endpoint, name, model, fingerprint, "rc")
    say(progress, f"{endpoint}: creating RC {name} with {model} at 0% traffic")
    backend.create_deployment(rc_spec, wait=False, progress=progress)
    # tag right after creating: a run killed while waiting finds its RC and waits again
    write_state(backend, endpoint, set_tags={RC_TAG: name},
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
        write_state(backend, endpoint, set_tags={FAILED_RC_TAG: name, ROLLBACK_REASON_TAG: clip(exc.reason or str(exc))})
        raise
    # traffic and the PROD tag in one update: never a PROD without its traffic
    write_state(backend, endpoint, traffic={name: 100},
            set_tags={PROD_TAG: name},
            remove_tags=(RC_TAG, OLD_PROD_TAG, FAILED_RC_TAG, ROLLBACK_REASON_TAG, SMOKE_TESTED_TAG,
                         GATES_PASSED_TAG))
    say(progress, f"{endpoint}: first release: {name} is PROD at 100%")
    return read_state(backend, endpoint)


def _create_unless_there(backend: Backend, state: RolloutState, existing: Deployment | None, spec: DeploymentSpec,
                         purpose: str, progress: Progress | None) -> None:
    """Create `spec` (tagged), unless a deployment of the same fingerprint is there and not failed (a re-run
    reuses it); a different or failed one under that name is deleted first."""
    endpoint, name = state.endpoint, spec.name
    if existing is not None and (existing.tags.get(FINGERPRINT_TAG) != spec.tags[FINGERPRINT_TAG]
                                 or existing.provisioning_state == "Failed"):
        say(progress, f"{endpoint}: deleting {name} ({existing.provisioning_state}) before {purpose}")
        delete_deployment(backend, endpoint, name, state)
        existing = None
    if existing is None:
        say(progress, f"{endpoint}: {purpose}: creating {name} with {spec.model}")
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
    mirror: dict[str, int] | None = {} if name in state.mirror_traffic else None
    write_state(backend, endpoint, traffic=traffic, mirror=mirror,
            set_tags={FAILED_RC_TAG: name, ROLLBACK_REASON_TAG: clip(f"RC failed to start: {reason}")},
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
            say(progress, line)
            last = line
        time.sleep(0.25)


def delete_deployment(backend: Backend, endpoint: str, name: str, state: RolloutState) -> None:
    if name == state.prod:  # the one rule above all others
        raise Conflict(f"refusing to delete {name!r} on {endpoint!r}: it is PROD")
    if name in state.mirror_traffic:
        write_state(backend, endpoint, mirror={})
    try:
        backend.delete_deployment(endpoint, name)
    except NotFound:
        pass


def deploy_baseline(backend: Backend, endpoint: str, spec: DeploymentSpec, *,
                    progress: Progress | None = None) -> RolloutState:
    """Deploy PROD's model again, with `spec`'s code and settings, as the baseline at 0%. Idempotent.

    A release is compared with PROD, which has been warm and serving for hours; a baseline started at the
    same time as the RC, on the same code and sizing, differs from it only by the model, as in Kayenta and
    Netflix's canary analysis. Only while an RC is at 0% (created or smoke-tested): the baseline then
    takes the RC's share at every traffic step and is removed at promotion or rollback.
    """
    state = read_state(backend, endpoint)
    if not guard(Action.DEPLOY_BASELINE, state) or state.prod_model is None:
        raise refusal(Action.DEPLOY_BASELINE, state)
    if BASELINE_NAME in (state.prod, state.rc):
        raise Conflict(f"deployment name {BASELINE_NAME!r} is taken on {endpoint!r} by PROD or the RC")
    model = state.prod_model
    fingerprint = _fingerprint(spec, model)
    existing = {d.name: d for d in backend.list_deployments(endpoint)}.get(BASELINE_NAME)
    baseline_spec = _tagged(spec, endpoint, BASELINE_NAME, model, fingerprint, "baseline")
    _create_unless_there(backend, state, existing, baseline_spec, "the baseline (PROD's model, 0% traffic)", progress)
    write_state(backend, endpoint, set_tags={BASELINE_TAG: BASELINE_NAME})
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
        delete_deployment(backend, endpoint, name, state)
    write_state(backend, endpoint, remove_tags=(BASELINE_TAG,))
    return read_state(backend, endpoint)


