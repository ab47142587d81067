"""Per-request log -> Azure-named metrics and raw samples.

The gateway hands every request (mirrored ones too, flagged) to a `RequestLog`, which batches them into
SQLite from a background thread so that recording never sits on the request path (a graceful stop
writes everything; a SIGKILL loses at most the last batch interval, 0.2 s, of requests). Queries speak Azure
Monitor's language: metric names, aggregations, ISO 8601 grains and OData-like filters such as
`deployment eq 'green' and statusCodeClass ne '2xx'`.
"""
from __future__ import annotations

import math
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from saferollout.backends.base import AGGREGATIONS, METRIC_DIMENSIONS, METRIC_NAMES
from saferollout.errors import SpecError

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    ts REAL NOT NULL, endpoint TEXT NOT NULL, deployment TEXT NOT NULL, status INTEGER NOT NULL,
    latency_ms REAL NOT NULL, mirrored INTEGER NOT NULL, request_id TEXT NOT NULL, model_status INTEGER,
    pinned INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS requests_by_time ON requests (endpoint, ts);
CREATE TABLE IF NOT EXISTS mirrored_pairs (
    ts REAL NOT NULL, endpoint TEXT NOT NULL, request_id TEXT NOT NULL, request_body BLOB NOT NULL,
    live_deployment TEXT NOT NULL, live_status INTEGER NOT NULL, live_body BLOB NOT NULL,
    mirror_deployment TEXT NOT NULL, mirror_status INTEGER NOT NULL, mirror_body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS pairs_by_time ON mirrored_pairs (endpoint, ts);
"""
# Row order of `requests`, which is also the tuple the gateway records.
RequestRow = tuple  # (ts, endpoint, deployment, status, latency_ms, mirrored, request_id, model_status, pinned)
RETENTION_S = 7 * 24 * 3600
PAIR_BODY_LIMIT = 64 * 1024


class RequestLog:
    """Batched, durable per-request log. `record` is cheap; a thread writes batches every `interval_s`."""

    def __init__(self, path: Path, interval_s: float = 0.2):
        self.path = Path(path)
        self._pending: list[tuple] = []
        self._pending_pairs: list[tuple] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = interval_s
        self._writer = self._connect()
        self._writer.executescript(SCHEMA)
        self._add_pinned_column()
        self._writer.execute("DELETE FROM requests WHERE ts < ?", (time.time() - RETENTION_S,))
        self._writer.execute("DELETE FROM mirrored_pairs WHERE ts < ?", (time.time() - RETENTION_S,))
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _add_pinned_column(self) -> None:
        """A log written before requests were marked pinned gets the column (its rows count as routed)."""
        columns = {row[1] for row in self._writer.execute("PRAGMA table_info(requests)")}
        if "pinned" not in columns:
            self._writer.execute("ALTER TABLE requests ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0")

    def record(self, row: RequestRow) -> None:
        with self._lock:
            self._pending.append(row)

    def record_pair(self, row: tuple) -> None:
        with self._lock:
            self._pending_pairs.append(row)

    def flush(self) -> None:
        """Write everything recorded so far (queries call this first, so they see their own requests)."""
        with self._lock:
            rows, self._pending = self._pending, []
            pairs, self._pending_pairs = self._pending_pairs, []
        if not rows and not pairs:
            return
        with self._write_lock:
            self._writer.execute("BEGIN")
            if rows:
                self._writer.executemany("INSERT INTO requests VALUES (?,?,?,?,?,?,?,?,?)", rows)
            if pairs:
                self._writer.executemany("INSERT INTO mirrored_pairs VALUES (?,?,?,?,?,?,?,?,?,?)", pairs)
            self._writer.execute("COMMIT")

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()
        self._writer.close()

    def rows(self, endpoint: str, start: float, end: float) -> list[tuple]:
        self.flush()
        with self._write_lock:
            cur = self._writer.execute(
                "SELECT ts, endpoint, deployment, status, latency_ms, mirrored, request_id, model_status, pinned "
                "FROM requests WHERE endpoint=? AND ts>=? AND ts<? ORDER BY ts", (endpoint, start, end))
            return cur.fetchall()

    def pairs(self, endpoint: str, start: float, end: float) -> list[tuple]:
        self.flush()
        with self._write_lock:
            cur = self._writer.execute(
                "SELECT * FROM mirrored_pairs WHERE endpoint=? AND ts>=? AND ts<? ORDER BY ts",
                (endpoint, start, end))
            return cur.fetchall()

    def delete_endpoint(self, endpoint: str) -> None:
        self.flush()
        with self._write_lock:
            self._writer.execute("DELETE FROM requests WHERE endpoint=?", (endpoint,))
            self._writer.execute("DELETE FROM mirrored_pairs WHERE endpoint=?", (endpoint,))


# ---- filters ---------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(\()|(\))|'((?:[^']|'')*)'|([A-Za-z_][A-Za-z0-9_]*))")


@dataclass
class Comparison:
    dimension: str
    op: str  # eq | ne
    value: str

    def matches(self, dims: dict[str, str]) -> bool:
        if self.value == "*":
            return self.op == "eq"
        hit = dims.get(self.dimension, "").lower() == self.value.lower()
        return hit if self.op == "eq" else not hit


@dataclass
class BoolOp:
    op: str  # and | or
    left: Any
    right: Any

    def matches(self, dims: dict[str, str]) -> bool:
        if self.op == "and":
            return self.left.matches(dims) and self.right.matches(dims)
        return self.left.matches(dims) or self.right.matches(dims)


class _Always:
    def matches(self, dims: dict[str, str]) -> bool:
        return True


ALWAYS = _Always()


def parse_filter(text: str | None, dimensions: Sequence[str]) -> Any:
    """Parse `deployment eq 'green' and statusCodeClass ne '2xx'` (and/or, parentheses, eq/ne)."""
    if not text or not text.strip():
        return ALWAYS
    tokens = _tokenize(text)
    node, pos = _parse_or(tokens, 0, text, dimensions)
    if pos != len(tokens):
        raise SpecError(f"invalid metric filter {text!r}: unexpected {tokens[pos][1]!r}")
    return node


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match:
            raise SpecError(f"invalid metric filter {text!r} near {text[pos:pos + 12]!r}")
        lpar, rpar, quoted, word = match.groups()
        if lpar:
            tokens.append(("(", "("))
        elif rpar:
            tokens.append((")", ")"))
        elif quoted is not None:
            tokens.append(("str", quoted.replace("''", "'")))
        else:
            tokens.append(("word", word))
        pos = match.end()
    return tokens


def _parse_or(tokens, pos, text, dims):
    left, pos = _parse_and(tokens, pos, text, dims)
    while pos < len(tokens) and tokens[pos] == ("word", "or"):
        right, pos = _parse_and(tokens, pos + 1, text, dims)
        left = BoolOp("or", left, right)
    return left, pos


def _parse_and(tokens, pos, text, dims):
    left, pos = _parse_term(tokens, pos, text, dims)
    while pos < len(tokens) and tokens[pos] == ("word", "and"):
        right, pos = _parse_term(tokens, pos + 1, text, dims)
        left = BoolOp("and", left, right)
    return left, pos


def _parse_term(tokens, pos, text, dims):
    if pos >= len(tokens):
        raise SpecError(f"invalid metric filter {text!r}: it ends too early")
    if tokens[pos][0] == "(":
        node, pos = _parse_or(tokens, pos + 1, text, dims)
        if pos >= len(tokens) or tokens[pos][0] != ")":
            raise SpecError(f"invalid metric filter {text!r}: missing ')'")
        return node, pos + 1
    if pos + 3 > len(tokens):
        raise SpecError(f"invalid metric filter {text!r}: expected <dimension> eq|ne '<value>'")
    (kind_d, dim), (kind_o, op), (kind_v, value) = tokens[pos:pos + 3]
    if kind_d != "word" or kind_o != "word" or op.lower() not in ("eq", "ne") or kind_v != "str":
        raise SpecError(f"invalid metric filter {text!r}: expected <dimension> eq|ne '<value>'")
    canonical = {d.lower(): d for d in dims}
    if dim.lower() not in canonical:
        raise SpecError(f"unknown dimension {dim!r} in metric filter: this metric has {', '.join(dims)}")
    return Comparison(canonical[dim.lower()], op.lower(), value), pos + 3


def scope_of(node: Any) -> Any:
    """The filter with every non-deployment comparison dropped: which requests are 'in scope'.

    A bucket where the scope saw requests but the filter matched none holds 0 (e.g. zero errors out of
    120 requests); a bucket where the scope saw no request at all holds None: no data is never zero errors.
    """
    if isinstance(node, Comparison):
        return node if node.dimension == "deployment" else ALWAYS
    if isinstance(node, BoolOp):
        left, right = scope_of(node.left), scope_of(node.right)
        if node.op == "or" and (left is ALWAYS or right is ALWAYS):
            return ALWAYS
        if left is ALWAYS:
            return right
        if right is ALWAYS:
            return left
        return BoolOp(node.op, left, right)
    return ALWAYS


# ---- aggregation -----------------------------------------------------------------------------

_GRAIN = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$")


def grain_seconds(grain: str) -> int:
    match = _GRAIN.match((grain or "").upper())
    if not match or not any(match.groups()):
        raise SpecError(f"invalid grain {grain!r}: use an ISO 8601 duration such as PT1M, PT5S or PT1H")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    total = days * 86400 + hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise SpecError(f"invalid grain {grain!r}: it must be longer than zero")
    return total


def dimensions_of(row: tuple) -> dict[str, str]:
    status = int(row[3])
    model_status = row[7]
    return {"deployment": row[2], "statusCode": str(status), "statusCodeClass": f"{status // 100}xx",
            "modelStatusCode": "" if model_status is None else str(model_status)}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    # linear interpolation between closest ranks, as numpy's default
    pos = (len(ordered) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _value(metric: str, aggregation: str, grain_s: int, latencies: list[float], scoped: int) -> float | None:
    if metric == "RequestsPerMinute":
        if scoped == 0:
            return None
        count = len(latencies)
        return float(count) if aggregation in ("Total", "Count") else count * 60.0 / grain_s
    if not latencies:
        return None
    if metric == "RequestLatency":
        return {"Average": lambda: sum(latencies) / len(latencies), "Maximum": lambda: max(latencies),
                "Minimum": lambda: min(latencies), "Total": lambda: sum(latencies),
                "Count": lambda: float(len(latencies))}[aggregation]()
    quantile = int(metric.rsplit("_P", 1)[1]) / 100.0
    return _percentile(latencies, quantile)


def validate_query(metric: str, aggregation: str, split_by: Iterable[str]) -> tuple[str, ...]:
    if metric not in METRIC_NAMES:
        raise SpecError(f"unknown metric {metric!r}: choose one of {', '.join(METRIC_NAMES)}")
    if aggregation not in AGGREGATIONS:
        raise SpecError(f"unknown aggregation {aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")
    dims = METRIC_DIMENSIONS[metric]
    canonical = {d.lower(): d for d in dims}
    split = []
    for name in split_by:
        if name.lower() not in canonical:
            raise SpecError(f"cannot split {metric} by {name!r}: its dimensions are {', '.join(dims)}")
        split.append(canonical[name.lower()])
    return tuple(split)


def aggregate(rows: Sequence[tuple], metric: str, aggregation: str, grain: str, start: float, end: float,
              filter_text: str | None = None, split_by: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Turn request rows into Azure-style time series: one per split-by combination, aligned buckets."""
    split = validate_query(metric, aggregation, split_by)
    dims = METRIC_DIMENSIONS[metric]
    node = parse_filter(filter_text, dims)
    scope = scope_of(node)
    grain_s = grain_seconds(grain)
    first = math.floor(start / grain_s) * grain_s
    n_buckets = max(1, math.ceil((end - first) / grain_s))
    latencies: dict[tuple, list[list[float]]] = {}
    scoped = [0] * n_buckets
    for row in rows:
        bucket = int((row[0] - first) // grain_s)
        if not 0 <= bucket < n_buckets:
            continue
        row_dims = dimensions_of(row)
        if not scope.matches(row_dims):
            continue
        scoped[bucket] += 1
        if not node.matches(row_dims):
            continue
        key = tuple(row_dims[d] for d in split)
        latencies.setdefault(key, [[] for _ in range(n_buckets)])[bucket].append(row[4])
    if not split and not latencies:
        latencies[()] = [[] for _ in range(n_buckets)]
    series = []
    for key, buckets in sorted(latencies.items()):
        points = [{"timestamp": first + i * grain_s,
                   "value": _value(metric, aggregation, grain_s, buckets[i], scoped[i])}
                  for i in range(n_buckets)]
        series.append({"metric": metric, "aggregation": aggregation, "grain": grain,
                       "dimensions": dict(zip(split, key)), "points": points})
    return series


def to_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)

