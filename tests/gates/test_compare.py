"""The comparative gate: known-answer tests, samples and aggregates modes, missing data, its error bound."""
import numpy as np
import pytest
from scipy import stats

from saferollout.gates.compare import CompareGate, compare_errors, compare_latency

from fake_backend import T0, FakeBackend, lognormal, stream


def backend(rc_error_rate=0.005, rc_latency=None, rc_n=300, prod_n=2700, **kwargs):
    return FakeBackend(stream("blue", prod_n, T0, T0 + 200, error_rate=0.005, seed=3)
                       + stream("green", rc_n, T0, T0 + 200, error_rate=rc_error_rate, latency=rc_latency, seed=4),
                       **kwargs)


def test_fisher_exact_when_no_degradation_is_allowed():
    decision, reason, evidence = compare_errors(200, 12, 1800, 9, tolerance_points=0, alpha=0.01)
    expected = stats.fisher_exact([[12, 188], [9, 1791]], alternative="greater").pvalue
    assert decision == "fail" and evidence["test"] == "fisher_exact"
    assert evidence["p_value"] == pytest.approx(expected)
    assert "the RC is worse than PROD +0 points" in reason


def test_two_proportion_test_shifted_by_the_margin():
    decision, _, evidence = compare_errors(1000, 20, 9000, 90, tolerance_points=0.5, alpha=0.01)
    z = (0.02 - 0.01 - 0.005) / np.sqrt(0.02 * 0.98 / 1000 + 0.01 * 0.99 / 9000)
    assert decision == "pass" and evidence["p_value"] == pytest.approx(stats.norm.sf(z))


def test_as_good_as_prod_passes():
    decision, reason, _ = compare_errors(300, 1, 2700, 14, tolerance_points=0.5, alpha=0.01)
    assert decision == "pass" and "no significant degradation beyond +0.5 points" in reason


def test_latency_fails_only_when_the_ratio_and_the_u_test_agree():
    rng = np.random.default_rng(0)
    prod = rng.lognormal(4, 0.4, 2000)
    assert compare_latency(prod[:300] * 1.5, prod, quantile=0.9, tolerance_ratio=1.2, alpha=0.01)[0] == "fail"
    decision, reason, evidence = compare_latency(prod[:300] * 1.1, prod, quantile=0.9, tolerance_ratio=1.2, alpha=0.01)
    assert decision == "pass" and reason.endswith("within the tolerance")
    assert evidence["p_value"] < 0.01  # slower, significantly, but within the allowed degradation


def test_gate_waits_for_min_samples_then_decides(context):
    gate = CompareGate(metric="errors", min_samples=400)
    verdict = gate.check(context(backend(), 200))
    assert verdict.decision == "inconclusive"
    assert verdict.reason == "too few samples: green has 300 (need 400 per deployment)"
    assert CompareGate(metric="errors").check(context(backend(rc_error_rate=0.08), 200)).decision == "fail"


def test_gate_on_latency_samples(context):
    verdict = CompareGate(metric="latency").check(context(backend(rc_latency=lognormal(sigma=0.4, scale=1.6)), 200))
    assert verdict.decision == "fail" and verdict.evidence["test"] == "mann_whitney_u"


def test_aggregates_mode_counts_errors_from_requests_per_minute(context):
    fake = backend(rc_error_rate=0.08, raw_samples=False)
    gate = CompareGate(metric="errors", mode="aggregates")
    assert gate.needs_samples is False
    verdict = gate.check(context(fake, 200))
    assert verdict.decision == "fail" and verdict.evidence["mode"] == "aggregates"
    exact = CompareGate(metric="errors").check(context(backend(rc_error_rate=0.08), 200))
    assert verdict.evidence["errors"] == exact.evidence["errors"] and verdict.evidence["n"] == exact.evidence["n"]


def test_aggregates_mode_latency_uses_per_interval_percentiles(context):
    slow = CompareGate(metric="latency", mode="aggregates").check(context(backend(rc_latency=lognormal(scale=1.6)), 200))
    assert slow.decision == "fail" and slow.evidence["metric"] == "RequestLatency_P90"
    same = CompareGate(metric="latency", mode="aggregates").check(context(backend(rc_latency=lognormal()), 200))
    assert same.decision == "pass"


def test_aggregates_without_traffic_are_inconclusive(context):
    verdict = CompareGate(metric="errors", mode="aggregates").check(context(FakeBackend(), 200))
    assert verdict.decision == "inconclusive"
    assert verdict.reason == "too few samples: green has 0, blue has 0 (need 200 per deployment)"


def test_false_rollback_of_the_fixed_sample_test_stays_below_alpha():
    rng = np.random.default_rng(5)
    runs, alpha = 2000, 0.01
    fails = sum(compare_errors(200, int(rng.binomial(200, 0.01)), 1800, int(rng.binomial(1800, 0.01)),
                               tolerance_points=0.5, alpha=alpha)[0] == "fail" for _ in range(runs))
    assert fails / runs <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / runs)


def test_the_former_names_of_the_tolerance_are_refused_with_the_new_name():
    from saferollout.errors import SpecError
    from saferollout.gates.registry import build_gates

    with pytest.raises(SpecError, match=r"gate 'old' \(compare\): max_ratio is now tolerance"):
        build_gates([{"kind": "compare", "name": "old", "metric": "latency", "max_ratio": 1.3}])
    with pytest.raises(SpecError, match="margin is now tolerance"):
        build_gates([{"kind": "compare", "metric": "errors", "margin": 1}])


def test_compare_latency_leaves_the_warm_up_out(context):
    """The RC 3x slower in its first 20 s only: the default 20 s warm-up keeps it from failing."""
    rows = stream("blue", 3600, T0, T0 + 200, seed=1) + stream("green", 400, T0, T0 + 200, seed=2)
    rows = [(*r[:4], r[4] * 3 if r[2] == "green" and r[0] < T0 + 20 else r[4], *r[5:]) for r in rows]
    assert CompareGate(metric="latency", warmup_s=0).check(context(FakeBackend(rows), 200)).decision == "fail"
    assert CompareGate(metric="latency").check(context(FakeBackend(rows), 200)).decision == "pass"


class RecordingBackend(FakeBackend):
    """Aggregates only (as on Azure), and a request sent with the deployment header lands in them too."""

    def __init__(self, rows, clock):
        super().__init__(rows, raw_samples=False, scorers={"green": lambda b: (200, {}), "blue": lambda b: (200, {})})
        self.clock = clock

    def invoke(self, endpoint, body, *, deployment=None, timeout_s=60.0):
        self.rows.append((self.clock(), endpoint, deployment, 200, 5.0, 0, f"pin{len(self.rows)}", 200))
        return super().invoke(endpoint, body, deployment=deployment, timeout_s=timeout_s)


def test_aggregate_counts_leave_out_the_requests_the_gates_pinned_themselves():
    """On aggregates, 300 pinned 200s to the RC would halve its 6% error rate and hide it from the test."""
    from saferollout.gates.base import PinnedLedger
    from saferollout.gates.base import GateContext

    now = [T0 + 30]
    rows = stream("blue", 1800, T0, T0 + 120, error_rate=0.005, seed=1) + \
        stream("green", 200, T0, T0 + 120, error_rate=0.06, seed=2)
    backend = RecordingBackend(rows, lambda: now[0])
    ledger = PinnedLedger(backend, clock=lambda: now[0])
    for _ in range(300):
        ledger.invoke("credit", b"{}", deployment="green")
    now[0] = T0 + 120
    gate = CompareGate(metric="errors", mode="aggregates", min_samples=100)
    seen_raw = gate.check(GateContext(backend, "credit", "green", "blue", T0, now[0]))
    seen_by_gate = gate.check(GateContext(ledger, "credit", "green", "blue", T0, now[0]))
    assert seen_raw.evidence["n"]["rc"] == 500 and seen_by_gate.evidence["n"]["rc"] == 200
    assert seen_by_gate.evidence["errors"]["rc"] == seen_raw.evidence["errors"]["rc"]
    assert seen_by_gate.decision == "fail", seen_by_gate.reason
    assert seen_raw.decision == "pass", seen_raw.reason
