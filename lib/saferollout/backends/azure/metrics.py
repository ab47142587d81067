"""Azure Monitor metrics for online endpoints, in the same names and filters as the local backend.

Queries go through `MetricsQueryClient.query_resource` (azure-monitor-query >= 1.4, < 2: the 2.x line
dropped the metrics client) on the endpoint's ARM resource id, namespace
`Microsoft.MachineLearningServices/workspaces/onlineEndpoints`. Our filter syntax is Azure's own
(`deployment eq 'green' and statusCodeClass ne '2xx'`); it is validated with the shared parser (`saferollout.backends.query`), then
rendered for Azure with one `<dimension> eq '*'` clause per split-by dimension, which is how Azure Monitor
is asked to split a series.

Azure answers one time series per value of every dimension named in the filter, so series that differ
only in dimensions the caller did not split by are merged back (counts add up, minima and maxima combine;
an average of averages for latency, which is exact when one deployment is named).
"""
from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Sequence

from saferollout.backends.base import DEPLOYMENT_METRIC_DIMENSIONS, METRIC_DIMENSIONS, MetricPoint, MetricSeries
from saferollout.backends.query import (ALWAYS, NEVER, BoolOp, Comparison, grain_seconds, join, parse_filter,
                                        scope_of, split_dimensions, validate_query)
from saferollout.errors import BackendError, SpecError

NAMESPACE = "Microsoft.MachineLearningServices/workspaces/onlineEndpoints"
# Grains Azure Monitor serves for platform metrics; it refuses anything finer than a minute.
AZURE_GRAINS = {60: "PT1M", 300: "PT5M", 900: "PT15M", 1800: "PT30M", 3600: "PT1H", 21600: "PT6H",
                43200: "PT12H", 86400: "P1D"}


def render(node: Any) -> str:
    """A parsed filter back to text Azure Monitor understands ('' for no filter)."""
    if node is ALWAYS or node is None:
        return ""
    if isinstance(node, Comparison):
        value = node.value.replace("'", "''")
        return f"{node.dimension} {node.op} '{value}'"
    if isinstance(node, BoolOp):
        parts = []
        for side in (node.left, node.right):
            text = render(side)
            # `or` binds looser than `and`: keep the caller's grouping explicit
            if isinstance(side, BoolOp) and side.op != node.op:
                text = f"({text})"
            parts.append(text)
        return f" {node.op} ".join(p for p in parts if p)
    raise TypeError(f"cannot render filter node {node!r}")


def named_dimensions(node: Any) -> set[str]:
    if isinstance(node, Comparison):
        return {node.dimension}
    if isinstance(node, BoolOp):
        return named_dimensions(node.left) | named_dimensions(node.right)
    return set()


def azure_grain(grain: str) -> timedelta:
    seconds = grain_seconds(grain)
    if seconds not in AZURE_GRAINS:
        raise SpecError(f"Azure Monitor cannot serve grain {grain!r}: use one of {', '.join(AZURE_GRAINS.values())} "
                        "(the local backend also serves finer grains such as PT5S; Azure's finest is PT1M)")
    return timedelta(seconds=seconds)


def crosses_dimensions(node: Any) -> bool:
    """True when an `or` joins comparisons of two dimensions, which Azure Monitor refuses."""
    if isinstance(node, BoolOp):
        if node.op == "or" and len(named_dimensions(node)) > 1:
            return True
        return crosses_dimensions(node.left) or crosses_dimensions(node.right)
    return False


def build_filter(metric: str, filter_text: str | None, split_by: Sequence[str]) -> tuple[str | None, Any, Any]:
    """-> (Azure $filter text or None, the parsed filter, the filter to apply here or None).

    Azure Monitor's `or` may only join values of one dimension. A filter whose `or` crosses dimensions
    (`statusCodeClass eq '5xx' or statusCode eq '424'`) is asked as a split by every dimension it names,
    and applied here to the series Azure returns: each series carries its dimension values."""
    node = parse_filter(filter_text, METRIC_DIMENSIONS[metric])
    if crosses_dimensions(node):
        dims = [d for d in METRIC_DIMENSIONS[metric] if d in named_dimensions(node) or d in split_by]
        return " and ".join(f"{dim} eq '*'" for dim in dims), node, node
    clauses = [render(node)] if node is not ALWAYS else []
    if clauses and isinstance(node, BoolOp) and node.op == "or" and split_by:
        clauses = [f"({clauses[0]})"]
    clauses += [f"{dim} eq '*'" for dim in split_by]
    return (" and ".join(clauses) or None), node, None


def scope_filter(node: Any) -> str | None:
    """The filter keeping only its deployment comparisons: which requests were 'in scope' (see local)."""
    return render(scope_of(node)) or None


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


# Azure Monitor answers at most `top` series (10 when not given) when a filter splits, and drops the rest
# without a word; we ask for this many and refuse an answer that reaches it (it may be cut short).
MAX_SERIES = 1000


def query(client: Any, resource_id: str, metric: str, aggregation: str, grain: str, start: datetime,
          end: datetime, filter_text: str | None, namespace: str = NAMESPACE) -> Any:
    """One call to Azure Monitor (raises the SDK's errors; the backend translates them)."""
    result = client.query_resource(resource_id, [metric], metric_namespace=namespace,
                                   timespan=(_utc(start), _utc(end)), granularity=azure_grain(grain),
                                   aggregations=[aggregation], filter=filter_text,
                                   max_results=MAX_SERIES if filter_text else None)
    for found in result.metrics:
        if len(found.timeseries) >= MAX_SERIES:
            raise BackendError(f"Azure Monitor returned {len(found.timeseries)} series of {metric} for filter "
                               f"{filter_text!r}, the most it was asked for: the answer may be cut short; "
                               "narrow the filter or split by fewer dimensions")
    return result


def _value(point: Any, aggregation: str) -> float | None:
    value = getattr(point, aggregation.lower(), None)
    return None if value is None else float(value)


def _merge(values: list[float], metric: str, aggregation: str) -> float:
    if aggregation == "Minimum":
        return min(values)
    if aggregation == "Maximum":
        return max(values)
    if aggregation in ("Total", "Count") or metric == "RequestsPerMinute":
        return sum(values)
    return sum(values) / len(values)


def _metadata(element: Any, dimension: str) -> str:
    values = {str(k).lower(): v for k, v in (getattr(element, "metadata_values", None) or {}).items()}
    return str(values.get(dimension.lower(), ""))


def to_series(result: Any, metric: str, aggregation: str, grain: str,
              split_by: Sequence[str], keep: Any = None) -> list[MetricSeries]:
    """Azure's MetricsQueryResult -> our MetricSeries, one per split-by combination, timestamps ascending.

    `keep`: a parsed filter applied here to each series' dimension values (see `build_filter`)."""
    grouped: dict[tuple[str, ...], dict[datetime, list[float | None]]] = {}
    for found in result.metrics:
        if str(found.name).lower() != metric.lower():
            continue
        for element in found.timeseries:
            if keep is not None and not keep.matches(
                    {d: _metadata(element, d) for d in METRIC_DIMENSIONS.get(metric, ())}):
                continue
            key = tuple(_metadata(element, d) for d in split_by)
            points = grouped.setdefault(key, {})
            for point in element.data:
                points.setdefault(_utc(point.timestamp), []).append(_value(point, aggregation))
    series = []
    for key, points in sorted(grouped.items()):
        merged = []
        for stamp in sorted(points):
            values = [v for v in points[stamp] if v is not None]
            merged.append(MetricPoint(stamp, _merge(values, metric, aggregation) if values else None))
        series.append(MetricSeries(metric=metric, aggregation=aggregation, grain=grain,
                                   dimensions=dict(zip(split_by, key)), points=merged))
    return series


def timeline(start: datetime, end: datetime, grain: str) -> list[datetime]:
    """The buckets of the window, aligned to the grain as Azure Monitor (and the local backend) align them."""
    grain_s = grain_seconds(grain)
    first = math.floor(_utc(start).timestamp() / grain_s) * grain_s
    count = max(1, math.ceil((_utc(end).timestamp() - first) / grain_s))
    return [datetime.fromtimestamp(first + i * grain_s, tz=timezone.utc) for i in range(count)]


def align(series: list[MetricSeries], stamps: list[datetime], scope: list[MetricSeries] | None,
          split: bool) -> list[MetricSeries]:
    """One point per bucket. With a scope (request counts): no request in scope is no data (None), never
    zero errors, whatever Azure reported; a bucket with requests in scope but none matching counts 0."""
    if not split and not series:
        series = [MetricSeries(metric="", aggregation="", grain="", dimensions={}, points=[])]
    in_scope = None if scope is None else {p.timestamp for s in scope for p in s.points if p.value}
    for one in series:
        values = {p.timestamp: p.value for p in one.points}
        if in_scope is None:
            one.points = [MetricPoint(t, values.get(t)) for t in stamps]
        else:
            one.points = [MetricPoint(t, (values.get(t) or 0.0) if t in in_scope else None) for t in stamps]
    return series


def query_series(client: Any, resource_id: str, metric: str, *, aggregation: str, grain: str,
                 start: datetime, end: datetime, filter_text: str | None,
                 split_by: Iterable[str]) -> tuple[list[MetricSeries], list[str]]:
    """-> (series, the Azure filters that were run, for the record). SDK errors propagate."""
    split = validate_query(metric, aggregation, split_by)
    azure_filter, node, keep = build_filter(metric, filter_text, split)
    result = query(client, resource_id, metric, aggregation, grain, start, end, azure_filter)
    series = to_series(result, metric, aggregation, grain, split, keep)
    ran = [azure_filter or ""]
    scope = None
    if metric == "RequestsPerMinute":
        scope_text = scope_filter(node)
        scope = to_series(query(client, resource_id, metric, "Total", grain, start, end, scope_text),
                          metric, "Total", grain, ())
        ran.append(scope_text or "")
    series = align(series, timeline(start, end, grain), scope, bool(split))
    for one in series:
        one.metric, one.aggregation, one.grain = metric, aggregation, grain
    return series, ran


# ---- deployment (instance) metrics -------------------------------------------------------------

DEPLOYMENT_NAMESPACE = "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/deployments"
INSTANCE_AGGREGATIONS = ("Average", "Minimum", "Maximum")


def _deployments_named(node: Any) -> list[str]:
    if isinstance(node, Comparison) and node.dimension == "deployment":
        if node.op != "eq" or node.value == "*":
            raise SpecError("a deployment metric names its deployments with `deployment eq '<name>'` "
                            f"(or splits by deployment), not `deployment {node.op} '{node.value}'`")
        return [node.value]
    if isinstance(node, BoolOp):
        return _deployments_named(node.left) + _deployments_named(node.right)
    return []


def _mentions_deployment(node: Any) -> bool:
    if isinstance(node, Comparison):
        return node.dimension == "deployment"
    return isinstance(node, BoolOp) and (_mentions_deployment(node.left) or _mentions_deployment(node.right))


def _for_deployment(node: Any, name: str) -> Any:
    """The filter Azure gets on deployment `name`'s own resource: each `deployment eq` comparison is true or
    false there (ALWAYS, or NEVER when nothing of it can match), the other comparisons stay.

    `deployment eq 'blue' or instanceId eq 'i-0'` asks for all of blue and for i-0 anywhere, which no query of
    the deployments it names can give: a comparison of another dimension is joined to them with `and` only.
    """
    if isinstance(node, Comparison):
        if node.dimension != "deployment":
            return node
        return ALWAYS if node.value.lower() == name.lower() else NEVER
    if isinstance(node, BoolOp):
        if node.op == "or" and _mentions_deployment(node.left) != _mentions_deployment(node.right):
            raise SpecError("a deployment metric's filter joins `deployment eq` comparisons to the others with "
                            f"`and` only; got {render(node)!r}: query each deployment on its own instead")
        return join(node.op, _for_deployment(node.left, name), _for_deployment(node.right, name))
    return node


def query_deployment_series(client: Any, endpoint_id: str, all_deployments: Sequence[str], metric: str, *,
                            aggregation: str, grain: str, start: datetime, end: datetime,
                            filter_text: str | None, split_by: Iterable[str]) -> tuple[list[MetricSeries], list[str]]:
    """An instance metric (CPU, memory...) of the deployments the filter names, one query per deployment
    on its own ARM id. -> (series, the Azure filters that were run)."""
    dims = DEPLOYMENT_METRIC_DIMENSIONS[metric]
    if aggregation not in INSTANCE_AGGREGATIONS:
        raise SpecError(f"{metric} is reported as {', '.join(INSTANCE_AGGREGATIONS)}; got aggregation {aggregation!r}")
    split = split_dimensions(metric, dims, split_by)
    node = parse_filter(filter_text, dims)
    named = _deployments_named(node)
    deployments = named or ([] if "deployment" not in split else list(all_deployments))
    if not deployments:
        raise SpecError(f"{metric} is a deployment metric: name the deployment (filter \"deployment eq 'blue'\") "
                        "or split by deployment")
    if len(deployments) > 1 and "deployment" not in split:
        raise SpecError(f"{metric} of several deployments: split by deployment, or name one")
    known = {d.lower(): d for d in all_deployments}
    azure_split = [d for d in split if d != "deployment"]
    stamps = timeline(start, end, grain)
    series: list[MetricSeries] = []
    filters: list[str] = []
    for name in deployments:
        if name.lower() not in known:
            raise SpecError(f"deployment {name!r} not found on this endpoint: it has {', '.join(sorted(known.values()))}")
        scoped = _for_deployment(node, name)
        if scoped is NEVER:
            continue
        rest = render(scoped) or None
        clauses = ([f"({rest})" if " or " in (rest or "") and azure_split else rest] if rest else []) + \
            [f"{d} eq '*'" for d in azure_split]
        azure_filter = " and ".join(clauses) or None
        filters.append(azure_filter or "")
        resource = f"{endpoint_id}/deployments/{known[name.lower()]}"
        result = query(client, resource, metric, aggregation, grain, start, end, azure_filter, DEPLOYMENT_NAMESPACE)
        found = to_series(result, metric, aggregation, grain, azure_split)
        found = align(found, stamps, None, bool(azure_split))
        for one in found:
            one.metric, one.aggregation, one.grain = metric, aggregation, grain
            if "deployment" in split:
                one.dimensions = {"deployment": known[name.lower()], **one.dimensions}
        series.extend(found)
    return series, filters
