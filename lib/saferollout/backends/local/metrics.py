"""Per-request log -> Azure-named metrics and raw samples.

The gateway hands every request (mirrored ones too, flagged) to a `RequestLog`, which batches them into
SQLite from a background thread so that recording never sits on the request path (a graceful stop
writes everything; a SIGKILL loses at most the last batch interval, 0.2 s, of requests). `aggregate` answers
queries in Azure Monitor's language (parsed by `saferollout.backends.query`) from those rows.
"""
from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from saferollout.backends import query
from saferollout.backends.base import DEPLOYMENT_METRIC_DIMENSIONS, METRIC_DIMENSIONS
from saferollout.backends.query import grain_seconds, parse_filter, scope_of
from saferollout.errors import SpecError

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    ts REAL NOT NULL, endpoint TEXT NOT NULL, deployment TEXT NOT NULL, status INTEGER NOT NULL,
    latency_ms REAL NOT NULL, mirrored INTEGER NOT NULL, request_id TEXT NOT NULL, model_status INTEGER,
    pinned INTEGER NOT NULL DEFAULT 0, held INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS requests_by_time ON requests (endpoint, ts);
CREATE TABLE IF NOT EXISTS mirrored_pairs (
    ts REAL NOT NULL, endpoint TEXT NOT NULL, request_id TEXT NOT NULL, request_body BLOB NOT NULL,
    live_deployment TEXT NOT NULL, live_status INTEGER NOT NULL, live_body BLOB NOT NULL,
    mirror_deployment TEXT NOT NULL, mirror_status INTEGER NOT NULL, mirror_body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS pairs_by_time ON mirrored_pairs (endpoint, ts);
CREATE TABLE IF NOT EXISTS instance_metrics (
    ts REAL NOT NULL, endpoint TEXT NOT NULL, deployment TEXT NOT NULL, instance_id TEXT NOT NULL,
    cpu_pct REAL NOT NULL, memory_pct REAL NOT NULL);
CREATE INDEX IF NOT EXISTS instance_metrics_by_time ON instance_metrics (endpoint, ts);
"""
# The deployment metrics the platform measures itself, by their Azure names, and their column in
# `instance_metrics`: CPU of the instance's processes as a share of the machine's, resident memory as a
# share of its memory (Azure: of the instance's VM). The other Azure deployment metrics (GPU, disk) are not.
INSTANCE_METRICS = {"CpuUtilizationPercentage": 4, "CpuMemoryUtilizationPercentage": 5}
# Row order of `requests`, which is also the tuple the gateway records.
# held: the request waited for instances coming back after a platform restart (recorded, shown by the raw
# samples, left out of the metrics: the platform's own outage is no evidence about a deployment).
RequestRow = tuple  # (ts, endpoint, deployment, status, latency_ms, mirrored, request_id, model_status, pinned, held)


def request_row(ts: float, endpoint: str, deployment: str, status: int, latency_ms: float, mirrored: int = 0,
                request_id: str = "", model_status: int | None = None, pinned: int = 0, held: int = 0) -> RequestRow:
    """A whole request-log row, in column order; what is not given takes its default (a served, live request).

    The gateway records whole rows itself; the in-memory backends of the tests build theirs with this, so every
    reader of rows (`aggregate`, the samples) can rely on every column.
    """
    return (ts, endpoint, deployment, status, latency_ms, mirrored, request_id, model_status, pinned, held)
RETENTION_S = 7 * 24 * 3600
log = logging.getLogger("saferollout.platform")
PAIR_BODY_LIMIT = 64 * 1024


class RequestLog:
    """Batched, durable per-request log. `record` is cheap; a thread writes batches every `interval_s`.

    The log is never a single point of failure: a file SQLite cannot read (corrupt, truncated) is moved
    aside as `metrics.db.corrupt-<UTC time>` and a new log started, with one warning saying so; a log
    removed while the platform runs is written again from the copy still open, history included. The
    writer thread never dies of a bad batch, and `health()` says how it fares (`local status` shows it).
    """

    def __init__(self, path: Path, interval_s: float = 0.2):
        self.path = Path(path)
        self._pending: list[tuple] = []
        self._pending_pairs: list[tuple] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = interval_s
        self._health: dict[str, Any] = {"state": "ok", "path": str(self.path), "last_error": None,
                                        "last_error_at": None, "moved_aside": [], "lost_requests": 0}
        self._writer = self._open()
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _add_new_columns(self, db: sqlite3.Connection) -> None:
        """A log written before requests were marked pinned or held gets the columns (its rows are neither)."""
        columns = {row[1] for row in db.execute("PRAGMA table_info(requests)")}
        for name in ("pinned", "held"):  # in the table's order: ALTER TABLE adds at the end
            if name not in columns:
                db.execute(f"ALTER TABLE requests ADD COLUMN {name} INTEGER NOT NULL DEFAULT 0")

    def _open(self) -> sqlite3.Connection:
        """The log at `path`, ready to write; an unreadable file is moved aside and a new log started."""
        try:
            return self._prepared(self._connect())
        except sqlite3.DatabaseError as exc:
            self._move_aside(exc)
            return self._prepared(self._connect())

    def _prepared(self, db: sqlite3.Connection) -> sqlite3.Connection:
        try:
            db.executescript(SCHEMA)  # "file is not a database" here; damage deeper in is met when written
            self._add_new_columns(db)
            db.execute("DELETE FROM requests WHERE ts < ?", (time.time() - RETENTION_S,))
            db.execute("DELETE FROM mirrored_pairs WHERE ts < ?", (time.time() - RETENTION_S,))
        except sqlite3.DatabaseError:
            db.close()
            raise
        self._inode = os.stat(self.path).st_ino
        return db

    def _move_aside(self, exc: Exception) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            part = Path(f"{self.path}{suffix}")
            if part.exists():
                part.replace(Path(f"{aside}{suffix}"))
        self._health["moved_aside"].append(str(aside))
        self._note_error(exc)
        log.warning("the request log %s could not be read (%s): moved it aside to %s and started a new one",
                    self.path, exc, aside)

    def _note_error(self, exc: Exception) -> None:
        self._health.update(last_error=f"{type(exc).__name__}: {exc}", last_error_at=time.time())

    def _recover(self, exc: Exception) -> None:
        """Replace a writer whose file broke (called with the write lock held)."""
        try:
            self._writer.close()
        except sqlite3.Error:
            pass
        self._move_aside(exc)
        self._writer = self._prepared(self._connect())

    def _reappear(self) -> None:
        """The log was removed while we ran: write it again from the connection still open on it."""
        fresh = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._writer.backup(fresh)
        except sqlite3.Error as exc:  # the open copy is unreadable too: start empty
            fresh.close()
            Path(self.path).unlink(missing_ok=True)
            self._note_error(exc)
            log.warning("the request log %s was removed while the platform ran and its open copy could not be "
                        "read (%s): started a new one", self.path, exc)
        else:
            fresh.close()
            log.warning("the request log %s was removed while the platform ran: wrote it again from the copy "
                        "still open (history kept)", self.path)
        self._writer.close()
        self._writer = self._prepared(self._connect())

    def _check_file(self) -> None:
        try:
            missing = os.stat(self.path).st_ino != self._inode
        except FileNotFoundError:
            missing = True
        if missing:
            self._reappear()

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
        with self._write_lock:
            self._check_file()
            if not rows and not pairs:
                return
            try:
                self._write(rows, pairs)
            except sqlite3.DatabaseError as exc:
                self._recover(exc)
                try:
                    self._write(rows, pairs)
                except sqlite3.DatabaseError as again:  # the new file fails too: count what is lost
                    self._health["lost_requests"] += len(rows)
                    self._note_error(again)
                    raise
            self._health["state"] = "ok"

    def _write(self, rows: list[tuple], pairs: list[tuple]) -> None:
        try:
            self._writer.execute("BEGIN")
            if rows:
                self._writer.executemany("INSERT INTO requests VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
            if pairs:
                self._writer.executemany("INSERT INTO mirrored_pairs VALUES (?,?,?,?,?,?,?,?,?,?)", pairs)
            self._writer.execute("COMMIT")
        except sqlite3.Error:
            if self._writer.in_transaction:
                try:
                    self._writer.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.flush()
            except Exception as exc:  # never let the writer die: say so in health() and keep going
                self._health["state"] = "failing"
                self._note_error(exc)
                log.warning("the request log could not write a batch: %s", exc)

    def health(self) -> dict[str, Any]:
        """How the writer fares: state ok|failing, the last error, logs moved aside, requests lost."""
        with self._lock:
            pending = len(self._pending)
        return {**self._health, "moved_aside": list(self._health["moved_aside"]), "pending": pending,
                "writer_alive": self._thread.is_alive()}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.flush()
        except Exception as exc:  # a stop must finish even if the last batch cannot be written
            log.warning("the request log could not write its last batch: %s", exc)
        self._writer.close()

    def _query(self, sql: str, params: tuple) -> list[tuple]:
        self.flush()
        with self._write_lock:
            try:
                return self._writer.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:  # broken under us: start a new log, which has no such rows
                self._recover(exc)
                return self._writer.execute(sql, params).fetchall()

    def rows(self, endpoint: str, start: float, end: float) -> list[tuple]:
        return self._query(
            "SELECT ts, endpoint, deployment, status, latency_ms, mirrored, request_id, model_status, pinned, held "
            "FROM requests WHERE endpoint=? AND ts>=? AND ts<? ORDER BY ts", (endpoint, start, end))

    def pairs(self, endpoint: str, start: float, end: float) -> list[tuple]:
        return self._query("SELECT * FROM mirrored_pairs WHERE endpoint=? AND ts>=? AND ts<? ORDER BY ts",
                           (endpoint, start, end))

    def delete_endpoint(self, endpoint: str) -> None:
        self._query("DELETE FROM requests WHERE endpoint=?", (endpoint,))
        self._query("DELETE FROM mirrored_pairs WHERE endpoint=?", (endpoint,))
        self._query("DELETE FROM instance_metrics WHERE endpoint=?", (endpoint,))

    def record_instances(self, rows: list[tuple]) -> None:
        """(ts, endpoint, deployment, instance id, cpu %, memory %) rows: a few every few seconds, written now."""
        if not rows:
            return
        with self._write_lock:
            try:
                self._writer.executemany("INSERT INTO instance_metrics VALUES (?,?,?,?,?,?)", rows)
            except sqlite3.DatabaseError as exc:  # broken under us: a new log, as for requests
                self._recover(exc)
                self._writer.executemany("INSERT INTO instance_metrics VALUES (?,?,?,?,?,?)", rows)

    def instance_rows(self, endpoint: str, start: float, end: float) -> list[tuple]:
        return self._query("SELECT ts, endpoint, deployment, instance_id, cpu_pct, memory_pct FROM instance_metrics "
                           "WHERE endpoint=? AND ts>=? AND ts<? ORDER BY ts", (endpoint, start, end))


# ---- aggregation -----------------------------------------------------------------------------

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
    """`query.validate_query` for what the local platform measures (of the deployment metrics, CPU and memory)."""
    if metric in DEPLOYMENT_METRIC_DIMENSIONS and metric not in INSTANCE_METRICS:
        raise SpecError(f"{metric} is not measured by the local platform: it measures "
                        f"{' and '.join(INSTANCE_METRICS)} of each instance's processes")
    return query.validate_query(metric, aggregation, split_by, deployment_metrics=INSTANCE_METRICS)


def aggregate(rows: Sequence[tuple], metric: str, aggregation: str, grain: str, start: float, end: float,
              filter_text: str | None = None, split_by: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Turn request rows into Azure-style time series: one per split-by combination, aligned buckets.

    Requests held through a platform restart (`held`) are left out: on Azure a control-plane restart does not
    stop the data plane, so its metrics never hold such a wait, and a bake gate would roll back a healthy PROD
    for the platform's outage.
    """
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
        if not 0 <= bucket < n_buckets or row[9]:
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


REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "Average": lambda v: sum(v) / len(v), "Minimum": min, "Maximum": max, "Total": sum, "Count": len}


def aggregate_instances(rows: Sequence[tuple], metric: str, aggregation: str, grain: str, start: float, end: float,
                        filter_text: str | None = None, split_by: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Instance samples (`RequestLog.instance_rows`) as Azure-style series of `metric`, aligned buckets; an
    interval without a sample is None (no data), never 0."""
    split = validate_query(metric, aggregation, split_by)
    node = parse_filter(filter_text, DEPLOYMENT_METRIC_DIMENSIONS[metric])
    column, grain_s = INSTANCE_METRICS[metric], grain_seconds(grain)
    first = math.floor(start / grain_s) * grain_s
    n_buckets = max(1, math.ceil((end - first) / grain_s))
    values: dict[tuple, list[list[float]]] = {}
    for row in rows:
        bucket = int((row[0] - first) // grain_s)
        row_dims = {"deployment": row[2], "instanceId": row[3]}
        if 0 <= bucket < n_buckets and node.matches(row_dims):
            key = tuple(row_dims[d] for d in split)
            values.setdefault(key, [[] for _ in range(n_buckets)])[bucket].append(float(row[column]))
    if not split and not values:
        values[()] = [[] for _ in range(n_buckets)]
    reduce = REDUCERS[aggregation]
    return [{"metric": metric, "aggregation": aggregation, "grain": grain, "dimensions": dict(zip(split, key)),
             "points": [{"timestamp": first + i * grain_s, "value": reduce(b) if b else None}
                        for i, b in enumerate(buckets)]}
            for key, buckets in sorted(values.items())]


def to_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)

