"""Anytime-valid statistics: e-values and confidence sequences that stay valid however often one looks.

Everything here rests on Ville's inequality: a nonnegative (super)martingale M with M_0 = 1 exceeds
1/alpha at any time with probability at most alpha. Mixture likelihood ratios are such martingales, so
thresholding them at 1/alpha gives tests and confidence sequences (CS) whose error bound holds at every
look, not only at a fixed sample size (Robbins 1970; Howard, Ramdas, McAuliffe & Sekhon 2021).

- `bernoulli_cs`: the conjugate Beta-mixture CS for a proportion (Robbins' mixture, as in Howard et al.).
- `one_sided_binomial_log_e`: a truncated-Beta mixture e-value against "success probability <= p0"
  (or ">= p0"). Used on error events (which deployment did each error come from?), the
  conditional-binomial form of the Poisson-process test of Lindon, Sanden & Shirikian (2022), and on
  the share of RC requests above a latency level.
- `quantile_cs`: a CS for a quantile from the Bernoulli CS of the indicators 1{X <= v}
  (Howard & Ramdas 2022).

The functions take numpy arrays (or scalars) so the benchmark can evaluate many simulated runs at once
with the very code the gates call.
"""
from __future__ import annotations

import numpy as np
from scipy import special, stats

# Mixture priors. Any prior keeps the guarantees; it only decides where the test is most powerful.
PROPORTION_PRIOR = (0.5, 0.5)       # Jeffreys: no favoured rate
ERROR_RATE_PRIOR = (1.0, 200.0)     # error rates: mean 0.5%, so bounds on rare errors are tight
QUANTILE_PRIOR_WEIGHT = 20.0        # quantile CS: Beta(q w, (1 - q) w), centred on the quantile's level
ALTERNATIVE_PRIOR = (1.0, 3.0)      # alternatives of one-sided e-values: weight on moderate departures
_BISECTION_STEPS = 60


def bernoulli_log_mixture(x, n, p, prior: tuple[float, float] = PROPORTION_PRIOR):
    """log of the Beta-mixture likelihood ratio against success probability `p` after x of n successes."""
    a, b = prior
    x, n, p = np.asarray(x, float), np.asarray(n, float), np.asarray(p, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_null = special.xlogy(x, p) + special.xlog1py(n - x, -p)
    return special.betaln(a + x, b + n - x) - special.betaln(a, b) - log_null


def bernoulli_cs(x, n, alpha: float, prior: tuple[float, float] = PROPORTION_PRIOR):
    """Time-uniform (1 - alpha) confidence sequence for a proportion: arrays (low, high).

    The set {p : mixture(p) < 1/alpha} is an interval around x/n (the log-likelihood is concave in p);
    its ends are found by bisection, vectorised over runs.
    """
    x, n = np.broadcast_arrays(np.asarray(x, float), np.asarray(n, float))
    bound = np.log(1.0 / alpha)
    centre = np.where(n > 0, x / np.maximum(n, 1), 0.5)

    def edge(inside, outside):
        inside, outside = inside.copy(), outside.copy()
        for _ in range(_BISECTION_STEPS):
            mid = (inside + outside) / 2
            ok = bernoulli_log_mixture(x, n, mid, prior) < bound
            inside = np.where(ok, mid, inside)
            outside = np.where(ok, outside, mid)
        return inside

    low = edge(centre, np.zeros_like(centre))
    high = edge(centre, np.ones_like(centre))
    # the ends themselves: 0 and 1 belong to the CS when the mixture there stays below the bound
    low = np.where(bernoulli_log_mixture(x, n, 0.0, prior) < bound, 0.0, low)
    high = np.where(bernoulli_log_mixture(x, n, 1.0, prior) < bound, 1.0, high)
    return low, high


def one_sided_binomial_log_e(x, n, p0, prior: tuple[float, float] = ALTERNATIVE_PRIOR, side: str = "greater"):
    """log e-value against H0: p <= p0 (side "greater") or H0: p >= p0 (side "less"), x successes in n.

    The mixture of likelihood ratios p^x (1-p)^(n-x) / (p0^x (1-p0)^(n-x)) over p ~ Beta(prior)
    truncated to the alternative side of p0. Each ratio with p on that side is a supermartingale under
    every p' in H0 (monotone likelihood ratio), so the mixture is one too and Ville's inequality bounds
    P(ever >= 1/alpha) by alpha.
    """
    a, b = prior
    x, n, p0 = np.asarray(x, float), np.asarray(n, float), np.asarray(p0, float)
    post_a, post_b = a + x, b + n - x
    tail = stats.beta.logsf if side == "greater" else stats.beta.logcdf
    log_marginal = (special.betaln(post_a, post_b) - special.betaln(a, b)
                    + tail(p0, post_a, post_b) - tail(p0, a, b))
    log_null = special.xlogy(x, p0) + special.xlog1py(n - x, -p0)
    return np.where(n > 0, log_marginal - log_null, 0.0)


def arm_count_log_e(x_rc, x_prod, n_rc, n_prod):
    """log e-value that events (errors, slow requests) hit the RC more often per request than PROD.

    Requests are routed at random, so if both deployments have the same event rate, each event comes
    from the RC with probability rho0 = n_rc / (n_rc + n_prod) whatever that rate is: conditioning on
    the events removes the unknown rate (Lindon, Sanden & Shirikian 2022 test Poisson counts this way).
    """
    x_rc, x_prod, n_rc, n_prod = (np.asarray(v, float) for v in (x_rc, x_prod, n_rc, n_prod))
    total = n_rc + n_prod
    rho0 = np.where(total > 0, n_rc / np.maximum(total, 1), 0.5)
    return one_sided_binomial_log_e(x_rc, x_rc + x_prod, rho0), rho0


def quantile_cs(values, q: float, alpha: float, prior: tuple[float, float] | None = None):
    """Time-uniform (1 - alpha) confidence sequence for the q-quantile of i.i.d. `values`: (low, high).

    For the true quantile Q, the indicators 1{X_i <= Q} are Bernoulli(q); Q lies in the set of v whose
    count c(v) = #{X_i <= v} keeps q inside the Bernoulli CS. That set runs from the c_lo-th to the
    (c_hi + 1)-th order statistic, where [c_lo, c_hi] are the counts for which q is not rejected.
    Ends beyond the data are 0 and +inf.
    """
    prior = prior or (q * QUANTILE_PRIOR_WEIGHT, (1 - q) * QUANTILE_PRIOR_WEIGHT)
    ordered = np.sort(np.asarray(values, float))
    n = ordered.size
    counts = np.arange(n + 1)
    accepted = np.flatnonzero(bernoulli_log_mixture(counts, n, q, prior) < np.log(1.0 / alpha))
    c_lo, c_hi = int(accepted[0]), int(accepted[-1])
    low = ordered[c_lo - 1] if c_lo >= 1 else 0.0
    high = ordered[c_hi] if c_hi < n else float("inf")
    return float(low), float(high)


# Betting fractions of `tolerant_difference_log_e`, as shares of the largest fraction that keeps every
# factor positive. A fixed grid averaged with equal weights is itself an e-process (an average of
# e-processes); it costs log(len(grid)) of evidence against the best single fraction in hindsight.
BETTING_GRID = (0.5, 0.25, 0.125)


def tolerant_difference_log_e(n_rc, x_rc, x_prod, rho, *, points: float = 0.0, ratio: float = 1.0):
    """log e-value against H0: p_rc <= ratio * p_prod + points, from counts of events per deployment.

    Each request goes to the RC with the known probability `rho` (random routing). Its bet pays
    Y = [RC] (event - points) / rho - [PROD] ratio * event / (1 - rho), whose mean given the past is
    p_rc - ratio * p_prod - points: at most 0 under H0 at every moment, however both rates drift with
    load. The capital prod(1 + lambda Y) is then a nonnegative supermartingale for any fixed lambda in
    [0, lambda_max) (Waudby-Smith & Ramdas 2023's betting martingales); Y takes four values, so it
    depends on the counts only. The grid average over lambda is returned (vectorised over runs).
    """
    n_rc, x_rc, x_prod, rho = (np.asarray(v, float) for v in (n_rc, x_rc, x_prod, rho))
    rc_event = (1.0 - points) / rho
    rc_quiet = -points / rho
    prod_event = -ratio / (1.0 - rho)
    lambda_max = 1.0 / np.maximum(-rc_quiet, -prod_event)
    logs = [x_rc * np.log1p(share * lambda_max * rc_event)
            + special.xlog1py(n_rc - x_rc, share * lambda_max * rc_quiet)
            + special.xlog1py(x_prod, share * lambda_max * prod_event) for share in BETTING_GRID]
    return special.logsumexp(np.stack(logs), axis=0) - np.log(len(BETTING_GRID))


def rank_shift_log_e(rc_scores, prod_scores, rho):
    """log e-value against H0: E[score of an RC request] <= E[score of a PROD request], at every moment.

    Scores are a fixed increasing transform of each request's latency, here PROD's calibrated CDF at the
    RC's latency deflated by the tolerance (and at PROD's own latency for PROD), so they lie in [0, 1].
    If the deflated RC latency is stochastically no larger than PROD's, its scores are no larger in
    mean. Each request's bet pays Y = [RC] (s - 1/2) / rho - [PROD] (s - 1/2) / (1 - rho), of mean
    E[s_rc] - E[s_prod] <= 0 under H0, so prod(1 + lambda Y) is a nonnegative supermartingale for
    lambda < 2 min(rho, 1 - rho): a two-sample test of stochastic order in the spirit of Lindon, Sanden &
    Shirikian (2022) that uses every request's latency, not only whether it crossed one level.
    """
    rc_y = (np.asarray(rc_scores, float) - 0.5) / rho
    prod_y = -(np.asarray(prod_scores, float) - 0.5) / (1.0 - rho)
    y = np.concatenate([rc_y, prod_y])
    lambda_max = 2.0 * min(rho, 1.0 - rho)
    logs = [np.sum(np.log1p(share * lambda_max * y)) for share in BETTING_GRID]
    return float(special.logsumexp(logs) - np.log(len(BETTING_GRID)))
