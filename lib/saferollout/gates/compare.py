"""The comparative gate: RC against PROD over the same window, a fixed-sample test decided once.

It waits until both deployments have `min_samples`, then decides at that look (a fixed-horizon test
looked at once keeps its error rate; looking again and again would not, which is what the sequential
gate is for). "As good as PROD" passes: it fails only on significant harm beyond the `tolerance`, the
worst RC the user still accepts.

errors  one-sided test of H0: p_rc - p_prod <= tolerance (points): Fisher's exact test when the tolerance
        is 0, otherwise a two-proportion z-test with unpooled variance (Wald) shifted by the tolerance.
latency Mann-Whitney U (RC slower than PROD, one-sided) and the quantile ratio RC/PROD: fail when the
        ratio exceeds the tolerance and the U test is significant. Requests in the first `warmup_s`
        after the shift are left out (samples mode).
mode: aggregates reads counts from RequestsPerMinute split by deployment and statusCodeClass, and the
latency percentile per deployment, for backends without raw samples (Azure); there the latency check is
the ratio of count-weighted per-interval percentiles, without a distribution test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from saferollout.gates.base import (GateBase, GateContext, Inconclusive, PinnedLedger, fetch_samples, is_error,
                                    require_prod, require_samples, to_datetime)

AGGREGATE_QUANTILES = {0.5: "RequestLatency_P50", 0.9: "RequestLatency_P90", 0.95: "RequestLatency_P95",
                       0.99: "RequestLatency_P99"}


def compare_errors(n_rc: float, x_rc: float, n_prod: float, x_prod: float, *, tolerance_points: float,
                   alpha: float) -> tuple[str, str, dict[str, Any]]:
    """One-sided test of RC error rate above PROD's + tolerance; pass unless significant."""
    p_rc, p_prod, margin = x_rc / n_rc, x_prod / n_prod, tolerance_points / 100.0
    if margin == 0:
        test = "fisher_exact"
        p_value = float(stats.fisher_exact([[x_rc, n_rc - x_rc], [x_prod, n_prod - x_prod]],
                                           alternative="greater").pvalue)
    else:
        test = "two_proportion_z"
        se = math.sqrt(max(p_rc * (1 - p_rc) / n_rc + p_prod * (1 - p_prod) / n_prod, 1e-12))
        p_value = float(stats.norm.sf((p_rc - p_prod - margin) / se))
    evidence = {"n": {"rc": n_rc, "prod": n_prod}, "errors": {"rc": x_rc, "prod": x_prod},
                "error_rate": {"rc": p_rc, "prod": p_prod}, "test": test, "p_value": p_value,
                "alpha": alpha, "tolerance_points": tolerance_points}
    rates = f"RC {p_rc:.2%} of {n_rc} vs PROD {p_prod:.2%} of {n_prod}"
    if p_value < alpha:
        return "fail", (f"error rate: {rates}; p = {p_value:.3g} < {alpha:g}: the RC is worse than PROD "
                        f"+{tolerance_points:g} points"), evidence
    return "pass", (f"error rate: {rates}; p = {p_value:.3g} >= {alpha:g}: no significant degradation beyond "
                    f"+{tolerance_points:g} points"), evidence


def compare_latency(rc_ms, prod_ms, *, quantile: float, tolerance_ratio: float,
                    alpha: float) -> tuple[str, str, dict[str, Any]]:
    """Mann-Whitney U (RC slower) and the quantile ratio; fail only when both say harm."""
    rc_ms, prod_ms = np.asarray(rc_ms, float), np.asarray(prod_ms, float)
    p_value = float(stats.mannwhitneyu(rc_ms, prod_ms, alternative="greater").pvalue)
    rc_q, prod_q = float(np.quantile(rc_ms, quantile)), float(np.quantile(prod_ms, quantile))
    ratio = rc_q / prod_q if prod_q > 0 else math.inf
    label = f"p{quantile * 100:g}"
    evidence = {"n": {"rc": int(rc_ms.size), "prod": int(prod_ms.size)}, "quantile": quantile,
                "latency_ms": {"rc": rc_q, "prod": prod_q}, "ratio": ratio, "tolerance_ratio": tolerance_ratio,
                "test": "mann_whitney_u", "p_value": p_value, "alpha": alpha}
    observed = f"{label} RC {rc_q:.1f} ms vs PROD {prod_q:.1f} ms (ratio {ratio:.2f}, tolerance {tolerance_ratio:g})"
    if ratio > tolerance_ratio and p_value < alpha:
        return "fail", f"latency {observed}; Mann-Whitney p = {p_value:.3g} < {alpha:g}: the RC is slower", evidence
    why = "within the tolerance" if ratio <= tolerance_ratio else f"not significantly slower (p = {p_value:.3g})"
    return "pass", f"latency {observed}; {why}", evidence


@dataclass
class CompareGate(GateBase):
    """RC vs PROD over the same window; `metric` errors or latency, `mode` samples or aggregates."""

    metric: str = "errors"
    mode: str = "samples"
    tolerance: float | None = None  # errors: percentage points over PROD's (0.5); latency: RC/PROD ratio (1.2)
    quantile: float = 0.9
    alpha: float = 0.01
    min_samples: int = 200
    grain: str = "PT1M"  # aggregates mode: the interval of the metric queries
    warmup_s: float = 20.0  # latency, samples mode: requests this soon after the window opens are left out

    kind = "compare"
    CHOICES = {"metric": ("errors", "latency"), "mode": ("samples", "aggregates")}
    RENAMED = {"margin": "tolerance", "max_ratio": "tolerance"}

    def __post_init__(self) -> None:
        self.tolerance = self.limit()
        self.name = self.name or f"{self.metric}-compare"

    def limit(self) -> float:
        """The tolerance: as given, else this metric's default."""
        if self.tolerance is None:
            return 0.5 if self.metric == "errors" else 1.2
        return self.tolerance

    @property
    def needs_samples(self) -> bool:  # type: ignore[override]
        return self.mode == "samples"

    def validate(self) -> list[str]:
        problems = []
        tolerance = self.limit()
        if self.mode == "aggregates" and self.metric == "latency" and self.quantile not in AGGREGATE_QUANTILES:
            problems.append(f"quantile must be one of {', '.join(map(str, AGGREGATE_QUANTILES))} in aggregates mode")
        if not 0 < self.alpha < 1:
            problems.append("alpha must be between 0 and 1")
        if self.min_samples < 1:
            problems.append("min_samples must be at least 1")
        if self.metric == "latency" and tolerance < 1:
            problems.append("tolerance for latency is a ratio of quantiles, at least 1 (e.g. 1.2)")
        if self.metric == "errors" and not 0 <= tolerance < 100:
            problems.append("tolerance for errors is in percentage points, between 0 and 100")
        if self.warmup_s < 0:
            problems.append("warmup_s must be at least 0")
        return problems

    def look(self, ctx: GateContext) -> tuple[str, str, dict[str, Any]]:
        prod = require_prod(ctx)
        tolerance = self.limit()
        if self.mode == "aggregates":
            return self._look_aggregates(ctx, prod)
        rc_samples, prod_samples = fetch_samples(ctx, ctx.rc), fetch_samples(ctx, prod)
        require_samples({ctx.rc: len(rc_samples), prod: len(prod_samples)}, self.min_samples)
        if self.metric == "errors":
            return compare_errors(len(rc_samples), sum(is_error(s.status_code) for s in rc_samples),
                                  len(prod_samples), sum(is_error(s.status_code) for s in prod_samples),
                                  tolerance_points=tolerance, alpha=self.alpha)
        warm = ctx.start + self.warmup_s
        rc_ms = [s.latency_ms for s in rc_samples if not is_error(s.status_code) and s.timestamp >= warm]
        prod_ms = [s.latency_ms for s in prod_samples if not is_error(s.status_code) and s.timestamp >= warm]
        require_samples({ctx.rc: len(rc_ms), prod: len(prod_ms)}, self.min_samples)
        return compare_latency(rc_ms, prod_ms, quantile=self.quantile, tolerance_ratio=tolerance,
                               alpha=self.alpha)

    def _look_aggregates(self, ctx: GateContext, prod: str) -> tuple[str, str, dict[str, Any]]:
        counts = self._query_counts(ctx)  # {(deployment, class): count}
        tolerance = self.limit()
        totals = {d: sum(v for (dep, _), v in counts.items() if dep == d) for d in (ctx.rc, prod)}
        require_samples(totals, self.min_samples)
        if self.metric == "errors":
            errors = {d: sum(v for (dep, cls), v in counts.items() if dep == d and cls != "2xx") for d in totals}
            decision, reason, evidence = compare_errors(totals[ctx.rc], errors[ctx.rc], totals[prod], errors[prod],
                                                        tolerance_points=tolerance, alpha=self.alpha)
            return decision, reason, dict(evidence, mode="aggregates")
        rc_q, prod_q = (self._weighted_quantile(ctx, d) for d in (ctx.rc, prod))
        ratio = rc_q / prod_q if prod_q > 0 else math.inf
        label = f"p{self.quantile * 100:g}"
        evidence = {"mode": "aggregates", "n": totals, "latency_ms": {"rc": rc_q, "prod": prod_q},
                    "ratio": ratio, "tolerance_ratio": tolerance, "metric": AGGREGATE_QUANTILES[self.quantile],
                    "test": None}
        observed = f"{label} RC {rc_q:.1f} ms vs PROD {prod_q:.1f} ms (ratio {ratio:.2f}, tolerance {tolerance:g})"
        if ratio > tolerance:
            return "fail", f"latency {observed}, from per-interval aggregates", evidence
        return "pass", f"latency {observed}, from per-interval aggregates", evidence

    def _query_counts(self, ctx: GateContext) -> dict[tuple[str, str], float]:
        series = ctx.backend.query_metrics(ctx.endpoint, "RequestsPerMinute", aggregation="Total",
                                           grain=self.grain, start=to_datetime(ctx.start), end=to_datetime(ctx.now),
                                           split_by=("deployment", "statusCodeClass"))
        counts: dict[tuple[str, str], float] = {}
        for s in series:
            key = (s.dimensions.get("deployment", ""), s.dimensions.get("statusCodeClass", ""))
            counts[key] = counts.get(key, 0) + sum(p.value or 0 for p in s.points)
        # requests the gates pinned themselves are not live traffic: take out those the metrics hold by now
        if isinstance(ctx.backend, PinnedLedger):
            settled = ctx.now - ctx.backend.metrics_delay_s
            for key, n in ctx.backend.counts(ctx.start, settled).items():
                if key in counts:
                    counts[key] = max(0.0, counts[key] - n)
        return counts

    def _weighted_quantile(self, ctx: GateContext, deployment: str) -> float:
        """Count-weighted mean of the per-interval percentile (an approximation of the window's)."""
        metric = AGGREGATE_QUANTILES[self.quantile]
        window: dict[str, Any] = {"start": to_datetime(ctx.start), "end": to_datetime(ctx.now), "grain": self.grain,
                  "filter": f"deployment eq '{deployment}'"}
        quantiles = ctx.backend.query_metrics(ctx.endpoint, metric, aggregation="Average", **window)
        counts = ctx.backend.query_metrics(ctx.endpoint, "RequestsPerMinute", aggregation="Total", **window)
        if not quantiles or not counts:
            raise Inconclusive(f"no {metric} data for {deployment}", {"metric": metric})
        pairs = [(q.value, c.value) for q, c in zip(quantiles[0].points, counts[0].points)
                 if q.value is not None and c.value]
        if not pairs:
            raise Inconclusive(f"no {metric} data for {deployment} in the window", {"metric": metric})
        values, weights = zip(*pairs)
        return float(np.average(values, weights=weights))
