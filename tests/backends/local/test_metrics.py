"""Per-request rows -> Azure-named metrics: buckets, filters, percentiles, and no data never read as zero."""
import pytest

from saferollout.backends.local.metrics import aggregate, grain_seconds, parse_filter
from saferollout.errors import SpecError


def row(ts, deployment, status=200, latency=10.0, mirrored=0):
    return (ts, "ep", deployment, status, latency, mirrored, "rid", status)


ROWS = [row(0.5, "blue", latency=10), row(1.0, "blue", latency=20), row(2.0, "green", 500, 40),
        row(61.0, "blue", latency=30), row(62.0, "green", latency=50), row(63.0, "green", 429, 60)]


def values(series):
    return [p["value"] for p in series["points"]]


def test_requests_per_minute_counts_per_bucket():
    [series] = aggregate(ROWS, "RequestsPerMinute", "Total", "PT1M", 0, 120)
    assert values(series) == [3.0, 3.0]


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


@pytest.mark.parametrize("text", ["deployment eq", "deployment eq 'a' and", "(deployment eq 'a'",
                                  "deployment gt 'a'", "deployment eq a"])
def test_malformed_filters_are_refused(text):
    with pytest.raises(SpecError, match="invalid metric filter"):
        parse_filter(text, ["deployment", "statusCodeClass"])


def test_or_and_parentheses():
    node = parse_filter("(deployment eq 'a' or deployment eq 'b') and statusCodeClass eq '5xx'",
                        ["deployment", "statusCodeClass"])
    assert node.matches({"deployment": "b", "statusCodeClass": "5xx"})
    assert not node.matches({"deployment": "c", "statusCodeClass": "5xx"})
    assert not node.matches({"deployment": "a", "statusCodeClass": "2xx"})


def test_bad_grain_is_refused():
    with pytest.raises(SpecError, match="invalid grain"):
        grain_seconds("1m")
