"""The rollout state machine against the real local platform: phases, resume, lock, rollback, faults,
and the kill-at-each-step test (a driver process killed with SIGKILL at every step boundary, then run
again, must end in a completed rollout, never leaving traffic on a missing or failed deployment, never
without PROD)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from saferollout import cli, data, rollout, traffic
from saferollout.errors import Conflict, DeploymentFailed, GateFailed, NotFound
from saferollout.rollout import Next, NextAction, Phase, RolloutState, next_step
from saferollout.specs import load_deployment_spec, load_endpoint_spec

DRIVER = Path(__file__).parent / "driver.py"
STEPS = [10, 50, 100]


# ---- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(local_backend, credit_model_dir):
    """Two versions of the credit model: v_a plays the current PROD, v_b the candidate."""
    name = f"rollout-credit-{uuid.uuid4().hex[:6]}"
    first = local_backend.register_model(name, str(credit_model_dir))
    second = local_backend.register_model(name, str(credit_model_dir))
    return first.ref, second.ref


@pytest.fixture(scope="module")
def bodies(credit_split):
    return data.sample_requests(credit_split.X_test.head(6), batch_size=2)


@pytest.fixture
def endpoint(local_backend, example_dir, unique_name):
    """A fresh endpoint (no deployments), deleted with its deployments at the end of the test."""
    name = unique_name("ro")
    rollout.ensure_endpoint(local_backend, load_endpoint_spec(example_dir / "endpoint.yml", name=name))
    yield name
    local_backend.delete_endpoint(name)


@pytest.fixture
def spec(example_dir, endpoint):
    return load_deployment_spec(example_dir / "deployment.yml", endpoint_name=endpoint)


@pytest.fixture
def released(local_backend, endpoint, spec, models):
    """The endpoint after its first release: PROD `blue` serving v_a at 100%."""
    rollout.deploy_candidate(local_backend, endpoint, spec, models[0])
    return endpoint


def assert_safe(backend, endpoint: str) -> RolloutState:
    """The invariants no step, crash or rollback may break."""
    state = rollout.read_state(backend, endpoint)
    assert state.prod is not None, f"no PROD: {state.describe()}"
    assert state.deployments[state.prod] == "Succeeded", state.describe()
    assert sum(state.traffic.values()) == 100, state.describe()
    for name, percent in state.traffic.items():
        if percent > 0:
            assert state.deployments.get(name) == "Succeeded", f"traffic on {name}: {state.describe()}"
            assert name in (state.prod, state.rc, state.baseline), \
                f"traffic on a deployment that is neither PROD, RC nor baseline: {state.describe()}"
    for name in state.mirror_traffic:
        assert state.deployments.get(name) == "Succeeded", state.describe()
    return state


def crashing(spec):
    return spec.with_changes(environment_variables={"SAFEROLLOUT_FAULT": "crash"})


# ---- next_step: what a resumed run does -------------------------------------------------------------

def state_of(phase: Phase, **fields) -> RolloutState:
    fields.setdefault("deployments", {"blue": "Succeeded", "green": "Succeeded"})
    return RolloutState(endpoint="ep", phase=phase, **fields)


@pytest.mark.parametrize("state, expected", [
    (state_of(Phase.NO_ENDPOINT), "deploy"),
    (state_of(Phase.EMPTY), "deploy"),
    (state_of(Phase.STABLE, prod="blue", models={"blue": "azureml:m:1"}), "deploy"),
    (state_of(Phase.RC_CREATED, prod="blue", rc="green"), "smoke"),
    (state_of(Phase.RC_CREATED, prod="blue", rc="green", deployments={"blue": "Succeeded", "green": "Creating"}),
     "deploy"),
    (state_of(Phase.SMOKE_TESTED, prod="blue", rc="green"), "shift:10"),
    (state_of(Phase.SHIFTING, prod="blue", rc="green", rc_percent=10), "gate:10"),
    (state_of(Phase.SHIFTING, prod="blue", rc="green", rc_percent=10, gates_passed=[10]), "shift:50"),
    (state_of(Phase.SHIFTING, prod="blue", rc="green", rc_percent=50, gates_passed=[10, 50]), "promote"),
    (state_of(Phase.SHIFTING, prod="blue", rc="green", rc_percent=30), "gate:30"),
    (state_of(Phase.SHIFTING, prod="blue", rc="green", rc_percent=30, gates_passed=[30]), "shift:50"),
    (state_of(Phase.SHIFTING, prod="blue", rc="green", rc_percent=100), "promote"),
    (state_of(Phase.PROMOTED, prod="green", old_prod="blue"), "bake"),
    (state_of(Phase.ROLLED_BACK, prod="blue", failed_rc="green", models={"green": "azureml:m:2"}), "deploy"),
])
def test_next_step_resumes_from_the_phase(state, expected):
    assert str(next_step(state, STEPS)) == expected


def test_next_step_is_done_when_prod_serves_the_model_or_its_rollout_was_rolled_back():
    models = {"blue": "azureml:m:1", "green": "azureml:m:2"}
    stable = state_of(Phase.STABLE, prod="green", models=models)
    assert str(next_step(stable, STEPS, model="azureml:m:2")) == "done"
    assert str(next_step(stable, STEPS, model="azureml:m:3")) == "deploy"
    rolled_back = state_of(Phase.ROLLED_BACK, prod="blue", failed_rc="green", models=models)
    assert str(next_step(rolled_back, STEPS, model="azureml:m:2")) == "done"
    assert str(next_step(rolled_back, STEPS, model="azureml:m:3")) == "deploy"


def test_next_step_is_a_typed_action_whose_short_form_rollout_show_prints():
    action = next_step(state_of(Phase.SHIFTING, prod="blue", rc="green", rc_percent=10, gates_passed=[10]), STEPS)
    assert action == NextAction(Next.SHIFT, 50) and action.percent == 50 and str(action) == "shift:50"
    assert next_step(state_of(Phase.PROMOTED, prod="green", old_prod="blue"), STEPS) == NextAction(Next.BAKE)


def test_next_step_with_a_single_full_step_promotes_after_the_smoke_test():
    assert str(next_step(state_of(Phase.SMOKE_TESTED, prod="blue", rc="green"), [100])) == "promote"


# ---- the phases on a real endpoint ------------------------------------------------------------------

def test_missing_endpoint_reads_as_no_endpoint_and_deploying_to_it_says_to_create_it(local_backend, spec, models):
    state = rollout.read_state(local_backend, "ro-never-created")
    assert state.phase == Phase.NO_ENDPOINT and str(next_step(state, STEPS)) == "deploy"
    with pytest.raises(NotFound, match="endpoint 'ro-never-created' does not exist: create it first"):
        rollout.deploy_candidate(local_backend, "ro-never-created", spec, models[0])


def test_first_release_deploys_prod_at_100_percent_and_running_it_again_changes_nothing(
        local_backend, endpoint, spec, models):
    assert rollout.read_state(local_backend, endpoint).phase == Phase.EMPTY
    state = rollout.deploy_candidate(local_backend, endpoint, spec, models[0])
    assert state.phase == Phase.STABLE
    assert (state.prod, state.rc, state.traffic) == ("blue", None, {"blue": 100})
    assert local_backend.get_endpoint(endpoint).tags[rollout.PROD_TAG] == "blue"
    dep = local_backend.get_deployment(endpoint, "blue")
    assert dep.tags[rollout.ROLE_TAG] == "prod" and dep.tags[rollout.MODEL_TAG] == models[0]
    assert str(next_step(state, STEPS, model=models[0])) == "done"
    again = rollout.deploy_candidate(local_backend, endpoint, spec, models[0])
    assert again == state
    assert [d.name for d in local_backend.list_deployments(endpoint)] == ["blue"]


def test_an_untagged_endpoint_with_live_traffic_is_not_taken_over_by_a_first_release(
        local_backend, endpoint, spec, models):
    # an endpoint made with `az ml` (no saferollout tags) already serving production from its own deployment
    local_backend.create_deployment(spec.with_changes(name="live-one", model=models[0]), wait=True)
    local_backend.update_endpoint(endpoint, traffic={"live-one": 100})
    assert rollout.read_state(local_backend, endpoint).phase == Phase.EMPTY
    with pytest.raises(Conflict, match=r"no PROD_DEPLOYMENT tag but serves live traffic \(live-one=100\)"):
        rollout.deploy_candidate(local_backend, endpoint, spec, models[1])
    assert local_backend.get_endpoint(endpoint).traffic == {"live-one": 100}
    assert [d.name for d in local_backend.list_deployments(endpoint)] == ["live-one"]
    # as the message says: name PROD, and the candidate becomes an RC at 0%
    assert cli.main(["online-endpoint", "update", "-n", endpoint, "--set", f"tags.{rollout.PROD_TAG}=live-one",
                     "-o", "none"]) == 0
    state = rollout.deploy_candidate(local_backend, endpoint, spec, models[1])
    assert (state.phase, state.prod, state.rc, state.traffic) == (Phase.RC_CREATED, "live-one", "blue",
                                                                  {"live-one": 100})


def test_candidate_goes_through_every_phase_to_a_completed_rollout(local_backend, released, spec, models, bodies):
    endpoint = released
    state = rollout.deploy_candidate(local_backend, endpoint, spec, models[1])
    assert (state.phase, state.prod, state.rc, state.rc_percent) == (Phase.RC_CREATED, "blue", "green", 0)
    assert state.rc_model == models[1] and state.prod_model == models[0]
    assert rollout.deploy_candidate(local_backend, endpoint, spec, models[1]) == state  # re-run reuses it
    assert str(next_step(state, STEPS)) == "smoke"

    wrong = rollout.smoke_test(local_backend, endpoint, "green", bodies[:2], check=lambda answer: "too optimistic")
    assert not wrong.ok and wrong.failures == ["request 0: too optimistic", "request 1: too optimistic"]
    with pytest.raises(GateFailed, match=r"smoke test of 'green' failed: 2 of 2 requests \(request 0: too optimistic"):
        wrong.raise_if_failed()
    with pytest.raises(GateFailed, match="no requests were sent"):
        rollout.smoke_test(local_backend, endpoint, "green", []).raise_if_failed()
    missing = rollout.smoke_test(local_backend, endpoint, "nosuch", bodies[:1])
    assert not missing.ok and missing.failures[0].startswith("request 0: status 404")
    smoke = rollout.smoke_test(local_backend, endpoint, "green", bodies)
    assert smoke.ok and smoke.n == len(bodies) and smoke.failures == [] and len(smoke.latencies) == len(bodies)
    assert local_backend.request_samples(endpoint, deployment="green")  # it really went to green
    state = rollout.mark_smoke_tested(local_backend, endpoint)
    assert state.phase == Phase.SMOKE_TESTED and str(next_step(state, STEPS)) == "shift:10"

    state = rollout.shift_traffic(local_backend, endpoint, 10)
    assert (state.phase, state.traffic) == (Phase.SHIFTING, {"blue": 90, "green": 10})
    assert rollout.shift_traffic(local_backend, endpoint, 10) == state
    assert str(next_step(state, STEPS)) == "gate:10"
    state = rollout.mark_gate_passed(local_backend, endpoint)
    assert state.gates_passed == [10] and str(next_step(state, STEPS)) == "shift:50"
    with pytest.raises(Conflict, match="cannot delete the old PROD on .* in phase SHIFTING: promote first"):
        rollout.delete_old_prod(local_backend, endpoint)
    state = rollout.shift_traffic(local_backend, endpoint, 50)
    assert state.traffic == {"blue": 50, "green": 50} and str(next_step(state, STEPS)) == "gate:50"

    state = rollout.promote(local_backend, endpoint)
    assert (state.phase, state.prod, state.old_prod, state.rc) == (Phase.PROMOTED, "green", "blue", None)
    assert state.traffic == {"blue": 0, "green": 100}
    tags = local_backend.get_endpoint(endpoint).tags
    assert (tags[rollout.PROD_TAG], tags[rollout.OLD_PROD_TAG]) == ("green", "blue")
    assert rollout.RC_TAG not in tags
    assert rollout.promote(local_backend, endpoint) == state
    assert str(next_step(state, STEPS)) == "bake"

    state = rollout.delete_old_prod(local_backend, endpoint)
    assert (state.phase, state.prod, state.traffic) == (Phase.STABLE, "green", {"green": 100})
    assert [d.name for d in local_backend.list_deployments(endpoint)] == ["green"]
    assert rollout.OLD_PROD_TAG not in local_backend.get_endpoint(endpoint).tags
    assert rollout.delete_old_prod(local_backend, endpoint) == state
    assert str(next_step(state, STEPS, model=models[1])) == "done"


def test_traffic_moves_to_the_rc_only_after_its_smoke_test_and_stops_mirroring_to_it(
        local_backend, released, spec, models):
    # an RC at 0% left by an abandoned run, with other settings, is replaced by the new candidate
    slow = spec.with_changes(environment_variables={"SAFEROLLOUT_FAULT": "latency"})
    rollout.deploy_candidate(local_backend, released, slow, models[1])
    state = rollout.deploy_candidate(local_backend, released, spec, models[1])
    assert (state.phase, state.rc) == (Phase.RC_CREATED, "green")
    assert local_backend.get_deployment(released, "green").environment_variables["SAFEROLLOUT_FAULT"] == "none"
    with pytest.raises(Conflict, match="cannot shift traffic on .* in phase RC_CREATED: smoke-test the RC first"):
        rollout.shift_traffic(local_backend, released, 10)
    with pytest.raises(Conflict, match="cannot promote on .* in phase RC_CREATED: smoke-test the RC first"):
        rollout.promote(local_backend, released)
    assert rollout.read_state(local_backend, released).traffic == {"blue": 100}
    rollout.mark_smoke_tested(local_backend, released)
    local_backend.update_endpoint(released, mirror_traffic={"green": 20})
    state = rollout.shift_traffic(local_backend, released, 10)
    assert state.traffic == {"blue": 90, "green": 10} and state.mirror_traffic == {}


def test_crashing_rc_fails_to_deploy_and_never_gets_traffic(local_backend, released, spec, models):
    endpoint = released
    with pytest.raises(DeploymentFailed, match=r"deployment 'green' on .* failed: .*init\(\)") as failure:
        rollout.deploy_candidate(local_backend, endpoint, crashing(spec), models[1])
    assert "SAFEROLLOUT_FAULT=crash" in failure.value.logs
    state = assert_safe(local_backend, endpoint)
    assert (state.phase, state.failed_rc, state.rc, state.traffic) == (Phase.ROLLED_BACK, "green", None,
                                                                       {"blue": 100})
    assert state.rollback_reason.startswith("RC failed to start:")
    with pytest.raises(Conflict, match="cannot shift traffic on .* in phase ROLLED_BACK"):
        rollout.shift_traffic(local_backend, endpoint, 10)
    with pytest.raises(Conflict, match="cannot promote on .* in phase ROLLED_BACK: the RC 'green' was rolled back"):
        rollout.promote(local_backend, endpoint)

    # a run killed after the start failed but before marking it: the RC tag still names the failed RC
    tags = dict(local_backend.get_endpoint(endpoint).tags, **{rollout.RC_TAG: "green",
                                                               rollout.SMOKE_TESTED_TAG: "green"})
    tags.pop(rollout.FAILED_RC_TAG)
    local_backend.update_endpoint(endpoint, tags=tags)
    with pytest.raises(Conflict, match="cannot route traffic to 'green' on .*: its state is Failed"):
        rollout.shift_traffic(local_backend, endpoint, 10)
    with pytest.raises(DeploymentFailed, match="deployment 'green' on .* failed"):  # resuming marks it failed
        rollout.deploy_candidate(local_backend, endpoint, crashing(spec), models[1])
    assert rollout.read_state(local_backend, endpoint).phase == Phase.ROLLED_BACK

    # the next rollout replaces the failed RC under the same name
    state = rollout.deploy_candidate(local_backend, endpoint, spec, models[1])
    assert (state.phase, state.rc, state.failed_rc) == (Phase.RC_CREATED, "green", None)
    assert state.deployments["green"] == "Succeeded"
    assert local_backend.get_deployment(endpoint, "green").environment_variables["SAFEROLLOUT_FAULT"] == "none"


def test_rollback_from_shifting_leaves_prod_at_100_and_the_rc_tagged_failed(
        local_backend, released, spec, models, bodies):
    endpoint = released
    rollout.deploy_candidate(local_backend, endpoint, spec, models[1])
    rollout.mark_smoke_tested(local_backend, endpoint)
    rollout.shift_traffic(local_backend, endpoint, 50)
    with pytest.raises(Conflict, match="deployment 'green' on .* serves another candidate .* at 50%: roll it back first"):
        rollout.deploy_candidate(local_backend, endpoint, crashing(spec), models[1])
    with pytest.raises(Conflict, match=r"PROD 'blue' on .* already serves .*, and RC 'green' \(.*\) is in flight "
                                        "at 50%: finish or roll back that rollout first"):
        rollout.deploy_candidate(local_backend, endpoint, spec, models[0])
    rollout.acquire_lock(local_backend, endpoint, "ci", "run-1")
    state = rollout.rollback(local_backend, endpoint, "gate at 50% failed: p99 latency 900 ms > 500 ms")
    assert (state.phase, state.prod, state.rc, state.failed_rc) == (Phase.ROLLED_BACK, "blue", None, "green")
    assert state.traffic == {"blue": 100, "green": 0} and state.mirror_traffic == {}
    assert state.lock is None
    assert state.rollback_reason == "gate at 50% failed: p99 latency 900 ms > 500 ms"
    assert state.deployments["green"] == "Succeeded"  # kept for its logs
    assert_safe(local_backend, endpoint)
    assert rollout.rollback(local_backend, endpoint, "again") == state  # idempotent
    answers = [local_backend.invoke(endpoint, body) for body in bodies]
    assert {a.deployment for a in answers} == {"blue"}


def test_rollback_after_promotion_gives_traffic_back_to_the_old_prod(local_backend, released, spec, models):
    endpoint = released
    rollout.deploy_candidate(local_backend, endpoint, spec, models[1])
    rollout.mark_smoke_tested(local_backend, endpoint)
    rollout.promote(local_backend, endpoint)
    with pytest.raises(Conflict, match="has a promoted rollout that is not finished"):
        rollout.deploy_candidate(local_backend, endpoint, spec, models[0])
    local_backend.update_endpoint(endpoint, mirror_traffic={"blue": 20})  # the old PROD may be mirrored to
    state = rollout.rollback(local_backend, endpoint, "bake gate failed")
    assert (state.phase, state.prod, state.failed_rc, state.old_prod) == (Phase.ROLLED_BACK, "blue", "green", None)
    assert state.traffic == {"blue": 100, "green": 0} and state.mirror_traffic == {}
    assert rollout.OLD_PROD_TAG not in local_backend.get_endpoint(endpoint).tags
    assert_safe(local_backend, endpoint)


def test_rollback_of_a_missing_endpoint_says_so(local_backend):
    with pytest.raises(NotFound, match="endpoint 'ro-not-there' does not exist: nothing to roll back"):
        rollout.rollback(local_backend, "ro-not-there", "why not")


# ---- the lock ---------------------------------------------------------------------------------------

def test_lock_stops_a_second_rollout_and_names_its_holder(local_backend, endpoint):
    lock = rollout.acquire_lock(local_backend, endpoint, "alice@ci", "run-7")
    assert (lock["owner"], lock["run"]) == ("alice@ci", "run-7")
    assert rollout.read_state(local_backend, endpoint).lock == lock
    assert rollout.acquire_lock(local_backend, endpoint, "alice@ci", "run-7") == lock  # a resumed run
    with pytest.raises(Conflict) as held:
        rollout.acquire_lock(local_backend, endpoint, "bob@laptop", "run-8")
    message = str(held.value)
    assert f"endpoint '{endpoint}' is locked by alice@ci (run run-7)" in message
    assert "break_stale_after_s" in message and "force=True" in message
    with pytest.raises(Conflict, match="locked by alice@ci"):  # not stale yet
        rollout.acquire_lock(local_backend, endpoint, "bob@laptop", "run-8", break_stale_after_s=3600)
    with pytest.raises(Conflict, match="locked by alice@ci"):  # the same owner in another run is another rollout
        rollout.acquire_lock(local_backend, endpoint, "alice@ci", "run-9")
    with pytest.raises(Conflict, match="cannot release the lock on .*: it is held by alice@ci, not bob@laptop"):
        rollout.release_lock(local_backend, endpoint, "bob@laptop")


def test_a_stale_lock_can_be_broken_and_force_breaks_any(local_backend, endpoint):
    rollout.acquire_lock(local_backend, endpoint, "dead-runner", "run-1")
    time.sleep(0.05)
    lock = rollout.acquire_lock(local_backend, endpoint, "new-runner", "run-2", break_stale_after_s=0.01)
    assert lock["owner"] == "new-runner"
    lock = rollout.acquire_lock(local_backend, endpoint, "operator", force=True)
    assert lock["owner"] == "operator"
    rollout.release_lock(local_backend, endpoint, "operator")
    assert rollout.read_state(local_backend, endpoint).lock is None
    rollout.release_lock(local_backend, endpoint)  # releasing nothing is fine
    assert rollout.LOCK_TAG not in local_backend.get_endpoint(endpoint).tags


def test_a_lock_whose_holder_on_this_machine_is_gone_is_taken_over(local_backend, endpoint, monkeypatch):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    monkeypatch.setenv(rollout.RUNNER_PID_ENV, str(gone.pid))  # as a runner that was killed since
    dead = rollout.acquire_lock(local_backend, endpoint, "ci@here", "killed-run")
    assert (dead["pid"], dead["host"]) == (gone.pid, socket.gethostname())
    monkeypatch.delenv(rollout.RUNNER_PID_ENV)
    lock = rollout.acquire_lock(local_backend, endpoint, "ci@here", "next-run")
    assert (lock["run"], lock["pid"]) == ("next-run", os.getpid())
    # a live holder keeps it, and so does a holder on another machine, whose processes we cannot see
    with pytest.raises(Conflict, match="locked by ci@here \\(run next-run\\)"):
        rollout.acquire_lock(local_backend, endpoint, "ci@here", "third-run")
    remote = dict(dead, host="another-machine")
    local_backend.update_endpoint(endpoint, tags={**local_backend.get_endpoint(endpoint).tags,
                                                  rollout.LOCK_TAG: json.dumps(remote)})
    with pytest.raises(Conflict, match="locked by ci@here \\(run killed-run\\)"):
        rollout.acquire_lock(local_backend, endpoint, "ci@here", "third-run")
    rollout.release_lock(local_backend, endpoint)


def test_a_resumed_run_reclaims_its_lock_so_no_other_run_can_take_it_over(local_backend, endpoint, monkeypatch):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    monkeypatch.setenv(rollout.RUNNER_PID_ENV, str(gone.pid))  # the runner that took the lock was killed
    rollout.acquire_lock(local_backend, endpoint, "ci@here", "run-1")
    monkeypatch.setenv(rollout.RUNNER_PID_ENV, str(os.getpid()))  # its run resumed in this process
    assert rollout.reclaim_lock(local_backend, endpoint, "another-run") is None  # not its lock: untouched
    lock = rollout.reclaim_lock(local_backend, endpoint, "run-1")
    assert (lock["run"], lock["pid"], lock["owner"]) == ("run-1", os.getpid(), "ci@here")
    with pytest.raises(Conflict, match="locked by ci@here \\(run run-1\\)"):
        rollout.acquire_lock(local_backend, endpoint, "ci@here", "run-2")
    rollout.release_lock(local_backend, endpoint)
    assert rollout.reclaim_lock(local_backend, endpoint, "run-1") is None  # no lock: nothing to reclaim
    assert rollout.reclaim_lock(local_backend, "ro-not-there", "run-1") is None


def test_of_runs_racing_for_the_lock_one_wins_and_the_others_are_told_who(local_backend, endpoint):
    outcomes: dict[str, str] = {}

    def contend(owner: str) -> None:
        try:
            rollout.acquire_lock(local_backend, endpoint, owner, "race")
            outcomes[owner] = "won"
        except Conflict as exc:
            outcomes[owner] = str(exc)

    threads = [threading.Thread(target=contend, args=(f"runner-{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    winners = [owner for owner, outcome in outcomes.items() if outcome == "won"]
    assert len(outcomes) == 3 and len(winners) == 1, outcomes
    holder = rollout.read_state(local_backend, endpoint).lock["owner"]
    assert winners == [holder]
    # each loser is told who held the lock when it looked (the last writer wins, so that may be a runner
    # that lost to a later write in turn)
    assert all(f"is locked by runner-" in outcome for owner, outcome in outcomes.items() if owner != holder)


def test_lock_keeps_the_endpoints_other_tags(local_backend, endpoint):
    before = dict(local_backend.get_endpoint(endpoint).tags)
    rollout.acquire_lock(local_backend, endpoint, "ci", "r")
    rollout.release_lock(local_backend, endpoint)
    assert local_backend.get_endpoint(endpoint).tags == before == {"project": "saferollout"}


# ---- the kill-at-each-step test ---------------------------------------------------------------------

# (marker, seconds to wait after it before SIGKILL): each boundary, and a few moments inside a step
KILL_POINTS = [
    ("begin deploy", 0.4),  # while the RC is being created and started
    ("done deploy", 0.0),
    ("begin smoke", 0.05),
    ("done smoke", 0.0),
    ("begin shift:10", 0.0),
    ("done shift:10", 0.0),
    ("done gate:10", 0.0),
    ("done shift:50", 0.0),
    ("done gate:50", 0.0),
    ("begin promote", 0.0),
    ("done promote", 0.0),
    ("begin bake", 0.05),  # while the old PROD is being deleted
    ("done bake", 0.0),
    ("begin done", 0.0),
]
# the markers of a whole rollout in order: a resumed run skips what is done, so a kill point whose own
# marker never comes fires at the first marker after it
ORDER = [f"{edge} {step}" for step in ("deploy", "smoke", "shift:10", "gate:10", "shift:50", "gate:50", "promote",
                                       "bake", "done") for edge in ("begin", "done")]


def run_driver(args: list[str], kill_on: str | None, delay_s: float) -> tuple[list[str], bool]:
    """Run the driver; SIGKILL it `delay_s` after it prints `kill_on` (or a later marker of ORDER).

    -> (its markers, whether it was killed)."""
    proc = subprocess.Popen([sys.executable, str(DRIVER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ))
    timer = threading.Timer(120, proc.kill)  # a hung driver must not hang the suite
    timer.start()
    markers, killed = [], False
    try:
        for line in proc.stdout:
            markers.append(line.strip())
            if kill_on is not None and line.strip() in ORDER[ORDER.index(kill_on):]:
                time.sleep(delay_s)
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
        proc.wait(60)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        err = proc.stderr.read()
        proc.stderr.close()
    if not killed:
        assert proc.returncode == 0, f"driver failed: {err}"
    return markers, killed


@pytest.mark.slow
def test_killing_the_rollout_at_each_step_and_running_it_again_completes_it(
        local_backend, released, example_dir, models, bodies, tmp_path):
    endpoint = released
    bodies_file = tmp_path / "bodies.json"
    bodies_file.write_text(json.dumps([b.decode() for b in bodies[:2]]))
    args = [endpoint, str(example_dir / "deployment.yml"), models[1], "kill-run", "10,50,100", str(bodies_file)]
    load = traffic.LoadGenerator(local_backend, endpoint, bodies, rps=10, results_path=tmp_path / "load.jsonl")
    load.start()
    kills = 0
    try:
        for marker, delay in KILL_POINTS:
            markers, killed = run_driver(args, marker, delay)
            kills += killed
            state = assert_safe(local_backend, endpoint)
            assert state.lock is None or state.lock["run"] == "kill-run", state.describe()
        markers, killed = run_driver(args, None, 0.0)  # the last run, left alone, finishes it
    finally:
        result = load.stop()
    assert not killed and markers[-1] == "done done"
    assert kills == len(KILL_POINTS)
    state = assert_safe(local_backend, endpoint)
    assert (state.phase, state.prod, state.prod_model, state.lock) == (Phase.STABLE, "green", models[1], None)
    assert state.traffic == {"green": 100} and list(state.deployments) == ["green"]
    # clients saw no failure while the runner was killed over and over
    assert result.sent > 0 and result.failed == 0, result.to_dict()
    assert set(result.by_deployment) <= {"blue", "green"}


# ---- the `saferollout rollout` command --------------------------------------------------------------

def test_rollout_show_prints_the_state_and_what_a_resumed_run_would_do(endpoint, capsys):
    assert cli.main(["rollout", "show", "-n", endpoint]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["endpoint"], shown["phase"], shown["prod"], shown["next_step"]) == (endpoint, "EMPTY", None, "deploy")


def test_rollout_unlock_breaks_only_a_stale_lock_unless_forced(local_backend, endpoint, capsys):
    rollout.acquire_lock(local_backend, endpoint, "dead-runner", "run-3")
    assert cli.main(["rollout", "unlock", "-n", endpoint]) == 2
    assert capsys.readouterr().err.strip() == ("error: say which lock to break: --older-than SECONDS (a stale one) "
                                               "or --force (any)")
    assert cli.main(["rollout", "unlock", "-n", endpoint, "--older-than", "3600"]) == 1
    assert re.search(r"is held by dead-runner \(run run-3\) for \d+ s, not more than 3600 s: it is not stale; "
                     "use --force", capsys.readouterr().err)
    assert rollout.read_state(local_backend, endpoint).lock["owner"] == "dead-runner"
    assert cli.main(["rollout", "unlock", "-n", endpoint, "--force"]) == 0
    assert json.loads(capsys.readouterr().out)["released"]["owner"] == "dead-runner"
    assert rollout.read_state(local_backend, endpoint).lock is None
    assert cli.main(["rollout", "unlock", "-n", "ro-not-there", "--force"]) == 1
    assert capsys.readouterr().err.strip() == "error: endpoint 'ro-not-there' not found"


def test_the_lock_conflict_names_the_command_that_breaks_it(local_backend, endpoint):
    rollout.acquire_lock(local_backend, endpoint, "alice@ci", "run-1")
    with pytest.raises(Conflict, match=f"`saferollout rollout unlock -n {endpoint} --older-than SECONDS`"):
        rollout.acquire_lock(local_backend, endpoint, "bob@ci", "run-2")


def test_rollout_rollback_command_releases_the_lock(local_backend, endpoint, capsys):
    rollout.acquire_lock(local_backend, endpoint, "ci", "run-4")
    assert cli.main(["rollout", "rollback", "-n", endpoint, "--reason", "operator said so"]) == 0
    assert json.loads(capsys.readouterr().out)["lock"] is None


# ---- the baseline: PROD's model deployed afresh beside the RC --------------------------------------

def _candidate_with_baseline(backend, endpoint, spec, models):
    rollout.deploy_candidate(backend, endpoint, spec, models[1])
    return rollout.deploy_baseline(backend, endpoint, spec)


def test_a_baseline_serves_prods_model_takes_the_rcs_share_and_goes_at_the_promotion(
        local_backend, released, spec, models, bodies):
    state = _candidate_with_baseline(local_backend, released, spec, models)
    assert state.baseline == "baseline" and state.control == "baseline"
    assert state.models["baseline"] == state.prod_model == rollout.resolve_model_ref(local_backend, models[0])
    assert rollout.smoke_test(local_backend, released, state.rc, bodies).ok
    rollout.mark_smoke_tested(local_backend, released)
    state = rollout.shift_traffic(local_backend, released, 10)
    assert state.traffic == {"blue": 80, "green": 10, "baseline": 10}
    assert_safe(local_backend, released)
    assert rollout.shift_traffic(local_backend, released, 50).traffic == {"blue": 0, "green": 50, "baseline": 50}
    with pytest.raises(Conflict, match="with the baseline 'baseline' taking the same share, each can have at most "
                                       "50% before the promotion"):
        rollout.shift_traffic(local_backend, released, 60)
    state = rollout.promote(local_backend, released)
    assert state.phase == Phase.PROMOTED and state.baseline is None
    assert "baseline" not in state.deployments and state.traffic == {"green": 100, "blue": 0}
    assert rollout.BASELINE_TAG not in local_backend.get_endpoint(released).tags


def test_a_rollback_removes_the_baseline_and_gives_prod_everything(local_backend, released, spec, models, bodies):
    state = _candidate_with_baseline(local_backend, released, spec, models)
    rollout.mark_smoke_tested(local_backend, released)
    rollout.shift_traffic(local_backend, released, 10)
    state = rollout.rollback(local_backend, released, "gate failed")
    assert state.phase == Phase.ROLLED_BACK and state.baseline is None and "baseline" not in state.deployments
    assert state.traffic == {"blue": 100, "green": 0}
    assert rollout.rollback(local_backend, released, "again").phase == Phase.ROLLED_BACK  # idempotent


def test_a_baseline_is_deployed_beside_an_rc_at_zero_only(local_backend, released, spec):
    with pytest.raises(Conflict, match=r"a baseline is deployed beside an RC at 0%, but '.*' is in phase STABLE"):
        rollout.deploy_baseline(local_backend, released, spec)


def test_deploying_the_baseline_again_reuses_it(local_backend, released, spec, models):
    first = _candidate_with_baseline(local_backend, released, spec, models)
    again = rollout.deploy_baseline(local_backend, released, spec)
    assert again.baseline == first.baseline and again.deployments["baseline"] == "Succeeded"
