"""The sequential gate: every verdict path, missing data, and the false-rollback bound under peeking."""
import numpy as np
import pytest

from saferollout.gates.sequential import (SequentialGate, error_decision, error_statistics, latency_decision,
                                          latency_statistics)

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
    assert "strong evidence the RC fails more often than PROD's +0.5 points (~1.02%)" in reason
    assert evidence["e_value"] >= 125 and evidence["rc_share"] == pytest.approx(0.1)


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
    fail = error_statistics(n_rc, x_rc, n_prod, x_prod, rho=0.1, tolerance_points=0.0, tolerance_ratio=1.0,
                            margin_points=2.0, alpha=alpha, beta=0.05)["fail"]
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
                                              tolerance_ratio=1.0, tolerance_ms=0.0, margin_ratio=1.0 + 1e-9,
                                              alpha=alpha, beta=0.05)
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
    assert verdict.decision == "fail" and "strong evidence the RC is slower than 1.2x PROD's +1 ms" in verdict.reason
    assert verdict.evidence["latency_ms"]["rc"] > 1.3 * verdict.evidence["latency_ms"]["prod"]


def test_gate_passes_a_healthy_rc_on_latency(context):
    verdict = SequentialGate(metric="latency").check(context(healthy_and(rc_latency=lognormal()), 300))
    assert verdict.decision == "pass", verdict.reason
    assert "within 1.5x PROD with confidence 95%" in verdict.reason
    assert verdict.evidence["rc_above_allowed"] / 450 < 0.1 and verdict.evidence["e_value_no_harm"] >= 25


def test_a_latency_pass_just_after_the_warm_up_shows_the_requests_it_was_decided_on(context):
    # the pass test reads the warm-up too; with one second left after it, a p90 'of 1 request' misled readers
    verdict = SequentialGate(metric="latency", warmup_s=298).check(context(healthy_and(rc_latency=lognormal()), 300))
    assert verdict.decision == "pass", verdict.reason
    n = verdict.evidence["n"]  # the answered requests of the window (450 and 4050 sent, a few of them errors)
    assert n["rc"] > 440 and n["prod"] > 4000 and sum(verdict.evidence["n_after_warmup"].values()) < 100
    assert f"({n['rc']}) vs PROD" in verdict.reason and f"({n['prod']}), the warm-up included" in verdict.reason


def test_latency_waits_for_calibration_before_it_can_fail(context):
    backend = healthy_and(rc_latency=lognormal(scale=3.0), seconds=10, rc_n=40, prod_n=120)
    verdict = SequentialGate(metric="latency", warmup_s=0).check(context(backend, 10))
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
    passed = error_statistics(n_rc, x_rc, n_prod, x_prod, tolerance_points=0.5, tolerance_ratio=1.0, margin_points=3.0,
                              alpha=0.01, beta=beta)["pass"]
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


# ---- the tolerance: a healthy RC that is not exactly PROD ----------------------------------------

def _boundary_error_runs(rng, runs, looks, rc_extra_points, load_swing=0.0):
    """Counts at each look (10 s apart) of 20 rps with the RC at 10%; PROD's rate moves with the load."""
    t = np.arange(looks)
    load = 1 + load_swing * np.sin(2 * np.pi * t / 6)
    p_prod = 0.005 * load
    n_rc = rng.poisson(20, (runs, looks))
    n_prod = rng.poisson(180, (runs, looks))
    x_rc = rng.binomial(n_rc, p_prod + rc_extra_points / 100).cumsum(axis=1)
    x_prod = rng.binomial(n_prod, p_prod).cumsum(axis=1)
    return n_rc.cumsum(axis=1), x_rc, n_prod.cumsum(axis=1), x_prod


@pytest.mark.parametrize("load_swing", [0.0, 0.8])
def test_an_rc_exactly_at_the_error_tolerance_is_rolled_back_less_often_than_alpha(load_swing):
    """RC = PROD + 0.5 points at every moment (the tolerance), PROD's own rate swinging with the load."""
    rng = np.random.default_rng(31)
    runs, alpha = 2000, 0.01
    n_rc, x_rc, n_prod, x_prod = _boundary_error_runs(rng, runs, 30, 0.5, load_swing)
    fail = error_statistics(n_rc, x_rc, n_prod, x_prod, rho=0.1, tolerance_points=0.5, tolerance_ratio=1.0,
                            margin_points=3.0, alpha=alpha, beta=0.05)["fail"]
    assert fail.any(axis=1).mean() <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / runs)


def test_errors_five_points_over_prod_fail_fast_despite_the_tolerance():
    rng = np.random.default_rng(5)
    n_rc, x_rc, n_prod, x_prod = _boundary_error_runs(rng, 300, 18, 5.0)
    fail = error_statistics(n_rc, x_rc, n_prod, x_prod, rho=0.1, tolerance_points=0.5, tolerance_ratio=1.0,
                            margin_points=3.0, alpha=0.01, beta=0.05)["fail"]
    first = np.where(fail.any(axis=1), fail.argmax(axis=1), 99)
    assert fail.any(axis=1).mean() >= 0.95 and np.median(first) <= 6  # a look every 10 s: within a minute


def _latency_stream(rng, seconds, rc_scale, load_swing=0.0, rps=20.0):
    n = rng.poisson(rps * seconds)
    ts = np.sort(rng.uniform(0, seconds, n))
    load = 1 + load_swing * np.sin(2 * np.pi * ts / 60)
    rc = rng.random(n) < 0.1
    ms = rng.lognormal(np.log(50), 0.5, n) * load * np.where(rc, rc_scale, 1.0)
    return ts[rc], ms[rc], ts[~rc], ms[~rc]


@pytest.mark.parametrize("load_swing", [0.0, 0.5])
def test_an_rc_at_the_latency_tolerance_is_rolled_back_less_often_than_alpha(load_swing):
    """RC 1.2x PROD at every moment (the tolerance), looked at every 10 s for 3 minutes."""
    rng = np.random.default_rng(77)
    alpha, runs, fails = 0.05, 150, 0
    for _ in range(runs):
        rc_ts, rc_ms, prod_ts, prod_ms = _latency_stream(rng, 180, 1.2, load_swing)
        for cut in range(20, 181, 10):
            a, b = np.searchsorted(rc_ts, cut), np.searchsorted(prod_ts, cut)
            if latency_statistics(rc_ts[:a], rc_ms[:a], prod_ts[:b], prod_ms[:b], rho=0.1, quantile=0.9,
                                  tolerance_ratio=1.2, tolerance_ms=0.0, margin_ratio=1.5, alpha=alpha,
                                  beta=0.05)["fail"]:
                fails += 1
                break
    assert fails / runs <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / runs)


def test_latency_fifty_percent_over_prod_fails_within_the_window():
    rng = np.random.default_rng(78)
    detected = 0
    for _ in range(40):
        rc_ts, rc_ms, prod_ts, prod_ms = _latency_stream(rng, 120, 1.5)
        detected += latency_statistics(rc_ts, rc_ms, prod_ts, prod_ms, rho=0.1, quantile=0.9, tolerance_ratio=1.2,
                                       tolerance_ms=0.0, margin_ratio=1.5, alpha=0.01, beta=0.05)["fail"]
    assert detected >= 38


def test_a_slow_start_inside_the_warm_up_is_left_out(context):
    """The RC is 3x slower for its first 40 s, then as fast as PROD: a 45 s warm-up hides it."""
    rows = stream("blue", 2700, T0, T0 + 150, seed=3) + stream("green", 300, T0, T0 + 150, seed=4)
    rows = [(r[0], r[1], r[2], r[3], r[4] * 3 if r[2] == "green" and r[0] < T0 + 40 else r[4], *r[5:]) for r in rows]

    def decisions(gate):  # a look every 5 s, as a gate step looks
        return [gate.check(context(FakeBackend(rows), elapsed)).decision for elapsed in range(5, 151, 5)]

    assert "fail" in decisions(SequentialGate(metric="latency", warmup_s=0))
    assert "fail" not in decisions(SequentialGate(metric="latency", warmup_s=45))


def test_latency_says_it_is_warming_up_before_the_warm_up_ends(context):
    verdict = SequentialGate(metric="latency", warmup_s=20).check(context(healthy_and(), 10))
    assert verdict.decision == "inconclusive"
    assert verdict.reason == "latency: warming up, the first 20s after the shift are left out"


def test_pinned_requests_are_never_counted_as_live_traffic(context):
    """A thousand failing requests pinned to the RC with the header (a smoke test gone wrong) change nothing."""
    pinned = [(T0 + 1 + i * 0.1, "credit", "green", 500, 900.0, 0, f"p{i}", 500, 1) for i in range(1000)]
    gate = SequentialGate(metric="errors")
    plain = gate.check(context(healthy_and(), 300))
    with_pinned = gate.check(context(FakeBackend(healthy_and().rows + pinned), 300))
    assert with_pinned.evidence["n"] == plain.evidence["n"] and with_pinned.decision == plain.decision == "pass"


# ---- the window's end ----------------------------------------------------------------------------

def _between_limits(seconds=180):
    """An RC 1.35x slower: over the tolerance (1.2x) but within the margin (1.5x) -- undecided for a while."""
    return healthy_and(rc_latency=lognormal(scale=1.3), seconds=seconds, rc_n=20 * seconds // 10,
                       prod_n=18 * seconds)


def test_an_undecided_gate_passes_at_the_window_end_and_says_why(context):
    verdict = SequentialGate(metric="errors", max_duration_s=60, margin=0.5).check(context(healthy_and(seconds=60, rc_n=120, prod_n=1080), 60))
    assert verdict.decision == "pass" and verdict.evidence["passed_at_window_end"] is True
    assert "the window ended without evidence the RC fails more often than PROD's +0.5 points" in verdict.reason


def test_undecided_fail_keeps_the_old_rule(context):
    gate = SequentialGate(metric="errors", max_duration_s=60, margin=0.5, undecided="fail")
    verdict = gate.check(context(healthy_and(seconds=60, rc_n=120, prod_n=1080), 60))
    assert verdict.decision == "fail" and verdict.reason.startswith("no decision within 60s: error rate:")


def test_the_window_end_test_fails_a_regression_not_yet_proven(context):
    """+3 points over 180 s: the anytime test may still wait; the one fixed test at the end does not pass it."""
    backend = healthy_and(rc_error_rate=0.005 + 0.03, seconds=180, rc_n=360, prod_n=3240, seed=11)
    verdict = SequentialGate(metric="errors", max_duration_s=180, margin=1.0).check(context(backend, 180))
    assert verdict.decision == "fail"
    assert "at the window's end" in verdict.reason or "strong evidence" in verdict.reason


def test_too_few_samples_at_the_window_end_still_fail(context):
    verdict = SequentialGate(metric="latency", max_duration_s=60).check(context(FakeBackend(), 60))
    assert verdict.decision == "fail" and "too few samples" in verdict.reason


# ---- settings -------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    ({"metric": "latency", "tolerance": 0.9}, "tolerance for latency is a ratio of quantiles, at least 1"),
    ({"metric": "errors", "tolerance": -1}, "tolerance for errors is in percentage points"),
    ({"metric": "errors", "tolerance_ratio": 0.5}, "tolerance_ratio at least 1"),
    ({"metric": "latency", "warmup_s": -5}, "warmup_s and tolerance_ms must be at least 0"),
    ({"metric": "latency", "fail_quantiles": [1.5]}, "quantile and fail_quantiles must be between 0 and 1"),
])
def test_bad_tolerance_settings_are_refused_with_their_names(settings, message):
    from saferollout.errors import SpecError
    from saferollout.gates.registry import build_gates

    with pytest.raises(SpecError, match=message):
        build_gates([{"kind": "sequential", **settings}])


def test_undecided_must_be_pass_or_fail():
    from saferollout.errors import SpecError
    from saferollout.gates.registry import build_gates

    with pytest.raises(SpecError, match="undecided must be one of pass, fail, not 'maybe'"):
        build_gates([{"kind": "sequential", "undecided": "maybe"}])
