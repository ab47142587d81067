"""The threshold gate (the seed's rule): pass, fail and every flavour of missing data."""
from saferollout.gates.threshold import ThresholdGate, judge_intervals

from fake_backend import T0, FakeBackend, stream


def rows_per_minute(minutes, errors_in_minute=None, deployment="green"):
    """90 requests per minute for the RC; `errors_in_minute` {minute: n} makes the first n of them 500s."""
    rows = []
    for minute in range(minutes):
        chunk = stream(deployment, 90, T0 + 60 * minute, T0 + 60 * (minute + 1), seed=minute)
        bad = (errors_in_minute or {}).get(minute, 0)
        rows += [(r[0], r[1], r[2], 500 if i < bad else 200, r[4], r[5], r[6], r[7]) for i, r in enumerate(chunk)]
    return rows


def test_judge_passes_when_the_last_intervals_all_meet_the_condition():
    assert judge_intervals([1, 0, 2, 3, 1], condition="lte", threshold=5, intervals=5)[0] == "pass"


def test_judge_fails_on_any_violating_interval_at_once():
    decision, reason, _ = judge_intervals([1, 9], condition="lte", threshold=5, intervals=5)
    assert decision == "fail" and reason == "interval 2 of 2 has 9, which is not lte 5"


def test_judge_is_inconclusive_before_enough_intervals_and_on_empty_intervals():
    assert judge_intervals([1, 2], condition="lte", threshold=5, intervals=5)[1] == \
        "only 2 of 5 complete intervals so far"
    decision, reason, _ = judge_intervals([1, None, 2, 3, 1], condition="lte", threshold=5, intervals=5)
    assert decision == "inconclusive"
    assert reason == "1 of the last 5 intervals have no data (the filter matched no request in scope)"


def test_errors_preset_passes_five_clean_minutes(context):
    verdict = ThresholdGate(preset="errors").check(context(FakeBackend(rows_per_minute(5)), 300))
    assert verdict.decision == "pass" and verdict.gate == "errors-threshold"
    assert verdict.evidence["values"] == [0.0] * 5
    assert verdict.evidence["query"]["filter"] == "deployment eq 'green' and statusCodeClass ne '2xx'"


def test_a_minute_is_judged_only_once_the_backend_has_all_of_it(context):
    """On Azure the newest minutes are partial for a while: a half-counted bad minute must not pass."""
    backend = FakeBackend(rows_per_minute(5))
    backend.metrics_delay_s = 180.0
    verdict = ThresholdGate(preset="errors").check(context(backend, 300))
    assert verdict.decision == "inconclusive" and verdict.evidence["values"] == [0.0] * 2
    assert ThresholdGate(preset="errors").check(context(backend, 480)).decision == "pass"


def test_errors_preset_fails_as_soon_as_a_minute_has_too_many_errors(context):
    backend = FakeBackend(rows_per_minute(2, {1: 6}))
    verdict = ThresholdGate(preset="errors").check(context(backend, 120))
    assert verdict.decision == "fail"
    assert verdict.reason == "RequestsPerMinute (Total): interval 2 of 2 has 6, which is not lte 5"


def test_the_current_minute_is_not_judged_until_it_is_complete(context):
    backend = FakeBackend(rows_per_minute(3, {2: 30}))
    assert ThresholdGate(preset="errors").check(context(backend, 150)).decision == "inconclusive"


def test_latency_preset_reads_the_rc_p90(context):
    verdict = ThresholdGate(preset="latency", threshold=1.0, intervals=1).check(
        context(FakeBackend(rows_per_minute(1)), 60))
    assert verdict.decision == "fail" and verdict.reason.startswith("RequestLatency_P90 (Average): interval 1 of 1")


def test_no_traffic_is_never_zero_errors(context):
    verdict = ThresholdGate(preset="errors").check(context(FakeBackend(), 300))
    assert verdict.decision == "inconclusive"
    assert "5 of the last 5 intervals have no data" in verdict.reason


def test_a_filter_matching_nothing_is_inconclusive(context):
    verdict = ThresholdGate(preset="errors").check(context(FakeBackend(rows_per_minute(5)), 300, rc="gren"))
    assert verdict.decision == "inconclusive" and "have no data" in verdict.reason


def test_an_unknown_metric_is_inconclusive_naming_it(context):
    gate = ThresholdGate(metric="RequestLatencyP90", threshold=100)
    verdict = gate.check(context(FakeBackend(rows_per_minute(5)), 300))
    assert verdict.decision == "inconclusive"
    assert verdict.reason.startswith("SpecError: unknown metric 'RequestLatencyP90'")


def test_a_query_that_returns_no_series_is_inconclusive(context):
    class NoSeries(FakeBackend):  # Azure Monitor answers an unmatched filter with no time series at all
        def query_metrics(self, *args, **kwargs):
            return []

    verdict = ThresholdGate(preset="errors").check(context(NoSeries(rows_per_minute(5)), 300))
    assert verdict.decision == "inconclusive"
    assert verdict.reason == ("the metric query returned no series: the filter "
                              "\"deployment eq 'green' and statusCodeClass ne '2xx'\" matched nothing")


def test_inconclusive_fails_at_the_limit_saying_why(context):
    verdict = ThresholdGate(preset="errors", max_duration_s=300).check(context(FakeBackend(), 300))
    assert verdict.decision == "fail"
    assert verdict.reason.startswith("no decision within 300s: RequestsPerMinute (Total): 5 of the last 5")


def test_the_bake_error_gate_fails_a_new_prod_whose_model_fails(context):
    """The gateway answers a failing model with 424 (as Azure does), never 5xx: the bake must count it."""
    from saferollout import pipeline

    class Local(FakeBackend):
        finest_grain = "PT5S"

    rows = [(r[0], r[1], r[2], 424, r[4], r[5], r[6], 500) for r in stream("green", 120, T0, T0 + 30)]
    errors = next(g for g in pipeline.choose_gates(Local(rows), "bake", 30) if g.name == "bake-errors")
    verdict = errors.check(context(Local(rows), 30, prod=None))
    assert verdict.decision == "fail", verdict.reason
