"""Figures for notebooks and reports: built from given data, thresholds drawn, no data kept as no data."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from saferollout import plots  # noqa: E402
from saferollout.backends.base import MetricPoint, MetricSeries  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def series(dep: str, values: list[float | None], metric: str = "RequestsPerMinute") -> MetricSeries:
    return MetricSeries(metric, "Total", "PT5S", {"deployment": dep},
                        [MetricPoint(T0 + timedelta(seconds=5 * i), v) for i, v in enumerate(values)])


def observation() -> plots.Observation:
    requests = plots.series_frame([series("blue", [9, 9, 5, 5]), series("green", [1, 1, 5, 5])])
    errors = plots.series_frame([series("green", [0, 1, 0, 2])])
    latency = {p: plots.series_frame([series("blue", [10, 11, None, 12], p), series("green", [20, 21, 22, 23], p)])
               for p in plots.PERCENTILES}
    return plots.Observation("ep", "PT5S", requests, errors, latency)


def lines_at(ax, y: float) -> list:
    return [line for line in ax.get_lines() if list(line.get_ydata()) == [y, y]]


def test_series_frame_keeps_missing_intervals_as_nan_not_zero():
    frame = plots.series_frame([series("blue", [1.0, None, 3.0])])
    assert list(frame.columns) == ["blue"] and np.isnan(frame["blue"].iloc[1]) and frame["blue"].iloc[2] == 3.0


def test_traffic_shares_are_percent_of_each_interval_and_skip_empty_ones():
    requests = pd.DataFrame({"blue": [9.0, np.nan, 5.0], "green": [1.0, np.nan, 15.0]})
    shares = plots.traffic_shares(requests)
    assert len(shares) == 2
    assert shares.iloc[0].tolist() == [90.0, 10.0] and shares.iloc[1].tolist() == [25.0, 75.0]


def test_dashboard_draws_the_thresholds_and_every_deployment():
    fig = plots.rollout_dashboard(observation(), latency_threshold_ms=250.0, error_threshold=3,
                                  marks={"gate window": T0.timestamp() + 5})
    lat_ax, err_ax, split_ax = fig.axes
    assert lines_at(lat_ax, 250.0) and lines_at(err_ax, 3)
    labels = {t.get_text() for t in lat_ax.get_legend().get_texts()}
    assert {"blue p90", "green p99", "limit 250 ms"} <= labels
    assert {t.get_text() for t in split_ax.get_legend().get_texts()} == {"blue", "green"}


def test_dashboard_without_thresholds_draws_no_limit_lines():
    fig = plots.rollout_dashboard(observation())
    assert not any("limit" in t.get_text() or "threshold" in t.get_text() for ax in fig.axes if ax.get_legend()
                   for t in ax.get_legend().get_texts())


def test_a_window_without_requests_says_so_instead_of_an_empty_legend():
    empty = plots.Observation("ep", "PT5S", pd.DataFrame(), pd.DataFrame(), {p: pd.DataFrame() for p in plots.PERCENTILES})
    lat_ax = plots.rollout_dashboard(empty).axes[0]
    assert lat_ax.get_legend() is None
    assert [t.get_text() for t in lat_ax.texts] == ["no requests in this window"]


def test_gate_timeline_has_one_row_per_gate_coloured_by_decision():
    history = [{"gate": "errors", "decision": d, "window_start": 100.0, "checked_at": 100.0 + i}
               for i, d in enumerate(["inconclusive", "inconclusive", "pass"])]
    history.append({"gate": "latency", "decision": "fail", "window_start": 100.0, "checked_at": 104.0})
    fig = plots.gate_timeline(history)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["errors", "latency"]
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"pass", "fail", "inconclusive"}


def test_verdict_table_shows_headline_evidence():
    table = plots.verdict_table([{"gate": "errors", "kind": "compare", "decision": "fail", "reason": "worse",
                                  "evidence": {"n_rc": 40, "p_value": 0.00123456, "query": "x", "nested": {}}}])
    assert table.loc[0, "decision"] == "fail"
    assert table.loc[0, "evidence"] == "n_rc=40, p_value=0.001235"


@pytest.mark.parametrize("figure", [plots.roc_figure, plots.calibration_figure])
def test_quality_figures_plot_held_out_predictions(figure):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.6 + rng.random(200) * 0.4, 0, 1)
    fig = figure(y, p)
    assert len(fig.axes[0].get_lines()) == 2  # the model and the reference diagonal


def test_roc_legend_states_the_auc():
    fig = plots.roc_figure([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert "AUC 0.750" in fig.axes[0].get_legend().get_texts()[0].get_text()


def test_limits_are_the_gates_tolerances_and_the_tightest_wins():
    verdicts = [  # what each gate tolerates, from its evidence
        {"evidence": {"tolerance_ratio": 1.2, "tolerance_ms": 2.0, "latency_ms": {"rc": 50, "prod": 40.0}}},  # 50 ms
        {"evidence": {"tolerance_ratio": 1.2, "latency_ms": {"rc": 50, "prod": 90.0}}},  # compare latency: 108 ms
        {"evidence": {"tolerance_ratio": 1.5, "tolerance_points": 0.5, "error_rate": {"rc": 0.0, "prod": 0.01}}},
        {"evidence": {"tolerance_points": 2.0, "tolerance_ratio": 1.0, "error_rate": {"rc": 0.0, "prod": 0.0}}},
        {"evidence": {"agreement": 0.9, "allowed_ms": 10.0}},  # no tolerance: not a limit
    ]
    limits = plots.limits_from_verdicts(verdicts)
    assert limits["latency_threshold_ms"] == pytest.approx(50.0) and limits["error_rate_limit"] == pytest.approx(0.02)
    assert plots.limits_from_verdicts([]) == {"latency_threshold_ms": None, "error_rate_limit": None}


def test_an_error_rate_limit_is_drawn_as_that_share_of_the_rcs_requests():
    fig = plots.rollout_dashboard(observation(), error_rate_limit=0.1, rc="green")
    line = next(l for l in fig.axes[1].get_lines() if "allowed for green" in l.get_label())
    assert list(line.get_ydata()) == pytest.approx([0.1, 0.1, 0.5, 0.5])


def test_a_deployment_that_served_without_errors_shows_zero_errors_not_a_gap():
    requests = pd.DataFrame({"blue": [5.0, np.nan, 4.0], "green": [1.0, 2.0, np.nan]})
    errors = pd.DataFrame({"green": [np.nan, 1.0, np.nan]})
    filled = plots.zero_errors_where_served(requests, errors)
    assert filled["blue"].tolist()[0] == 0.0 and np.isnan(filled["blue"].tolist()[1])
    assert filled["green"].tolist()[:2] == [0.0, 1.0] and np.isnan(filled["green"].tolist()[2])


def test_the_whole_run_dashboard_puts_gate_decisions_on_the_same_time_axis():
    t0 = T0.timestamp()
    looks = [{"gate": "errors", "decision": d, "window_start": t0, "checked_at": t0 + 5 * i}
             for i, d in enumerate(["inconclusive", "pass"])]
    looks.append({"gate": "latency", "decision": "fail", "window_start": t0, "checked_at": t0 + 15})
    fig = plots.rollout_dashboard(observation(), gate_looks=looks)
    gate_ax = fig.axes[3]
    assert [t.get_text() for t in gate_ax.get_yticklabels()] == ["errors", "latency"]
    assert gate_ax.get_xlim() == fig.axes[0].get_xlim()  # shared with latency, errors and the split
    fail = [c for c in gate_ax.collections if c.get_label() == "fail"][0]
    assert matplotlib.dates.num2date(fail.get_offsets()[0][0]) == T0 + timedelta(seconds=15)


def test_step_labels_close_in_time_do_not_overlap():
    t0 = T0.timestamp()
    marks = {"deploy": t0, "shift-10": t0 + 0.5, "validate-10": t0 + 1.0, "rollback": t0 + 15}
    fig = plots.rollout_dashboard(observation(), marks=marks)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = {t.get_text(): t.get_window_extent(renderer) for t in fig.axes[0].texts}
    assert set(boxes) == set(marks)
    names = sorted(boxes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not boxes[a].overlaps(boxes[b]), (a, b)


def test_gate_window_figures_draw_the_window_at_the_backends_finest_grain_and_return_the_verdicts():
    from types import SimpleNamespace

    import matplotlib.pyplot as plt

    asked = []

    class Backend:
        finest_grain = "PT5S"

        def query_metrics(self, endpoint, metric, **query):
            asked.append((metric, query["grain"]))
            return [series("blue", [9, 9]), series("green", [1, 1])]

    verdict = SimpleNamespace(to_dict=lambda: {"gate": "errors", "kind": "threshold", "decision": "pass",
                                               "reason": "ok", "evidence": {"intervals": 3},
                                               "window_start": T0.timestamp() + 30, "checked_at": T0.timestamp() + 40})
    report = SimpleNamespace(started_at=T0.timestamp() + 30, ended_at=T0.timestamp() + 60,
                             verdicts=[verdict], history=[verdict])
    plt.close("all")
    table = plots.gate_window_figures(Backend(), "ep", report, rc="green", title="t", latency_threshold_ms=250.0)
    assert {grain for _, grain in asked} == {"PT5S"} and table["decision"].tolist() == ["pass"]
    dashboard = plt.figure(1)
    assert lines_at(dashboard.axes[0], 250.0) and len(plt.get_fignums()) == 2  # the dashboard and the timeline
