"""Our metric queries in Azure Monitor's terms: filters, splits, grains, and Azure's series read back."""
import time
from datetime import datetime, timedelta, timezone

import pytest
from azure.monitor.query import Metric, MetricsQueryResult, MetricValue, TimeSeriesElement

from saferollout.backends.azure.metrics import (NAMESPACE, azure_grain, build_filter, query_deployment_series,
                                                query_series, scope_filter,
                                                to_series)
from saferollout.errors import SpecError

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def test_filter_is_rendered_in_azure_syntax_with_a_star_clause_per_split():
    text, *_ = build_filter("RequestsPerMinute", "deployment eq 'green' and statusCodeClass ne '2xx'",
                           ["statusCode"])
    assert text == "deployment eq 'green' and statusCodeClass ne '2xx' and statusCode eq '*'"


def test_or_keeps_its_grouping_when_a_split_is_added():
    text, *_ = build_filter("RequestsPerMinute", "deployment eq 'a' or deployment eq 'b'", ["deployment"])
    assert text == "(deployment eq 'a' or deployment eq 'b') and deployment eq '*'"
    text, *_ = build_filter("RequestsPerMinute", "(deployment eq 'a' or deployment eq 'b') and statusCode eq '500'",
                           [])
    assert text == "(deployment eq 'a' or deployment eq 'b') and statusCode eq '500'"


def test_no_filter_and_no_split_sends_no_filter():
    assert build_filter("RequestLatency_P90", None, [])[0] is None


def test_scope_keeps_only_the_deployment_comparisons():
    _, node, _ = build_filter("RequestsPerMinute", "deployment eq 'green' and statusCodeClass ne '2xx'", [])
    assert scope_filter(node) == "deployment eq 'green'"


def test_quotes_in_values_are_escaped():
    text, *_ = build_filter("RequestLatency", "deployment eq 'it''s'", [])
    assert text == "deployment eq 'it''s'"


def test_grains_finer_than_a_minute_are_refused_with_the_choices():
    assert azure_grain("PT1M") == timedelta(minutes=1) and azure_grain("PT1H") == timedelta(hours=1)
    with pytest.raises(SpecError, match="Azure Monitor cannot serve grain 'PT5S': use one of PT1M"):
        azure_grain("PT5S")
    with pytest.raises(SpecError, match="Azure Monitor cannot serve grain 'PT7M'"):
        azure_grain("PT7M")


def result(metric: str, *series: tuple[dict, list[tuple[int, dict]]]) -> MetricsQueryResult:
    return MetricsQueryResult(timespan="", metrics=[Metric(
        id="id", type="t", name=metric, unit="Count", display_description="", timeseries=[
            TimeSeriesElement(metadata_values=meta,
                              data=[MetricValue(timestamp=T0 + timedelta(minutes=m), **v) for m, v in points])
            for meta, points in series])])


def test_series_the_caller_did_not_split_by_are_merged():
    # Azure splits by every dimension named in the filter: 4xx and 5xx come back apart
    answer = result("RequestsPerMinute",
                    ({"statuscodeclass": "4xx"}, [(0, {"total": 2.0}), (1, {"total": None})]),
                    ({"statuscodeclass": "5xx"}, [(0, {"total": 3.0}), (1, {"total": 1.0})]))
    [series] = to_series(answer, "RequestsPerMinute", "Total", "PT1M", ())
    assert [p.value for p in series.points] == [5.0, 1.0]


def test_split_series_are_keyed_by_dimension_value_whatever_its_case():
    answer = result("RequestLatency_P90", ({"Deployment": "blue"}, [(0, {"average": 12.0})]),
                    ({"deployment": "green"}, [(0, {"average": 30.0})]))
    series = to_series(answer, "RequestLatency_P90", "Average", "PT1M", ("deployment",))
    assert {s.dimensions["deployment"]: s.points[0].value for s in series} == {"blue": 12.0, "green": 30.0}


def test_maxima_combine_as_a_maximum():
    answer = result("RequestLatency", ({"deployment": "a"}, [(0, {"maximum": 12.0})]),
                    ({"deployment": "b"}, [(0, {"maximum": 30.0})]))
    [series] = to_series(answer, "RequestLatency", "Maximum", "PT1M", ())
    assert series.points[0].value == 30.0


class RecordingMonitor:
    """Answers two canned results: the query asked for, then the scope query."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = []

    def query_resource(self, resource_uri, metric_names, **kwargs):
        self.calls.append((resource_uri, metric_names, kwargs))
        return self.answers.pop(0)


def test_a_minute_azure_reports_as_zero_is_no_data_when_nothing_was_in_scope():
    errors = result("RequestsPerMinute", ({}, [(0, {"total": 0.0}), (1, {"total": 0.0}), (2, {"total": 1.0})]))
    scope = result("RequestsPerMinute", ({}, [(0, {"total": 0.0}), (1, {"total": 12.0}), (2, {"total": 9.0})]))
    monitor = RecordingMonitor(errors, scope)
    [series], ran = query_series(monitor, "/subscriptions/x/onlineEndpoints/ep", "RequestsPerMinute",
                                 aggregation="Total", grain="PT1M", start=T0, end=T0 + timedelta(minutes=3),
                                 filter_text="deployment eq 'rc' and statusCodeClass ne '2xx'", split_by=())
    assert [p.value for p in series.points] == [None, 0.0, 1.0]
    assert ran == ["deployment eq 'rc' and statusCodeClass ne '2xx'", "deployment eq 'rc'"]
    resource, names, kwargs = monitor.calls[0]
    assert (resource, names) == ("/subscriptions/x/onlineEndpoints/ep", ["RequestsPerMinute"])
    assert kwargs["metric_namespace"] == NAMESPACE
    assert kwargs["granularity"] == timedelta(minutes=1) and kwargs["aggregations"] == ["Total"]
    assert kwargs["timespan"] == (T0, T0 + timedelta(minutes=3))


def test_latency_buckets_without_data_are_none():
    latency = result("RequestLatency_P50", ({"deployment": "rc"}, [(1, {"average": 20.0})]))
    [series], _ = query_series(RecordingMonitor(latency), "/r", "RequestLatency_P50", aggregation="Average",
                               grain="PT1M", start=T0, end=T0 + timedelta(minutes=3),
                               filter_text="deployment eq 'rc'", split_by=())
    assert [p.value for p in series.points] == [None, 20.0, None]
    assert [p.timestamp for p in series.points] == [T0 + timedelta(minutes=m) for m in range(3)]


# ---- on the wire: Azure Monitor's own rules -------------------------------------------------------

def test_an_or_across_two_dimensions_counts_right_though_azure_refuses_it(azure, fake, served, credit_split):
    from saferollout.data import to_request

    good = to_request(credit_split.X_test.head(1))
    for body in [good, good, good, {"data": [{"age": 1}]}, {"data": [{"age": 2}]}]:  # 3 x 200, 2 x 424
        azure.invoke(served, body, deployment="blue")
    # the bake gate's filter: Azure Monitor answers 400 to an `or` that joins two dimensions
    [series] = azure.query_metrics(served, "RequestsPerMinute", aggregation="Total",
                                   filter="deployment eq 'blue' and (statusCodeClass eq '5xx' or statusCode eq '424')")
    assert sum(p.value or 0 for p in series.points) == 2
    sent = fake.transport.sent("GET", "/providers/Microsoft.Insights/metrics")[-2].query["$filter"]
    assert " or " not in sent


def test_more_than_ten_series_all_come_back(azure, fake, served):
    now = time.time()
    for i in range(12):  # twelve deployments' requests in the service's request log
        fake.state.record_request((now - 30, served, f"d{i:02d}", 200, 5.0, 0, f"r{i}", 200))
    series = azure.query_metrics(served, "RequestsPerMinute", aggregation="Total", split_by=["deployment"],
                                 start=datetime.fromtimestamp(now - 120, timezone.utc),
                                 end=datetime.fromtimestamp(now + 60, timezone.utc))
    assert sorted(s.dimensions["deployment"] for s in series) == [f"d{i:02d}" for i in range(12)]
    assert fake.transport.sent("GET", "/providers/Microsoft.Insights/metrics")[0].query["top"] == "1000"


def test_a_grain_finer_than_a_minute_is_refused_before_azure_is_asked(azure, fake, served):
    with pytest.raises(SpecError, match="Azure Monitor cannot serve grain 'PT5S'"):
        azure.query_metrics(served, "RequestsPerMinute", aggregation="Total", grain="PT5S")
    assert not fake.transport.sent("GET", "/providers/Microsoft.Insights/metrics")


def test_memory_and_cpu_of_a_deployment_are_asked_of_its_own_resource(azure, fake, served, credit_split):
    from saferollout.data import to_request

    for _ in range(3):
        assert azure.invoke(served, to_request(credit_split.X_test.head(5)), deployment="blue").status == 200
    [memory] = azure.query_metrics(served, "CpuMemoryUtilizationPercentage", aggregation="Maximum",
                                   filter="deployment eq 'blue'")
    values = [p.value for p in memory.points if p.value is not None]
    assert values and all(0 < v < 100 for v in values)
    sent = fake.transport.sent("GET", "/providers/Microsoft.Insights/metrics")[-1]
    assert sent.path.endswith("/onlineEndpoints/ep-served/deployments/blue/providers/Microsoft.Insights/metrics")
    assert sent.query["metricnamespace"] == "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/deployments"
    [cpu] = azure.query_metrics(served, "CpuUtilizationPercentage", aggregation="Average",
                                split_by=["deployment", "instanceId"])
    assert cpu.dimensions["deployment"] == "blue" and cpu.dimensions["instanceId"].startswith("blue-")


def test_a_deployment_metric_without_a_deployment_says_how_to_name_one(azure, served):
    with pytest.raises(SpecError, match="name the deployment \\(filter \"deployment eq 'blue'\"\\)"):
        azure.query_metrics(served, "CpuMemoryUtilizationPercentage", aggregation="Maximum")
    with pytest.raises(SpecError, match="reported as Average, Minimum, Maximum"):
        azure.query_metrics(served, "CpuUtilizationPercentage", aggregation="Total", filter="deployment eq 'blue'")


class ResourceMonitor:
    """Answers every query with no series and keeps (resource, filter) of each."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def query_resource(self, resource_id, metrics, **kwargs):
        self.calls.append((resource_id.rsplit("/", 1)[1], kwargs["filter"]))
        return result(metrics[0])


@pytest.mark.parametrize("filter_text, calls", [
    ("deployment eq 'blue' and instanceId eq 'i-0'", [("blue", "instanceId eq 'i-0'")]),
    ("(deployment eq 'blue' and instanceId eq 'i-0') or (deployment eq 'green' and instanceId eq 'i-1')",
     [("blue", "instanceId eq 'i-0'"), ("green", "instanceId eq 'i-1'")]),
    ("deployment eq 'blue' or deployment eq 'green'", [("blue", None), ("green", None)]),
])
def test_each_deployment_is_queried_with_the_part_of_the_filter_that_is_its_own(filter_text, calls):
    monitor = ResourceMonitor()
    _, filters = query_deployment_series(monitor, "ep", ["blue", "green"], "CpuUtilizationPercentage",
                                         aggregation="Average", grain="PT1M", start=T0, end=T0 + timedelta(minutes=5),
                                         filter_text=filter_text, split_by=["deployment"])
    assert monitor.calls == calls and filters == [f or "" for _, f in calls]


def test_a_deployment_or_another_dimension_is_refused_for_a_deployment_metric():
    with pytest.raises(SpecError, match="joins `deployment eq` comparisons to the others with `and` only"):
        query_deployment_series(ResourceMonitor(), "ep", ["blue"], "CpuUtilizationPercentage", aggregation="Average",
                                grain="PT1M", start=T0, end=T0 + timedelta(minutes=5),
                                filter_text="deployment eq 'blue' or instanceId eq 'i-0'", split_by=[])
