"""AzureBackend: the Backend protocol over Azure ML managed online endpoints (azure-ai-ml, Azure Monitor).

The same specs (read from the same CLI v2 YAML files) and the same rules as the local platform: traffic and
mirror rules are checked here before anything is sent, so a bad request fails with the local backend's
message and leaves the workspace unchanged; Azure enforces them again on its side.

Keys and tokens are read when a request needs them and kept only in memory: they are never printed, logged,
put in an error message or returned by anything but `get_credentials` / `regenerate_keys`.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import redirect_stdout
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable

from azure.ai.ml.exceptions import ValidationException

from saferollout.backends.azure import metrics as azure_metrics
from saferollout.backends.azure.entities import (credentials_from_sdk, deployment_entity, deployment_from_sdk,
                                                 endpoint_entity, endpoint_from_sdk, model_entity,
                                                 model_from_sdk)
from saferollout.backends.azure.errors import error_detail, sdk_errors
from saferollout.backends.azure.settings import AzureClients, AzureSettings, build_clients, build_metrics_client
from saferollout.backends.base import (DEPLOYMENT_METRIC_DIMENSIONS, Credentials, Deployment, Endpoint,
                                       InvokeResult, MetricSeries, MirroredPair, Model, Progress,
                                       RequestSample)
from saferollout.errors import (BackendError, Conflict, DeploymentFailed, NotFound, SafeRolloutError,
                               SpecError)
from saferollout.specs import (DeploymentSpec, EndpointSpec, check_model_type, check_no_code_model, check_scoring,
                               model_type_of, parse_model_ref, parse_traffic, validate_mirror, validate_model_name,
                               validate_name, validate_traffic)

DEPLOYMENT_HEADER = "azureml-model-deployment"
DEFAULT_WINDOW = timedelta(hours=1)
DEFAULT_LOG_LINES = 500
# how long a failed resource waits for its operation's poller to see the end (`_failure_reason`)
OPERATION_SETTLE_S = 15.0


def _lower_keys(mapping: dict[str, int]) -> dict[str, int]:
    return {str(k).lower(): v for k, v in mapping.items()}


class AzureBackend:
    """Azure ML managed online endpoints, through `MLClient` and Azure Monitor."""

    name = "azure"
    supports_raw_samples = False
    metrics_delay_s = 180.0  # Azure Monitor's ingestion delay, about 1-3 minutes (docs/azure.md)
    supports_mirrored_pairs = False
    finest_grain = "PT1M"  # Azure Monitor's finest grain for online endpoints

    def __init__(self, *, subscription_id: str | None = None, resource_group: str | None = None,
                 workspace_name: str | None = None, config_path: str | None = None,
                 client_factory: str | None = None, ml_client: Any = None, metrics_client: Any = None,
                 http_session: Any = None, credential: Any = None, poll_interval_s: float = 5.0,
                 **unknown: Any):
        if unknown:  # a typo such as `workspace=` must not silently fall back to another workspace
            raise SpecError(f"unknown azure backend setting(s) {', '.join(sorted(unknown))}: use subscription_id, "
                            "resource_group, workspace_name, config_path or client_factory")
        self.settings = AzureSettings.resolve(subscription_id, resource_group, workspace_name, config_path,
                                              client_factory)
        if ml_client is None:
            clients = build_clients(self.settings, credential)
        else:
            clients = AzureClients(ml_client, metrics_client, http_session)
        self.ml_client = clients.ml_client
        self._metrics_client = metrics_client or clients.metrics_client
        self._session = http_session or clients.http_session
        self._credential = credential
        self.poll_interval_s = poll_interval_s
        self._credentials: dict[str, Credentials] = {}
        self._scoring_uris: dict[str, str] = {}
        # deployment operations started without waiting, by (endpoint, name) in Azure's lower case: their
        # pollers (which poll on in the SDK's thread) hold why a deployment failed; Azure's GET does not
        self._started: dict[tuple[str, str], Any] = {}
        self.last_metric_filters: list[str] = []  # the Azure $filter text(s) of the last query, for the record

    def __repr__(self) -> str:
        return f"AzureBackend(workspace={self.workspace!r})"

    @property
    def workspace(self) -> str:
        return str(getattr(self.ml_client, "workspace_name", None) or self.settings.workspace_name or "")

    @property
    def metrics_client(self) -> Any:
        if self._metrics_client is None:
            self._metrics_client = build_metrics_client(self._credential)
        return self._metrics_client

    @property
    def session(self) -> Any:
        if self._session is None:
            import requests

            self._session = requests.Session()
        return self._session

    # ---- models -----------------------------------------------------------------------------
    def register_model(self, name: str, path: str, *, description: str = "", tags: dict[str, str] | None = None,
                       properties: dict[str, str] | None = None, type: str = "custom_model") -> Model:
        validate_model_name(name)
        source = Path(path).expanduser()
        if not source.exists():
            raise SpecError(f"model path does not exist: {path}")
        entity = model_entity(name, str(source.resolve()), description, tags or {}, properties or {},
                              check_model_type(source, type))
        with sdk_errors(f"model {name!r}"):
            return model_from_sdk(self.ml_client.models.create_or_update(entity))

    def get_model(self, name: str, version: int | str | None = None) -> Model:
        latest = version in (None, "latest", "@latest")
        if not latest and not str(version).isdigit():
            raise SpecError(f"model version must be a number or 'latest', got {version!r}")
        what = f"model {name}" + ("" if latest else f":{version}")
        with sdk_errors(what):
            if latest:
                try:
                    return model_from_sdk(self.ml_client.models.get(name=name, label="latest"))
                except ValidationException as exc:  # the SDK's answer when no version of `name` exists
                    if "does not exist" not in str(exc):
                        raise
                    raise NotFound(f"{what} not found in the Azure ML workspace ({exc})") from exc
            return model_from_sdk(self.ml_client.models.get(name=name, version=str(version)))

    def list_models(self, name: str | None = None) -> list[Model]:
        with sdk_errors(f"models named {name!r}" if name else "models"):
            if name:
                found = [model_from_sdk(m) for m in self.ml_client.models.list(name=name)]
            else:  # without a name the SDK lists containers: expand each into its versions, like local
                names = sorted({m.name for m in self.ml_client.models.list()})
                found = [model_from_sdk(m) for n in names for m in self.ml_client.models.list(name=n)]
        return sorted(found, key=lambda m: (m.name, m.version))

    def _resolve_model(self, spec: DeploymentSpec) -> Any:
        """`azureml:name@latest` becomes a concrete version, so the deployment records what it serves; a local
        path becomes an anonymous model, of type mlflow_model when it holds an MLmodel file (as no-code needs)."""
        if not spec.model:
            return None
        if spec.model.startswith("azureml:"):
            name, version = parse_model_ref(spec.model)
            model = self.get_model(name, version)
            check_no_code_model(spec, model.ref, model.type, f"deployment {spec.name!r}")
            return model.ref
        from azure.ai.ml.entities import Model as SdkModel

        return SdkModel(path=spec.model, type=model_type_of(spec.model))

    # ---- endpoints --------------------------------------------------------------------------
    def _endpoint_entity(self, name: str) -> Any:
        validate_name(name)
        with sdk_errors(f"endpoint {name!r}"):
            return self.ml_client.online_endpoints.get(name=name)

    def create_endpoint(self, spec: EndpointSpec) -> Endpoint:
        validate_name(spec.name)
        if any(spec.traffic.values()) or any(spec.mirror_traffic.values()):
            raise SpecError(f"endpoint {spec.name!r} has no deployments yet: create it without traffic, "
                            "then set traffic once a deployment exists")
        if self._exists(lambda: self.ml_client.online_endpoints.get(name=spec.name), f"endpoint {spec.name!r}"):
            raise Conflict(f"endpoint {spec.name!r} already exists")
        self._lro(f"create endpoint {spec.name!r}",
                  lambda: self.ml_client.online_endpoints.begin_create_or_update(endpoint_entity(spec)), None)
        return self.get_endpoint(spec.name)

    def _exists(self, get: Any, what: str) -> bool:
        try:
            with sdk_errors(what):
                get()
            return True
        except NotFound:
            return False

    def get_endpoint(self, name: str) -> Endpoint:
        endpoint = endpoint_from_sdk(self._endpoint_entity(name))
        self._scoring_uris[name] = endpoint.scoring_uri
        return endpoint

    def list_endpoints(self) -> list[Endpoint]:
        with sdk_errors("endpoints"):
            return sorted((endpoint_from_sdk(e) for e in self.ml_client.online_endpoints.list()),
                          key=lambda e: e.name)

    def update_endpoint(self, name: str, *, traffic: dict[str, int] | None = None,
                        mirror_traffic: dict[str, int] | None = None, tags: dict[str, str] | None = None,
                        description: str | None = None, set_tags: dict[str, str] | None = None,
                        remove_tags: Iterable[str] = (), progress: Progress | None = None) -> Endpoint:
        remove = list(remove_tags)
        if tags is not None and (set_tags is not None or remove):
            raise SpecError("give tags (the whole map) or set_tags / remove_tags (changes), not both")
        entity = self._endpoint_entity(name)
        current = endpoint_from_sdk(entity)
        deployments = {d.name: d for d in self.list_deployments(name)}
        # Azure ML names are case-insensitive and the SDK sends them lower-cased: `Green` is `green` there
        new_traffic = current.traffic if traffic is None else validate_traffic(
            _lower_keys(parse_traffic(traffic)), set(deployments))
        for dep, percent in new_traffic.items():
            state = deployments[dep].provisioning_state if dep in deployments else "missing"
            if percent > current.traffic.get(dep, 0) and state != "Succeeded":
                raise Conflict(f"cannot give traffic to deployment {dep!r}: its state is {state}")
        mirror_in = current.mirror_traffic if mirror_traffic is None else _lower_keys(
            parse_traffic(mirror_traffic, "mirror_traffic"))
        mirror = validate_mirror(mirror_in, new_traffic, set(deployments))
        for dep in mirror:
            if deployments[dep].provisioning_state != "Succeeded" and dep not in current.mirror_traffic:
                raise Conflict(f"cannot mirror to deployment {dep!r}: its state is "
                               f"{deployments[dep].provisioning_state}")
        # The documented way: name every deployment, zeros included; the endpoint PUT replaces both maps
        # (the SDK strips the zeros before sending), so a deployment taken out of traffic really leaves it.
        entity.traffic = {d: new_traffic.get(d, 0) for d in deployments}
        entity.mirror_traffic = {d: mirror.get(d, 0) for d in deployments}
        if tags is not None:
            entity.tags = {str(k): str(v) for k, v in tags.items()}
        elif set_tags is not None or remove:  # onto the tags just read: the endpoint PUT sends the whole map
            merged = {k: v for k, v in (entity.tags or {}).items() if k not in remove}
            merged.update({str(k): str(v) for k, v in (set_tags or {}).items()})
            entity.tags = merged
        if description is not None:
            entity.description = str(description)
        self._lro(f"update endpoint {name!r}",
                  lambda: self.ml_client.online_endpoints.begin_create_or_update(entity), progress)
        return self.get_endpoint(name)

    def delete_endpoint(self, name: str, progress: Progress | None = None) -> None:
        self._endpoint_entity(name)
        self._lro(f"delete endpoint {name!r}", lambda: self.ml_client.online_endpoints.begin_delete(name=name),
                  progress)
        self._credentials.pop(name, None)
        self._scoring_uris.pop(name, None)

    def get_credentials(self, name: str) -> Credentials:
        validate_name(name)
        with sdk_errors(f"the keys of endpoint {name!r}"):
            return credentials_from_sdk(self.ml_client.online_endpoints.get_keys(name=name))

    def regenerate_keys(self, name: str, key_type: str = "primary") -> Credentials:
        endpoint = endpoint_from_sdk(self._endpoint_entity(name))
        if endpoint.auth_mode != "key":
            raise SpecError(f"endpoint {name!r} uses auth_mode {endpoint.auth_mode}: only key endpoints have keys")
        if key_type not in ("primary", "secondary"):
            raise SpecError(f"key type must be primary or secondary, got {key_type!r}")
        self._credentials.pop(name, None)
        self._lro(f"regenerate the {key_type} key of endpoint {name!r}",
                  lambda: self.ml_client.online_endpoints.begin_regenerate_keys(name=name, key_type=key_type),
                  None)
        return self.get_credentials(name)

    # ---- deployments ------------------------------------------------------------------------
    def _deployment_entity(self, endpoint: str, name: str) -> Any:
        validate_name(name, "deployment")
        with sdk_errors(f"deployment {name!r} on endpoint {endpoint!r}"):
            return self.ml_client.online_deployments.get(name=name, endpoint_name=endpoint)

    def create_deployment(self, spec: DeploymentSpec, *, wait: bool = True,
                          progress: Progress | None = None) -> Deployment:
        self._endpoint_entity(spec.endpoint_name)
        validate_name(spec.name, "deployment")
        if self._exists(lambda: self.ml_client.online_deployments.get(name=spec.name,
                                                                     endpoint_name=spec.endpoint_name),
                        f"deployment {spec.name!r}"):
            raise Conflict(f"deployment {spec.name!r} already exists on endpoint {spec.endpoint_name!r}: use update")
        return self._put_deployment(spec, wait, progress, "create")

    def update_deployment(self, spec: DeploymentSpec, *, wait: bool = True,
                          progress: Progress | None = None) -> Deployment:
        self._deployment_entity(spec.endpoint_name, spec.name)
        return self._put_deployment(spec, wait, progress, "update")

    def _put_deployment(self, spec: DeploymentSpec, wait: bool, progress: Progress | None,
                        verb: str) -> Deployment:
        check_scoring(spec, f"deployment {spec.name!r}")  # a scoring script, or an MLflow model (no-code)
        entity = deployment_entity(spec, self._resolve_model(spec))
        what = f"{verb} deployment {spec.name!r} on endpoint {spec.endpoint_name!r}"
        start = lambda: self.ml_client.online_deployments.begin_create_or_update(entity)  # noqa: E731
        if not wait:
            with sdk_errors(what):
                self._started[(spec.endpoint_name.lower(), spec.name.lower())] = start()
            return self.get_deployment(spec.endpoint_name, spec.name)
        try:
            self._lro(what, start, progress)
        except SafeRolloutError as exc:  # a failed LRO comes back as a 400: tell a failed deployment apart
            if self._failed_deployment(spec.endpoint_name, spec.name) is None:
                raise
            logs = self._logs_or_note(spec.endpoint_name, spec.name, 40)
            raise DeploymentFailed(f"deployment {spec.name!r} on {spec.endpoint_name!r} failed: {exc}; its "
                                   "logs are in the error's `logs` (or get_deployment_logs)", str(exc), logs) from exc
        deployment = self.get_deployment(spec.endpoint_name, spec.name)
        if deployment.provisioning_state == "Failed":
            logs = self._logs_or_note(spec.endpoint_name, spec.name, 40)
            raise DeploymentFailed(f"deployment {spec.name!r} on {spec.endpoint_name!r} failed", "", logs)
        return deployment

    def _failed_deployment(self, endpoint: str, name: str) -> Deployment | None:
        try:
            deployment = self.get_deployment(endpoint, name)
        except NotFound:
            return None
        return deployment if deployment.provisioning_state == "Failed" else None

    def _logs_or_note(self, endpoint: str, name: str, lines: int) -> str:
        try:
            return self.get_deployment_logs(endpoint, name, lines)
        except BackendError as exc:  # the logs are a courtesy: never hide the real failure behind them
            return f"(logs unavailable: {exc})"

    def get_deployment(self, endpoint: str, name: str) -> Deployment:
        deployment = deployment_from_sdk(self._deployment_entity(endpoint, name))
        if deployment.provisioning_state == "Failed":
            deployment.reason = self._failure_reason(endpoint, name)
        return deployment

    def _failure_reason(self, endpoint: str, name: str) -> str:
        """Why a deployment failed: its operation's error when this backend started it, else where to look.

        The resource can read Failed before the operation's poller (a thread polling the operation's status)
        has seen the end: the poller is given up to `OPERATION_SETTLE_S` to catch up, so that the reason is the
        operation's error rather than a pointer to the logs (a fresh-clone CI run read the resource first).
        """
        poller = self._started.get((endpoint.lower(), name.lower()))
        if poller is not None and not poller.done():
            try:
                poller.wait(OPERATION_SETTLE_S)
            except Exception:  # noqa: BLE001 - the operation's error: result() below raises it again
                pass
        if poller is not None and poller.done():
            try:
                with redirect_stdout(sys.stderr):
                    poller.result()
            except Exception as exc:  # noqa: BLE001 - the failed operation's error is the reason
                return error_detail(exc)
        return (f"Azure reports its provisioning Failed; its logs say why: saferollout online-deployment get-logs "
                f"-n {name} -e {endpoint} --backend azure")

    def list_deployments(self, endpoint: str) -> list[Deployment]:
        validate_name(endpoint)
        with sdk_errors(f"the deployments of endpoint {endpoint!r}"):
            found = [deployment_from_sdk(d) for d in self.ml_client.online_deployments.list(endpoint_name=endpoint)]
        return sorted(found, key=lambda d: d.name)

    def delete_deployment(self, endpoint: str, name: str, progress: Progress | None = None) -> None:
        current = endpoint_from_sdk(self._endpoint_entity(endpoint))
        name = self._deployment_entity(endpoint, name).name  # as Azure names it (lower case)
        if current.traffic.get(name, 0) > 0:
            raise Conflict(f"cannot delete deployment {name!r}: it has {current.traffic[name]}% live traffic; "
                           "move its traffic to another deployment first")
        if current.mirror_traffic.get(name, 0) > 0:
            raise Conflict(f"cannot delete deployment {name!r}: it receives mirror traffic; turn the mirror off first")
        self._lro(f"delete deployment {name!r} on endpoint {endpoint!r}",
                  lambda: self.ml_client.online_deployments.begin_delete(name=name, endpoint_name=endpoint),
                  progress)

    def get_deployment_logs(self, endpoint: str, name: str, lines: int | None = None) -> str:
        validate_name(name, "deployment")
        with sdk_errors(f"the logs of deployment {name!r} on endpoint {endpoint!r}"):
            return str(self.ml_client.online_deployments.get_logs(name=name, endpoint_name=endpoint,
                                                                  lines=lines or DEFAULT_LOG_LINES))

    # ---- long-running operations ------------------------------------------------------------
    def _lro(self, what: str, start: Any, progress: Progress | None) -> Any:
        """Start an operation and wait for it, reporting its status every poll (never a secret)."""
        started = time.monotonic()
        with sdk_errors(what):
            poller = start()
            if poller is None:
                return None
            last = ""
            while True:
                line = f"{what}: {poller.status()} {time.monotonic() - started:.0f}s"
                if progress is not None and line != last:
                    progress(line)
                    last = line
                if poller.done():
                    break
                poller.wait(self.poll_interval_s)
            result = poller.result()
        if progress is not None:
            progress(f"{what}: done in {time.monotonic() - started:.0f}s")
        return result

    # ---- data plane -------------------------------------------------------------------------
    def _bearer(self, endpoint: str) -> str:
        cred = self._credentials.get(endpoint)
        if cred is None or (cred.expiry_time_utc is not None and cred.expiry_time_utc - time.time() < 60):
            cred = self._credentials[endpoint] = self.get_credentials(endpoint)
        return cred.bearer

    def _scoring_uri(self, endpoint: str) -> str:
        if endpoint not in self._scoring_uris:
            self.get_endpoint(endpoint)
        uri = self._scoring_uris[endpoint]
        if not uri:
            raise BackendError(f"endpoint {endpoint!r} has no scoring URI yet: wait for it to finish provisioning")
        return uri

    def invoke(self, endpoint: str, body: bytes | str | dict | list, *, deployment: str | None = None,
               timeout_s: float = 60.0) -> InvokeResult:
        """POST to the scoring URI ourselves (the SDK's invoke keeps the deployment header between calls)."""
        payload = body if isinstance(body, bytes) else (body.encode() if isinstance(body, str)
                                                        else json.dumps(body).encode())
        uri = self._scoring_uri(endpoint)
        headers = {"Authorization": f"Bearer {self._bearer(endpoint)}", "Content-Type": "application/json"}
        if deployment:
            headers[DEPLOYMENT_HEADER] = deployment  # a fresh dict per call: never leaks into the next one
        started = time.perf_counter()
        try:
            resp = self.session.post(uri, data=payload, headers=headers, timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - requests' and the fake's transport errors alike
            raise BackendError(f"cannot reach endpoint {endpoint!r} at {uri}: {type(exc).__name__}: {exc}",
                               exc) from exc
        if resp.status_code == 401:  # keys may have been regenerated since we cached them
            self._credentials.pop(endpoint, None)
        answer_headers = {k: v for k, v in resp.headers.items() if k.lower() != "authorization"}
        return InvokeResult(status=resp.status_code, body=resp.content,
                            deployment=resp.headers.get(DEPLOYMENT_HEADER),
                            request_id=resp.headers.get("x-request-id") or resp.headers.get("x-ms-request-id"),
                            latency_ms=(time.perf_counter() - started) * 1000.0, headers=answer_headers)

    # ---- metrics ----------------------------------------------------------------------------
    def endpoint_resource_id(self, endpoint: str) -> str:
        """The endpoint's ARM id, which Azure Monitor queries are made on."""
        entity = self._endpoint_entity(endpoint)
        if getattr(entity, "id", None):
            return str(entity.id)
        client = self.ml_client
        return (f"/subscriptions/{client.subscription_id}/resourceGroups/{client.resource_group_name}"
                f"/providers/Microsoft.MachineLearningServices/workspaces/{client.workspace_name}"
                f"/onlineEndpoints/{endpoint}")

    def query_metrics(self, endpoint: str, metric: str, *, aggregation: str = "Average", grain: str = "PT1M",
                      start: datetime | None = None, end: datetime | None = None, filter: str | None = None,
                      split_by: Iterable[str] = ()) -> list[MetricSeries]:
        end = end or datetime.now(timezone.utc)
        start = start or end - DEFAULT_WINDOW
        resource_id = self.endpoint_resource_id(endpoint)
        if metric in DEPLOYMENT_METRIC_DIMENSIONS:  # instance metrics live on each deployment's resource
            names = [d.name for d in self.list_deployments(endpoint)]
            with sdk_errors(f"metric {metric} of endpoint {endpoint!r}"):
                series, self.last_metric_filters = azure_metrics.query_deployment_series(
                    self.metrics_client, resource_id, names, metric, aggregation=aggregation, grain=grain,
                    start=start, end=end, filter_text=filter, split_by=split_by)
            return series
        with sdk_errors(f"metric {metric} of endpoint {endpoint!r}"):
            series, self.last_metric_filters = azure_metrics.query_series(
                self.metrics_client, resource_id, metric, aggregation=aggregation, grain=grain, start=start,
                end=end, filter_text=filter, split_by=split_by)
        return series

    def request_samples(self, endpoint: str, *, deployment: str | None = None, start: datetime | None = None,
                        end: datetime | None = None, include_mirrored: bool = False) -> list[RequestSample]:
        raise BackendError("the azure backend has no raw request samples: Azure Monitor keeps only per-minute "
                           "aggregates; use a gate that works on aggregates (threshold, or comparative on "
                           "metrics) instead of one that needs samples")

    def mirrored_pairs(self, endpoint: str, *, start: datetime | None = None,
                       end: datetime | None = None) -> list[MirroredPair]:
        raise BackendError("the azure backend has no mirrored pairs: Azure keeps no mirrored answers; "
                           "use an agreement gate with source: header")
