"""LocalBackend: the Backend protocol over the local platform's control API and gateway.

A LocalBackend is a short-lived client (a notebook kernel, the CLI, a test): it starts the workspace's
platform process on demand and never owns it.
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable

import requests

from saferollout.backends.base import (Credentials, Deployment, Endpoint, InvokeResult, MetricPoint,
                                       MetricSeries, MirroredPair, Model, Progress, RequestSample)
from saferollout.backends.local.client import start_platform
from saferollout.backends.local.workspace import admin_token, resolve_home
from saferollout.backends.local.gateway import DEPLOYMENT_HEADER
from saferollout.errors import BackendError, Conflict, DeploymentFailed, NotFound, SpecError
from saferollout.specs import DeploymentSpec, EndpointSpec, check_model_type, parse_traffic

ERRORS = {"SpecError": SpecError, "UsageError": SpecError, "NotFound": NotFound, "Conflict": Conflict,
          "BackendError": BackendError}
TERMINAL_STATES = ("Succeeded", "Failed")
DEFAULT_WINDOW = timedelta(hours=1)


def _epoch(moment: datetime | float | None, default: float) -> float:
    if moment is None:
        return default
    if isinstance(moment, (int, float)):
        return float(moment)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


class LocalBackend:
    """The embedded default backend: a real endpoint platform on this machine."""

    name = "local"
    supports_raw_samples = True
    metrics_delay_s = 0.0  # a query flushes the request log first
    supports_mirrored_pairs = True
    finest_grain = "PT5S"  # the request log holds every request: any grain works; 5 s is what plots use

    def __init__(self, home: str | os.PathLike | None = None, autostart: bool = True):
        self.home = resolve_home(home)
        self.autostart = autostart
        self._session = requests.Session()
        self._info: dict[str, Any] | None = None
        self._credentials: dict[str, Credentials] = {}

    # ---- plumbing ---------------------------------------------------------------------------
    def _platform(self) -> dict[str, Any]:
        if self._info is None:
            if self.autostart:
                self._info = start_platform(self.home)
            else:
                path = self.home / "platform.json"
                if not path.exists():
                    raise BackendError(f"the local platform is not running for {self.home}: "
                                       "run `saferollout local start`")
                self._info = json.loads(path.read_text())
        return self._info

    def _call(self, method: str, path: str, body: Any = None, params: dict | None = None,
              timeout: float = 60.0) -> Any:
        for attempt in range(2):
            info = self._platform()
            url = f"http://127.0.0.1:{info['control_port']}/api{path}"
            try:
                resp = self._session.request(method, url, json=body, params=params, timeout=timeout,
                                             headers={"Authorization": f"Bearer {admin_token(self.home)}"})
                break
            except requests.ConnectionError as exc:
                self._info = None  # the platform restarted or stopped: find (or start) it again
                if attempt == 1 or not self.autostart:
                    raise BackendError(f"cannot reach the local platform for {self.home}: {exc}", exc) from exc
        data = resp.json()
        if resp.status_code >= 400:
            error = data.get("error", {})
            cls = ERRORS.get(error.get("type"), BackendError)
            raise cls(error.get("message") or f"platform answered {resp.status_code}")
        return data

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self._platform()['gateway_port']}"

    # ---- models -----------------------------------------------------------------------------
    def register_model(self, name: str, path: str, *, description: str = "", tags: dict[str, str] | None = None,
                       properties: dict[str, str] | None = None, type: str = "custom_model") -> Model:
        if not Path(path).expanduser().exists():
            raise SpecError(f"model path does not exist: {path}")
        check_model_type(path, type)
        data = self._call("POST", "/models", {"name": name, "path": str(Path(path).expanduser().resolve()),
                                              "description": description, "tags": tags or {},
                                              "properties": {k: str(v) for k, v in (properties or {}).items()},
                                              "type": type})
        return Model(**data)

    def get_model(self, name: str, version: int | str | None = None) -> Model:
        which = "latest" if version in (None, "latest", "@latest") else str(version)
        return Model(**self._call("GET", f"/models/{name}/{which}"))

    def list_models(self, name: str | None = None) -> list[Model]:
        return [Model(**m) for m in self._call("GET", "/models", params={"name": name} if name else None)]

    # ---- endpoints --------------------------------------------------------------------------
    def create_endpoint(self, spec: EndpointSpec) -> Endpoint:
        return Endpoint(**self._call("POST", "/endpoints", _endpoint_body(spec)))

    def get_endpoint(self, name: str) -> Endpoint:
        return Endpoint(**self._call("GET", f"/endpoints/{name}"))

    def list_endpoints(self) -> list[Endpoint]:
        return [Endpoint(**e) for e in self._call("GET", "/endpoints")]

    def update_endpoint(self, name: str, *, traffic: dict[str, int] | None = None,
                        mirror_traffic: dict[str, int] | None = None, tags: dict[str, str] | None = None,
                        description: str | None = None, set_tags: dict[str, str] | None = None,
                        remove_tags: Iterable[str] = ()) -> Endpoint:
        body = {"traffic": None if traffic is None else parse_traffic(traffic),
                "mirror_traffic": None if mirror_traffic is None else parse_traffic(mirror_traffic, "mirror_traffic"),
                "tags": tags, "description": description, "set_tags": set_tags,
                "remove_tags": list(remove_tags) or None}
        return Endpoint(**self._call("PATCH", f"/endpoints/{name}", body))

    def delete_endpoint(self, name: str) -> None:
        self._call("DELETE", f"/endpoints/{name}", timeout=120)
        self._credentials.pop(name, None)

    def get_credentials(self, name: str) -> Credentials:
        return Credentials(**self._call("GET", f"/endpoints/{name}/credentials"))

    def regenerate_keys(self, name: str, key_type: str = "primary") -> Credentials:
        self._credentials.pop(name, None)
        return Credentials(**self._call("POST", f"/endpoints/{name}/regenerate-keys", {"key_type": key_type}))

    # ---- deployments ------------------------------------------------------------------------
    def create_deployment(self, spec: DeploymentSpec, *, wait: bool = True,
                          progress: Progress | None = None) -> Deployment:
        data = self._call("POST", f"/endpoints/{spec.endpoint_name}/deployments", spec.to_dict())
        return self._wait(spec.endpoint_name, spec.name, progress) if wait else Deployment(**data)

    def update_deployment(self, spec: DeploymentSpec, *, wait: bool = True,
                          progress: Progress | None = None) -> Deployment:
        data = self._call("PUT", f"/endpoints/{spec.endpoint_name}/deployments/{spec.name}", spec.to_dict())
        return self._wait(spec.endpoint_name, spec.name, progress) if wait else Deployment(**data)

    def _wait(self, endpoint: str, name: str, progress: Progress | None) -> Deployment:
        """Wait for a terminal state; a Failed deployment raises DeploymentFailed with its reason and log."""
        started, last = time.monotonic(), ""
        while True:
            dep = self.get_deployment(endpoint, name)
            states = ", ".join(f"{i['name']}: {i['state']}" for i in dep.instances) or "starting instances"
            line = f"{endpoint}/{name}: {dep.provisioning_state} ({states}) {time.monotonic() - started:.0f}s"
            if progress is not None and line != last:
                progress(line)
                last = line
            if dep.provisioning_state in TERMINAL_STATES:
                break
            time.sleep(0.2)
        if dep.provisioning_state == "Failed":
            logs = self.get_deployment_logs(endpoint, name, lines=40)
            raise DeploymentFailed(f"deployment {name!r} on {endpoint!r} failed: {dep.reason}", dep.reason, logs)
        return dep

    def get_deployment(self, endpoint: str, name: str) -> Deployment:
        return Deployment(**self._call("GET", f"/endpoints/{endpoint}/deployments/{name}"))

    def list_deployments(self, endpoint: str) -> list[Deployment]:
        return [Deployment(**d) for d in self._call("GET", f"/endpoints/{endpoint}/deployments")]

    def delete_deployment(self, endpoint: str, name: str) -> None:
        self._call("DELETE", f"/endpoints/{endpoint}/deployments/{name}", timeout=120)

    def get_deployment_logs(self, endpoint: str, name: str, lines: int | None = None) -> str:
        params = {"lines": lines} if lines else None
        return self._call("GET", f"/endpoints/{endpoint}/deployments/{name}/logs", params=params)["logs"]

    # ---- data plane -------------------------------------------------------------------------
    def _bearer(self, endpoint: str) -> str:
        cred = self._credentials.get(endpoint)
        if cred is None or (cred.expiry_time_utc is not None and cred.expiry_time_utc - time.time() < 60):
            cred = self._credentials[endpoint] = self.get_credentials(endpoint)
        return cred.bearer

    def invoke(self, endpoint: str, body: bytes | str | dict | list, *, deployment: str | None = None,
               timeout_s: float = 60.0) -> InvokeResult:
        payload = body if isinstance(body, bytes) else (body.encode() if isinstance(body, str)
                                                        else json.dumps(body).encode())
        headers = {"Authorization": f"Bearer {self._bearer(endpoint)}", "Content-Type": "application/json"}
        if deployment:
            headers[DEPLOYMENT_HEADER] = deployment
        started = time.perf_counter()
        try:
            resp = self._session.post(f"{self.gateway_url}/endpoints/{endpoint}/score", data=payload,
                                      headers=headers, timeout=timeout_s)
        except requests.RequestException as exc:
            raise BackendError(f"cannot reach endpoint {endpoint!r}: {exc}", exc) from exc
        if resp.status_code == 401:  # keys may have been regenerated since we cached them
            self._credentials.pop(endpoint, None)
        return InvokeResult(status=resp.status_code, body=resp.content,
                            deployment=resp.headers.get(DEPLOYMENT_HEADER),
                            request_id=resp.headers.get("x-request-id"),
                            latency_ms=(time.perf_counter() - started) * 1000.0, headers=dict(resp.headers))

    # ---- metrics ----------------------------------------------------------------------------
    def query_metrics(self, endpoint: str, metric: str, *, aggregation: str = "Average", grain: str = "PT1M",
                      start: datetime | None = None, end: datetime | None = None, filter: str | None = None,
                      split_by: Iterable[str] = ()) -> list[MetricSeries]:
        now = time.time()
        params = {"metric": metric, "aggregation": aggregation, "grain": grain,
                  "start": _epoch(start, now - DEFAULT_WINDOW.total_seconds()), "end": _epoch(end, now),
                  "filter": filter or "", "split_by": ",".join(split_by)}
        series = self._call("GET", f"/endpoints/{endpoint}/metrics", params=params)
        return [MetricSeries(metric=s["metric"], aggregation=s["aggregation"], grain=s["grain"],
                             dimensions=s["dimensions"],
                             points=[MetricPoint(datetime.fromtimestamp(p["timestamp"], tz=timezone.utc), p["value"])
                                     for p in s["points"]]) for s in series]

    def request_samples(self, endpoint: str, *, deployment: str | None = None, start: datetime | None = None,
                        end: datetime | None = None, include_mirrored: bool = False) -> list[RequestSample]:
        now = time.time()
        params = {"start": _epoch(start, now - DEFAULT_WINDOW.total_seconds()), "end": _epoch(end, now),
                  "include_mirrored": "true" if include_mirrored else "false"}
        if deployment:
            params["deployment"] = deployment
        return [RequestSample(**s) for s in self._call("GET", f"/endpoints/{endpoint}/samples", params=params)]

    def mirrored_pairs(self, endpoint: str, *, start: datetime | None = None,
                       end: datetime | None = None) -> list[MirroredPair]:
        now = time.time()
        params = {"start": _epoch(start, now - DEFAULT_WINDOW.total_seconds()), "end": _epoch(end, now)}
        rows = self._call("GET", f"/endpoints/{endpoint}/mirrored-pairs", params=params)
        return [MirroredPair(**{k: (v.encode() if k.endswith("_body") else v) for k, v in row.items()})
                for row in rows]


def _endpoint_body(spec: EndpointSpec) -> dict[str, Any]:
    return {"name": spec.name, "auth_mode": spec.auth_mode, "description": spec.description, "tags": spec.tags,
            "properties": spec.properties, "traffic": spec.traffic, "mirror_traffic": spec.mirror_traffic}

