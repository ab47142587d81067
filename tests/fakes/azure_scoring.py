"""The fake managed endpoint's data plane: runs a deployment's scoring script in-process, as a container would.

`ScoringRuntime` imports the deployment's `score.py` from its code snapshot, calls `init()` with
`AZUREML_MODEL_DIR` and the deployment's environment variables set, then `run(raw_data)` per request.
`FakeScoringSession` is the HTTP session the backend posts to: it answers like Azure's gateway (401, 404,
400, 424 with the model's status, the `azureml-model-deployment` answer header, mirror traffic) and records
every request for the fake Azure Monitor.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator
from urllib.parse import urlparse

import requests
from requests.structures import CaseInsensitiveDict

from fakes.azure_state import FakeWorkspaceState
from saferollout.backends.local import mlflow_scoring

DEPLOYMENT_HEADER = "azureml-model-deployment"
_ENV_LOCK = threading.RLock()  # os.environ is process-wide: one scoring call at a time patches it


@contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for key, old in saved.items():
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old


class ScoringRuntime:
    """Loaded scoring scripts of this process, one per deployment version (its `uid`)."""

    def __init__(self, state: FakeWorkspaceState):
        self.state = state
        self._modules: dict[tuple[str, str, str], ModuleType] = {}

    @staticmethod
    def environment(record: dict[str, Any]) -> dict[str, str]:
        env = dict(record.get("environment_variables") or {})
        if record.get("model_dir"):
            env["AZUREML_MODEL_DIR"] = record["model_dir"]
        return env

    def load(self, endpoint: str, record: dict[str, Any]) -> ModuleType:
        """Import and init() the script (raises what init() raises: the deployment then fails)."""
        key = (endpoint, record["name"], record["uid"])  # a re-created deployment is a new container
        module = self._modules.get(key)
        if module is not None:
            return module
        script = Path(record["code_dir"]) / record["scoring_script"] if record.get("scoring_script") \
            else Path(mlflow_scoring.__file__)  # no-code MLflow: the service's own script, ours stands in
        spec = importlib.util.spec_from_file_location(
            f"fake_azure_score_{endpoint}_{record['name']}_{record['uid']}".replace("-", "_"), script)
        module = importlib.util.module_from_spec(spec)
        with patched_environ(self.environment(record)):
            spec.loader.exec_module(module)
            module.init()
        self._modules[key] = module
        return module

    def provision(self, endpoint: str, record: dict[str, Any]) -> str | None:
        """Start the 'container': None when init() succeeded, else the failure reason (also logged)."""
        self.state.append_log(endpoint, record["name"],
                              f"Starting inference server for deployment {record['name']} "
                              f"(generation {record['generation']}, {record['instance_count']} instance(s))")
        try:
            self.load(endpoint, record)
        except BaseException as exc:  # noqa: BLE001 - whatever init() raises fails the deployment
            self.state.append_log(endpoint, record["name"], "init() failed:\n" + traceback.format_exc())
            return f"{type(exc).__name__}: {exc}"
        self.state.append_log(endpoint, record["name"], "Scoring script init() completed; ready for requests")
        return None

    def run(self, endpoint: str, record: dict[str, Any], body: bytes) -> tuple[int, bytes, float]:
        """-> (model server status, body, milliseconds in run()). A raising run() is a 500.

        Only run() is timed: a container's init() happens before it takes traffic, and waiting for this
        process's environment lock is an artefact of the fake, not latency a deployment would show."""
        started = None
        try:
            module = self.load(endpoint, record)
            with patched_environ(self.environment(record)):
                started = time.perf_counter()
                run = module.run if record.get("scoring_script") else module.predict  # no-code: raises on
                answer = run(body.decode("utf-8"))  # bad input, as Azure's own MLflow script does (a 500)
                elapsed_ms = (time.perf_counter() - started) * 1000.0
        except BaseException as exc:  # noqa: BLE001 - the model server turns any error into a 500
            elapsed_ms = 0.0 if started is None else (time.perf_counter() - started) * 1000.0
            self.state.append_log(endpoint, record["name"], "run() failed:\n" + traceback.format_exc(limit=3))
            return 500, json.dumps({"message": f"{type(exc).__name__}: {exc}"}).encode(), elapsed_ms
        return 200, (answer if isinstance(answer, bytes) else json.dumps(answer).encode()), elapsed_ms


def _rss_bytes() -> int:
    """This process's resident memory (the 'container' is this process in the fake)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _response(status: int, body: bytes, headers: dict[str, str], url: str) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = body
    response.headers = CaseInsensitiveDict({"Content-Type": "application/json", **headers})
    response.url = url
    response.encoding = "utf-8"
    return response


class FakeScoringSession:
    """Stands in for `requests.Session` when the backend posts to a fake endpoint's scoring URI."""

    def __init__(self, state: FakeWorkspaceState, runtime: ScoringRuntime, rng: random.Random | None = None):
        self.state = state
        self.runtime = runtime
        self.rng = rng or random.Random()

    def close(self) -> None:
        pass

    def post(self, url: str, data: bytes | str | None = None, headers: dict | None = None,
             timeout: float | None = None, **kwargs: Any) -> requests.Response:
        """Like `requests.Session.post` with a `data=` body (what AzureBackend.invoke sends)."""
        headers = CaseInsensitiveDict(headers or {})
        body = data if isinstance(data, bytes) else (data or "").encode()
        host = urlparse(url).hostname or ""
        endpoint = host.split(".", 1)[0]
        snapshot = self.state.read()
        record = snapshot["endpoints"].get(endpoint)
        if record is None or not host.endswith(".inference.ml.azure.com"):
            raise requests.ConnectionError(f"Failed to resolve '{host}' (fake Azure: no such endpoint)")
        request_id = str(uuid.uuid4())
        ids = {"x-request-id": request_id, "x-ms-request-id": request_id}
        refusal = self._authorize(snapshot, record, headers.get("Authorization", ""))
        if refusal:
            return _response(401, json.dumps({"message": refusal}).encode(), ids, url)
        try:
            json.loads(body)
        except ValueError as exc:
            return _response(400, json.dumps({"message": f"malformed JSON in request body: {exc}"}).encode(),
                             ids, url)
        deployments = snapshot["deployments"].get(endpoint, {})
        pinned = headers.get(DEPLOYMENT_HEADER)
        if pinned:
            pinned = next((name for name in deployments if name.lower() == pinned.lower()), pinned)
            if pinned not in deployments:
                return _response(404, json.dumps({"message": f"deployment {pinned!r} not found on endpoint "
                                                             f"{endpoint!r}"}).encode(), ids, url)
            chosen = pinned
        else:
            chosen = self._choose(record["traffic"])
            if chosen is None:
                return _response(404, json.dumps({"message": "No valid deployments to route to. Please check "
                                                             "that the endpoint has at least one deployment "
                                                             "with positive weight values or use a deployment "
                                                             "specific header to route."}).encode(), ids, url)
        answer = self._serve(endpoint, deployments[chosen], body, request_id, mirrored=False, url=url)
        if not pinned:
            for mirror, percent in record["mirror_traffic"].items():
                if mirror in deployments and self.rng.random() * 100 < percent:
                    self._serve(endpoint, deployments[mirror], body, request_id, mirrored=True, url=url)
        return answer

    def _authorize(self, snapshot: dict[str, Any], record: dict[str, Any], header: str) -> str | None:
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            return "missing credentials: send 'Authorization: Bearer <key or token>'"
        credential = credential.strip()
        if record["auth_mode"] == "key":
            return None if credential in (record["primary_key"], record["secondary_key"]) else "invalid key"
        token = snapshot["tokens"].get(credential)
        if token is None or token["endpoint"] != record["name"]:
            return "invalid token"
        return None if token["expiry"] > time.time() else "token expired"

    def _choose(self, traffic: dict[str, int]) -> str | None:
        live = [(name, percent) for name, percent in sorted(traffic.items()) if percent > 0]
        if not live:
            return None
        pick = self.rng.random() * sum(p for _, p in live)
        for name, percent in live:
            pick -= percent
            if pick < 0:
                return name
        return live[-1][0]

    def _serve(self, endpoint: str, deployment: dict[str, Any], body: bytes, request_id: str, mirrored: bool,
               url: str) -> requests.Response:
        arrival = time.time()
        headers = {DEPLOYMENT_HEADER: deployment["name"], "x-request-id": request_id, "x-ms-request-id": request_id}
        if not deployment.get("serving"):  # its first version never started: nothing can answer
            status, payload, model_status, latency_ms = 424, json.dumps(
                {"message": f"deployment {deployment['name']!r} failed and cannot serve requests"}).encode(), None, 0.0
        else:
            cpu_started = time.thread_time()
            model_status, payload, latency_ms = self.runtime.run(endpoint, deployment, body)
            self.state.record_usage({"ts": arrival, "endpoint": endpoint, "deployment": deployment["name"],
                                     "instance": f"{deployment['name']}-{deployment['uid'][:6]}-0",
                                     "cpu_s": time.thread_time() - cpu_started, "rss": _rss_bytes(),
                                     "total_memory": _total_memory()})
            status = 200 if model_status == 200 else 424
            if status != 200:
                headers["ms-azureml-model-error-statuscode"] = str(model_status)
        self.state.record_request((arrival, endpoint, deployment["name"], status, latency_ms, int(mirrored),
                                   request_id, model_status))
        return _response(status, payload, headers, url)
