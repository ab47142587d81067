"""The sequential gate: anytime-valid RC-vs-PROD tests that may stop early either way.

It is meant to be looked at continuously. Two bounds hold however often it looks (Ville's inequality):
- fail (roll back) only on strong evidence that the RC is worse than PROD: a healthy RC is rolled
  back with probability at most `alpha`;
- pass only on strong evidence that the RC is no worse than PROD by more than `margin`: an RC worse
  than that passes with probability at most `beta`.
Neither before `min_samples` per deployment; a gate undecided at `max_duration_s` fails.

errors  (margin in percentage points: 3 by default)
  fail: of the E errors so far, X came from the RC. If both error rates are equal, each error comes from
        the RC with probability rho0 = RC's share of requests, so X ~ Binomial(E, rho0); the e-value is
        a truncated-Beta mixture over rho > rho0 (Lindon et al. 2022's count test, conditional form).
  pass: upper end of the RC rate's CS minus lower end of PROD's below the margin (the two CS share
        beta: 0.8 beta for the RC, 0.2 beta for PROD, which has ~9x the data).
latency (margin as a ratio of the quantile: p90 at most 1.5x PROD by default)
  fail: a request is "slow" when it takes longer than v, PROD's q-quantile over its first
        `calibration_samples` requests; on the requests that arrive after those, slow requests are
        counted like errors (same conditional test). v is fixed before the counted requests arrive,
        so the test is exact for a healthy RC (same latency distribution as PROD).
  pass: w = margin x the lower end of PROD's quantile CS (0.2 beta; Howard & Ramdas 2022). If the
        RC's quantile were above margin x PROD's, at least 1 - q of its requests would exceed w; a
        one-sided mixture e-value (0.8 beta) on the share that does is evidence that it is not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from saferollout.gates.anytime import (ERROR_RATE_PRIOR, arm_count_log_e, bernoulli_cs, one_sided_binomial_log_e,
                                       quantile_cs)
from saferollout.gates.base import (GateBase, GateContext, fetch_samples, is_error, require_prod,
                                    require_samples)

DEFAULT_ERROR_MARGIN_POINTS = 3.0
# The pass side's error budget beta is split between the RC's bound and PROD's: PROD has ~9x the data,
# so its bound barely moves with a smaller share, while the RC's tightens (it passes sooner).
RC_SHARE_OF_BETA = 0.8
DEFAULT_LATENCY_MARGIN_RATIO = 1.5
DEFAULT_CALIBRATION_SAMPLES = 200


def error_statistics(n_rc, x_rc, n_prod, x_prod, *, margin_points: float, alpha: float, beta: float):
    """Vectorised evidence on error counts: a dict of arrays with `fail` and `pass` flags."""
    log_e, rho0 = arm_count_log_e(x_rc, x_prod, n_rc, n_prod)
    _, rc_high = bernoulli_cs(x_rc, n_rc, RC_SHARE_OF_BETA * beta, ERROR_RATE_PRIOR)
    prod_low, _ = bernoulli_cs(x_prod, n_prod, (1 - RC_SHARE_OF_BETA) * beta, ERROR_RATE_PRIOR)
    fail = log_e >= np.log(1 / alpha)
    passed = ~fail & (rc_high - prod_low < margin_points / 100.0)
    return {"log_e": log_e, "rho0": rho0, "rc_high": rc_high, "prod_low": prod_low,
            "fail": fail, "pass": passed}


def error_decision(n_rc: int, x_rc: int, n_prod: int, x_prod: int, *, margin_points: float, alpha: float,
                   beta: float) -> tuple[str, str, dict[str, Any]]:
    s = {k: float(np.asarray(v)) for k, v in error_statistics(
        n_rc, x_rc, n_prod, x_prod, margin_points=margin_points, alpha=alpha, beta=beta).items()}
    rc_rate, prod_rate = x_rc / n_rc, x_prod / n_prod
    e_value = float(np.exp(min(s["log_e"], 700.0)))
    evidence = {"n": {"rc": n_rc, "prod": n_prod}, "errors": {"rc": x_rc, "prod": x_prod},
                "error_rate": {"rc": rc_rate, "prod": prod_rate}, "e_value": e_value,
                "e_threshold": 1 / alpha, "rc_share": s["rho0"], "rc_rate_upper": s["rc_high"],
                "prod_rate_lower": s["prod_low"], "margin_points": margin_points, "alpha": alpha,
                "beta": beta}
    rates = f"RC {rc_rate:.2%} of {n_rc} vs PROD {prod_rate:.2%} of {n_prod}"
    if s["fail"]:
        return "fail", (f"error rate: {rates}; e-value {e_value:.3g} >= {1 / alpha:g}: strong evidence "
                        "the RC fails more often than PROD"), evidence
    allowed = s["prod_low"] + margin_points / 100.0
    if s["pass"]:
        return "pass", (f"error rate: {rates}; the RC's is at most {s['rc_high']:.2%}, within PROD "
                        f"+{margin_points:g} points ({allowed:.2%}) with confidence {1 - beta:.0%}"), evidence
    return "inconclusive", (f"error rate: {rates}; not decided yet: e-value {e_value:.3g} < {1 / alpha:g} "
                            f"and the RC's could be up to {s['rc_high']:.2%} (> {allowed:.2%})"), evidence


def latency_statistics(rc_ts, rc_ms, prod_ts, prod_ms, *, quantile: float, margin_ratio: float, alpha: float,
                       beta: float, calibration: int = DEFAULT_CALIBRATION_SAMPLES) -> dict[str, Any]:
    """Evidence on the latency quantile of RC vs PROD, with `fail` and `pass` flags.

    Timestamps order the requests: PROD's first `calibration` requests fix the slow threshold, and only
    requests after the last of them are counted for the fail test.
    """
    rc_ts, rc_ms, prod_ts, prod_ms = (np.asarray(v, float) for v in (rc_ts, rc_ms, prod_ts, prod_ms))
    order = np.argsort(prod_ts, kind="stable")
    calibrated = prod_ms.size >= calibration
    log_e, rho0, slow_ms, counted = 0.0, None, None, {"rc": 0, "prod": 0}
    slow = {"rc": 0, "prod": 0}
    if calibrated:
        slow_ms = float(np.quantile(prod_ms[order[:calibration]], quantile))
        cut = prod_ts[order[calibration - 1]]
        rc_after, prod_after = rc_ms[rc_ts > cut], prod_ms[prod_ts > cut]
        counted = {"rc": int(rc_after.size), "prod": int(prod_after.size)}
        slow = {"rc": int(np.count_nonzero(rc_after > slow_ms)), "prod": int(np.count_nonzero(prod_after > slow_ms))}
        log_e, rho0 = (float(v) for v in arm_count_log_e(slow["rc"], slow["prod"], counted["rc"], counted["prod"]))
    prod_low, _ = quantile_cs(prod_ms, quantile, (1 - RC_SHARE_OF_BETA) * beta)
    allowed_ms = margin_ratio * prod_low
    above = int(np.count_nonzero(rc_ms > allowed_ms))
    log_e_pass = float(one_sided_binomial_log_e(above, rc_ms.size, 1.0 - quantile, side="less"))
    fail = log_e >= np.log(1 / alpha)
    passed = (not fail) and log_e_pass >= np.log(1 / (RC_SHARE_OF_BETA * beta))
    return {"log_e": log_e, "rc_share": rho0, "slow_ms": slow_ms, "counted": counted, "slow": slow,
            "calibrated": calibrated, "prod_low": prod_low, "allowed_ms": allowed_ms, "rc_above_allowed": above,
            "log_e_pass": log_e_pass, "fail": bool(fail), "pass": bool(passed)}


def latency_decision(rc_ts, rc_ms, prod_ts, prod_ms, *, quantile: float, margin_ratio: float, alpha: float,
                     beta: float, calibration: int = DEFAULT_CALIBRATION_SAMPLES) -> tuple[str, str, dict[str, Any]]:
    s = latency_statistics(rc_ts, rc_ms, prod_ts, prod_ms, quantile=quantile, margin_ratio=margin_ratio,
                           alpha=alpha, beta=beta, calibration=calibration)
    label = f"p{quantile * 100:g}"
    rc_q, prod_q = float(np.quantile(rc_ms, quantile)), float(np.quantile(prod_ms, quantile))
    e_value = float(np.exp(min(s["log_e"], 700.0)))
    evidence = {"n": {"rc": len(rc_ms), "prod": len(prod_ms)}, "quantile": quantile,
                "latency_ms": {"rc": rc_q, "prod": prod_q}, "ratio": rc_q / prod_q if prod_q else None,
                "e_value": e_value, "e_threshold": 1 / alpha, "slow_threshold_ms": s["slow_ms"],
                "slow_requests": s["slow"], "counted_requests": s["counted"], "rc_share": s["rc_share"],
                "calibration_samples": calibration, "prod_quantile_lower": s["prod_low"],
                "allowed_ms": s["allowed_ms"], "rc_above_allowed": s["rc_above_allowed"],
                "e_value_no_harm": float(np.exp(min(s["log_e_pass"], 700.0))),
                "e_threshold_no_harm": 1 / (RC_SHARE_OF_BETA * beta), "margin_ratio": margin_ratio,
                "alpha": alpha, "beta": beta}
    observed = f"{label} RC {rc_q:.1f} ms ({len(rc_ms)}) vs PROD {prod_q:.1f} ms ({len(prod_ms)})"
    if s["fail"]:
        return "fail", (f"latency {observed}; e-value {e_value:.3g} >= {1 / alpha:g}: strong evidence the RC "
                        f"has more requests slower than {s['slow_ms']:.1f} ms than PROD"), evidence
    allowed, share = s["allowed_ms"], s["rc_above_allowed"] / len(rc_ms)
    if s["pass"]:
        return "pass", (f"latency {observed}; {share:.1%} of RC requests above {allowed:.1f} ms ({margin_ratio:g}x "
                        f"PROD's {label} lower bound): its {label} is within {margin_ratio:g}x PROD with confidence "
                        f"{1 - beta:.0%}"), evidence
    waiting = (f"e-value {e_value:.3g} < {1 / alpha:g}" if s["calibrated"]
               else f"PROD has {len(prod_ms)} of {calibration} calibration samples")
    return "inconclusive", (f"latency {observed}; not decided yet: {waiting}, and {share:.1%} of RC requests "
                            f"above {allowed:.1f} ms is not yet clearly below {1 - quantile:.0%}"), evidence


@dataclass
class SequentialGate(GateBase):
    """Anytime-valid RC-vs-PROD gate on raw samples; `metric` is errors or latency."""

    metric: str = "errors"
    margin: float | None = None  # errors: percentage points; latency: ratio of the quantile
    alpha: float = 0.01
    beta: float = 0.05
    min_samples: int = 30
    quantile: float = 0.9
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES

    kind = "sequential"
    needs_samples = True
    CHOICES = {"metric": ("errors", "latency")}

    def __post_init__(self) -> None:
        if self.margin is None:
            self.margin = DEFAULT_ERROR_MARGIN_POINTS if self.metric == "errors" else DEFAULT_LATENCY_MARGIN_RATIO
        self.name = self.name or f"{self.metric}-sequential"

    def validate(self) -> list[str]:
        problems = []
        if not 0 < self.alpha < 1 or not 0 < self.beta < 1:
            problems.append("alpha and beta must be between 0 and 1")
        if self.calibration_samples < 10:
            problems.append("calibration_samples must be at least 10")
        if not 0 < self.quantile < 1:
            problems.append("quantile must be between 0 and 1")
        if self.metric == "latency" and self.margin < 1:
            problems.append("margin for latency is a ratio of quantiles, at least 1 (e.g. 1.2)")
        if self.metric == "errors" and not 0 <= self.margin < 100:
            problems.append("margin for errors is in percentage points, between 0 and 100")
        return problems

    def look(self, ctx: GateContext) -> tuple[str, str, dict[str, Any]]:
        prod = require_prod(ctx)
        rc_samples, prod_samples = fetch_samples(ctx, ctx.rc), fetch_samples(ctx, prod)
        require_samples({ctx.rc: len(rc_samples), prod: len(prod_samples)}, self.min_samples)
        if self.metric == "errors":
            return error_decision(len(rc_samples), sum(is_error(s.status_code) for s in rc_samples),
                                  len(prod_samples), sum(is_error(s.status_code) for s in prod_samples),
                                  margin_points=self.margin, alpha=self.alpha, beta=self.beta)
        # latency of answered requests only: a failed request's latency says nothing about speed
        rc_ok = [s for s in rc_samples if not is_error(s.status_code)]
        prod_ok = [s for s in prod_samples if not is_error(s.status_code)]
        require_samples({ctx.rc: len(rc_ok), prod: len(prod_ok)}, self.min_samples)
        return latency_decision([s.timestamp for s in rc_ok], [s.latency_ms for s in rc_ok],
                                [s.timestamp for s in prod_ok], [s.latency_ms for s in prod_ok],
                                quantile=self.quantile, margin_ratio=self.margin, alpha=self.alpha,
                                beta=self.beta, calibration=self.calibration_samples)
