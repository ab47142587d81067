"""Azure Monitor's metrics API on the wire: `GET {resourceUri}/providers/Microsoft.Insights/metrics`.

The answer is the `Response` of the REST API specification (`specification/monitor/.../examples/
GetMetric.json`): `{cost, timespan, interval, namespace, resourceregion, value: [{id, type, name: {value,
localizedValue}, unit, timeseries: [{metadatavalues: [{name: {value, localizedValue}, value}], data:
[{timeStamp, average|total|...}]}], errorCode}]}`. The service's rules that matter to a gate are kept:

- two namespaces: `.../onlineEndpoints` (request metrics on the endpoint's id) and
  `.../onlineEndpoints/deployments` (instance metrics such as CPU and memory, on a deployment's id);
- grains of at least `PT1M` (anything finer is a 400);
- `or` may only join values of one dimension (`A eq 'a' or A eq 'b'`); across dimensions it is a 400;
- one series per value of every dimension named in the filter; dimension names answered in lower case;
- at most `top` series (10 when `top` is not given): a split wider than that loses series silently;
- request counts are 0 (not missing) in a minute without a request.

Request metrics are aggregated from the requests the fake endpoints served (`requests.jsonl`); instance
metrics from what the scoring process measured while serving them (`usage.jsonl`: CPU seconds and memory).
"""
from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import isodate

from fakes.azure_state import FakeWorkspaceState
from fakes.azure_wire import ARM_HOST, ServiceRefusal, WireRequest, WireResponse, json_response
from saferollout.backends.base import METRIC_DIMENSIONS
from saferollout.backends.local.metrics import aggregate
from saferollout.backends.query import BoolOp, Comparison, parse_filter

ENDPOINT_NAMESPACE = "Microsoft.MachineLearningServices/workspaces/onlineEndpoints"
DEPLOYMENT_NAMESPACE = "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/deployments"
GRAINS_S = (60, 300, 900, 1800, 3600, 21600, 43200, 86400)
DEFAULT_TOP = 10
# Instance metrics of the deployment namespace (Azure Monitor's supported-metrics reference), by unit.
INSTANCE_METRICS = {"CpuUtilizationPercentage": ("Percent", ("instanceId",)),
                    "CpuMemoryUtilizationPercentage": ("Percent", ("instanceId",)),
                    "DiskUtilization": ("Percent", ("instanceId", "disk")),
                    "GpuUtilizationPercentage": ("Percent", ("instanceId",)),
                    "GpuMemoryUtilizationPercentage": ("Percent", ("instanceId",)),
                    "DeploymentCapacity": ("Count", ("instanceId", "State"))}


def _dimensions(node: Any) -> list[str]:
    if isinstance(node, Comparison):
        return [node.dimension]
    if isinstance(node, BoolOp):
        left = _dimensions(node.left)
        return left + [d for d in _dimensions(node.right) if d not in left]
    return []


def _check_or(node: Any, text: str) -> None:
    """Azure: 'the logical or operator cannot separate two different metadata names'."""
    if isinstance(node, BoolOp):
        if node.op == "or" and len(_dimensions(node)) > 1:
            raise ServiceRefusal(400, "BadRequest", f"Invalid $filter '{text}': the logical or operator cannot "
                                                    "separate two different metadata names.")
        _check_or(node.left, text)
        _check_or(node.right, text)


def _window(timespan: str) -> tuple[datetime, datetime]:
    start_text, _, end_text = timespan.partition("/")
    start = isodate.parse_datetime(start_text)
    end = start + isodate.parse_duration(end_text) if end_text.startswith("P") else isodate.parse_datetime(end_text)
    return start.astimezone(timezone.utc), end.astimezone(timezone.utc)


def _stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class MonitorService:
    def __init__(self, state: FakeWorkspaceState):
        self.state = state

    def metrics(self, request: WireRequest, match: re.Match) -> WireResponse:
        resource = "/" + match["resource"]
        q = request.query
        namespace = q.get("metricnamespace", "")
        endpoint, deployment = self._resource(resource, namespace)
        grain_s = int(isodate.parse_duration(q.get("interval") or "PT1M").total_seconds())
        if grain_s not in GRAINS_S:
            raise ServiceRefusal(400, "BadRequest", f"Invalid time grain {q.get('interval')}: the supported time "
                                                    "grains are PT1M, PT5M, PT15M, PT30M, PT1H, PT6H, PT12H, P1D.")
        start, end = _window(q["timespan"])
        aggregation = (q.get("aggregation") or "average").split(",")[0].strip().capitalize()
        top = int(q.get("top") or DEFAULT_TOP)
        filter_text = q.get("$filter") or None
        values = []
        for metric in (q.get("metricnames") or "").split(","):
            if deployment is None:
                values.append(self._request_metric(resource, endpoint, metric, aggregation, grain_s, start, end,
                                                   filter_text, top))
            else:
                values.append(self._instance_metric(resource, endpoint, deployment, metric, aggregation, grain_s,
                                                    start, end, filter_text, top))
        return json_response(200, {"cost": 0, "timespan": f"{_stamp(start.timestamp())}/{_stamp(end.timestamp())}",
                                   "interval": isodate.duration_isoformat(timedelta(seconds=grain_s)),
                                   "namespace": namespace.lower(), "resourceregion": "westeurope", "value": values})

    def _resource(self, resource: str, namespace: str) -> tuple[str, str | None]:
        m = re.fullmatch(r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.MachineLearningServices/"
                         r"workspaces/[^/]+/onlineEndpoints/(?P<e>[^/]+)(?:/deployments/(?P<d>[^/]+))?", resource,
                         re.IGNORECASE)
        wanted = DEPLOYMENT_NAMESPACE if (m and m["d"]) else ENDPOINT_NAMESPACE
        if m is None or namespace.lower() != wanted.lower():
            raise ServiceRefusal(400, "BadRequest", f"Failed to find metric configuration for provider: "
                                                    f"Microsoft.MachineLearningServices, resource Type: "
                                                    f"{namespace}, resource: {resource}.")
        data = self.state.read()
        endpoint = next((k for k in data["endpoints"] if k.lower() == m["e"].lower()), None)
        if endpoint is None:
            raise ServiceRefusal(404, "ResourceNotFound", f"The Resource '{resource}' was not found.")
        if m["d"]:
            deployment = next((k for k in data["deployments"].get(endpoint, {}) if k.lower() == m["d"].lower()),
                              None)
            if deployment is None:
                raise ServiceRefusal(404, "ResourceNotFound", f"The Resource '{resource}' was not found.")
            return endpoint, deployment
        return endpoint, None

    def _parse(self, filter_text: str | None, dims: tuple[str, ...]) -> Any:
        try:
            node = parse_filter(filter_text, dims)
        except Exception as exc:  # noqa: BLE001 - the service answers any bad filter with a 400
            raise ServiceRefusal(400, "BadRequest", f"Invalid $filter '{filter_text}': {exc}") from exc
        _check_or(node, filter_text or "")
        return node

    @staticmethod
    def _metric_body(resource: str, metric: str, unit: str, series: list[tuple[dict[str, str], list[dict]]],
                     top: int) -> dict[str, Any]:
        timeseries = [{"metadatavalues": [{"name": {"value": k.lower(), "localizedValue": k.lower()}, "value": v}
                                          for k, v in dims.items()], "data": data} for dims, data in series[:top]]
        return {"id": f"{resource}/providers/Microsoft.Insights/metrics/{metric}", "type": "Microsoft.Insights/metrics",
                "name": {"value": metric, "localizedValue": metric}, "displayDescription": f"{metric} (fake)",
                "unit": unit, "timeseries": timeseries, "errorCode": "Success"}

    def _request_metric(self, resource: str, endpoint: str, metric: str, aggregation: str, grain_s: int,
                        start: datetime, end: datetime, filter_text: str | None, top: int) -> dict[str, Any]:
        if metric not in METRIC_DIMENSIONS:
            raise ServiceRefusal(400, "BadRequest", f"Failed to find metric configuration for provider: "
                                                    f"Microsoft.MachineLearningServices, resource Type: "
                                                    f"{ENDPOINT_NAMESPACE}, metric: {metric}.")
        node = self._parse(filter_text, METRIC_DIMENSIONS[metric])
        split = _dimensions(node)
        rows = self.state.request_rows(endpoint, start.timestamp(), end.timestamp())
        found = aggregate(rows, metric, aggregation, f"PT{grain_s}S", start.timestamp(), end.timestamp(),
                          filter_text, split)
        counts = metric == "RequestsPerMinute"
        key = aggregation.lower()
        series = [({d: v for d, v in s["dimensions"].items()},
                   [{"timeStamp": _stamp(p["timestamp"]),
                     key: 0.0 if (counts and p["value"] is None) else p["value"]} for p in s["points"]])
                  for s in found]
        return self._metric_body(resource, metric, "Count" if counts else "MilliSeconds", series, top)

    def _instance_metric(self, resource: str, endpoint: str, deployment: str, metric: str, aggregation: str,
                         grain_s: int, start: datetime, end: datetime, filter_text: str | None,
                         top: int) -> dict[str, Any]:
        if metric not in INSTANCE_METRICS:
            raise ServiceRefusal(400, "BadRequest", f"Failed to find metric configuration for provider: "
                                                    f"Microsoft.MachineLearningServices, resource Type: "
                                                    f"{DEPLOYMENT_NAMESPACE}, metric: {metric}.")
        unit, dims = INSTANCE_METRICS[metric]
        node = self._parse(filter_text, dims)
        split = _dimensions(node)
        first = math.floor(start.timestamp() / grain_s) * grain_s
        buckets: dict[tuple[str, ...], dict[int, list[float]]] = {}
        for row in self.state.usage_rows(endpoint, deployment, start.timestamp(), end.timestamp()):
            value = _usage_value(metric, row, grain_s)
            if value is None:
                continue
            row_dims = {"instanceId": row["instance"], "disk": "/", "State": "Running"}
            if not node.matches(row_dims):
                continue
            key = tuple(row_dims[d] for d in split)
            buckets.setdefault(key, {}).setdefault(int((row["ts"] - first) // grain_s), []).append(value)
        n = max(1, math.ceil((end.timestamp() - first) / grain_s))
        series = []
        for key, per_bucket in sorted(buckets.items()):
            data = []
            for i in range(n):
                values = per_bucket.get(i)
                point: dict[str, Any] = {"timeStamp": _stamp(first + i * grain_s)}
                if values:
                    point[aggregation.lower()] = _combine(metric, aggregation, values)
                data.append(point)
            series.append((dict(zip(split, key)), data))
        return self._metric_body(resource, metric, unit, series, top)


def _usage_value(metric: str, row: dict[str, Any], grain_s: int) -> float | None:
    if metric == "CpuUtilizationPercentage":
        return 100.0 * row["cpu_s"] / 60.0  # seconds of CPU per request; summed per minute below
    if metric == "CpuMemoryUtilizationPercentage":
        return 100.0 * row["rss"] / row["total_memory"]
    if metric == "DeploymentCapacity":
        return 1.0
    return None  # no disk or GPU is measured by the fake: those series are empty, as on a CPU-only SKU


def _combine(metric: str, aggregation: str, values: list[float]) -> float:
    if metric == "CpuUtilizationPercentage":
        total = sum(values)  # the CPU the instance used in that minute
        return total
    if aggregation == "Maximum":
        return max(values)
    if aggregation == "Minimum":
        return min(values)
    return sum(values) / len(values)


def routes(state: FakeWorkspaceState) -> list[tuple[str | None, re.Pattern, Callable]]:
    monitor = MonitorService(state)
    return [("GET", re.compile(rf"{re.escape(ARM_HOST)}/(?P<resource>.+)/providers/microsoft\.insights/metrics",
                               re.IGNORECASE), monitor.metrics)]
