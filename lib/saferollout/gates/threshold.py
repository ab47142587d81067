"""The threshold gate, at parity with the seed: a metric compared with a fixed threshold per interval.

It passes when the last `intervals` complete intervals since the window began all have data and all
meet the condition; it fails as soon as a complete interval violates it; otherwise it is inconclusive.
An interval with no data (None from the backend: no request in scope) is never read as a pass.
Presets: `errors` (RequestsPerMinute Total of the RC's non-2xx answers <= threshold) and `latency`
(RequestLatency_P90 of the RC <= threshold ms).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

from saferollout.backends.query import grain_seconds
from saferollout.errors import SpecError
from saferollout.gates.base import GateBase, GateContext, Inconclusive, to_datetime

CONDITIONS = {"lt": operator.lt, "lte": operator.le, "gt": operator.gt, "gte": operator.ge, "eq": operator.eq}
PRESETS = {
    "errors": {"metric": "RequestsPerMinute", "aggregation": "Total", "condition": "lte", "threshold": 5.0,
               "filter": "deployment eq '{rc}' and statusCodeClass ne '2xx'"},
    "latency": {"metric": "RequestLatency_P90", "aggregation": "Average", "condition": "lte",
                "threshold": 500.0, "filter": "deployment eq '{rc}'"},
}


def judge_intervals(values: list[float | None], *, condition: str, threshold: float,
                    intervals: int) -> tuple[str, str, dict[str, Any]]:
    """The seed's rule on the complete intervals' values, oldest first (None: no data)."""
    meets = CONDITIONS[condition]
    evidence = {"values": values, "condition": condition, "threshold": threshold, "intervals": intervals}
    for i, value in enumerate(values):
        if value is not None and not meets(value, threshold):
            return "fail", (f"interval {i + 1} of {len(values)} has {value:g}, which is not {condition} "
                            f"{threshold:g}"), evidence
    last = values[-intervals:]
    if len(last) < intervals:
        return "inconclusive", f"only {len(values)} of {intervals} complete intervals so far", evidence
    empty = sum(v is None for v in last)
    if empty:
        return "inconclusive", (f"{empty} of the last {intervals} intervals have no data (the filter matched "
                                "no request in scope)"), evidence
    return "pass", f"the last {intervals} intervals are all {condition} {threshold:g}", evidence


@dataclass
class ThresholdGate(GateBase):
    """A metric, an aggregation, a condition and a threshold, checked over N complete intervals."""

    preset: str | None = None
    metric: str | None = None
    aggregation: str | None = None
    condition: str | None = None
    threshold: float | None = None
    grain: str = "PT1M"
    intervals: int = 5
    filter: str | None = None

    kind = "threshold"
    CHOICES = {"preset": ("errors", "latency"), "condition": tuple(CONDITIONS),
               "aggregation": ("Average", "Minimum", "Maximum", "Total", "Count")}

    def __post_init__(self) -> None:
        for key, value in PRESETS.get(self.preset or "", {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.aggregation = self.aggregation or "Average"
        self.condition = self.condition or "lte"
        self.name = self.name or f"{self.preset or self.metric}-threshold"

    def validate(self) -> list[str]:
        problems = [f"{key} is required (or set preset: errors|latency)"
                    for key in ("metric", "threshold") if getattr(self, key) is None]
        if self.intervals < 1:
            problems.append("intervals must be at least 1")
        try:
            grain_seconds(self.grain)
        except Exception as exc:  # noqa: BLE001 - reported as a spec problem
            problems.append(str(exc))
        return problems

    def look(self, ctx: GateContext) -> tuple[str, str, dict[str, Any]]:
        if self.metric is None or self.threshold is None:  # validate() names them; never a look without them
            raise SpecError(f"gate {self.name!r} needs a metric and a threshold (or preset: errors|latency)")
        metric, threshold = self.metric, self.threshold
        aggregation, condition = self.aggregation or "Average", self.condition or "lte"
        query_filter = (self.filter or "").format(rc=ctx.rc, prod=ctx.prod or "")
        grain_s = grain_seconds(self.grain)
        query = {"metric": metric, "aggregation": aggregation, "grain": self.grain,
                 "filter": query_filter}
        series = ctx.backend.query_metrics(ctx.endpoint, metric, aggregation=aggregation,
                                           grain=self.grain, start=to_datetime(ctx.start),
                                           end=to_datetime(ctx.now), filter=query_filter or None)
        if not series:
            raise Inconclusive(f"the metric query returned no series: the filter {query_filter!r} "
                               "matched nothing", {"query": query})
        # an interval counts once the backend has all of it: Azure Monitor's newest minutes are partial
        values = complete_intervals(series[0].points, ctx.start, ctx.now - ctx.backend.metrics_delay_s, grain_s)
        decision, reason, evidence = judge_intervals(values, condition=condition,
                                                     threshold=threshold, intervals=self.intervals)
        return decision, f"{metric} ({aggregation}): {reason}", dict(evidence, query=query)


def complete_intervals(points, start: float, now: float, grain_s: int) -> list[float | None]:
    """Values of the buckets that lie wholly inside [start, now], oldest first."""
    values = []
    for point in points:
        begins = point.timestamp.timestamp()
        if begins >= start and begins + grain_s <= now:
            values.append(point.value)
    return values
