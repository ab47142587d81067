"""Anytime-valid statistics: known answers, and coverage that holds over every look (fixed seeds)."""
import numpy as np
import pytest
from scipy import integrate, stats

from saferollout.gates.anytime import (arm_count_log_e, bernoulli_cs, bernoulli_log_mixture,
                                       one_sided_binomial_log_e, quantile_cs)


def test_bernoulli_mixture_matches_numerical_integration():
    x, n, p0 = 3, 20, 0.3
    marginal, _ = integrate.quad(lambda p: p ** x * (1 - p) ** (n - x) * stats.beta.pdf(p, 0.5, 0.5), 0, 1)
    expected = np.log(marginal) - np.log(p0 ** x * (1 - p0) ** (n - x))
    assert bernoulli_log_mixture(x, n, p0) == pytest.approx(expected, rel=1e-6)


def test_bernoulli_cs_is_symmetric_for_half_successes_and_starts_at_zero_without_successes():
    low, high = bernoulli_cs(5, 10, 0.05)
    assert float(low) == pytest.approx(1 - float(high), abs=1e-9) and 0 < low < 0.5 < high < 1
    low0, high0 = bernoulli_cs(0, 100, 0.05)
    assert float(low0) == 0.0 and 0 < high0 < 0.1
    assert bernoulli_cs(0, 0, 0.05) == (0.0, 1.0)


def test_bernoulli_cs_bounds_sit_where_the_mixture_crosses_one_over_alpha():
    low, high = bernoulli_cs(7, 40, 0.05)
    for edge in (low, high):
        assert bernoulli_log_mixture(7, 40, edge) == pytest.approx(np.log(20), abs=1e-6)


def test_bernoulli_cs_covers_the_true_rate_at_every_look():
    rng = np.random.default_rng(7)
    runs, looks, p, alpha = 200, 200, 0.05, 0.1
    x = rng.binomial(1, p, (runs, looks)).cumsum(axis=1)
    n = np.arange(1, looks + 1)
    low, high = bernoulli_cs(x, np.broadcast_to(n, x.shape), alpha)
    ever_missed = ((low > p) | (high < p)).any(axis=1).mean()
    assert ever_missed <= alpha  # time-uniform: misses at any of 200 looks, not at one fixed n


def test_one_sided_e_value_matches_the_truncated_mixture_integral():
    x, n, p0, (a, b) = 6, 8, 0.1, (1.0, 3.0)
    num, _ = integrate.quad(lambda p: p ** x * (1 - p) ** (n - x) * stats.beta.pdf(p, a, b), p0, 1)
    expected = np.log(num / stats.beta.sf(p0, a, b)) - np.log(p0 ** x * (1 - p0) ** (n - x))
    assert one_sided_binomial_log_e(x, n, p0) == pytest.approx(expected, rel=1e-6)


def test_lower_side_e_value_matches_its_truncated_mixture_integral_and_shrinks_with_more_successes():
    x, n, p0, (a, b) = 2, 60, 0.1, (1.0, 3.0)
    num, _ = integrate.quad(lambda p: p ** x * (1 - p) ** (n - x) * stats.beta.pdf(p, a, b), 0, p0)
    expected = np.log(num / stats.beta.cdf(p0, a, b)) - np.log(p0 ** x * (1 - p0) ** (n - x))
    assert one_sided_binomial_log_e(x, n, p0, side="less") == pytest.approx(expected, rel=1e-6)
    assert float(one_sided_binomial_log_e(8, 60, p0, side="less")) < float(one_sided_binomial_log_e(2, 60, p0, side="less"))


def test_one_sided_e_value_grows_with_evidence_and_stays_below_one_without_it():
    assert float(one_sided_binomial_log_e(0, 0, 0.1)) == 0.0
    assert float(one_sided_binomial_log_e(0, 30, 0.1)) < 0
    assert float(one_sided_binomial_log_e(8, 10, 0.1)) > float(one_sided_binomial_log_e(4, 10, 0.1)) > 0


def test_one_sided_e_value_rarely_crosses_one_over_alpha_under_the_null_however_often_one_looks():
    rng = np.random.default_rng(11)
    runs, looks, p0, alpha = 1000, 300, 0.1, 0.05
    x = rng.binomial(1, p0, (runs, looks)).cumsum(axis=1)
    log_e = one_sided_binomial_log_e(x, np.broadcast_to(np.arange(1, looks + 1), x.shape), p0)
    assert (log_e >= np.log(1 / alpha)).any(axis=1).mean() <= alpha


def test_arm_count_null_is_the_rc_share_of_requests():
    log_e, rho0 = arm_count_log_e(1, 9, 100, 900)
    assert float(rho0) == pytest.approx(0.1)
    assert float(log_e) == pytest.approx(float(one_sided_binomial_log_e(1, 10, 0.1)))


def test_quantile_cs_is_bounded_by_order_statistics_and_unbounded_with_little_data():
    values = np.arange(1, 1001, dtype=float)  # the true 0.5-quantile of this population is ~500
    low, high = quantile_cs(values, 0.5, 0.05)
    assert low in values and high in values and 420 < low < 500 < high < 580
    assert quantile_cs([3.0, 1.0], 0.9, 0.05) == (0.0, float("inf"))


def test_quantile_cs_covers_the_true_p90_at_every_look():
    rng = np.random.default_rng(3)
    truth = float(stats.lognorm.ppf(0.9, 0.5))
    missed = 0
    for _ in range(100):
        x = rng.lognormal(0, 0.5, 600)
        for n in range(20, 601, 20):
            low, high = quantile_cs(x[:n], 0.9, 0.1)
            if not low <= truth <= high:
                missed += 1
                break
    assert missed / 100 <= 0.1 + 0.05  # alpha plus three binomial standard deviations
