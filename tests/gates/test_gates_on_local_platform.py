"""Gates against the real local platform: missing data never passes; the ML gates end to end."""
from __future__ import annotations

import math
import time

import pytest

from saferollout import data
from saferollout.gates import GateContext, run_gates
from saferollout.gates.compare import CompareGate
from saferollout.gates.ml import AgreementGate, QualityGate
from saferollout.gates.sequential import SequentialGate
from saferollout.gates.threshold import ThresholdGate
from saferollout.specs import EndpointSpec, load_deployment_spec


@pytest.fixture(scope="module")
def credit_endpoint(local_backend, example_dir, credit_model_dir, tmp_path_factory):
    """An endpoint with blue (PROD) and red: the same model registered with worse metrics, serving flipped."""
    import uuid

    suffix = uuid.uuid4().hex[:6]
    endpoint, model = f"gates-{suffix}", f"credit-gates-{suffix}"
    good = local_backend.register_model(model, str(credit_model_dir),
                                        properties={"auc": "0.80", "accuracy": "0.75", "log_loss": "0.50"})
    worse = local_backend.register_model(model, str(credit_model_dir),
                                         properties={"auc": "0.70", "accuracy": "0.74", "log_loss": "0.55"})
    local_backend.create_endpoint(EndpointSpec(name=endpoint, auth_mode="key"))
    specs = {"blue": (good.ref, "none"), "red": (worse.ref, "flip")}
    for name, (ref, fault) in specs.items():
        spec = load_deployment_spec(example_dir / "deployment.yml", name=name, endpoint_name=endpoint, model=ref)
        local_backend.create_deployment(spec.with_changes(
            environment_variables={**spec.environment_variables, "SAFEROLLOUT_FAULT": fault}), wait=False)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        states = {n: local_backend.get_deployment(endpoint, n).provisioning_state for n in specs}
        if all(s in ("Succeeded", "Failed") for s in states.values()):
            break
        time.sleep(0.2)
    assert set(states.values()) == {"Succeeded"}, states
    local_backend.update_endpoint(endpoint, traffic={"blue": 100})
    try:
        yield endpoint
    finally:
        local_backend.update_endpoint(endpoint, traffic={"blue": 0}, mirror_traffic={})
        local_backend.delete_endpoint(endpoint)


def look(backend, endpoint, rc="red", start=None):
    now = time.time()
    return GateContext(backend=backend, endpoint=endpoint, rc=rc, prod="blue", start=start or now - 60, now=now)


def test_no_traffic_is_inconclusive_for_every_data_gate(local_backend, credit_endpoint):
    ctx = look(local_backend, credit_endpoint)
    verdicts = {g.name: g.check(ctx) for g in (SequentialGate(metric="errors"), SequentialGate(metric="latency"),
                                               CompareGate(metric="errors"),
                                               CompareGate(metric="errors", mode="aggregates"),
                                               ThresholdGate(preset="errors", grain="PT5S", intervals=3))}
    assert {v.decision for v in verdicts.values()} == {"inconclusive"}
    assert verdicts["errors-sequential"].reason == "too few samples: red has 0, blue has 0 (need 30 per deployment)"
    assert verdicts["errors-threshold"].reason.endswith("3 of the last 3 intervals have no data (the filter matched "
                                                        "no request in scope)")


def test_an_unknown_metric_is_inconclusive_then_fails_at_the_limit(local_backend, credit_endpoint):
    gate = ThresholdGate(metric="RequestLatencyP90", threshold=100, max_duration_s=2)
    report = run_gates([gate], local_backend, credit_endpoint, "red", "blue", poll_s=0.5)
    assert report.decision == "fail" and len(report.history) >= 2
    assert report.history[0].decision == "inconclusive"
    assert report.verdicts[0].reason.startswith("no decision within 2s: SpecError: unknown metric 'RequestLatencyP90'")


def test_a_filter_matching_no_deployment_is_inconclusive(local_backend, credit_endpoint):
    start = float(int(time.time()))  # whole seconds, so PT1S intervals are complete once they end
    for body in data.sample_requests(data.split().X_test.head(10)):
        assert local_backend.invoke(credit_endpoint, body).ok
    # wait until the second holding the last request is over (and two seconds have passed)
    time.sleep(max(0.0, max(start + 2, math.ceil(time.time())) - time.time() + 0.05))
    gate = ThresholdGate(metric="RequestsPerMinute", aggregation="Total", threshold=5, grain="PT1S", intervals=2,
                         filter="deployment eq 'purple'")
    verdict = gate.check(look(local_backend, credit_endpoint, start=start))
    assert verdict.decision == "inconclusive"
    assert verdict.reason.endswith("2 of the last 2 intervals have no data (the filter matched no request in scope)")
    served = ThresholdGate(metric="RequestsPerMinute", aggregation="Total", threshold=100, grain="PT1S", intervals=1,
                           filter="deployment eq 'blue'").check(look(local_backend, credit_endpoint, start=start))
    assert sum(v or 0 for v in served.evidence["values"]) == 10  # the same window does hold blue's requests


def test_offline_quality_fails_a_model_registered_with_a_lower_auc(local_backend, credit_endpoint):
    verdict = QualityGate().check(look(local_backend, credit_endpoint))
    assert verdict.decision == "fail" and verdict.reason.startswith("the RC's held-out metrics are worse than PROD's: auc 0.7")
    assert QualityGate().check(look(local_backend, credit_endpoint, rc="blue")).decision == "pass"


def test_agreement_through_the_deployment_header(local_backend, credit_endpoint):
    flipped = AgreementGate(n=20).check(look(local_backend, credit_endpoint))
    assert flipped.decision == "fail" and flipped.evidence["rows"] == 20 and flipped.evidence["agreement"] < 0.2
    assert "agreement below 95.0%" in flipped.reason
    same = AgreementGate(n=20).check(look(local_backend, credit_endpoint, rc="blue"))
    assert same.decision == "pass" and same.evidence["agreement"] == 1.0


def test_agreement_from_mirrored_live_traffic(local_backend, credit_endpoint):
    local_backend.update_endpoint(credit_endpoint, mirror_traffic={"red": 50})
    start = time.time() - 0.5
    try:
        for body in data.sample_requests(data.split().X_test.head(40)):
            assert local_backend.invoke(credit_endpoint, body).ok
        gate = AgreementGate(source="mirror", n=10)
        deadline = time.monotonic() + 10  # the mirror answers in the background
        while (verdict := gate.check(look(local_backend, credit_endpoint, rc="red", start=start))).decision \
                == "inconclusive" and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        local_backend.update_endpoint(credit_endpoint, mirror_traffic={})
    assert verdict.decision == "fail" and verdict.evidence["source"] == "mirror"
    assert verdict.evidence["rows"] >= 10 and verdict.evidence["agreement"] < 0.2
