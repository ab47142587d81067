"""Values a notebook step records for later steps: `record` writes one, `read_records` reads them back.

A record is a JSON display output of mimetype `RECORD_MIMETYPE` in the executed notebook, so the notebook
itself stays the record of the run (no second log). The names below are the ones the runner and the report
read; a notebook writes them through these constants, never as literals.
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any, Mapping

RECORD_MIMETYPE = "application/vnd.saferollout.record+json"
GATE_RECORD = "gate_report"  # notebooks that run gates record their GateReport.to_dict() under this name
PROD_RECORD = "prod"  # the deploy step records the endpoint's PROD: the run deployed something to draw
LEFT_OUT_RECORD = "gates_left_out"  # a gate step's gates left out for want of evidence: [{name, kind, reason}]


def record(name: str, value: Any) -> Any:
    """Record `value` under `name` for later steps: a JSON display output the runner reads back.

    Call it from a notebook cell; the value must be JSON-serialisable. Returns `value`.
    """
    from IPython.display import display

    payload = {"name": str(name), "value": json.loads(json.dumps(value, default=str))}
    display({RECORD_MIMETYPE: payload, "text/plain": f"recorded {name} = {one_line(payload['value'])}"}, raw=True)
    return value


def one_line(value: Any, width: int = 100) -> str:
    """A value as one line of at most `width` characters: what a reader of a notebook or the run's console sees
    of a record (the whole value is in the record itself, and in summary.json). Floats show four significant
    digits (whole numbers from 10,000 up); a float named `*_at` is a moment, shown as UTC time."""
    value = _readable(value)
    if isinstance(value, dict) and len(json.dumps(value)) > width:
        text = "{" + ", ".join(f"{k}: {_brief(v)}" for k, v in value.items()) + "}"
    else:
        text = json.dumps(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _readable(value: Any, key: str = "") -> Any:
    if isinstance(value, float) and not isinstance(value, bool) and math.isfinite(value):
        if key.endswith("_at") and value > 1e9:  # unix seconds
            return datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return round(value) if abs(value) >= 1e4 else float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _readable(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_readable(v, key) for v in value]
    return value


def _brief(value: Any) -> str:
    if isinstance(value, dict):
        return f"{{{len(value)} keys}}"
    if isinstance(value, list):
        return f"[{len(value)} items]"
    text = json.dumps(value)
    return text if len(text) <= 30 else text[:27] + "..."


def read_records(notebook: Any) -> dict[str, Any]:
    """The values an executed notebook recorded (a path or an nbformat node); the last record of a name wins."""
    if not isinstance(notebook, Mapping):
        import nbformat

        notebook = nbformat.read(str(notebook), as_version=4)
    values: dict[str, Any] = {}
    for cell in notebook.get("cells", []):
        for output in cell.get("outputs", []) or []:
            payload = (output.get("data") or {}).get(RECORD_MIMETYPE)
            if isinstance(payload, str):  # some writers store JSON mimetypes as text
                payload = json.loads(payload)
            if isinstance(payload, Mapping) and "name" in payload:
                values[payload["name"]] = payload.get("value")
    return values
