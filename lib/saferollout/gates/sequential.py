"""The sequential gate: anytime-valid RC-vs-PROD tests that may stop early either way.

It is meant to be looked at continuously, and it has two limits (DESIGN.md, Gates):
- `tolerance`: the worst RC the user still accepts. Fail (roll back) only on strong evidence that the
  RC is worse than that: an RC within the tolerance is rolled back with probability at most `alpha`,
  however often the gate looks (Ville's inequality) and however the load moves both deployments.
- `margin`: pass only on strong evidence that the RC is within it: an RC worse than the margin passes
  early with probability at most `beta`.
A healthy release is never exactly PROD (a fresh process, a slightly slower model), so the tolerance sits
above "equal". Between the two limits the gate waits; at `max_duration_s`, an undecided gate whose fail
test never fired passes when `undecided: pass` (the default; the tolerance guarantee is untouched: it
never depended on the window) and fails when `undecided: fail`. Too few samples always fail there.

errors  (tolerance: RC rate <= tolerance_ratio x PROD's + tolerance points; margin: points)
  fail: a betting e-process on every request (`anytime.tolerant_difference_log_e`), using that each
        request goes to the RC with the known probability rho (its traffic share).
  pass: upper end of the RC rate's CS minus lower end of PROD's below the margin (0.8 beta for the
        RC, 0.2 beta for PROD, which has ~9x the data).
latency (tolerance: RC quantile <= tolerance x PROD's + tolerance_ms; margin: a ratio)
  Requests in the first `warmup_s` of the window (both deployments) are left out.
  fail: for each watched level q, v_q is PROD's q-quantile over its first `calibration_samples`
        requests; afterwards an RC request over tolerance x v_q + tolerance_ms and a PROD request over
        v_q are events. An RC within the tolerance at every moment sends each event to the RC with
        probability at most rho, so the conditional count test of Lindon, Sanden & Shirikian (2022)
        applies; the e-values of the levels are averaged (an average of e-values is an e-value).
  pass: w = margin x the lower end of PROD's quantile CS (0.2 beta; Howard & Ramdas 2022). If the
        RC's quantile were above margin x PROD's, at least 1 - q of its requests would exceed w; a
        one-sided mixture e-value (0.8 beta) on the share that does is evidence that it is not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from saferollout.gates.anytime import (ERROR_RATE_PRIOR, bernoulli_cs, one_sided_binomial_log_e, quantile_cs,
                                       rank_shift_log_e, tolerant_difference_log_e)
from saferollout.gates.base import (GateBase, GateContext, Inconclusive, fetch_samples, is_error, require_prod,
                                    require_samples)

# Defaults, measured in bench/gates.py at the runbook's defaults; reasoning in docs/gates.md.
DEFAULT_ERROR_TOLERANCE_POINTS = 0.5
DEFAULT_ERROR_TOLERANCE_RATIO = 1.0
DEFAULT_ERROR_MARGIN_POINTS = 3.0
DEFAULT_LATENCY_TOLERANCE_RATIO = 1.2
DEFAULT_LATENCY_TOLERANCE_MS = 1.0
DEFAULT_LATENCY_MARGIN_RATIO = 1.5
DEFAULT_WARMUP_S = 20.0
DEFAULT_CALIBRATION_SAMPLES = 200
DEFAULT_FAIL_QUANTILES: tuple[float, ...] = ()  # watched besides `quantile` on the fail side
# The fail side's alpha is split: most for the anytime test, the rest for one fixed-sample test at the
# window's end, which catches a regression the anytime test had not yet proven before a tolerant pass.
END_SHARE_OF_ALPHA = 0.2
# The pass side's error budget beta is split between the RC's bound and PROD's: PROD has ~9x the data,
# so its bound barely moves with a smaller share, while the RC's tightens (it passes sooner).
RC_SHARE_OF_BETA = 0.8


def fail_threshold(alpha: float) -> float:
    """The e-value at which the anytime fail test fires: 1 / (its share of alpha)."""
    return 1 / ((1 - END_SHARE_OF_ALPHA) * alpha)


def realised_share(n_rc, n_prod):
    """The RC's share of requests so far: the routing probability when the backend does not say it."""
    n_rc, n_prod = np.asarray(n_rc, float), np.asarray(n_prod, float)
    return np.where(n_rc + n_prod > 0, n_rc / np.maximum(n_rc + n_prod, 1), 0.5)


def slow_share_prior(rho):
    """Alternatives of the latency count test: Beta(50 m, 50 (1 - m)) with m = 1.5 rho.

    Any prior keeps the guarantee. A regression worth catching (p90 +50% against a 1.2x tolerance) sends
    about 1.8 rho of the events to the RC, far nearer rho than the generic prior's mass (measured in
    bench/gates.py: detection at 90% instead of 78% within the window).
    """
    mean = np.minimum(1.5 * np.asarray(rho, float), 0.9)
    return 50.0 * mean, 50.0 * (1 - mean)


def error_statistics(n_rc, x_rc, n_prod, x_prod, *, rho=None, tolerance_points: float, tolerance_ratio: float,
                     margin_points: float, alpha: float, beta: float) -> dict[str, Any]:
    """Vectorised evidence on error counts: a dict of arrays with `fail` and `pass` flags."""
    rho = realised_share(n_rc, n_prod) if rho is None else np.asarray(rho, float)
    log_e = tolerant_difference_log_e(n_rc, x_rc, x_prod, rho, points=tolerance_points / 100.0,
                                      ratio=tolerance_ratio)
    _, rc_high = bernoulli_cs(x_rc, n_rc, RC_SHARE_OF_BETA * beta, ERROR_RATE_PRIOR)
    prod_low, _ = bernoulli_cs(x_prod, n_prod, (1 - RC_SHARE_OF_BETA) * beta, ERROR_RATE_PRIOR)
    fail = log_e >= np.log(fail_threshold(alpha))
    passed = ~fail & (rc_high - prod_low < margin_points / 100.0)
    end_p = tolerant_difference_p_value(n_rc, x_rc, n_prod, x_prod, tolerance_points=tolerance_points,
                                        tolerance_ratio=tolerance_ratio)
    return {"log_e": log_e, "rho": rho, "rc_high": rc_high, "prod_low": prod_low, "fail": fail, "pass": passed,
            "end_p": end_p, "end_fail": end_p < END_SHARE_OF_ALPHA * alpha}


def tolerant_difference_p_value(n_rc, x_rc, n_prod, x_prod, *, tolerance_points: float, tolerance_ratio: float):
    """Fixed-sample one-sided p-value of H0: p_rc <= ratio x p_prod + points (Wald, unpooled variance).

    Looked at once, at the window's end; a rate of 0 is read as half an event so that the variance of a
    deployment without errors is not 0.
    """
    n_rc, x_rc, n_prod, x_prod = (np.asarray(v, float) for v in (n_rc, x_rc, n_prod, x_prod))
    n_rc, n_prod = np.maximum(n_rc, 1), np.maximum(n_prod, 1)
    p_rc, p_prod = np.maximum(x_rc, 0.5) / n_rc, np.maximum(x_prod, 0.5) / n_prod
    se = np.sqrt(p_rc * (1 - p_rc) / n_rc + tolerance_ratio ** 2 * p_prod * (1 - p_prod) / n_prod)
    excess = x_rc / n_rc - tolerance_ratio * x_prod / n_prod - tolerance_points / 100.0
    return stats.norm.sf(excess / se)


def error_decision(n_rc: int, x_rc: int, n_prod: int, x_prod: int, *, rho: float | None = None,
                   tolerance_points: float = DEFAULT_ERROR_TOLERANCE_POINTS,
                   tolerance_ratio: float = DEFAULT_ERROR_TOLERANCE_RATIO,
                   margin_points: float = DEFAULT_ERROR_MARGIN_POINTS, alpha: float, beta: float,
                   final: bool = False) -> tuple[str, str, dict[str, Any]]:
    """The errors verdict; `final`: the window ends now, so an undecided gate is decided by the end test."""
    s = {k: float(np.asarray(v)) for k, v in error_statistics(
        n_rc, x_rc, n_prod, x_prod, rho=rho, tolerance_points=tolerance_points, tolerance_ratio=tolerance_ratio,
        margin_points=margin_points, alpha=alpha, beta=beta).items()}
    rc_rate, prod_rate = x_rc / n_rc, x_prod / n_prod
    e_value = float(np.exp(min(s["log_e"], 700.0)))
    tolerated = tolerance_ratio * prod_rate + tolerance_points / 100.0
    evidence = {"n": {"rc": n_rc, "prod": n_prod}, "errors": {"rc": x_rc, "prod": x_prod},
                "error_rate": {"rc": rc_rate, "prod": prod_rate}, "e_value": e_value,
                "e_threshold": fail_threshold(alpha), "rc_share": s["rho"], "rc_rate_upper": s["rc_high"],
                "prod_rate_lower": s["prod_low"], "tolerance_points": tolerance_points,
                "tolerance_ratio": tolerance_ratio, "margin_points": margin_points, "alpha": alpha, "beta": beta}
    rates = f"RC {rc_rate:.2%} of {n_rc} vs PROD {prod_rate:.2%} of {n_prod}"
    limit = _error_limit(tolerance_ratio, tolerance_points)
    threshold = fail_threshold(alpha)
    if s["fail"]:
        return "fail", (f"error rate: {rates}; e-value {e_value:.3g} >= {threshold:g}: strong evidence the RC "
                        f"fails more often than {limit} (~{tolerated:.2%})"), evidence
    allowed = s["prod_low"] + margin_points / 100.0
    if s["pass"]:
        return "pass", (f"error rate: {rates}; the RC's is at most {s['rc_high']:.2%}, within PROD "
                        f"+{margin_points:g} points ({allowed:.2%}) with confidence {1 - beta:.0%}"), evidence
    if final:
        return _at_window_end(f"error rate: {rates}", f"the RC fails more often than {limit} (~{tolerated:.2%})",
                              s, e_value, threshold, evidence, alpha)
    return "inconclusive", (f"error rate: {rates}; not decided yet: e-value {e_value:.3g} < {threshold:g} "
                            f"and the RC's could be up to {s['rc_high']:.2%} (> {allowed:.2%})"), evidence


def _at_window_end(observed: str, harm: str, s: dict[str, Any], e_value: float, threshold: float,
                   evidence: dict[str, Any], alpha: float) -> tuple[str, str, dict[str, Any]]:
    """The one fixed-sample decision of a gate the anytime tests left undecided at the window's end."""
    end_alpha = END_SHARE_OF_ALPHA * alpha
    end = dict(evidence, end_p_value=s["end_p"], end_alpha=end_alpha)
    if s["end_fail"]:
        return "fail", f"{observed}; at the window's end {harm}: p = {s['end_p']:.3g} < {end_alpha:g}", end
    return "pass", (f"{observed}; the window ended without evidence {harm} (e-value {e_value:.3g} < "
                    f"{threshold:g}, p = {s['end_p']:.3g})"), dict(end, passed_at_window_end=True)


def _error_limit(ratio: float, points: float) -> str:
    scaled = "PROD's" if ratio == 1 else f"{ratio:g}x PROD's"
    return f"{scaled} +{points:g} points" if points else scaled


def latency_statistics(rc_ts, rc_ms, prod_ts, prod_ms, *, rho: float | None = None, quantile: float,
                       fail_quantiles: tuple[float, ...] = DEFAULT_FAIL_QUANTILES,
                       tolerance_ratio: float = DEFAULT_LATENCY_TOLERANCE_RATIO,
                       tolerance_ms: float = DEFAULT_LATENCY_TOLERANCE_MS, margin_ratio: float, alpha: float,
                       beta: float, calibration: int = DEFAULT_CALIBRATION_SAMPLES,
                       warm_after: float = -np.inf) -> dict[str, Any]:
    """Evidence on the latency of RC vs PROD, with `fail`, `pass` and (for the window's end) `end_fail` flags.

    Timestamps order the requests. PROD's first `calibration` requests fix the levels v_q (PROD is warm,
    so its requests in the warm-up count for that); only requests after both the last of them and
    `warm_after` are counted for the fail test, and only requests after `warm_after` for the pass test.
    """
    rc_ts, rc_ms, prod_ts, prod_ms = (np.asarray(v, float) for v in (rc_ts, rc_ms, prod_ts, prod_ms))
    levels = tuple(sorted({quantile, *fail_quantiles}))
    calibrated = prod_ms.size >= calibration
    per_level: dict[str, dict[str, Any]] = {}
    log_e, end_p, counted = 0.0, 1.0, {"rc": 0, "prod": 0}
    if calibrated:
        order = np.argsort(prod_ts, kind="stable")
        cut = max(prod_ts[order[calibration - 1]], warm_after)
        rc_after, prod_after = rc_ms[rc_ts > cut], prod_ms[prod_ts > cut]
        counted = {"rc": int(rc_after.size), "prod": int(prod_after.size)}
        share = float(realised_share(rc_after.size, prod_after.size)) if rho is None else rho
        calibrated_ms = np.sort(prod_ms[order[:calibration]])
        rank_log_e = rank_shift_log_e(_cdf(calibrated_ms, (rc_after - tolerance_ms) / tolerance_ratio),
                                      _cdf(calibrated_ms, prod_after), share)
        logs, end_ps = [rank_log_e], []
        per_level["rank"] = {"e_value": float(np.exp(min(rank_log_e, 700.0)))}
        for q in levels:
            v = float(np.quantile(calibrated_ms, q))
            rc_level = tolerance_ratio * v + tolerance_ms
            slow = {"rc": int(np.count_nonzero(rc_after > rc_level)), "prod": int(np.count_nonzero(prod_after > v))}
            events = slow["rc"] + slow["prod"]
            level_log_e = float(one_sided_binomial_log_e(slow["rc"], events, share, prior=slow_share_prior(share)))
            logs.append(level_log_e)
            end_ps.append(stats.binomtest(slow["rc"], events, share, alternative="greater").pvalue if events else 1.0)
            per_level[f"p{q * 100:g}"] = {"prod_level_ms": v, "rc_level_ms": rc_level, "slow": slow,
                                           "e_value": float(np.exp(min(level_log_e, 700.0))), "end_p_value": end_ps[-1]}
        log_e = float(np.logaddexp.reduce(logs) - np.log(len(logs)))
        end_p = min(1.0, len(levels) * min(end_ps))  # Bonferroni over the levels
    # the pass test reads the warm-up too: a slow start only makes the RC harder to pass, never easier
    prod_low = quantile_cs(prod_ms, quantile, (1 - RC_SHARE_OF_BETA) * beta)[0] if prod_ms.size else 0.0
    allowed_ms = margin_ratio * prod_low
    above = int(np.count_nonzero(rc_ms > allowed_ms))
    log_e_pass = float(one_sided_binomial_log_e(above, rc_ms.size, 1.0 - quantile, side="less"))
    fail = log_e >= np.log(fail_threshold(alpha))
    passed = (not fail) and prod_low > 0 and log_e_pass >= np.log(1 / (RC_SHARE_OF_BETA * beta))
    return {"log_e": log_e, "levels": per_level, "counted": counted, "calibrated": calibrated, "prod_low": prod_low,
            "allowed_ms": allowed_ms, "rc_above_allowed": above, "rc_n": int(rc_ms.size),
            "log_e_pass": log_e_pass, "fail": bool(fail), "pass": bool(passed), "end_p": end_p,
            "end_fail": bool(calibrated and end_p < END_SHARE_OF_ALPHA * alpha)}


def _cdf(calibrated_ms: np.ndarray, values: np.ndarray) -> np.ndarray:
    """PROD's calibrated CDF at `values` (mid-rank at ties): the scores of the rank test."""
    low = np.searchsorted(calibrated_ms, values, side="left")
    high = np.searchsorted(calibrated_ms, values, side="right")
    return (low + high) / (2.0 * calibrated_ms.size)


def latency_decision(rc_ts, rc_ms, prod_ts, prod_ms, *, rho: float | None = None, quantile: float,
                     fail_quantiles: tuple[float, ...] = DEFAULT_FAIL_QUANTILES,
                     tolerance_ratio: float = DEFAULT_LATENCY_TOLERANCE_RATIO,
                     tolerance_ms: float = DEFAULT_LATENCY_TOLERANCE_MS, margin_ratio: float, alpha: float,
                     beta: float, calibration: int = DEFAULT_CALIBRATION_SAMPLES, warm_after: float = -np.inf,
                     final: bool = False) -> tuple[str, str, dict[str, Any]]:
    """The latency verdict; `final`: the window ends now, so an undecided gate is decided once."""
    s = latency_statistics(rc_ts, rc_ms, prod_ts, prod_ms, rho=rho, quantile=quantile, fail_quantiles=fail_quantiles,
                           tolerance_ratio=tolerance_ratio, tolerance_ms=tolerance_ms, margin_ratio=margin_ratio,
                           alpha=alpha, beta=beta, calibration=calibration, warm_after=warm_after)
    label = f"p{quantile * 100:g}"
    rc_warm = np.asarray(rc_ms, float)[np.asarray(rc_ts, float) > warm_after]
    prod_warm = np.asarray(prod_ms, float)[np.asarray(prod_ts, float) > warm_after]
    if rc_warm.size == 0 or prod_warm.size == 0:
        raise Inconclusive("latency: no requests after the warm-up yet",
                           {"n": {"rc": len(rc_warm), "prod": len(prod_warm)}})
    rc_q, prod_q = float(np.quantile(rc_warm, quantile)), float(np.quantile(prod_warm, quantile))
    e_value = float(np.exp(min(s["log_e"], 700.0)))
    threshold = fail_threshold(alpha)
    evidence = {"n": {"rc": int(rc_warm.size), "prod": int(prod_warm.size)}, "quantile": quantile,
                "latency_ms": {"rc": rc_q, "prod": prod_q}, "ratio": rc_q / prod_q if prod_q else None,
                "e_value": e_value, "e_threshold": threshold, "levels": s["levels"],
                "counted_requests": s["counted"], "rc_share": rho, "calibration_samples": calibration,
                "prod_quantile_lower": s["prod_low"], "allowed_ms": s["allowed_ms"],
                "rc_above_allowed": s["rc_above_allowed"],
                "e_value_no_harm": float(np.exp(min(s["log_e_pass"], 700.0))),
                "e_threshold_no_harm": 1 / (RC_SHARE_OF_BETA * beta), "tolerance_ratio": tolerance_ratio,
                "tolerance_ms": tolerance_ms, "margin_ratio": margin_ratio, "alpha": alpha, "beta": beta}
    observed = f"{label} RC {rc_q:.1f} ms ({rc_warm.size}) vs PROD {prod_q:.1f} ms ({prod_warm.size})"
    tolerated = f"{tolerance_ratio:g}x PROD's" + (f" +{tolerance_ms:g} ms" if tolerance_ms else "")
    watched = "/".join(k for k in s["levels"] if k != "rank") + " and ranks"
    if s["fail"]:
        return "fail", (f"latency {observed}; e-value {e_value:.3g} >= {threshold:g}: strong evidence the RC is "
                        f"slower than {tolerated} (at {watched})"), evidence
    allowed, share = s["allowed_ms"], s["rc_above_allowed"] / max(s["rc_n"], 1)
    if s["pass"]:
        # the pass test read every request of the window, the warm-up included: say so, with those counts (a pass
        # just after the warm-up would otherwise show a p90 of one request each)
        rc_all, prod_all = np.asarray(rc_ms, float), np.asarray(prod_ms, float)
        evidence["n_after_warmup"] = evidence["n"]
        evidence["n"] = {"rc": int(rc_all.size), "prod": int(prod_all.size)}
        seen = (f"{label} RC {float(np.quantile(rc_all, quantile)):.1f} ms ({rc_all.size}) vs PROD "
                f"{float(np.quantile(prod_all, quantile)):.1f} ms ({prod_all.size}), the warm-up included")
        return "pass", (f"latency {seen}; {share:.1%} of RC requests above {allowed:.1f} ms ({margin_ratio:g}x "
                        f"PROD's {label} lower bound): its {label} is within {margin_ratio:g}x PROD with confidence "
                        f"{1 - beta:.0%}"), evidence
    if final and s["calibrated"]:
        return _at_window_end(f"latency {observed}", f"the RC is slower than {tolerated} (at {watched})",
                              s, e_value, threshold, evidence, alpha)
    waiting = (f"e-value {e_value:.3g} < {threshold:g}" if s["calibrated"]
               else f"PROD has {len(prod_ms)} of {calibration} calibration samples")
    return "inconclusive", (f"latency {observed}; not decided yet: {waiting}, and {share:.1%} of RC requests "
                            f"above {allowed:.1f} ms is not yet clearly below {1 - quantile:.0%}"), evidence


@dataclass
class SequentialGate(GateBase):
    """Anytime-valid RC-vs-PROD gate on raw samples; `metric` is errors or latency."""

    metric: str = "errors"
    tolerance: float | None = None  # errors: points over tolerance_ratio x PROD's; latency: ratio of quantiles
    tolerance_ratio: float = DEFAULT_ERROR_TOLERANCE_RATIO  # errors only: the RC may fail this many times as often
    tolerance_ms: float = DEFAULT_LATENCY_TOLERANCE_MS  # latency only: absolute slack over tolerance x PROD's
    margin: float | None = None  # errors: percentage points; latency: ratio of the quantile
    alpha: float = 0.01
    beta: float = 0.05
    min_samples: int = 30
    quantile: float = 0.9
    fail_quantiles: list[float] = field(default_factory=lambda: list(DEFAULT_FAIL_QUANTILES))
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES
    warmup_s: float = DEFAULT_WARMUP_S  # latency only: requests this soon after the window opens are left out
    undecided: str = "pass"  # at max_duration_s, with no evidence of harm: pass | fail

    kind = "sequential"
    needs_samples = True
    CHOICES = {"metric": ("errors", "latency"), "undecided": ("pass", "fail")}

    def __post_init__(self) -> None:
        self.tolerance, self.margin = self.limits()
        self.name = self.name or f"{self.metric}-sequential"

    def limits(self) -> tuple[float, float]:
        """(tolerance, margin): as given, else this metric's defaults."""
        errors = self.metric == "errors"
        tolerance = DEFAULT_ERROR_TOLERANCE_POINTS if errors else DEFAULT_LATENCY_TOLERANCE_RATIO
        margin = DEFAULT_ERROR_MARGIN_POINTS if errors else DEFAULT_LATENCY_MARGIN_RATIO
        return (tolerance if self.tolerance is None else self.tolerance,
                margin if self.margin is None else self.margin)

    def validate(self) -> list[str]:
        problems = []
        tolerance, margin = self.limits()
        if not 0 < self.alpha < 1 or not 0 < self.beta < 1:
            problems.append("alpha and beta must be between 0 and 1")
        if self.calibration_samples < 10:
            problems.append("calibration_samples must be at least 10")
        if not all(0 < q < 1 for q in [self.quantile, *self.fail_quantiles]):
            problems.append("quantile and fail_quantiles must be between 0 and 1")
        if self.warmup_s < 0 or self.tolerance_ms < 0:
            problems.append("warmup_s and tolerance_ms must be at least 0")
        if self.metric == "latency":
            if tolerance < 1:
                problems.append("tolerance for latency is a ratio of quantiles, at least 1 (e.g. 1.2)")
            if margin < 1:
                problems.append("margin for latency is a ratio of quantiles, at least 1 (e.g. 1.5)")
        else:
            if not 0 <= tolerance < 100 or self.tolerance_ratio < 1:
                problems.append("tolerance for errors is in percentage points (0 to 100) and tolerance_ratio "
                                "at least 1")
            if not 0 <= margin < 100:
                problems.append("margin for errors is in percentage points, between 0 and 100")
        return problems

    def look(self, ctx: GateContext) -> tuple[str, str, dict[str, Any]]:
        prod = require_prod(ctx)
        tolerance, margin = self.limits()
        final = self.undecided == "pass" and ctx.elapsed_s >= self.max_duration_s
        warm = ctx.start + self.warmup_s
        if self.metric == "latency" and ctx.now < warm:
            raise Inconclusive(f"latency: warming up, the first {self.warmup_s:g}s after the shift are left out",
                               {"warmup_s": self.warmup_s})
        rc_samples, prod_samples = fetch_samples(ctx, ctx.rc), fetch_samples(ctx, prod)
        require_samples({ctx.rc: len(rc_samples), prod: len(prod_samples)}, self.min_samples)
        if self.metric == "errors":
            return error_decision(len(rc_samples), sum(is_error(s.status_code) for s in rc_samples),
                                  len(prod_samples), sum(is_error(s.status_code) for s in prod_samples),
                                  rho=ctx.rc_share, tolerance_points=tolerance,
                                  tolerance_ratio=self.tolerance_ratio, margin_points=margin,
                                  alpha=self.alpha, beta=self.beta, final=final)
        # latency of answered requests: a failed request's latency says nothing about speed
        rc_ok = [s for s in rc_samples if not is_error(s.status_code)]
        prod_ok = [s for s in prod_samples if not is_error(s.status_code)]
        require_samples({ctx.rc: len(rc_ok), prod: len(prod_ok)}, self.min_samples)
        return latency_decision([s.timestamp for s in rc_ok], [s.latency_ms for s in rc_ok],
                                [s.timestamp for s in prod_ok], [s.latency_ms for s in prod_ok],
                                rho=ctx.rc_share, quantile=self.quantile, fail_quantiles=tuple(self.fail_quantiles),
                                tolerance_ratio=tolerance, tolerance_ms=self.tolerance_ms,
                                margin_ratio=margin, alpha=self.alpha, beta=self.beta,
                                calibration=self.calibration_samples, warm_after=warm, final=final)
