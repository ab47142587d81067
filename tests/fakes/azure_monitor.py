"""A fake of azure-monitor-query's MetricsQueryClient for the online-endpoint namespace.

`query_resource` answers with the SDK's real MetricsQueryResult / Metric / TimeSeriesElement / MetricValue,
aggregated from the requests the fake endpoints served (with the local backend's `aggregate`, so both
backends count the same way). It behaves as Azure Monitor does where that matters to a gate: grains of at
least one minute, one time series per value of each dimension named in the filter (`dim eq '*'` splits),
and count metrics reported as 0 (not missing) for a minute with no request.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

from azure.monitor.query import Metric, MetricsQueryResult, MetricValue, TimeSeriesElement

from fakes.azure_state import FakeWorkspaceState, bad_request, not_found
from saferollout.backends.base import METRIC_DIMENSIONS
from saferollout.backends.local.metrics import BoolOp, Comparison, aggregate, parse_filter

NAMESPACE = "Microsoft.MachineLearningServices/workspaces/onlineEndpoints"
GRAINS_S = (60, 300, 900, 1800, 3600, 21600, 43200, 86400)


def _named(node: Any) -> list[str]:
    if isinstance(node, Comparison):
        return [node.dimension]
    if isinstance(node, BoolOp):
        return _named(node.left) + [d for d in _named(node.right) if d not in _named(node.left)]
    return []


class FakeMetricsQueryClient:
    def __init__(self, state: FakeWorkspaceState):
        self._state = state
        self.queries: list[dict[str, Any]] = []  # what was asked, for tests to check the translation

    def query_resource(self, resource_uri: str, metric_names: Sequence[str], *, timespan: Any = None,
                       granularity: timedelta | None = None, aggregations: Sequence[str] | None = None,
                       max_results: int | None = None, order_by: str | None = None, filter: str | None = None,
                       metric_namespace: str | None = None, **kwargs: Any) -> MetricsQueryResult:
        self.queries.append({"resource_uri": resource_uri, "metric_names": list(metric_names),
                             "timespan": timespan, "granularity": granularity, "aggregations": aggregations,
                             "filter": filter, "metric_namespace": metric_namespace})
        if metric_namespace != NAMESPACE:
            raise bad_request(f"Failed to find metric configuration for provider namespace {metric_namespace}.")
        prefix = self._state.endpoint_id("")
        name = resource_uri[len(prefix):] if resource_uri.startswith(prefix) else None
        if not name or name not in self._state.read()["endpoints"]:
            raise not_found(f"The Resource '{resource_uri}' was not found.")
        grain_s = int((granularity or timedelta(minutes=1)).total_seconds())
        if grain_s not in GRAINS_S:
            raise bad_request(f"Invalid granularity {granularity}: Azure Monitor serves PT1M and coarser.")
        start, end = _window(timespan)
        rows = self._state.request_rows(name, start.timestamp(), end.timestamp())
        metrics = [self._metric(resource_uri, metric, rows, (aggregations or ["Average"])[0], grain_s, start, end,
                                filter) for metric in metric_names]
        return MetricsQueryResult(timespan=f"{start.isoformat()}/{end.isoformat()}", metrics=metrics,
                                  granularity=timedelta(seconds=grain_s), namespace=NAMESPACE,
                                  resource_region="westeurope", cost=0)

    def _metric(self, resource_uri: str, metric: str, rows: list[tuple], aggregation: str, grain_s: int,
                start: datetime, end: datetime, filter_text: str | None) -> Metric:
        if metric not in METRIC_DIMENSIONS:
            raise bad_request(f"Failed to find metric configuration for provider namespace {NAMESPACE}, "
                              f"metric name {metric}.")
        node = parse_filter(filter_text, METRIC_DIMENSIONS[metric])
        split = _named(node)  # Azure answers one series per value of every dimension the filter names
        found = aggregate(rows, metric, aggregation, f"PT{grain_s}S", start.timestamp(), end.timestamp(),
                          filter_text, split)
        counts = metric == "RequestsPerMinute"
        timeseries = [TimeSeriesElement(
            metadata_values={d.lower(): v for d, v in s["dimensions"].items()},
            data=[MetricValue(timestamp=datetime.fromtimestamp(p["timestamp"], tz=timezone.utc),
                              **{aggregation.lower(): 0.0 if (counts and p["value"] is None) else p["value"]})
                  for p in s["points"]]) for s in found]
        return Metric(id=f"{resource_uri}/providers/Microsoft.Insights/metrics/{metric}",
                      type="Microsoft.Insights/metrics", name=metric,
                      unit="Count" if counts else "Milliseconds", timeseries=timeseries,
                      display_description=f"{metric} (fake Azure Monitor)")


def _window(timespan: Any) -> tuple[datetime, datetime]:
    now = datetime.now(timezone.utc)
    if timespan is None:
        return now - timedelta(hours=1), now
    if isinstance(timespan, timedelta):
        return now - timespan, now
    start, second = timespan
    end = start + second if isinstance(second, timedelta) else second
    return start, end
