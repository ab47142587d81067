"""The rollout state machine, one module per concern; every name the notebooks call is importable from here.

    state        the phases and tags, `read_state`, and `write_state` (the one way rollout state is written)
    lock         one rollout per endpoint: acquire, reclaim, release
    deploy       the endpoint, the first release, the RC at 0% and the baseline beside it
    smoke        the RC's answers to sample requests, compared in structure with PROD's
    rules        which action is allowed in which phase (one table), and the guard that refuses the others
    transitions  `next_step` (a typed `NextAction`), the smoke-tested and gate-passed marks, shift, promote,
                 delete the old PROD, roll back

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
from saferollout.rollout.state import (BASELINE_TAG, FAILED_RC_TAG, FINGERPRINT_TAG, GATES_PASSED_TAG, LOCK_TAG,
                                       MAX_TAG_CHARS, MODEL_TAG, OLD_PROD_TAG, PROD_TAG, Phase, RC_TAG, ROLE_TAG,
                                       ROLLBACK_REASON_TAG, ROLLOUT_TAGS, RolloutState, SMOKE_TESTED_TAG, read_state,
                                       write_state)
from saferollout.rollout.lock import (LOCK_SETTLE_S, RUNNER_PID_ENV, acquire_lock, default_owner, holder_pid,
                                      reclaim_lock, release_lock)
from saferollout.rollout.deploy import (BASELINE_NAME, DEPLOYMENT_NAMES, DEPLOY_TIMEOUT_S, deploy_baseline,
                                        deploy_candidate, ensure_endpoint, remove_baseline, resolve_model_ref)
from saferollout.rollout.smoke import (SmokeResult, smoke_test, structure_difference)
from saferollout.rollout.rules import (RULES, Action, guard, refusal)
from saferollout.rollout.transitions import (Next, NextAction, delete_old_prod, mark_gate_passed, mark_smoke_tested,
                                             next_step, promote, rollback, shift_traffic)

__all__ = [
    "Action",
    "BASELINE_NAME",
    "BASELINE_TAG",
    "DEPLOYMENT_NAMES",
    "DEPLOY_TIMEOUT_S",
    "FAILED_RC_TAG",
    "FINGERPRINT_TAG",
    "GATES_PASSED_TAG",
    "LOCK_SETTLE_S",
    "LOCK_TAG",
    "MAX_TAG_CHARS",
    "MODEL_TAG",
    "Next",
    "NextAction",
    "OLD_PROD_TAG",
    "PROD_TAG",
    "Phase",
    "RC_TAG",
    "ROLE_TAG",
    "ROLLBACK_REASON_TAG",
    "ROLLOUT_TAGS",
    "RULES",
    "RUNNER_PID_ENV",
    "RolloutState",
    "SMOKE_TESTED_TAG",
    "SmokeResult",
    "acquire_lock",
    "default_owner",
    "delete_old_prod",
    "deploy_baseline",
    "deploy_candidate",
    "ensure_endpoint",
    "guard",
    "holder_pid",
    "mark_gate_passed",
    "mark_smoke_tested",
    "next_step",
    "promote",
    "read_state",
    "reclaim_lock",
    "refusal",
    "release_lock",
    "remove_baseline",
    "resolve_model_ref",
    "rollback",
    "shift_traffic",
    "smoke_test",
    "structure_difference",
    "write_state",
]
