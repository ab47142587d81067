"""Per-request rows -> Azure-named metrics: buckets, filters, percentiles, and no data never read as zero."""
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from saferollout.backends.local.workspace import admin_token
from saferollout.backends.local.metrics import aggregate, aggregate_instances, request_row
from saferollout.backends.query import grain_seconds
from saferollout.errors import SpecError
from saferollout.specs import EndpointSpec

from echo_platform import deploy_all, echo_spec, new_endpoint


def row(ts, deployment, status=200, latency=10.0, mirrored=0):
    return request_row(ts, "ep", deployment, status, latency, mirrored, "rid", status)


ROWS = [row(0.5, "blue", latency=10), row(1.0, "blue", latency=20), row(2.0, "green", 500, 40),
        row(61.0, "blue", latency=30), row(62.0, "green", latency=50), row(63.0, "green", 429, 60)]


def values(series):
    return [p["value"] for p in series["points"]]


def test_requests_per_minute_counts_per_bucket():
    [series] = aggregate(ROWS, "RequestsPerMinute", "Total", "PT1M", 0, 120)
    assert values(series) == [3.0, 3.0]


def test_requests_held_through_a_platform_restart_are_left_out_of_the_metrics():
    # a request held 2.5 s while the instances came back, then answered: the platform's outage, not blue's
    held = request_row(30.0, "ep", "blue", 200, 2500.0, request_id="held", model_status=200, held=1)
    served = request_row(31.0, "ep", "blue", 200, 12.0, request_id="served", model_status=200)
    [latency] = aggregate([held, served], "RequestLatency_P90", "Average", "PT1M", 0, 60, "deployment eq 'blue'")
    [count] = aggregate([held, served], "RequestsPerMinute", "Total", "PT1M", 0, 60)
    assert values(latency) == [12.0] and values(count) == [1.0]


def test_error_filter_counts_non_2xx():
    [series] = aggregate(ROWS, "RequestsPerMinute", "Total", "PT1M", 0, 120,
                         "deployment eq 'green' and statusCodeClass ne '2xx'")
    assert values(series) == [1.0, 1.0]


def test_zero_errors_is_zero_but_no_requests_is_none():
    [series] = aggregate(ROWS, "RequestsPerMinute", "Total", "PT1M", 0, 180,
                         "deployment eq 'blue' and statusCodeClass ne '2xx'")
    assert values(series) == [0.0, 0.0, None]


def test_split_by_status_class():
    series = aggregate(ROWS, "RequestsPerMinute", "Total", "PT1M", 0, 120, split_by=["statusCodeClass"])
    by_class = {s["dimensions"]["statusCodeClass"]: values(s) for s in series}
    # a class with no request in a bucket that did see requests counts zero, not "no data"
    assert by_class == {"2xx": [2.0, 2.0], "4xx": [0.0, 1.0], "5xx": [1.0, 0.0]}


def test_latency_percentiles_per_deployment():
    [p50] = aggregate(ROWS, "RequestLatency_P50", "Average", "PT1M", 0, 120, "deployment eq 'green'")
    assert values(p50) == [40.0, 55.0]
    [avg] = aggregate(ROWS, "RequestLatency", "Average", "PT1M", 0, 120, "deployment eq 'blue'")
    assert values(avg) == [15.0, 30.0]


def test_latency_with_no_samples_is_none():
    [p90] = aggregate([], "RequestLatency_P90", "Average", "PT5S", 0, 10, "deployment eq 'blue'")
    assert values(p90) == [None, None]


def test_finer_grain():
    assert grain_seconds("PT5S") == 5 and grain_seconds("PT1H") == 3600
    [series] = aggregate(ROWS, "RequestsPerMinute", "Total", "PT30S", 0, 90)
    assert values(series) == [3.0, None, 3.0]


def test_unknown_metric_is_refused_with_the_choices():
    with pytest.raises(SpecError, match="unknown metric 'RequestLatencyP90'.*RequestLatency_P90"):
        aggregate(ROWS, "RequestLatencyP90", "Average", "PT1M", 0, 60)


def test_unknown_dimension_in_filter_is_refused():
    with pytest.raises(SpecError, match="unknown dimension 'model'"):
        aggregate(ROWS, "RequestsPerMinute", "Total", "PT1M", 0, 60, "model eq 'x'")


# ---- against a running platform --------------------------------------------------------------

@pytest.fixture(scope="module")
def served(local_backend):
    """12 good requests to blue and 3 model failures (424) from broken, and the window they fell in."""
    endpoint = new_endpoint(local_backend)
    deploy_all(local_backend, [echo_spec(endpoint, "blue"), echo_spec(endpoint, "broken", env={"ECHO_FAIL": "1"})])
    local_backend.update_endpoint(endpoint, traffic={"blue": 100})
    start = time.time()
    statuses = [local_backend.invoke(endpoint, {"i": i}).status for i in range(12)]
    statuses += [local_backend.invoke(endpoint, {"i": i}, deployment="broken").status for i in range(3)]
    assert statuses == [200] * 12 + [424] * 3
    yield endpoint, start, time.time() + 0.001
    local_backend.delete_endpoint(endpoint)


def test_platform_metrics_answer_azure_queries(local_backend, served):
    endpoint, start, end = served
    series = local_backend.query_metrics(endpoint, "RequestsPerMinute", aggregation="Total", grain="PT5S",
                                         start=start, end=end, split_by=["deployment", "statusCodeClass"])
    totals = {(s.dimensions["deployment"], s.dimensions["statusCodeClass"]): sum(p.value or 0 for p in s.points)
              for s in series}
    assert totals == {("blue", "2xx"): 12, ("broken", "4xx"): 3}
    [errors] = local_backend.query_metrics(endpoint, "RequestsPerMinute", aggregation="Total", grain="PT1M",
                                           start=start, end=end,
                                           filter="deployment eq 'blue' and statusCodeClass ne '2xx'")
    assert {p.value for p in errors.points} <= {0.0, None} and 0.0 in {p.value for p in errors.points}
    [p99] = local_backend.query_metrics(endpoint, "RequestLatency_P99", grain="PT1M", start=start, end=end,
                                        filter="deployment eq 'blue'")
    samples = local_backend.request_samples(endpoint, deployment="blue", start=start, end=end)
    assert len(samples) == 12
    assert max(p.value for p in p99.points if p.value is not None) <= max(s.latency_ms for s in samples)


def test_unknown_metric_from_the_platform_is_a_spec_error(local_backend, served):
    with pytest.raises(SpecError, match="unknown metric 'Latency'"):
        local_backend.query_metrics(served[0], "Latency")


def test_a_window_outside_the_requests_holds_no_samples(local_backend, served):
    endpoint, start, _ = served
    assert local_backend.request_samples(endpoint, start=start - 120, end=start) == []


def test_gateway_serves_prometheus_metrics(local_backend, served):
    endpoint = served[0]
    url = f"{local_backend.gateway_url}/metrics"
    for headers in ({}, {"Authorization": "Bearer not-the-admin-token"}):
        refused = requests.get(url, headers=headers, timeout=10)
        assert refused.status_code == 401 and "saferollout_requests" not in refused.text
        assert refused.json()["message"] == ("missing or invalid credentials: /metrics takes the workspace admin "
                                             "token (Authorization: Bearer <admin.token>)")
    text = requests.get(url, headers={"Authorization": f"Bearer {admin_token(local_backend.home)}"}, timeout=10).text
    counts = {(s.labels["deployment"], s.labels["status_class"], s.labels["mirrored"]): s.value
              for family in text_string_to_metric_families(text) if family.name == "saferollout_requests"
              for s in family.samples if s.name == "saferollout_requests_total" and s.labels["endpoint"] == endpoint}
    assert counts == {("blue", "2xx", "false"): 12, ("broken", "4xx", "false"): 3}
    assert f'saferollout_request_latency_seconds_count{{deployment="blue",endpoint="{endpoint}"}} 12.0' in text


def test_a_deleted_endpoint_takes_its_metrics_with_it(local_backend):
    endpoint = new_endpoint(local_backend)
    deploy_all(local_backend, [echo_spec(endpoint, "blue")])
    local_backend.update_endpoint(endpoint, traffic={"blue": 100})
    start = time.time()
    assert local_backend.invoke(endpoint, {"x": 1}).status == 200
    assert len(local_backend.request_samples(endpoint, start=start, end=time.time() + 1)) == 1
    local_backend.delete_endpoint(endpoint)
    local_backend.create_endpoint(EndpointSpec(name=endpoint))
    try:
        assert local_backend.request_samples(endpoint, start=start, end=time.time() + 1) == []
    finally:
        local_backend.delete_endpoint(endpoint)


# ---- instance metrics (Azure's deployment metrics, measured by the platform) ----------------------

INSTANCE_ROWS = [(1.0, "ep", "blue", "blue-0", 10.0, 2.0), (3.0, "ep", "blue", "blue-0", 30.0, 2.2),
                 (3.5, "ep", "blue", "blue-1", 50.0, 4.0), (7.0, "ep", "green", "green-0", 5.0, 1.0)]


def test_instance_metrics_are_averaged_per_interval_and_an_interval_without_a_sample_has_no_data():
    [blue] = aggregate_instances(INSTANCE_ROWS, "CpuUtilizationPercentage", "Average", "PT5S", 0, 15,
                                 filter_text="deployment eq 'blue'")
    assert values(blue) == [30.0, None, None]
    split = aggregate_instances(INSTANCE_ROWS, "CpuMemoryUtilizationPercentage", "Maximum", "PT5S", 0, 10,
                                split_by=["instanceId"])
    assert {s["dimensions"]["instanceId"]: values(s) for s in split} == {
        "blue-0": [2.2, None], "blue-1": [4.0, None], "green-0": [None, 1.0]}


def test_a_deployment_metric_the_platform_does_not_measure_says_what_it_measures():
    with pytest.raises(SpecError, match="GpuUtilizationPercentage is not measured by the local platform: it measures "
                                        "CpuUtilizationPercentage and CpuMemoryUtilizationPercentage"):
        aggregate_instances([], "GpuUtilizationPercentage", "Average", "PT1M", 0, 60)


def test_the_platform_measures_each_instances_cpu_and_memory_so_the_seeds_memory_gate_runs(local_backend, served):
    from saferollout.gates.base import GateContext
    from saferollout.gates.threshold import ThresholdGate

    endpoint, start, _ = served
    deadline, memory = time.time() + 30, []
    while time.time() < deadline and not memory:  # a sample every 5 s
        time.sleep(1)
        series = local_backend.query_metrics(endpoint, "CpuMemoryUtilizationPercentage", grain="PT5S", start=start,
                                             end=time.time(), split_by=["instanceId"])
        memory = [(s.dimensions["instanceId"], p.value) for s in series for p in s.points if p.value is not None]
    assert memory and {name for name, _ in memory} <= {"blue-0", "broken-0"}
    assert all(0 < value < 100 for _, value in memory)  # an azmlinfsrv holds tens of MB of this machine's memory
    gate = ThresholdGate(name="memory", metric="CpuMemoryUtilizationPercentage", aggregation="Average",
                         condition="lte", threshold=90, grain="PT10S", intervals=1, filter="deployment eq '{rc}'")
    verdict = gate.check(GateContext(local_backend, endpoint, "blue", None, start, time.time()))
    while verdict.decision == "inconclusive" and time.time() < deadline + 30:  # a complete 10 s interval
        time.sleep(2)
        verdict = gate.check(GateContext(local_backend, endpoint, "blue", None, start, time.time()))
    assert verdict.decision == "pass", verdict.reason
