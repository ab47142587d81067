"""The fake Azure workspace's state: JSON in a directory, shared by every process that points at it.

Notebook kernels started by the runbook are separate processes, so the fake keeps its state on disk
(`state.json`, guarded by an advisory file lock) and its per-request log in `requests.jsonl`; the
registered model files and deployment code snapshots live beside them, as Azure keeps them in the
workspace's storage.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from saferollout.backends.local.metrics import request_row

SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
RESOURCE_GROUP = "rg-saferollout-fake"
WORKSPACE = "ws-saferollout-fake"
REGION = "westeurope"
MAX_MIRROR = 50


def new_key() -> str:
    return secrets.token_urlsafe(32)


class FakeWorkspaceState:
    """Read-modify-write transactions over state.json; every process sees the others' changes."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "state.json"
        self.lock_path = self.root / "state.lock"
        self.requests_path = self.root / "requests.jsonl"
        # a storage account name of its own (3-24 lowercase letters and digits): the SDK's blob clients are
        # routed to this workspace's transport by the account they address, so two fakes in one process
        # (a session's and a test's) never receive each other's uploads
        self.storage_account = "srfake" + hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:14]
        if not self.path.exists():
            with self.transaction() as state:
                state.update({"models": {}, "endpoints": {}, "deployments": {}, "tokens": {}, "codes": {},
                              "environments": {}, "operations": {}})

    @contextmanager
    def transaction(self) -> Iterator[dict[str, Any]]:
        """Exclusive access; the state is written back only if the block does not raise (state unchanged)."""
        with open(self.lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = json.loads(self.path.read_text()) if self.path.exists() else {}
                yield state
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
                tmp.replace(self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> dict[str, Any]:
        with open(self.lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            try:
                return json.loads(self.path.read_text())
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ---- ids and uris (what Azure would call them) --------------------------------------------
    @staticmethod
    def workspace_id() -> str:
        return (f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
                f"Microsoft.MachineLearningServices/workspaces/{WORKSPACE}")

    def endpoint_id(self, name: str) -> str:
        return f"{self.workspace_id()}/onlineEndpoints/{name}"

    @staticmethod
    def scoring_uri(name: str) -> str:
        return f"https://{name}.{REGION}.inference.ml.azure.com/score"

    def model_id(self, name: str, version: int) -> str:
        return f"{self.workspace_id()}/models/{name}/versions/{version}"

    # ---- storage -------------------------------------------------------------------------------
    def store_model_files(self, name: str, version: int, source: Path) -> Path:
        """Copy a model into the workspace; a folder `model/` appears as $AZUREML_MODEL_DIR/model/."""
        target = self.root / "models" / name / str(version)
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        if source.is_dir():
            shutil.copytree(source, target / source.name)
        else:
            shutil.copy2(source, target / source.name)
        return target

    def snapshot_code(self, endpoint: str, deployment: str, version: str, code: Path) -> Path:
        """Code is uploaded once per deployment version and never changes afterwards."""
        target = self.root / "code" / endpoint / deployment / version
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(code, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints"))
        return target

    def log_path(self, endpoint: str, deployment: str) -> Path:
        path = self.root / "logs" / endpoint / f"{deployment}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def append_log(self, endpoint: str, deployment: str, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with open(self.log_path(endpoint, deployment), "a") as log:
            for line in text.rstrip("\n").splitlines():
                log.write(f"{stamp} {line}\n")

    # ---- the request log that the fake Azure Monitor aggregates ------------------------------------
    def record_request(self, row: tuple) -> None:
        with open(self.lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(self.requests_path, "a") as log:
                    log.write(json.dumps(list(row)) + "\n")
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def record_usage(self, row: dict[str, Any]) -> None:
        """What a serving process measured for one request (CPU seconds, memory), for instance metrics."""
        with open(self.lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(self.root / "usage.jsonl", "a") as log:
                    log.write(json.dumps(row) + "\n")
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def usage_rows(self, endpoint: str, deployment: str, start: float, end: float) -> list[dict[str, Any]]:
        path = self.root / "usage.jsonl"
        if not path.exists():
            return []
        rows = (json.loads(line) for line in self._read_locked(path).splitlines())
        return [r for r in rows if r["endpoint"] == endpoint and r["deployment"] == deployment
                and start <= r["ts"] < end]

    def _read_locked(self, path: Path) -> str:
        """A log as the writers left it: under the lock, so a line being appended is never read half-written."""
        with open(self.lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            try:
                return path.read_text()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def request_rows(self, endpoint: str, start: float, end: float) -> list[tuple]:
        if not self.requests_path.exists():
            return []
        rows = []
        for line in self._read_locked(self.requests_path).splitlines():
            row = request_row(*json.loads(line))
            if row[1] == endpoint and start <= row[0] < end:
                rows.append(row)
        return rows
