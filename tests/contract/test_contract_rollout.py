"""The rollout's baseline on both backends: PROD's model deployed afresh beside the RC, at the RC's share,
removed at the promotion (a third deployment through the same protocol: Azure's limits apply too)."""
from __future__ import annotations

from saferollout import rollout
from saferollout.rollout import Phase


def test_a_baseline_takes_the_rcs_share_and_is_removed_at_the_promotion(backend, make_endpoint, deployments):
    endpoint = make_endpoint("bl")
    prod_spec = deployments.spec(endpoint, "blue")
    rollout.deploy_candidate(backend, endpoint, prod_spec, deployments.model_ref)  # the first release
    rc_spec = deployments.spec(endpoint, "green", CANDIDATE="2")  # other settings: a new candidate
    state = rollout.deploy_candidate(backend, endpoint, rc_spec, deployments.model_ref)
    assert state.phase == Phase.RC_CREATED and state.rc == "green"
    state = rollout.deploy_baseline(backend, endpoint, prod_spec)
    assert state.baseline == "baseline" and state.deployments["baseline"] == "Succeeded"
    assert state.models["baseline"] == state.prod_model
    rollout.mark_smoke_tested(backend, endpoint)
    state = rollout.shift_traffic(backend, endpoint, 10)
    assert backend.get_endpoint(endpoint).traffic == {"blue": 80, "green": 10, "baseline": 10}
    state = rollout.promote(backend, endpoint)
    assert state.phase == Phase.PROMOTED and state.baseline is None and "baseline" not in state.deployments
    assert rollout.BASELINE_TAG not in backend.get_endpoint(endpoint).tags
