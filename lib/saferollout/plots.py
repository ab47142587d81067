"""matplotlib figures for the notebooks and the run report.

Two kinds: model quality (ROC, calibration) from held-out predictions, and what the endpoint did during a
rollout (latency percentiles, error counts and the traffic split per deployment over time, gate decisions
over time). Endpoint data come from the backend's metrics (Azure Monitor names, so the same figures work on
both backends); every function returns a Figure and draws nothing it was not given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

PERCENTILES = ("P50", "P90", "P99")
DECISION_COLOURS = {"pass": "#1a7f37", "fail": "#cf222e", "inconclusive": "#9a6700"}


# ---- model quality -------------------------------------------------------------------------------------
def roc_figure(y_true: Iterable[int], probabilities: Iterable[float], label: str = "model") -> Figure:
    """ROC curve on held-out rows, with its AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y, p = np.asarray(list(y_true)), np.asarray(list(probabilities))
    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (held-out)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def calibration_figure(y_true: Iterable[int], probabilities: Iterable[float], n_bins: int = 10) -> Figure:
    """Reliability diagram: observed frequency of the positive class against predicted probability."""
    from sklearn.calibration import calibration_curve

    y, p = np.asarray(list(y_true)), np.asarray(list(probabilities))
    observed, predicted = calibration_curve(y, p, n_bins=n_bins, strategy="quantile")
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(predicted, observed, marker="o", label="model")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfectly calibrated")
    ax.set(xlabel="predicted P(good credit)", ylabel="observed share good", title="Calibration (held-out)",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


# ---- what the endpoint did ------------------------------------------------------------------------------
@dataclass
class Observation:
    """Per-deployment time series over a window: requests, errors (non-2xx) and latency percentiles (ms)."""

    endpoint: str
    grain: str
    requests: pd.DataFrame  # index: interval start (UTC), columns: deployments
    errors: pd.DataFrame
    latency: dict[str, pd.DataFrame] = field(default_factory=dict)  # "P50" -> frame

    @property
    def deployments(self) -> list[str]:
        return sorted(set(self.requests.columns) | set(self.errors.columns))


def series_frame(series: Iterable[Any], dimension: str = "deployment") -> pd.DataFrame:
    """MetricSeries (split by `dimension`) -> a frame indexed by time with one column per dimension value.

    Intervals without data stay NaN: no data is not zero.
    """
    columns = {}
    for s in series:
        name = s.dimensions.get(dimension, "all")
        columns[name] = pd.Series({p.timestamp: (np.nan if p.value is None else p.value) for p in s.points},
                                  dtype=float)
    frame = pd.DataFrame(columns)
    frame.index.name = "time"
    return frame.sort_index()


def observe(backend: Any, endpoint: str, start: float, end: float | None = None, grain: str = "PT5S") -> Observation:
    """Query the endpoint's metrics for the plots (works on any backend that speaks Azure metric names)."""
    begin = datetime.fromtimestamp(start, tz=timezone.utc)
    finish = datetime.fromtimestamp(end, tz=timezone.utc) if end else datetime.now(timezone.utc)

    def query(metric: str, aggregation: str, filter: str | None = None) -> pd.DataFrame:
        return series_frame(backend.query_metrics(endpoint, metric, aggregation=aggregation, grain=grain,
                                                  start=begin, end=finish, filter=filter, split_by=["deployment"]))

    requests = query("RequestsPerMinute", "Total")
    errors = zero_errors_where_served(requests, query("RequestsPerMinute", "Total", "statusCodeClass ne '2xx'"))
    latency = {p: query(f"RequestLatency_{p}", "Average") for p in PERCENTILES}
    return Observation(endpoint, grain, requests, errors, latency)


def zero_errors_where_served(requests: pd.DataFrame, errors: pd.DataFrame) -> pd.DataFrame:
    """A deployment that served requests in an interval without an error had 0 errors there (the metric
    query returns no series at all for it); an interval without requests stays NaN."""
    index = requests.index.union(errors.index)
    columns = sorted(set(requests.columns) | set(errors.columns))
    errors = errors.reindex(index=index, columns=columns)
    served = requests.reindex(index=index, columns=columns).fillna(0.0) > 0
    return errors.mask(errors.isna() & served, 0.0)


def _colours(names: Iterable[str]) -> dict[str, Any]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(sorted(names))}


def limits_from_verdicts(verdicts: Iterable[Mapping[str, Any]]) -> dict[str, float | None]:
    """The limits the gates applied, from their evidence, for the dashboard: the RC latency the gates
    tolerate (ms, the tightest of the latency gates: tolerance x PROD's quantile + tolerance_ms) and the
    RC error rate they tolerate (a fraction, the tightest too: tolerance_ratio x PROD's + tolerance points)."""
    latency: list[float] = []
    error_rate: list[float] = []
    for verdict in verdicts:
        ev = verdict.get("evidence") or {}
        ratio = ev.get("tolerance_ratio")
        if not isinstance(ratio, (int, float)):
            continue
        if isinstance(ev.get("latency_ms"), Mapping) and isinstance(ev["latency_ms"].get("prod"), (int, float)):
            latency.append(float(ratio) * float(ev["latency_ms"]["prod"]) + float(ev.get("tolerance_ms") or 0.0))
        elif isinstance(ev.get("error_rate"), Mapping) and isinstance(ev["error_rate"].get("prod"), (int, float)):
            error_rate.append(float(ratio) * float(ev["error_rate"]["prod"])
                              + float(ev.get("tolerance_points") or 0.0) / 100.0)
    return {"latency_threshold_ms": min(latency) if latency else None,
            "error_rate_limit": min(error_rate) if error_rate else None}


def rollout_dashboard(obs: Observation, *, latency_threshold_ms: float | None = None,
                      error_threshold: float | None = None, error_rate_limit: float | None = None,
                      rc: str | None = None, marks: Mapping[str, float] | None = None,
                      gate_looks: Iterable[Mapping[str, Any]] | None = None, title: str = "") -> Figure:
    """Panels sharing time: latency percentiles, error counts (per interval), the traffic split and, when
    `gate_looks` (verdict dicts) are given, each gate's decision at every look.

    Limits are drawn dashed: a latency in ms, an error count per interval, or an error rate the RC may
    not exceed (drawn as that share of the RC's requests in each interval). `marks` (label -> unix time)
    are vertical lines, e.g. when each step began; their labels sit above the panels, staggered so that
    close ones do not overlap. Legends sit outside the panels, right of them.
    """
    colours = _colours(obs.deployments)
    looks = list(gate_looks or [])
    gates = list(dict.fromkeys(str(v["gate"]) for v in looks))
    rows, ratios = 3, [3.0, 2.0, 2.0]
    if looks:
        rows, ratios = 4, ratios + [0.5 + 0.35 * len(gates)]
    fig, axes = plt.subplots(rows, 1, figsize=(11, 2.6 * sum(ratios) / 3 + 1.2), sharex=True,
                             gridspec_kw={"height_ratios": ratios})
    lat_ax, err_ax, split_ax = axes[:3]
    outside = {"fontsize": 7, "loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0}
    styles = {"P50": ":", "P90": "-", "P99": "--"}
    for pct, frame in obs.latency.items():
        for dep in frame.columns:
            lat_ax.plot(frame.index, frame[dep], linestyle=styles.get(pct, "-"), color=colours.get(dep),
                        marker=".", label=f"{dep} {pct.lower()}")
    if latency_threshold_ms is not None:
        lat_ax.axhline(latency_threshold_ms, color="#cf222e", linestyle="--", linewidth=1,
                       label=f"limit {latency_threshold_ms:.0f} ms")
    lat_ax.set(ylabel="latency (ms)")
    fig.suptitle(title or f"{obs.endpoint}: latency, errors and traffic split")
    if lat_ax.get_legend_handles_labels()[0]:
        lat_ax.legend(**outside)
    else:  # e.g. an RC that never started: say so rather than leave an empty panel
        lat_ax.text(0.5, 0.5, "no requests in this window", transform=lat_ax.transAxes, ha="center",
                    color="#57606a")

    for dep in obs.errors.columns:
        err_ax.plot(obs.errors.index, obs.errors[dep], drawstyle="steps-post", color=colours.get(dep),
                    marker=".", label=f"{dep} errors")
    if error_threshold is not None:
        err_ax.axhline(error_threshold, color="#cf222e", linestyle="--", linewidth=1,
                       label=f"threshold {error_threshold:g}")
    if error_rate_limit is not None and rc in obs.requests.columns:
        allowed = obs.requests[rc].fillna(0.0) * error_rate_limit
        err_ax.plot(allowed.index, allowed, drawstyle="steps-post", color="#cf222e", linestyle="--", linewidth=1,
                    label=f"allowed for {rc} ({error_rate_limit:.1%} of its requests)")
    err_ax.set(ylabel=f"non-2xx per {obs.grain}")
    if obs.errors.columns.size or error_threshold is not None or error_rate_limit is not None:
        err_ax.legend(**outside)

    shares = traffic_shares(obs.requests)
    if not shares.empty:
        split_ax.stackplot(shares.index, *[shares[c] for c in shares.columns], labels=list(shares.columns),
                           colors=[colours.get(c) for c in shares.columns], alpha=0.8)
        split_ax.legend(**outside)
    split_ax.set(ylabel="% of requests\nserved", ylim=(0, 100))
    if looks:
        _gate_panel(axes[3], looks, gates, outside)
    axes[-1].set(xlabel="time (UTC)")
    moments = {label: datetime.fromtimestamp(ts, tz=timezone.utc) for label, ts in (marks or {}).items()}
    for moment in moments.values():
        for ax in axes:
            ax.axvline(moment, color="grey", linestyle=":", linewidth=1)
    fig.autofmt_xdate()
    _label_marks(lat_ax, moments)
    fig.tight_layout()
    return fig


def _gate_panel(ax: Any, looks: list[Mapping[str, Any]], gates: list[str], legend: dict[str, Any]) -> None:
    """One row per gate on the time axis: each look's decision where it was made."""
    for decision, colour in DECISION_COLOURS.items():
        points = [(datetime.fromtimestamp(float(v["checked_at"]), tz=timezone.utc), gates.index(str(v["gate"])))
                  for v in looks if v["decision"] == decision]
        if points:
            xs, ys = zip(*points)
            ax.scatter(xs, ys, color=colour, label=decision, s=22, zorder=3)
    ax.set_yticks(range(len(gates)), gates, fontsize=8)
    ax.set_ylim(-0.6, len(gates) - 0.4)
    ax.set_ylabel("gate decisions")
    ax.legend(**legend)


def _label_marks(ax: Any, moments: Mapping[str, datetime]) -> None:
    """Step labels above the top panel; a label closer than a tenth of the axis to the one before it on
    the same line goes one line up (four lines; when all four are crowded, the line used longest ago)."""
    if not moments:
        return
    left, right = ax.get_xlim()
    span = (right - left) or 1.0
    last_on_line: dict[int, float] = {}
    for label, moment in sorted(moments.items(), key=lambda item: item[1]):
        x = (mdates.date2num(moment) - left) / span
        free = [i for i in range(4) if x - last_on_line.get(i, -1.0) >= 0.1]
        line = free[0] if free else min(last_on_line, key=last_on_line.__getitem__)
        last_on_line[line] = x
        ax.annotate(label, (moment, 1.0), xycoords=("data", "axes fraction"), xytext=(2, 3 + 10 * line),
                    textcoords="offset points", fontsize=7, va="bottom", color="#57606a")


def gate_window_figures(backend: Any, endpoint: str, report: Any, *, rc: str | None, title: str,
                        latency_threshold_ms: float | None = None, grain: str = "") -> pd.DataFrame:
    """What a gate window showed, as the validate and promote notebooks draw it: the dashboard over the
    window (from 30 s before it, the gates' limits drawn), each gate's decisions over time, and the final
    verdicts as a table (returned, for `display`).

    `report` is the window's `GateReport`; `grain` defaults to the backend's finest metric grain; a
    `latency_threshold_ms` given (from a threshold gate on latency) wins over the gates' own limits.
    """
    verdicts = [v.to_dict() for v in report.verdicts]
    observed = observe(backend, endpoint, report.started_at - 30, report.ended_at,
                       grain=grain or backend.finest_grain)
    limits = limits_from_verdicts(verdicts)
    limits["latency_threshold_ms"] = latency_threshold_ms or limits["latency_threshold_ms"]
    rollout_dashboard(observed, latency_threshold_ms=limits["latency_threshold_ms"],
                      error_rate_limit=limits["error_rate_limit"], rc=rc, marks={"gate window": report.started_at},
                      title=title)
    gate_timeline([v.to_dict() for v in report.history])
    return verdict_table(verdicts)


def traffic_shares(requests: pd.DataFrame) -> pd.DataFrame:
    """Requests per deployment per interval -> percent of the interval's requests (intervals with none dropped)."""
    counts = requests.fillna(0.0)
    totals = counts.sum(axis=1)
    return counts[totals > 0].div(totals[totals > 0], axis=0) * 100.0


def gate_timeline(history: Iterable[Mapping[str, Any]], title: str = "gate decisions over time") -> Figure:
    """One row per gate: each look's decision (pass, inconclusive, fail) at the time it was made."""
    looks = list(history)
    gates = list(dict.fromkeys(str(v["gate"]) for v in looks))
    fig, ax = plt.subplots(figsize=(10, 0.6 * max(len(gates), 1) + 1.2))
    if looks:
        t0 = min(float(v["window_start"]) for v in looks)
        for decision, colour in DECISION_COLOURS.items():
            points = [(float(v["checked_at"]) - t0, gates.index(str(v["gate"]))) for v in looks
                      if v["decision"] == decision]
            if points:
                xs, ys = zip(*points)
                ax.scatter(xs, ys, color=colour, label=decision, s=25)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_yticks(range(len(gates)), gates)
    ax.set(xlabel="seconds since the window began", title=title)
    ax.set_ylim(-0.5, max(len(gates), 1) - 0.5)
    fig.tight_layout()
    return fig


def verdict_table(verdicts: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Final verdicts as a table: gate, kind, decision, reason and the headline evidence."""
    rows = []
    for v in verdicts:
        evidence = v.get("evidence") or {}
        headline = {k: val for k, val in evidence.items() if isinstance(val, (int, float, str)) and k != "query"}
        rows.append({"gate": v.get("gate"), "kind": v.get("kind"), "decision": v.get("decision"),
                     "reason": v.get("reason"),
                     "evidence": ", ".join(f"{k}={_fmt(val)}" for k, val in list(headline.items())[:8])})
    return pd.DataFrame(rows, columns=["gate", "kind", "decision", "reason", "evidence"])


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
