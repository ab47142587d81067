"""The sequential gate: every verdict path, missing data, and the false-rollback bound under peeking."""
import numpy as np
import pytest

from saferollout.gates.sequential import SequentialGate, error_decision, error_statistics, latency_decision

from fake_backend import T0, FakeBackend, lognormal, stream


def healthy_and(rc_error_rate=0.005, rc_latency=None, seconds=300, rc_n=450, prod_n=4050, seed=1):
    """RC (green) at 10% and PROD (blue) at 90% of 15 rps over `seconds`."""
    return FakeBackend(stream("blue", prod_n, T0, T0 + seconds, error_rate=0.005, seed=seed)
                       + stream("green", rc_n, T0, T0 + seconds, error_rate=rc_error_rate,
                                latency=rc_latency, seed=seed + 1))


# ---- known answers on counts -------------------------------------------------------------------

def test_errors_fail_on_strong_evidence_the_rc_fails_more():
    decision, reason, evidence = error_decision(150, 9, 1350, 7, margin_points=2.0, alpha=0.01, beta=0.05)
    assert decision == "fail"
    assert reason.startswith("error rate: RC 6.00% of 150 vs PROD 0.52% of 1350; e-value")
    assert "strong evidence the RC fails more often than PROD" in reason
    assert evidence["e_value"] >= 100 and evidence["rc_share"] == pytest.approx(0.1)


def test_errors_pass_when_the_rc_rate_is_bounded_within_the_margin():
    decision, reason, evidence = error_decision(400, 1, 3600, 18, margin_points=2.0, alpha=0.01, beta=0.05)
    assert decision == "pass"
    assert "within PROD +2 points" in reason and "with confidence 95%" in reason
    assert evidence["rc_rate_upper"] - evidence["prod_rate_lower"] < 0.02


def test_errors_stay_inconclusive_when_evidence_is_weak_either_way():
    decision, reason, _ = error_decision(60, 1, 540, 3, margin_points=2.0, alpha=0.01, beta=0.05)
    assert decision == "inconclusive" and "not decided yet: e-value" in reason


def test_a_wider_margin_passes_sooner():
    args = dict(alpha=0.01, beta=0.05)
    assert error_decision(200, 1, 1800, 9, margin_points=1.0, **args)[0] == "inconclusive"
    assert error_decision(200, 1, 1800, 9, margin_points=5.0, **args)[0] == "pass"


# ---- the false-rollback bound ------------------------------------------------------------------

def test_error_false_rollback_stays_below_alpha_when_looking_every_ten_seconds():
    """A/A at 15 rps (RC 10%, 0.5% errors), a look every 10 s for 10 minutes, 1,000 runs (fixed seed)."""
    rng = np.random.default_rng(2024)
    runs, looks, alpha = 1000, 60, 0.01
    n_rc = rng.poisson(15, (runs, looks)).cumsum(axis=1)
    n_prod = rng.poisson(135, (runs, looks)).cumsum(axis=1)
    x_rc = rng.binomial(np.diff(n_rc, axis=1, prepend=0), 0.005).cumsum(axis=1)
    x_prod = rng.binomial(np.diff(n_prod, axis=1, prepend=0), 0.005).cumsum(axis=1)
    fail = error_statistics(n_rc, x_rc, n_prod, x_prod, margin_points=2.0, alpha=alpha, beta=0.05)["fail"]
    rate = fail.any(axis=1).mean()
    assert rate <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / runs)  # the bound, with a 3-sigma tolerance


def test_latency_false_rollback_stays_below_alpha_under_repeated_looks():
    rng = np.random.default_rng(99)
    alpha, runs, fails = 0.05, 150, 0
    for _ in range(runs):
        t_rc, t_prod = np.sort(rng.uniform(0, 300, 450)), np.sort(rng.uniform(0, 300, 4050))
        rc, prod = rng.lognormal(3.9, 0.5, 450), rng.lognormal(3.9, 0.5, 4050)
        for cut in range(30, 301, 30):
            a, b = np.searchsorted(t_rc, cut), np.searchsorted(t_prod, cut)
            decision, _, _ = latency_decision(t_rc[:a], rc[:a], t_prod[:b], prod[:b], quantile=0.9,
                                              margin_ratio=1.0 + 1e-9, alpha=alpha, beta=0.05)
            if decision == "fail":
                fails += 1
                break
    assert fails / runs <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / runs)


# ---- the gate on a backend ---------------------------------------------------------------------

def test_gate_fails_an_rc_with_five_more_points_of_errors(context):
    verdict = SequentialGate(metric="errors").check(context(healthy_and(rc_error_rate=0.08), 300))
    assert (verdict.gate, verdict.kind, verdict.decision) == ("errors-sequential", "sequential", "fail")
    assert verdict.evidence["n"] == {"rc": 450, "prod": 4050} and verdict.evidence["e_value"] >= 100


def test_gate_passes_a_healthy_rc_on_errors(context):
    verdict = SequentialGate(metric="errors").check(context(healthy_and(), 300))
    assert verdict.decision == "pass", verdict.reason


def test_gate_fails_an_rc_fifty_percent_slower(context):
    backend = healthy_and(rc_latency=lognormal(scale=1.5))
    verdict = SequentialGate(metric="latency").check(context(backend, 300))
    assert verdict.decision == "fail" and "strong evidence the RC has more requests slower than" in verdict.reason
    assert verdict.evidence["latency_ms"]["rc"] > 1.3 * verdict.evidence["latency_ms"]["prod"]


def test_gate_passes_a_healthy_rc_on_latency(context):
    verdict = SequentialGate(metric="latency").check(context(healthy_and(rc_latency=lognormal()), 300))
    assert verdict.decision == "pass", verdict.reason
    assert "within 1.5x PROD with confidence 95%" in verdict.reason
    assert verdict.evidence["rc_above_allowed"] / 450 < 0.1 and verdict.evidence["e_value_no_harm"] >= 25


def test_latency_waits_for_calibration_before_it_can_fail(context):
    backend = healthy_and(rc_latency=lognormal(scale=3.0), seconds=10, rc_n=40, prod_n=120)
    verdict = SequentialGate(metric="latency").check(context(backend, 10))
    assert verdict.decision == "inconclusive"
    assert "PROD has 120 of 200 calibration samples" in verdict.reason


# ---- never pass on missing data ----------------------------------------------------------------

def test_no_samples_at_all_is_inconclusive_naming_both_deployments(context):
    verdict = SequentialGate(metric="errors").check(context(FakeBackend(), 60))
    assert verdict.decision == "inconclusive"
    assert verdict.reason == "too few samples: green has 0, blue has 0 (need 30 per deployment)"


def test_too_few_rc_samples_is_inconclusive_even_when_they_look_perfect(context):
    backend = healthy_and(rc_n=12)
    verdict = SequentialGate(metric="latency").check(context(backend, 300))
    assert verdict.decision == "inconclusive"
    assert verdict.reason == "too few samples: green has 12 (need 30 per deployment)"


def test_an_rc_name_that_matches_nothing_is_inconclusive(context):
    verdict = SequentialGate(metric="errors").check(context(healthy_and(), 300, rc="gren"))
    assert verdict.decision == "inconclusive" and "gren has 0" in verdict.reason


def test_without_prod_there_is_nothing_to_compare(context):
    verdict = SequentialGate(metric="errors").check(context(healthy_and(), 300, prod=None))
    assert verdict.decision == "inconclusive"
    assert verdict.reason == "there is no PROD deployment to compare the RC with"


def test_missing_data_fails_at_the_gate_limit_with_the_reason(context):
    gate = SequentialGate(metric="errors", max_duration_s=120)
    assert gate.check(context(FakeBackend(), 119)).decision == "inconclusive"
    verdict = gate.check(context(FakeBackend(), 120))
    assert verdict.decision == "fail" and verdict.evidence["timed_out"] is True
    assert verdict.reason == ("no decision within 120s: too few samples: green has 0, blue has 0 "
                              "(need 30 per deployment)")


# ---- the pass bound: an RC worse than the margin rarely passes ---------------------------------

def test_errors_beyond_the_margin_pass_less_often_than_beta_when_looking_every_ten_seconds():
    rng = np.random.default_rng(8)
    runs, looks, beta = 1000, 60, 0.05
    n_rc = rng.poisson(15, (runs, looks)).cumsum(axis=1)
    n_prod = rng.poisson(135, (runs, looks)).cumsum(axis=1)
    x_rc = rng.binomial(np.diff(n_rc, axis=1, prepend=0), 0.005 + 0.03).cumsum(axis=1)  # PROD + 3 points
    x_prod = rng.binomial(np.diff(n_prod, axis=1, prepend=0), 0.005).cumsum(axis=1)
    passed = error_statistics(n_rc, x_rc, n_prod, x_prod, margin_points=3.0, alpha=0.01, beta=beta)["pass"]
    enough = n_rc >= 30
    assert (passed & enough).any(axis=1).mean() <= beta + 3 * np.sqrt(beta * (1 - beta) / runs)


def test_latency_beyond_the_margin_passes_less_often_than_beta_under_repeated_looks():
    rng = np.random.default_rng(12)
    beta, runs, passes = 0.05, 150, 0
    for _ in range(runs):
        t_rc, t_prod = np.sort(rng.uniform(0, 300, 450)), np.sort(rng.uniform(0, 300, 4050))
        rc, prod = rng.lognormal(3.9, 0.5, 450) * 1.5, rng.lognormal(3.9, 0.5, 4050)  # p90 exactly 1.5x
        for cut in range(30, 301, 30):
            a, b = np.searchsorted(t_rc, cut), np.searchsorted(t_prod, cut)
            if latency_decision(t_rc[:a], rc[:a], t_prod[:b], prod[:b], quantile=0.9, margin_ratio=1.5,
                                alpha=1e-12, beta=beta)[0] == "pass":
                passes += 1
                break
    assert passes / runs <= beta + 3 * np.sqrt(beta * (1 - beta) / runs)
