"""The metrics query language both backends speak: filters, grains, and queries refused with their reasons."""
import pytest

from saferollout.backends.query import (ALWAYS, NEVER, BoolOp, grain_seconds, join, parse_filter, scope_of,
                                        validate_query)
from saferollout.errors import SpecError


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


def test_the_scope_keeps_only_the_deployment_comparisons():
    node = parse_filter("deployment eq 'green' and statusCodeClass ne '2xx'", ["deployment", "statusCodeClass"])
    scope = scope_of(node)
    assert scope.matches({"deployment": "green", "statusCodeClass": "2xx"})
    assert not scope.matches({"deployment": "blue", "statusCodeClass": "5xx"})


def test_a_query_names_a_served_metric_and_splits_by_its_own_dimensions():
    assert validate_query("RequestsPerMinute", "Total", ["statuscodeclass"]) == ("statusCodeClass",)
    with pytest.raises(SpecError, match="unknown metric 'Latency'"):
        validate_query("Latency", "Average", [])
    with pytest.raises(SpecError, match="unknown aggregation 'Median'"):
        validate_query("RequestLatency", "Median", [])
    with pytest.raises(SpecError, match="cannot split RequestLatency by 'statusCode'"):
        validate_query("RequestLatency", "Average", ["statusCode"])
    with pytest.raises(SpecError, match="unknown metric 'DiskUtilization'"):
        validate_query("DiskUtilization", "Average", [], deployment_metrics=["CpuUtilizationPercentage"])


def test_join_folds_always_and_never_away_as_true_and_false():
    x = parse_filter("statusCodeClass eq '5xx'", ["statusCodeClass"])
    assert join("and", x, ALWAYS) is x and join("and", ALWAYS, x) is x
    assert join("and", x, NEVER) is NEVER and join("and", NEVER, x) is NEVER
    assert join("or", x, ALWAYS) is ALWAYS and join("or", ALWAYS, x) is ALWAYS
    assert join("or", x, NEVER) is x and join("or", NEVER, x) is x
    both = join("or", x, x)
    assert isinstance(both, BoolOp) and (both.op, both.left, both.right) == ("or", x, x)
