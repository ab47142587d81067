"""SQLite workspace state: the local control plane's source of truth.

The platform process is the only writer. Everything a restart must bring back lives here: models,
endpoints (keys, traffic, mirror, tags) and deployments (their spec and desired state). Per-request
metrics live in a second database (see `metrics.py`) so that recording never contends with control calls.
"""
from __future__ import annotations

import json
import secrets
import shutil
import sqlite3
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from saferollout.errors import Conflict, NotFound, SpecError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL, description TEXT NOT NULL,
    tags TEXT NOT NULL, properties TEXT NOT NULL, type TEXT NOT NULL, created_at TEXT NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS endpoints (
    name TEXT PRIMARY KEY, auth_mode TEXT NOT NULL, description TEXT NOT NULL, tags TEXT NOT NULL,
    properties TEXT NOT NULL, traffic TEXT NOT NULL, mirror_traffic TEXT NOT NULL,
    primary_key TEXT NOT NULL, secondary_key TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deployments (
    endpoint TEXT NOT NULL, name TEXT NOT NULL, spec TEXT NOT NULL, model_ref TEXT,
    model_dir TEXT, code_dir TEXT, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    generation INTEGER NOT NULL DEFAULT 1, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    PRIMARY KEY (endpoint, name));
"""


def new_key() -> str:
    """A 256-bit random key, URL-safe."""
    return secrets.token_urlsafe(32)


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Store:
    """Workspace state under `home`: `state.db` plus copied model and code files."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.home / "state.db", isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # meta ------------------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row["value"] if row else default

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def signing_key(self) -> bytes:
        """The secret that signs aml_token tokens; made once per workspace."""
        value = self.get_meta("token_signing_key")
        if value is None:
            value = secrets.token_hex(32)
            self.set_meta("token_signing_key", value)
        return bytes.fromhex(value)

    # models ----------------------------------------------------------------------------------
    def register_model(self, name: str, source: str, description: str, tags: dict, properties: dict,
                       type_: str = "custom_model") -> dict[str, Any]:
        """Copy `source` and record it as the next version of `name` (both steps here: for tests and tools)."""
        return self.add_model(name, self.copy_model(source), description, tags, properties, type_)

    def copy_model(self, source: str) -> Path:
        """Copy a model file or folder into the workspace's staging area; no database access, so it may run
        in a worker thread while the platform keeps serving. -> the staged copy (keeping the source's name).
        """
        src = Path(source).expanduser()
        if not src.exists():
            raise SpecError(f"model path does not exist: {src}")
        staging = self.home / "models" / ".staging" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            # A model version never changes once registered: copy, and keep the source's base name so a
            # folder model `model/` appears as $AZUREML_MODEL_DIR/model/... as on Azure.
            if src.is_dir():
                shutil.copytree(src, staging / src.name)
            else:
                shutil.copy2(src, staging / src.name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging / src.name

    def add_model(self, name: str, staged: Path, description: str, tags: dict, properties: dict,
                  type_: str = "custom_model") -> dict[str, Any]:
        """Record a staged copy (see copy_model) as the next version of `name`: a rename, quick."""
        with self._transaction():
            row = self.db.execute("SELECT MAX(version) AS v FROM models WHERE name=?", (name,)).fetchone()
            version = (row["v"] or 0) + 1
            target = self.home / "models" / name / str(version)
            if target.exists():  # left over from an interrupted registration
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            staged.parent.rename(target)
            self.db.execute(
                "INSERT INTO models VALUES (?,?,?,?,?,?,?,?)",
                (name, version, str(target / staged.name), description, json.dumps(tags),
                 json.dumps(properties), type_, utcnow()))
        return self.get_model(name, version)

    def get_model(self, name: str, version: int | None = None) -> dict[str, Any]:
        if version is None:
            row = self.db.execute("SELECT * FROM models WHERE name=? ORDER BY version DESC LIMIT 1",
                                  (name,)).fetchone()
        else:
            row = self.db.execute("SELECT * FROM models WHERE name=? AND version=?", (name, version)).fetchone()
        if row is None:
            which = f"{name}:{version}" if version is not None else name
            raise NotFound(f"model {which} not found")
        return self._model_row(row)

    def list_models(self, name: str | None = None) -> list[dict[str, Any]]:
        if name:
            rows = self.db.execute("SELECT * FROM models WHERE name=? ORDER BY version", (name,))
        else:
            rows = self.db.execute("SELECT * FROM models ORDER BY name, version")
        return [self._model_row(r) for r in rows]

    @staticmethod
    def _model_row(row: sqlite3.Row) -> dict[str, Any]:
        return {"name": row["name"], "version": row["version"], "path": row["path"],
                "description": row["description"], "tags": json.loads(row["tags"]),
                "properties": json.loads(row["properties"]), "type": row["type"],
                "created_at": row["created_at"]}

    # endpoints -------------------------------------------------------------------------------
    def create_endpoint(self, spec: dict[str, Any]) -> dict[str, Any]:
        if self.db.execute("SELECT 1 FROM endpoints WHERE name=?", (spec["name"],)).fetchone():
            raise Conflict(f"endpoint {spec['name']!r} already exists")
        self.db.execute(
            "INSERT INTO endpoints VALUES (?,?,?,?,?,?,?,?,?,?)",
            (spec["name"], spec["auth_mode"], spec.get("description", ""), json.dumps(spec.get("tags", {})),
             json.dumps(spec.get("properties", {})), json.dumps({}), json.dumps({}), new_key(), new_key(),
             utcnow()))
        return self.get_endpoint(spec["name"])

    def get_endpoint(self, name: str) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM endpoints WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"endpoint {name!r} not found")
        return {"name": row["name"], "auth_mode": row["auth_mode"], "description": row["description"],
                "tags": json.loads(row["tags"]), "properties": json.loads(row["properties"]),
                "traffic": json.loads(row["traffic"]), "mirror_traffic": json.loads(row["mirror_traffic"]),
                "primary_key": row["primary_key"], "secondary_key": row["secondary_key"],
                "created_at": row["created_at"]}

    def list_endpoints(self) -> list[dict[str, Any]]:
        names = [r["name"] for r in self.db.execute("SELECT name FROM endpoints ORDER BY name")]
        return [self.get_endpoint(n) for n in names]

    def update_endpoint(self, name: str, **fields: Any) -> dict[str, Any]:
        self.get_endpoint(name)
        allowed = {"traffic", "mirror_traffic", "tags", "description", "primary_key", "secondary_key"}
        for key, value in fields.items():
            if key not in allowed:
                raise ValueError(key)
            stored = json.dumps(value) if isinstance(value, dict) else value
            self.db.execute(f"UPDATE endpoints SET {key}=? WHERE name=?", (stored, name))
        return self.get_endpoint(name)

    def delete_endpoint(self, name: str) -> None:
        with self._transaction():
            self.db.execute("DELETE FROM deployments WHERE endpoint=?", (name,))
            self.db.execute("DELETE FROM endpoints WHERE name=?", (name,))

    # deployments -----------------------------------------------------------------------------
    def create_deployment(self, endpoint: str, name: str, spec: dict, model_ref: str | None,
                          model_dir: str | None, code_dir: str | None) -> dict[str, Any]:
        now = utcnow()
        self.db.execute(
            "INSERT INTO deployments (endpoint, name, spec, model_ref, model_dir, code_dir, state, reason,"
            " generation, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (endpoint, name, json.dumps(spec), model_ref, model_dir, code_dir, "Creating", "", 1, now, now))
        return self.get_deployment(endpoint, name)

    def get_deployment(self, endpoint: str, name: str) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM deployments WHERE endpoint=? AND name=?", (endpoint, name)).fetchone()
        if row is None:
            raise NotFound(f"deployment {name!r} not found on endpoint {endpoint!r}")
        return self._deployment_row(row)

    def list_deployments(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        if endpoint is None:
            rows = self.db.execute("SELECT * FROM deployments ORDER BY endpoint, name")
        else:
            rows = self.db.execute("SELECT * FROM deployments WHERE endpoint=? ORDER BY name", (endpoint,))
        return [self._deployment_row(r) for r in rows]

    def update_deployment(self, endpoint: str, name: str, **fields: Any) -> dict[str, Any]:
        allowed = {"spec", "model_ref", "model_dir", "code_dir", "state", "reason", "generation"}
        for key, value in fields.items():
            if key not in allowed:
                raise ValueError(key)
            stored = json.dumps(value) if key == "spec" else value
            self.db.execute(f"UPDATE deployments SET {key}=?, updated_at=? WHERE endpoint=? AND name=?",
                            (stored, utcnow(), endpoint, name))
        return self.get_deployment(endpoint, name)

    def delete_deployment(self, endpoint: str, name: str) -> None:
        self.db.execute("DELETE FROM deployments WHERE endpoint=? AND name=?", (endpoint, name))

    def remove_code(self, endpoint: str, name: str | None = None) -> None:
        """Remove the code snapshots of a deleted endpoint or deployment (no database access: any thread)."""
        folder = self.home / "code" / endpoint
        shutil.rmtree(folder / name if name else folder, ignore_errors=True)

    @staticmethod
    def _deployment_row(row: sqlite3.Row) -> dict[str, Any]:
        return {"endpoint": row["endpoint"], "name": row["name"], "spec": json.loads(row["spec"]),
                "model_ref": row["model_ref"], "model_dir": row["model_dir"], "code_dir": row["code_dir"],
                "state": row["state"], "reason": row["reason"], "generation": row["generation"],
                "created_at": row["created_at"], "updated_at": row["updated_at"]}

    def snapshot_code(self, endpoint: str, name: str, generation: int, code_path: str) -> str:
        """Copy the deployment's code folder, as Azure snapshots it, so later edits change nothing live.

        No database access: the platform runs it in a worker thread, so a large folder never stalls requests.
        """
        target = self.home / "code" / endpoint / name / str(generation)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(code_path, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".git"))
        return str(target)

    def _transaction(self) -> "_Tx":
        return _Tx(self.db)


class _Tx:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")

