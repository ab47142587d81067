"""A run's audit trail for humans: summary.json and report.html (summary table + the executed notebooks).

report.html is one self-contained page: nbconvert renders every executed notebook (plots are embedded as
base64 PNGs), the page keeps one copy of the notebook stylesheet and puts a summary table on top.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from saferollout.records import GATE_RECORD

STATUS_COLOURS = {"ok": "#1a7f37", "completed": "#1a7f37", "skipped": "#6e7781", "failed": "#cf222e",
                  "rolled_back": "#bc4c00", "pass": "#1a7f37", "fail": "#cf222e", "inconclusive": "#9a6700"}


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = Path(run_dir) / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    return path


def _badge(text: str) -> str:
    colour = STATUS_COLOURS.get(text, "#57606a")
    return f'<span class="sr-badge" style="background:{colour}">{html.escape(text)}</span>'


def _when(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%H:%M:%S")


def summary_table(summary: dict[str, Any], timeline: str = "") -> str:
    """The HTML header of the report: outcome, parameters, steps with timings, gate verdicts, traffic."""
    rows = []
    for step in summary.get("steps", []):
        records = {k: v for k, v in step.get("records", {}).items() if k != GATE_RECORD}
        shown = ", ".join(f"{k}={json.dumps(v)[:80]}" for k, v in records.items())
        if step.get("error"):
            shown = f"<b>{html.escape(step['error']['message'])}</b>"
        else:
            shown = html.escape(shown or step.get("skipped_because", ""))
        link = f'<a href="#{html.escape(step["id"])}">{html.escape(step["id"])}</a>' if step.get("output") else \
            html.escape(step["id"])
        duration = "" if step.get("duration_s") is None else f"{step['duration_s']:.1f}s"
        rows.append(f"<tr><td>{link}</td><td>{_badge(step['status'])}</td><td>{_when(step.get('started_at'))}</td>"
                    f"<td>{duration}</td><td>{shown}</td></tr>")
    gate_rows = []
    for step_id, report in (summary.get("gates") or {}).items():
        for verdict in report.get("verdicts", []):
            gate_rows.append(f"<tr><td>{html.escape(step_id)}</td><td>{html.escape(str(verdict.get('gate')))}</td>"
                             f"<td>{_badge(str(verdict.get('decision')))}</td>"
                             f"<td>{html.escape(str(verdict.get('reason', '')))}</td></tr>")
    failure = summary.get("failure")
    failure_html = ""
    if failure:
        source = html.escape(failure.get("cell_source") or "")
        failure_html = (f"<h3>Failure</h3><p>step <b>{html.escape(failure['step'])}</b>: "
                        f"{html.escape(failure['message'])}</p>"
                        + (f"<p>failing cell {failure.get('cell_index')}:</p><pre>{source}</pre>" if source else ""))
    traffic = summary.get("traffic") or {}
    traffic_rows = "".join(
        f"<tr><td>{html.escape(dep)}</td><td>{c['sent']}</td><td>{c['ok']}</td><td>{c['failed']}</td></tr>"
        for dep, c in (traffic.get("per_deployment") or {}).items())
    source = html.escape(str(traffic.get("description") or "no live traffic step ran"))
    left_out = "".join(
        f"<tr><td>{html.escape(step_id)}</td><td>{html.escape(str(g.get('name')))}</td>"
        f"<td>{html.escape(str(g.get('reason')))}</td></tr>"
        for step_id, gates in (summary.get("gates_left_out") or {}).items() for g in gates)
    left_out_html = ("<h3>Gates left out</h3><table><tr><th>step</th><th>gate</th><th>why</th></tr>"
                     f"{left_out}</table>") if left_out else ""
    params = "".join(f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(json.dumps(v))}</code></td></tr>"
                     for k, v in summary.get("parameters", {}).items())
    return f"""
<div class="sr-summary">
<h1>{html.escape(summary.get('runbook', ''))} {_badge(summary.get('status', ''))}</h1>
<p>run <code>{html.escape(summary.get('run_id', ''))}</code>, {summary.get('duration_s', 0):.0f}s,
exit code {summary.get('exit_code')}{' (first release)' if summary.get('first_release') else ''}</p>
{failure_html}
{timeline}
<h3>Steps</h3>
<table><tr><th>step</th><th>status</th><th>started (UTC)</th><th>duration</th><th>recorded</th></tr>
{''.join(rows)}</table>
<h3>Gate verdicts</h3>
<table><tr><th>step</th><th>gate</th><th>decision</th><th>reason</th></tr>{''.join(gate_rows) or
    '<tr><td colspan=4>no gates ran</td></tr>'}</table>
{left_out_html}
<h3>Live traffic (client side)</h3>
<p class="sr-traffic-source">live traffic: {source}</p>
<table><tr><th>served by</th><th>sent</th><th>ok</th><th>failed</th></tr>{traffic_rows or
    '<tr><td colspan=4>no live traffic</td></tr>'}</table>
<h3>Parameters</h3><table>{params}</table>
</div>"""


# ---- the rollout timeline at the top of the report ----------------------------------------------------
TIMELINE_STEPS = ("deploy", "shift", "validate", "promote", "rollback")  # the steps marked on the timeline


def gate_history(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every look of every gate in the run, in order (each validate window, then the bake)."""
    looks: list[dict[str, Any]] = []
    for step in summary.get("steps", []):
        report = (step.get("records") or {}).get(GATE_RECORD) or {}
        looks.extend(dict(v, gate=f"{v.get('gate')}") for v in report.get("history", []))
    return looks


def rollout_timeline(backend: Any, endpoint: str, summary: dict[str, Any], grain: str) -> str:
    """HTML for the report's opening figure: latency, errors and the traffic split per deployment over the
    whole run (the steps marked), and below them, on the same time axis, each gate's decision at every look."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saferollout import plots

    marks = {step["id"]: step["started_at"] for step in summary.get("steps", [])
             if step.get("started_at") and step["id"].split("-")[0] in TIMELINE_STEPS}
    start, end = float(summary["started_at"]), float(summary["ended_at"])
    observed = plots.observe(backend, endpoint, start, end, grain=grain)
    figure = plots.rollout_dashboard(observed, marks=marks, gate_looks=gate_history(summary),
                                     title=f"{endpoint}: the whole run")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    image = f'<img alt="rollout timeline" src="data:image/png;base64,{encoded}">'
    return f'<h3>Timeline</h3><div class="sr-timeline">{image}</div>'


_BODY = re.compile(r"<body[^>]*>(.*)</body>", re.S)
_HEAD = re.compile(r"<head[^>]*>(.*)</head>", re.S)
_STYLE = """<style>
.sr-summary { font-family: system-ui, sans-serif; max-width: 1100px; margin: 1em auto; }
.sr-summary table { border-collapse: collapse; margin-bottom: 1em; }
.sr-summary td, .sr-summary th { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left;
  vertical-align: top; font-size: 13px; }
.sr-timeline img { max-width: 100%; display: block; margin-bottom: 0.5em; }
.sr-badge { color: white; border-radius: 10px; padding: 1px 8px; font-size: 12px; }
.sr-notebook { border-top: 3px solid #d0d7de; margin-top: 2em; }
.sr-notebook > h2 { font-family: system-ui, sans-serif; max-width: 1100px; margin: 0.5em auto; }
</style>"""


def render_notebook(path: Path) -> tuple[str, str]:
    """(head, body) of a notebook rendered by nbconvert's HTML exporter (images embedded)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab")
    document, _ = exporter.from_notebook_node(nbformat.read(str(path), as_version=4))
    head, body = _HEAD.search(document), _BODY.search(document)
    return (head.group(1) if head else ""), (body.group(1) if body else document)


def write_report(run_dir: Path, summary: dict[str, Any], timeline: str = "") -> Path:
    """report.html: the outcome and the rollout timeline (`rollout_timeline`'s HTML), the summary table, then
    every executed notebook of the run, in order."""
    run_dir = Path(run_dir)
    head, sections = "", []
    for step in summary.get("steps", []):
        output = run_dir / step["output"] if step.get("output") else None
        if output is None or not output.exists():
            continue
        nb_head, body = render_notebook(output)
        head = head or nb_head  # one copy of the stylesheet is enough
        sections.append(f'<section class="sr-notebook" id="{html.escape(step["id"])}">'
                        f'<h2>{html.escape(step["output"])} {_badge(step["status"])}</h2>{body}</section>')
    head = re.sub(r"<title>.*?</title>", "", head, flags=re.S)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(summary.get('runbook', ''))} {html.escape(summary.get('run_id', ''))}</title>"
            f"{head}{_STYLE}</head><body>{summary_table(summary, timeline)}{''.join(sections)}</body></html>")
    path = run_dir / "report.html"
    path.write_text(page)
    return path
