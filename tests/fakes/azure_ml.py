"""A fake of azure-ai-ml's MLClient operation groups (`online_endpoints`, `online_deployments`, `models`).

Same method names and keyword arguments as the SDK, answers made of the SDK's REAL entity classes
(ManagedOnlineEndpoint, ManagedOnlineDeployment, Model, EndpointAuthKeys, EndpointAuthToken) and real
`LROPoller`s, errors of the SDK's real types (ResourceNotFoundError, HttpResponseError 400...), and Azure's
rules enforced on the service side: traffic sums to 0 or 100, mirror at most 50% to one deployment that has
no live traffic, no deleting a deployment with traffic.

State lives in a directory (see azure_state), so notebook kernels started by a runbook share it: point them
at it with env SAFEROLLOUT_AZURE_FAKE_DIR and SAFEROLLOUT_AZURE_CLIENT_FACTORY=fakes.azure_ml:client_factory
(with the tests folder on PYTHONPATH).
"""
from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from azure.ai.ml.entities import (CodeConfiguration, EndpointAuthKeys, EndpointAuthToken, ManagedOnlineDeployment,
                                  ManagedOnlineEndpoint, Model, OnlineRequestSettings, ProbeSettings, SystemData)
from azure.ai.ml.exceptions import ValidationException
from azure.core.exceptions import HttpResponseError, ResourceExistsError
from azure.core.polling import LROPoller, NoPolling, PollingMethod

from fakes.azure_monitor import FakeMetricsQueryClient
from fakes.azure_scoring import FakeScoringSession, ScoringRuntime
from fakes.azure_state import (REGION, RESOURCE_GROUP, SUBSCRIPTION, WORKSPACE, FakeWorkspaceState, bad_request,
                               check_traffic_rules, new_key, not_found)

ENV_FAKE_DIR = "SAFEROLLOUT_AZURE_FAKE_DIR"
TOKEN_TTL_S = 3600
PROBE_FIELDS = ("initial_delay", "period", "timeout", "success_threshold", "failure_threshold")
REQUEST_FIELDS = ("request_timeout_ms", "max_concurrent_requests_per_instance", "max_queue_wait_ms")


class _FailedPolling(PollingMethod):
    """A long-running operation that ended Failed: `result()` raises the service's error."""

    def initialize(self, client: Any, initial_response: Any, deserialization_callback: Any) -> None:
        self._error = initial_response

    def run(self) -> None:
        raise self._error

    def status(self) -> str:
        return "Failed"

    def finished(self) -> bool:
        return False

    def resource(self) -> Any:
        return None

    def get_continuation_token(self) -> str:
        return "failed"


def done(result: Any = None) -> LROPoller:
    return LROPoller(None, result, lambda value: value, NoPolling())


def failed(error: Exception) -> LROPoller:
    return LROPoller(None, error, lambda value: value, _FailedPolling())


def _strip_zeroes(traffic: dict[str, Any] | None) -> dict[str, int]:
    """What the SDK does before it sends an endpoint: zero weights dropped, names lower-cased."""
    return {str(k).lower(): int(v) for k, v in (traffic or {}).items() if v and int(v) != 0}


# ---- endpoints --------------------------------------------------------------------------------

class FakeOnlineEndpointOperations:
    def __init__(self, state: FakeWorkspaceState):
        self._state = state
        self.calls: list[str] = []

    def _entity(self, snapshot: dict[str, Any], name: str) -> ManagedOnlineEndpoint:
        record = snapshot["endpoints"][name]
        traffic = dict(record["traffic"])
        # as the SDK's get(): deployments without traffic or mirror show up with 0
        for dep in snapshot["deployments"].get(name, {}):
            if not traffic.get(dep) and not record["mirror_traffic"].get(dep):
                traffic[dep] = 0
        return ManagedOnlineEndpoint(
            name=name, auth_mode=record["auth_mode"], description=record["description"], tags=dict(record["tags"]),
            properties=dict(record["properties"]), traffic=traffic, mirror_traffic=dict(record["mirror_traffic"]),
            scoring_uri=self._state.scoring_uri(name), openapi_uri=self._state.scoring_uri(name).replace(
                "/score", "/swagger.json"), provisioning_state="Succeeded", id=self._state.endpoint_id(name),
            location=REGION, kind="Managed")

    def get(self, name: str, *, local: bool = False) -> ManagedOnlineEndpoint:
        self.calls.append(f"get {name}")
        snapshot = self._state.read()
        if name not in snapshot["endpoints"]:
            raise not_found(f"Resource Microsoft.MachineLearningServices/workspaces/onlineEndpoints/{name} "
                            "was not found.")
        return self._entity(snapshot, name)

    def list(self, *, local: bool = False) -> list[ManagedOnlineEndpoint]:
        snapshot = self._state.read()
        return [self._entity(snapshot, name) for name in sorted(snapshot["endpoints"])]

    def begin_create_or_update(self, endpoint: ManagedOnlineEndpoint, *, local: bool = False) -> LROPoller:
        self.calls.append(f"begin_create_or_update {endpoint.name}")
        traffic, mirror = _strip_zeroes(endpoint.traffic), _strip_zeroes(endpoint.mirror_traffic)
        with self._state.transaction() as state:
            deployments = set(state["deployments"].get(endpoint.name, {}))
            check_traffic_rules(traffic, mirror, deployments)
            record = state["endpoints"].get(endpoint.name)
            if record is None:
                record = state["endpoints"][endpoint.name] = {
                    "name": endpoint.name, "auth_mode": str(endpoint.auth_mode or "key").lower(),
                    "primary_key": new_key(), "secondary_key": new_key(),
                    "created_at": datetime.now(timezone.utc).isoformat()}
                state["deployments"].setdefault(endpoint.name, {})
            elif str(endpoint.auth_mode or "key").lower() != record["auth_mode"]:
                raise bad_request("The auth_mode of an existing endpoint cannot be changed.")
            record.update(description=endpoint.description or "", tags=dict(endpoint.tags or {}),
                          properties=dict(endpoint.properties or {}), traffic=traffic, mirror_traffic=mirror)
            snapshot = dict(state)
        return done(self._entity(snapshot, endpoint.name))

    def begin_delete(self, name: str | None = None, *, local: bool = False) -> LROPoller:
        self.calls.append(f"begin_delete {name}")
        with self._state.transaction() as state:
            if name not in state["endpoints"]:
                raise not_found(f"Resource Microsoft.MachineLearningServices/workspaces/onlineEndpoints/{name} "
                                "was not found.")
            del state["endpoints"][name]
            for deployment in state["deployments"].pop(name, {}):
                self._state.log_path(name, deployment).unlink(missing_ok=True)
            state["tokens"] = {t: v for t, v in state["tokens"].items() if v["endpoint"] != name}
        return done(None)

    def get_keys(self, name: str) -> EndpointAuthKeys | EndpointAuthToken:
        self.calls.append(f"get_keys {name}")
        with self._state.transaction() as state:
            record = state["endpoints"].get(name)
            if record is None:
                raise not_found(f"Resource Microsoft.MachineLearningServices/workspaces/onlineEndpoints/{name} "
                                "was not found.")
            if record["auth_mode"] == "key":
                return EndpointAuthKeys(primary_key=record["primary_key"], secondary_key=record["secondary_key"])
            token, now = new_key(), time.time()
            state["tokens"][token] = {"endpoint": name, "expiry": now + TOKEN_TTL_S}
            return EndpointAuthToken(access_token=token, expiry_time_utc=now + TOKEN_TTL_S,
                                     refresh_after_time_utc=now + TOKEN_TTL_S / 2, token_type="Bearer")

    def begin_regenerate_keys(self, name: str, *, key_type: str = "primary") -> LROPoller:
        self.calls.append(f"begin_regenerate_keys {name}")
        with self._state.transaction() as state:
            record = state["endpoints"].get(name)
            if record is None:
                raise not_found(f"Resource Microsoft.MachineLearningServices/workspaces/onlineEndpoints/{name} "
                                "was not found.")
            if record["auth_mode"] != "key":
                raise ValidationException(message=f"Endpoint '{name}' does not use keys for authentication.",
                                          no_personal_data_message="Endpoint does not use keys for authentication.")
            if key_type.lower() not in ("primary", "secondary"):
                raise ValidationException(message="Key type must be 'primary' or 'secondary'.",
                                          no_personal_data_message="Key type must be 'primary' or 'secondary'.")
            record[f"{key_type.lower()}_key"] = new_key()
        return done(None)

    def invoke(self, *args: Any, **kwargs: Any) -> str:
        raise AssertionError("the backend must post to the scoring URI itself, not call the SDK's invoke")


# ---- deployments ------------------------------------------------------------------------------

def _settings(obj: Any, fields: tuple[str, ...]) -> dict[str, int]:
    return {f: int(getattr(obj, f)) for f in fields if obj is not None and getattr(obj, f, None) is not None}


class FakeOnlineDeploymentOperations:
    def __init__(self, state: FakeWorkspaceState, models: "FakeModelOperations", runtime: ScoringRuntime):
        self._state = state
        self._models = models
        self._runtime = runtime
        self.calls: list[str] = []

    def _entity(self, endpoint: str, record: dict[str, Any]) -> ManagedOnlineDeployment:
        code_id = f"{self._state.workspace_id()}/codes/{endpoint}-{record['name']}/versions/{record['generation']}"
        return ManagedOnlineDeployment(
            name=record["name"], endpoint_name=endpoint, model=record["model_id"],
            code_configuration=CodeConfiguration(code=code_id, scoring_script=record["scoring_script"]),
            environment=record["environment_id"], instance_type=record["instance_type"],
            instance_count=record["instance_count"],
            request_settings=OnlineRequestSettings(**record["request_settings"]),
            liveness_probe=ProbeSettings(**record["liveness_probe"]),
            readiness_probe=ProbeSettings(**record["readiness_probe"]),
            environment_variables=dict(record["environment_variables"]), tags=dict(record["tags"]),
            properties=dict(record["properties"]), description=record["description"],
            provisioning_state=record["provisioning_state"])

    def _get_record(self, state: dict[str, Any], endpoint: str, name: str) -> dict[str, Any]:
        if endpoint not in state["endpoints"]:
            raise not_found(f"Resource Microsoft.MachineLearningServices/workspaces/onlineEndpoints/{endpoint} "
                            "was not found.")
        record = state["deployments"].get(endpoint, {}).get(name)
        if record is None:
            raise not_found(f"Resource Microsoft.MachineLearningServices/workspaces/onlineEndpoints/"
                            f"{endpoint}/deployments/{name} was not found.")
        return record

    def get(self, name: str, endpoint_name: str, *, local: bool = False) -> ManagedOnlineDeployment:
        self.calls.append(f"get {endpoint_name}/{name}")
        state = self._state.read()
        return self._entity(endpoint_name, self._get_record(state, endpoint_name, name))

    def list(self, endpoint_name: str, *, local: bool = False) -> list[ManagedOnlineDeployment]:
        state = self._state.read()
        if endpoint_name not in state["endpoints"]:
            raise not_found(f"Resource Microsoft.MachineLearningServices/workspaces/onlineEndpoints/"
                            f"{endpoint_name} was not found.")
        return [self._entity(endpoint_name, r) for _, r in sorted(state["deployments"][endpoint_name].items())]

    def get_logs(self, name: str, endpoint_name: str, lines: int, *, container_type: str | None = None,
                 local: bool = False) -> str:
        self._get_record(self._state.read(), endpoint_name, name)
        path = self._state.log_path(endpoint_name, name)
        text = path.read_text() if path.exists() else ""
        return "\n".join(text.splitlines()[-int(lines):])

    def _model(self, endpoint: str, name: str, model: Any) -> tuple[str, str]:
        """-> (model ARM id, AZUREML_MODEL_DIR): the SDK sends a reference, or uploads a local path."""
        if isinstance(model, str):
            ref = model[len("azureml:"):] if model.startswith("azureml:") else model
            if "@" in ref:
                model_name, _, label = ref.partition("@")
                entity = self._models.get(model_name, label=label)
            else:
                model_name, _, version = ref.partition(":")
                entity = self._models.get(model_name, version=version or None)
        elif isinstance(model, Model):  # a local path: registered as an anonymous model, as Azure does
            entity = self._models.create_or_update(Model(name=f"{endpoint}-{name}-anonymous", path=model.path))
        else:
            raise bad_request(f"Deployment '{name}' needs a model.")
        version = int(entity.version)
        model_dir = self._state.root / "models" / entity.name / str(version)
        return self._state.model_id(entity.name, version), str(model_dir)

    def begin_create_or_update(self, deployment: ManagedOnlineDeployment, *, local: bool = False,
                               skip_script_validation: bool = False, **kwargs: Any) -> LROPoller:
        endpoint, name = deployment.endpoint_name, deployment.name
        self.calls.append(f"begin_create_or_update {endpoint}/{name}")
        if endpoint not in self._state.read()["endpoints"]:
            raise not_found(f"Resource Microsoft.MachineLearningServices/workspaces/onlineEndpoints/{endpoint} "
                            "was not found.")
        code = deployment.code_configuration
        if code is None or not code.code or not code.scoring_script:
            raise bad_request("A managed online deployment without an MLflow model needs code_configuration.")
        code_dir = Path(str(code.code))
        if not (code_dir / str(code.scoring_script)).is_file():
            raise bad_request(f"Scoring script {code.scoring_script} was not found in {code_dir}.")
        model_id, model_dir = self._model(endpoint, name, deployment.model)
        previous = self._state.read()["deployments"][endpoint].get(name)
        generation, uid = ((previous["generation"] + 1) if previous else 1), uuid.uuid4().hex
        record = {
            "name": name, "generation": generation, "uid": uid, "model_id": model_id, "model_dir": model_dir,
            "code_dir": str(self._state.snapshot_code(endpoint, name, uid, code_dir)),
            "scoring_script": str(code.scoring_script),
            "environment_id": f"{self._state.workspace_id()}/environments/CliV2AnonymousEnvironment/versions/1",
            "instance_type": deployment.instance_type or "Standard_DS3_v2",
            "instance_count": int(deployment.instance_count or 1),
            "request_settings": _settings(deployment.request_settings, REQUEST_FIELDS),
            "liveness_probe": _settings(deployment.liveness_probe, PROBE_FIELDS),
            "readiness_probe": _settings(deployment.readiness_probe, PROBE_FIELDS),
            "environment_variables": {str(k): str(v) for k, v in (deployment.environment_variables or {}).items()},
            "tags": dict(deployment.tags or {}), "properties": dict(deployment.properties or {}),
            "description": deployment.description or "", "provisioning_state": "Succeeded", "serving": True,
        }
        reason = self._runtime.provision(endpoint, record)
        with self._state.transaction() as state:
            if endpoint not in state["endpoints"]:
                raise not_found(f"endpoint {endpoint} was deleted while deployment {name} was provisioning")
            deployments = state["deployments"][endpoint]
            if reason is None:
                deployments[name] = record
            elif previous is not None and previous.get("serving"):
                deployments[name] = dict(previous, provisioning_state="Failed")  # the old version keeps serving
            else:
                deployments[name] = dict(record, provisioning_state="Failed", serving=False)
            entity = self._entity(endpoint, deployments[name])
        if reason is not None:
            error = HttpResponseError(message=(
                f"(ResourceOperationFailure) Resource provisioning failed for deployment {name}: the scoring "
                f"container crashed in init(): {reason}. Check the deployment logs."))
            error.status_code = 400
            return failed(error)
        return done(entity)

    def begin_delete(self, name: str, endpoint_name: str, *, local: bool = False) -> LROPoller:
        self.calls.append(f"begin_delete {endpoint_name}/{name}")
        with self._state.transaction() as state:
            self._get_record(state, endpoint_name, name)
            record = state["endpoints"][endpoint_name]
            if record["traffic"].get(name, 0) > 0:
                raise bad_request(f"Deployment '{name}' has {record['traffic'][name]}% traffic and cannot be "
                                  "deleted: set its traffic to 0 first.")
            if record["mirror_traffic"].get(name, 0) > 0:
                raise bad_request(f"Deployment '{name}' receives mirror traffic and cannot be deleted.")
            del state["deployments"][endpoint_name][name]
        self._state.log_path(endpoint_name, name).unlink(missing_ok=True)  # a new deployment starts fresh logs
        return done(None)


# ---- models -----------------------------------------------------------------------------------

class FakeModelOperations:
    def __init__(self, state: FakeWorkspaceState):
        self._state = state

    def _entity(self, record: dict[str, Any]) -> Model:
        return Model(name=record["name"], version=str(record["version"]), path=record["uri"],
                     description=record["description"] or None, tags=dict(record["tags"]),
                     properties=dict(record["properties"]), type=record["type"],
                     creation_context=SystemData(created_at=datetime.fromisoformat(record["created_at"])))

    def create_or_update(self, model: Model) -> Model:
        source = Path(str(model.path)).expanduser()
        if not source.exists():
            raise ValidationException(message=f"Path {model.path} does not exist.",
                                      no_personal_data_message="Model path does not exist.")
        with self._state.transaction() as state:
            versions = state["models"].setdefault(model.name, [])
            if model.version and any(str(v["version"]) == str(model.version) for v in versions):
                raise ResourceExistsError(message=f"Model {model.name}:{model.version} already exists.")
            version = int(model.version) if model.version else max((v["version"] for v in versions), default=0) + 1
            self._state.store_model_files(model.name, version, source)
            record = {"name": model.name, "version": version, "description": model.description or "",
                      "tags": dict(model.tags or {}), "properties": dict(model.properties or {}),
                      "type": model.type or "custom_model", "created_at": datetime.now(timezone.utc).isoformat(),
                      "uri": (f"azureml://subscriptions/{SUBSCRIPTION}/resourcegroups/{RESOURCE_GROUP}/workspaces/"
                              f"{WORKSPACE}/datastores/workspaceblobstore/paths/LocalUpload/{model.name}/"
                              f"{version}/{source.name}")}
            versions.append(record)
        return self._entity(record)

    def get(self, name: str, version: str | None = None, label: str | None = None) -> Model:
        if version and label:
            raise ValidationException(message="Cannot specify both version and label.",
                                      no_personal_data_message="Cannot specify both version and label.")
        if not version and not label:
            raise ValidationException(message="Must provide either version or label",
                                      no_personal_data_message="Must provide either version or label")
        versions = self._state.read()["models"].get(name, [])
        if label:
            if label != "latest":
                raise bad_request(f"Unknown label '{label}'.")
            found = max(versions, key=lambda v: v["version"], default=None)
        else:
            found = next((v for v in versions if str(v["version"]) == str(version)), None)
        if found is None:
            raise not_found(f"Model container with name: {name} not found." if not versions
                            else f"Model {name}:{version or label} not found.")
        return self._entity(found)

    def list(self, name: str | None = None, stage: str | None = None, **kwargs: Any) -> list[Model]:
        models = self._state.read()["models"]
        if name:
            return [self._entity(v) for v in sorted(models.get(name, []), key=lambda v: -v["version"])]
        return [Model(name=n) for n in sorted(models)]  # containers, as the SDK lists them


# ---- the client -------------------------------------------------------------------------------

class FakeMLClient:
    """What AzureBackend uses of MLClient: scope attributes and three operation groups."""

    def __init__(self, state_dir: str | os.PathLike):
        self.state = FakeWorkspaceState(state_dir)
        self.subscription_id = SUBSCRIPTION
        self.resource_group_name = RESOURCE_GROUP
        self.workspace_name = WORKSPACE
        self.runtime = ScoringRuntime(self.state)
        self.models = FakeModelOperations(self.state)
        self.online_endpoints = FakeOnlineEndpointOperations(self.state)
        self.online_deployments = FakeOnlineDeploymentOperations(self.state, self.models, self.runtime)


def fake_clients(state_dir: str | os.PathLike) -> tuple[FakeMLClient, FakeMetricsQueryClient, FakeScoringSession]:
    ml_client = FakeMLClient(state_dir)
    return ml_client, FakeMetricsQueryClient(ml_client.state), FakeScoringSession(ml_client.state, ml_client.runtime)


def client_factory(settings: Any = None) -> tuple[FakeMLClient, FakeMetricsQueryClient, FakeScoringSession]:
    """SAFEROLLOUT_AZURE_CLIENT_FACTORY=fakes.azure_ml:client_factory, state in env SAFEROLLOUT_AZURE_FAKE_DIR."""
    state_dir = os.environ.get(ENV_FAKE_DIR)
    if not state_dir:
        raise RuntimeError(f"set {ENV_FAKE_DIR} to the fake workspace's state directory")
    return fake_clients(state_dir)
