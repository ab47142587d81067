"""What every benchmark shares: a record of where it ran, and its own section of docs/benchmarks.md."""
from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"


def environment(note: str, *, with_load: bool = True) -> dict[str, Any]:
    """Date, commit, Python, CPUs (and the load average at the start, when the machine's load matters)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = ""
    record: dict[str, Any] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit,
                              "python": platform.python_version(), "cpus": os.cpu_count()}
    if with_load:
        record["loadavg_at_start"] = os.getloadavg()
    record["note"] = note
    return record


def write_section(heading: str, section: str) -> None:
    """Replace (or add) the section under `heading` (e.g. `## Gates`), leaving the other sections alone."""
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        DOCS.write_text(text.rstrip() + "\n\n" + section)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rest = "\n".join(lines[end:])
    DOCS.write_text("\n".join(lines[:start]).rstrip() + "\n\n" + section + ("\n" + rest + "\n" if rest else ""))
