"""The metrics log is not a single point of failure: corrupt, truncated or removed, the platform goes on.

The RequestLog tests use a real SQLite file and the real writer thread; the platform tests start a real
platform in a workspace of their own and stop it.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from saferollout.backends.local.backend import LocalBackend
from saferollout.backends.local.client import platform_status, start_platform, stop_platform
from saferollout.backends.local.metrics import RequestLog
from saferollout.errors import BackendError
from saferollout.specs import EndpointSpec

from echo_platform import wait_for


def requests_rows(n: int, prefix: str) -> list[tuple]:
    now = time.time()
    return [(now, "ep", "blue", 200, 1.0, 0, f"{prefix}{i}", 200, 0, 0) for i in range(n)]


def record(log: RequestLog, rows: list[tuple]) -> None:
    for row in rows:
        log.record(row)


def ids(log: RequestLog) -> set[str]:
    return {row[6] for row in log.rows("ep", 0, time.time() + 60)}


def test_a_corrupt_log_is_moved_aside_with_one_warning_and_a_new_one_started(tmp_path, caplog):
    path = tmp_path / "metrics.db"
    path.write_bytes(b"this is not a database " * 100)
    with caplog.at_level(logging.WARNING, logger="saferollout.platform"):
        log = RequestLog(path)
    try:
        record(log, requests_rows(5, "a"))
        assert ids(log) == {f"a{i}" for i in range(5)}
        [aside] = log.health()["moved_aside"]
        assert Path(aside).read_bytes().startswith(b"this is not a database")
        assert [r.getMessage() for r in caplog.records] == [
            f"the request log {path} could not be read (file is not a database): moved it aside to {aside} "
            "and started a new one"]
    finally:
        log.close()


def test_a_log_truncated_while_running_is_replaced_and_the_writer_keeps_going(tmp_path):
    path = tmp_path / "metrics.db"
    first = RequestLog(path)
    record(first, requests_rows(5000, "old"))
    first.close()  # checkpointed: the rows now live in the main file
    log = RequestLog(path, interval_s=0.05)
    try:
        os.truncate(path, 0)
        record(log, requests_rows(10, "new"))
        wait_for(lambda: log.health()["moved_aside"], 5, what="the writer to notice the truncated log")
        assert ids(log) == {f"new{i}" for i in range(10)}
        health = log.health()
        assert health["state"] == "ok" and health["writer_alive"]
        assert health["last_error"] == "DatabaseError: database disk image is malformed"
        record(log, requests_rows(3, "later"))
        assert {"later0", "later1", "later2"} <= ids(log)
    finally:
        log.close()


def test_a_log_removed_while_running_is_written_again_with_its_history(tmp_path, caplog):
    path = tmp_path / "metrics.db"
    log = RequestLog(path, interval_s=0.05)
    try:
        record(log, requests_rows(5, "before"))
        log.flush()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        with caplog.at_level(logging.WARNING, logger="saferollout.platform"):
            record(log, requests_rows(5, "after"))
            wait_for(path.exists, 5, what="the log to be written again")
            assert ids(log) == {f"before{i}" for i in range(5)} | {f"after{i}" for i in range(5)}
        assert [r.getMessage() for r in caplog.records] == [
            f"the request log {path} was removed while the platform ran: wrote it again from the copy still "
            "open (history kept)"]
    finally:
        log.close()
    reopened = RequestLog(path)
    try:
        assert len(ids(reopened)) == 10  # on disk, not only in memory
    finally:
        reopened.close()


# ---- the platform around it --------------------------------------------------------------------

@pytest.fixture
def home(tmp_path):
    home = tmp_path / "ws"
    try:
        yield home
    finally:
        stop_platform(home)


def test_the_platform_starts_over_a_corrupt_log_and_status_tells(home):
    LocalBackend(home).list_endpoints()
    stop_platform(home)
    (home / "metrics.db").write_bytes(b"\x00garbage" * 512)
    status = start_platform(home, timeout=60)
    [aside] = status["metrics_log"]["moved_aside"]
    assert status["metrics_log"]["state"] == "ok"
    assert "file is not a database" in status["metrics_log"]["last_error"]
    backend = LocalBackend(home)
    backend.create_endpoint(EndpointSpec(name="after-corrupt", auth_mode="key"))
    assert backend.query_metrics("after-corrupt", "RequestsPerMinute")  # queries answer, no 500
    lines = [line for line in (home / "platform.log").read_text().splitlines() if "could not be read" in line]
    assert len(lines) == 1 and aside in lines[0]
    assert platform_status(home)["metrics_log"]["moved_aside"] == [aside]


def test_a_platform_that_cannot_start_fails_the_waiting_client_at_once_with_its_reason(home):
    LocalBackend(home).list_endpoints()
    stop_platform(home)
    (home / "state.db").write_bytes(b"\x00garbage" * 512)
    for stale in ("state.db-wal", "state.db-shm"):
        (home / stale).unlink(missing_ok=True)
    started = time.monotonic()
    with pytest.raises(BackendError, match=r"the local platform for .* did not start: the platform stopped: "
                                           r"DatabaseError: file is not a database \(see .*platform\.log\)"):
        start_platform(home, timeout=60)
    assert time.monotonic() - started < 15


def test_a_log_written_before_pinned_and_held_requests_gets_the_columns_and_keeps_its_rows(tmp_path):
    import sqlite3

    path = tmp_path / "metrics.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE requests (ts REAL NOT NULL, endpoint TEXT NOT NULL, deployment TEXT NOT NULL, "
                "status INTEGER NOT NULL, latency_ms REAL NOT NULL, mirrored INTEGER NOT NULL, "
                "request_id TEXT NOT NULL, model_status INTEGER)")
    old.execute("INSERT INTO requests VALUES (?,?,?,?,?,?,?,?)", (time.time(), "ep", "blue", 200, 1.0, 0, "old", 200))
    old.commit()
    old.close()
    log = RequestLog(path)
    try:
        record(log, [(time.time(), "ep", "blue", 200, 1.0, 0, "new", 200, 1, 1)])
        rows = {row[6]: row for row in log.rows("ep", 0, time.time() + 60)}
        assert rows["old"][8:] == (0, 0) and rows["new"][8:] == (1, 1)  # older rows: routed, not held
    finally:
        log.close()
