"""The Azure ML resource provider on the wire: ARM requests in, ARM JSON out.

Shapes follow the REST API specification examples (Microsoft.MachineLearningServices, `Workspace/
OnlineEndpoint/*.json`, `OnlineDeployment/ManagedOnlineDeployment/*.json`, `Workspace/ModelVersion`,
`Workspace/CodeVersion`, `Workspace/DataVersionBase`, `Datastore/*.json`): resources are `{id, name, type, location, kind, tags,
identity, sku, systemData, properties: {...camelCase...}}`, errors are `{"error": {code, message}}`.

What the service does, and so the fake does:
- names are case-insensitive (ARM): a resource is found whatever the case of the URL, and answers with the
  name it was stored under (the SDK lowercases endpoint and deployment names before it sends them);
- PUT and DELETE of endpoints and deployments are long-running: `201`/`202` with `Azure-AsyncOperation`
  and `Location`; the operation answers `InProgress` once, then `Succeeded` or `Failed` with an error; a
  deployment's container starts (the scoring script's `init()` runs) when its operation completes;
- a second PUT or DELETE while an operation runs on the same resource is refused with `409 Conflict`;
- traffic and mirror rules are enforced with a `400`, whatever the client checked first;
- models and code are read from where the SDK uploaded them (the fake blob storage), never from the
  client's disk: what runs is what was uploaded.
"""
from __future__ import annotations

import re
import secrets
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from fakes.azure_state import (MAX_MIRROR, REGION, RESOURCE_GROUP, SUBSCRIPTION, WORKSPACE, FakeWorkspaceState,
                               new_key)
from fakes.azure_wire import ARM_HOST, ServiceRefusal, WireRequest, WireResponse, json_response

TOKEN_TTL_S = 3600
STORAGE_CONTAINER = "azureml-blobstore-00000000"
PROVIDER = "Microsoft.MachineLearningServices"

# The service's defaults for what a PUT leaves out (its answers always carry them).
_PROBE_DEFAULT = {"initialDelay": "PT10M", "period": "PT10S", "timeout": "PT2S", "successThreshold": 1,
                  "failureThreshold": 30}
DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    "endpointComputeType": "Managed", "scaleSettings": {"scaleType": "Default"}, "appInsightsEnabled": False,
    "egressPublicNetworkAccess": "Enabled", "instanceType": "Standard_DS3_v2",
    "requestSettings": {"requestTimeout": "PT5S", "maxConcurrentRequestsPerInstance": 1, "maxQueueWait": "PT0.5S"},
    "livenessProbe": _PROBE_DEFAULT, "readinessProbe": _PROBE_DEFAULT}

_WS = (rf"{re.escape(ARM_HOST)}/subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)/providers/"
       rf"microsoft\.machinelearningservices/workspaces/(?P<ws>[^/]+)")
_NAME = r"[^/]+"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _system_data(created: str | None = None) -> dict[str, Any]:
    return {"createdAt": created or _now(), "createdBy": "fake-user", "createdByType": "User",
            "lastModifiedAt": _now(), "lastModifiedBy": "fake-user", "lastModifiedByType": "User"}


def bad_request(message: str, code: str = "BadArgument") -> ServiceRefusal:
    return ServiceRefusal(400, code, message)


def not_found(kind: str, name: str) -> ServiceRefusal:
    return ServiceRefusal(404, "ResourceNotFound",
                          f"The Resource '{PROVIDER}/workspaces/{WORKSPACE}/{kind}/{name}' under resource group "
                          f"'{RESOURCE_GROUP}' was not found.")


class ArmService:
    """Handlers over the workspace state; one per transport."""

    def __init__(self, state: FakeWorkspaceState):
        self.state = state
        with state.transaction() as data:
            for key in ("codes", "environments", "operations", "data"):
                data.setdefault(key, {})

    # ---- ids --------------------------------------------------------------------------------
    @staticmethod
    def ws_id() -> str:
        return (f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/{PROVIDER}/"
                f"workspaces/{WORKSPACE}")

    def _check_scope(self, match: re.Match) -> None:
        if (match["sub"].lower(), match["rg"].lower(), match["ws"].lower()) != (
                SUBSCRIPTION.lower(), RESOURCE_GROUP.lower(), WORKSPACE.lower()):
            raise ServiceRefusal(404, "ResourceNotFound",
                                 f"The workspace '{match['ws']}' in resource group '{match['rg']}' was not found.")

    # ---- workspace and datastores -----------------------------------------------------------------
    def workspace(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        return json_response(200, {
            "id": self.ws_id(), "name": WORKSPACE, "type": f"{PROVIDER}/workspaces", "location": REGION,
            "kind": "Default", "tags": {}, "identity": {"type": "SystemAssigned"},
            "properties": {"friendlyName": WORKSPACE, "provisioningState": "Succeeded",
                           "discoveryUrl": f"https://{REGION}.api.azureml.ms/discovery",
                           "mlFlowTrackingUri": f"azureml://{REGION}.api.azureml.ms/mlflow/v1.0{self.ws_id()}",
                           "workspaceId": "11111111-2222-3333-4444-555555555555",
                           "storageAccount": f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/"
                                             f"providers/Microsoft.Storage/storageAccounts/{self.state.storage_account}"},
            "systemData": _system_data()})

    def _datastore(self) -> dict[str, Any]:
        return {"id": f"{self.ws_id()}/datastores/workspaceblobstore", "name": "workspaceblobstore",
                "type": f"{PROVIDER}/workspaces/datastores",
                "properties": {"datastoreType": "AzureBlob", "accountName": self.state.storage_account,
                               "containerName": STORAGE_CONTAINER, "endpoint": "core.windows.net",
                               "protocol": "https", "isDefault": True,
                               "credentials": {"credentialsType": "AccountKey"},
                               "serviceDataAccessAuthIdentity": "None", "tags": {}, "properties": {}},
                "systemData": _system_data()}

    def datastores(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        return json_response(200, {"value": [self._datastore()]})

    def datastore(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        if match["name"].lower() != "workspaceblobstore":
            raise not_found("datastores", match["name"])
        return json_response(200, self._datastore())

    def datastore_secrets(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        return json_response(200, {"secretsType": "Sas", "sasToken": self._sas()})

    @staticmethod
    def _sas() -> str:
        return "sv=2021-08-06&ss=b&srt=sco&sp=rwdlac&se=2099-01-01T00:00:00Z&sig=fake"

    # ---- pending uploads (models and code) -------------------------------------------------------
    def pending_upload(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        # a temporary container of its own, with a container SAS: the SDK uploads into it
        blob_uri = f"https://{self.state.storage_account}.blob.core.windows.net/{uuid.uuid4()}"
        return json_response(200, {
            "pendingUploadId": uuid.uuid4().hex, "pendingUploadType": "TemporaryBlobReference",
            "blobReferenceForConsumption": {
                "blobUri": blob_uri, "storageAccountArmId": None,
                "credential": {"credentialType": "SAS", "sasUri": f"{blob_uri}?{self._sas()}"}}})

    # ---- long-running operations -------------------------------------------------------------------
    def _start_operation(self, data: dict[str, Any], kind: str, target: dict[str, Any]) -> str:
        op_id = uuid.uuid4().hex
        data["operations"][op_id] = {"kind": kind, "target": target, "status": "InProgress", "polls": 0,
                                     "error": None}
        return op_id

    def _operation_headers(self, op_id: str, api_version: str) -> dict[str, str]:
        base = (f"https://{ARM_HOST}/subscriptions/{SUBSCRIPTION}/providers/{PROVIDER}/locations/{REGION}/"
                f"mfeOperations")
        return {"Azure-AsyncOperation": f"{base}Status/{op_id}?api-version={api_version}",
                "Location": f"{base}Results/{op_id}?api-version={api_version}", "Retry-After": "0"}

    @staticmethod
    def _busy(data: dict[str, Any], key: tuple[str, ...]) -> dict[str, Any] | None:
        for op in data["operations"].values():
            if op["status"] == "InProgress" and tuple(op["target"]["key"]) == key:
                return op
        return None

    def operation_status(self, request: WireRequest, match: re.Match) -> WireResponse:
        op_id = match["op"]
        with self.state.transaction() as data:
            op = data["operations"].get(op_id)
            if op is None:
                raise ServiceRefusal(404, "NotFound", f"Operation {op_id} was not found.")
            if op["status"] == "InProgress":
                op["polls"] += 1
                if op["polls"] > 1:  # one InProgress answer first, as a real provisioning shows
                    self._complete(data, op)
            body = {"id": f"/subscriptions/{SUBSCRIPTION}/providers/{PROVIDER}/locations/{REGION}/"
                          f"mfeOperationsStatus/{op_id}", "name": op_id, "status": op["status"],
                    "startTime": _now()}
            if op["status"] != "InProgress":
                body["endTime"] = _now()
            if op["error"]:
                body["error"] = op["error"]
        return json_response(200, body)

    def operation_result(self, request: WireRequest, match: re.Match) -> WireResponse:
        with self.state.transaction() as data:
            op = data["operations"].get(match["op"])
            if op is None:
                raise ServiceRefusal(404, "NotFound", f"Operation {match['op']} was not found.")
            if op["status"] == "InProgress":
                return WireResponse(202, b"", self._operation_headers(match["op"], request.query.get(
                    "api-version", "")))
        return WireResponse(204 if op["status"] == "Succeeded" else 200, b"")

    def _complete(self, data: dict[str, Any], op: dict[str, Any]) -> None:
        """The service's work for one operation, done when a poll finds it due."""
        kind, target = op["kind"], op["target"]
        op["status"] = "Succeeded"
        if kind == "endpoint.put":
            record = data["endpoints"].get(target["endpoint"])
            if record is not None:
                record["provisioning_state"] = "Succeeded"
        elif kind == "endpoint.delete":
            name = target["endpoint"]
            data["endpoints"].pop(name, None)
            for dep in data["deployments"].pop(name, {}):
                self.state.log_path(name, dep).unlink(missing_ok=True)
            data["tokens"] = {t: v for t, v in data["tokens"].items() if v["endpoint"] != name}
        elif kind == "deployment.put":
            self._provision(data, op)
        elif kind == "deployment.delete":
            data["deployments"].get(target["endpoint"], {}).pop(target["deployment"], None)
            self.state.log_path(target["endpoint"], target["deployment"]).unlink(missing_ok=True)
        elif kind == "keys.regenerate":
            record = data["endpoints"].get(target["endpoint"])
            if record is not None:
                record[f"{target['key_type']}_key"] = new_key()

    def _provision(self, data: dict[str, Any], op: dict[str, Any]) -> None:
        from fakes.azure_scoring import ScoringRuntime

        endpoint, name = op["target"]["endpoint"], op["target"]["deployment"]
        deployments = data["deployments"].get(endpoint, {})
        record = deployments.get(name)
        if record is None:
            op["status"], op["error"] = "Failed", {"code": "NotFound", "message": f"deployment {name} is gone"}
            return
        reason = ScoringRuntime(self.state).provision(endpoint, record)
        previous = op["target"].get("previous")
        if reason is None:
            record.update(provisioning_state="Succeeded", serving=True)
            return
        op["status"] = "Failed"
        op["error"] = {"code": "ResourceOperationFailure", "message": (
            f"Resource provisioning failed for deployment {name}: the scoring container crashed in init(): "
            f"{reason}. Check the deployment logs.")}
        if previous is not None and previous.get("serving"):  # the old version keeps serving
            deployments[name] = dict(previous, provisioning_state="Failed")
        else:
            record.update(provisioning_state="Failed", serving=False)

    # ---- online endpoints --------------------------------------------------------------------
    def _endpoint_key(self, data: dict[str, Any], name: str) -> str | None:
        return next((k for k in data["endpoints"] if k.lower() == name.lower()), None)

    def _endpoint_body(self, data: dict[str, Any], key: str) -> dict[str, Any]:
        record = data["endpoints"][key]
        return {
            "id": f"{self.ws_id()}/onlineEndpoints/{key}", "name": key,
            "type": f"{PROVIDER}/workspaces/onlineEndpoints", "location": REGION, "kind": "Managed",
            "tags": record["tags"], "identity": record.get("identity") or {"type": "SystemAssigned",
                                                                          "principalId": SUBSCRIPTION,
                                                                          "tenantId": SUBSCRIPTION},
            "properties": {
                "description": record["description"], "properties": record["properties"],
                "authMode": record["auth_mode_wire"],
                "scoringUri": self.state.scoring_uri(key),
                "swaggerUri": self.state.scoring_uri(key).replace("/score", "/swagger.json"),
                "provisioningState": record.get("provisioning_state", "Succeeded"),
                "traffic": record["traffic"], "mirrorTraffic": record["mirror_traffic"],
                "publicNetworkAccess": record.get("public_network_access", "Enabled")},
            "systemData": _system_data(record.get("created_at"))}

    def list_endpoints(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        data = self.state.read()
        return json_response(200, {"value": [self._endpoint_body(data, k) for k in sorted(data["endpoints"])]})

    def get_endpoint(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        data = self.state.read()
        key = self._endpoint_key(data, match["endpoint"])
        if key is None:
            raise not_found("onlineEndpoints", match["endpoint"])
        return json_response(200, self._endpoint_body(data, key))

    def put_endpoint(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        body = request.json()
        props = body.get("properties") or {}
        with self.state.transaction() as data:
            key = self._endpoint_key(data, match["endpoint"]) or match["endpoint"]
            if self._busy(data, ("endpoint", key.lower())):
                raise ServiceRefusal(409, "Conflict", f"There is an operation in progress on endpoint {key}: "
                                                      "wait for it to complete before starting another one.")
            traffic = {str(k): int(v) for k, v in (props.get("traffic") or {}).items()}
            mirror = {str(k): int(v) for k, v in (props.get("mirrorTraffic") or {}).items()}
            deployments = set(data["deployments"].get(key, {}))
            _check_traffic_rules(traffic, mirror, deployments)
            auth = str(props.get("authMode") or "Key")
            record = data["endpoints"].get(key)
            if record is None:
                record = data["endpoints"][key] = {
                    "name": key, "auth_mode": auth.lower().replace("amltoken", "aml_token"),
                    "auth_mode_wire": auth, "primary_key": new_key(), "secondary_key": new_key(),
                    "created_at": _now()}
                data["deployments"].setdefault(key, {})
                status = 201
            else:
                if auth.lower() != record["auth_mode_wire"].lower():
                    raise bad_request("The authMode of an existing endpoint cannot be changed.")
                status = 200
            record.update(description=props.get("description") or "", tags=dict(body.get("tags") or {}),
                          properties=dict(props.get("properties") or {}), traffic=traffic, mirror_traffic=mirror,
                          identity=body.get("identity"),
                          public_network_access=props.get("publicNetworkAccess") or "Enabled",
                          provisioning_state="Creating" if status == 201 else "Updating")
            op_id = self._start_operation(data, "endpoint.put", {"key": ["endpoint", key.lower()], "endpoint": key})
            answer = self._endpoint_body(data, key)
        return json_response(status, answer, **self._operation_headers(op_id, request.query["api-version"]))

    def delete_endpoint(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        with self.state.transaction() as data:
            key = self._endpoint_key(data, match["endpoint"])
            if key is None:
                return WireResponse(204)
            if self._busy(data, ("endpoint", key.lower())):
                raise ServiceRefusal(409, "Conflict", f"There is an operation in progress on endpoint {key}.")
            data["endpoints"][key]["provisioning_state"] = "Deleting"
            op_id = self._start_operation(data, "endpoint.delete", {"key": ["endpoint", key.lower()],
                                                                     "endpoint": key})
        return WireResponse(202, b"", self._operation_headers(op_id, request.query["api-version"]))

    def _endpoint_record(self, data: dict[str, Any], name: str) -> tuple[str, dict[str, Any]]:
        key = self._endpoint_key(data, name)
        if key is None:
            raise not_found("onlineEndpoints", name)
        return key, data["endpoints"][key]

    def list_keys(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        _, record = self._endpoint_record(self.state.read(), match["endpoint"])
        if record["auth_mode"] != "key":
            raise bad_request("Keys are only available for endpoints with authMode Key.")
        return json_response(200, {"primaryKey": record["primary_key"], "secondaryKey": record["secondary_key"]})

    def get_token(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        with self.state.transaction() as data:
            key, record = self._endpoint_record(data, match["endpoint"])
            if record["auth_mode"] != "aml_token":
                raise bad_request("Tokens are only available for endpoints with authMode AMLToken.")
            token, now = new_key(), time.time()
            data["tokens"][token] = {"endpoint": key, "expiry": now + TOKEN_TTL_S}
        return json_response(200, {"accessToken": token, "tokenType": "Bearer",
                                   "expiryTimeUtc": int(now + TOKEN_TTL_S),
                                   "refreshAfterTimeUtc": int(now + TOKEN_TTL_S / 2)})

    def regenerate_keys(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        key_type = str(request.json().get("keyType") or "").lower()
        if key_type not in ("primary", "secondary"):
            raise bad_request(f"keyType must be Primary or Secondary, got {key_type!r}.")
        with self.state.transaction() as data:
            key, record = self._endpoint_record(data, match["endpoint"])
            if record["auth_mode"] != "key":
                raise bad_request("Keys can only be regenerated for endpoints with authMode Key.")
            op_id = self._start_operation(data, "keys.regenerate", {"key": ["keys", key.lower()], "endpoint": key,
                                                                     "key_type": key_type})
        return WireResponse(202, b"", self._operation_headers(op_id, request.query["api-version"]))

    # ---- online deployments -------------------------------------------------------------------
    def _deployment_body(self, endpoint: str, record: dict[str, Any]) -> dict[str, Any]:
        props = dict(record["wire"])
        props["provisioningState"] = record["provisioning_state"]
        return {"id": f"{self.ws_id()}/onlineEndpoints/{endpoint}/deployments/{record['name']}",
                "name": record["name"], "type": f"{PROVIDER}/workspaces/onlineEndpoints/deployments",
                "location": REGION, "kind": "Managed", "tags": record["tags"], "properties": props,
                "sku": record.get("sku") or {"name": "Default", "capacity": record["instance_count"]},
                "systemData": _system_data(record.get("created_at"))}

    def _deployment_record(self, data: dict[str, Any], endpoint: str, name: str) -> tuple[str, dict[str, Any]]:
        key, _ = self._endpoint_record(data, endpoint)
        deployments = data["deployments"].get(key, {})
        found = next((k for k in deployments if k.lower() == name.lower()), None)
        if found is None:
            raise not_found(f"onlineEndpoints/{key}/deployments", name)
        return key, deployments[found]

    def list_deployments(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        data = self.state.read()
        key, _ = self._endpoint_record(data, match["endpoint"])
        records = data["deployments"].get(key, {})
        return json_response(200, {"value": [self._deployment_body(key, records[n]) for n in sorted(records)]})

    def get_deployment(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        key, record = self._deployment_record(self.state.read(), match["endpoint"], match["deployment"])
        return json_response(200, self._deployment_body(key, record))

    def put_deployment(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        body = request.json()
        props = dict(body.get("properties") or {})
        name = match["deployment"]
        with self.state.transaction() as data:
            endpoint, _ = self._endpoint_record(data, match["endpoint"])
            deployments = data["deployments"].setdefault(endpoint, {})
            existing = next((k for k in deployments if k.lower() == name.lower()), None)
            name = existing or name
            if self._busy(data, ("deployment", endpoint.lower(), name.lower())):
                raise ServiceRefusal(409, "Conflict", f"There is an operation in progress on deployment {name} of "
                                                      f"endpoint {endpoint}: wait for it to complete.")
            previous = deployments.get(name)
            code = props.get("codeConfiguration") or {}
            if not props.get("model"):
                raise bad_request(f"Deployment '{name}' needs a model.")
            model_dir = self._model_folder(data, props["model"])
            if code:  # a scoring script of the user's
                if not code.get("codeId") or not code.get("scoringScript"):
                    raise bad_request("codeConfiguration needs codeId and scoringScript.")
                code_dir = self._code_folder(data, code["codeId"])
                if not (code_dir / code["scoringScript"]).is_file():
                    raise bad_request(f"Scoring script {code['scoringScript']} was not found in code "
                                      f"{code['codeId']}.")
            else:  # no-code: the service serves an MLflow model with a scoring script and image of its own
                model_type = self._model_record(data, props["model"])["properties"].get("modelType")
                if model_type != "mlflow_model":
                    raise bad_request("A managed online deployment without an MLflow model needs codeConfiguration "
                                      f"with codeId and scoringScript (model {props['model']} is a {model_type}).")
                code_dir = None
            for key, default in DEPLOYMENT_DEFAULTS.items():  # what the service fills in, as its answers show
                if props.get(key) is None:
                    props[key] = default
            uid = uuid.uuid4().hex
            sku = body.get("sku") or {}
            record = {
                "name": name, "uid": uid, "generation": (previous["generation"] + 1) if previous else 1,
                "model_dir": str(model_dir), "scoring_script": code.get("scoringScript"),
                "code_dir": str(self.state.snapshot_code(endpoint, name, uid, code_dir)) if code_dir else None,
                "instance_count": int(sku.get("capacity") or 1), "sku": sku or None,
                "environment_variables": {str(k): str(v) for k, v in
                                          (props.get("environmentVariables") or {}).items()},
                "tags": dict(body.get("tags") or {}), "wire": props,
                "provisioning_state": "Creating" if previous is None else "Updating",
                "serving": bool(previous and previous.get("serving")),
                "created_at": (previous or {}).get("created_at") or _now()}
            deployments[name] = record
            op_id = self._start_operation(data, "deployment.put", {
                "key": ["deployment", endpoint.lower(), name.lower()], "endpoint": endpoint, "deployment": name,
                "previous": previous})
            answer = self._deployment_body(endpoint, record)
        return json_response(201 if previous is None else 200, answer,
                             **self._operation_headers(op_id, request.query["api-version"]))

    def delete_deployment(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        with self.state.transaction() as data:
            endpoint, record = self._deployment_record(data, match["endpoint"], match["deployment"])
            name = record["name"]
            live = data["endpoints"][endpoint]
            if live["traffic"].get(name, 0) > 0:
                raise bad_request(f"Deployment '{name}' has {live['traffic'][name]}% traffic and cannot be "
                                  "deleted: set its traffic to 0 first.")
            if live["mirror_traffic"].get(name, 0) > 0:
                raise bad_request(f"Deployment '{name}' receives mirror traffic and cannot be deleted.")
            if self._busy(data, ("deployment", endpoint.lower(), name.lower())):
                raise ServiceRefusal(409, "Conflict", f"There is an operation in progress on deployment {name}.")
            record["provisioning_state"] = "Deleting"
            op_id = self._start_operation(data, "deployment.delete", {
                "key": ["deployment", endpoint.lower(), name.lower()], "endpoint": endpoint, "deployment": name})
        return WireResponse(202, b"", self._operation_headers(op_id, request.query["api-version"]))

    def deployment_logs(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        endpoint, record = self._deployment_record(self.state.read(), match["endpoint"], match["deployment"])
        tail = int(request.json().get("tail") or 500)
        path = self.state.log_path(endpoint, record["name"])
        lines = path.read_text().splitlines() if path.exists() else []
        return json_response(200, {"content": "\n".join(lines[-tail:])})

    # ---- where uploaded files are ---------------------------------------------------------------
    def _code_folder(self, data: dict[str, Any], code_id: str) -> Path:
        m = re.search(r"/codes/([^/]+)/versions/([^/]+)$", code_id, re.IGNORECASE)
        record = data["codes"].get(f"{m[1]}:{m[2]}") if m else None
        if record is None:
            raise bad_request(f"Code {code_id} was not found in the workspace.")
        return self._blob_folder(record["properties"]["codeUri"])

    def _model_record(self, data: dict[str, Any], model_id: str) -> dict[str, Any]:
        m = re.search(r"/models/([^/]+)/versions/([^/]+)$", model_id, re.IGNORECASE)
        versions = data["models"].get(m[1], {}) if m else {}
        record = versions.get(m[2]) if m else None
        if record is None:
            raise bad_request(f"Model {model_id} was not found in the workspace.")
        return record

    def _model_folder(self, data: dict[str, Any], model_id: str) -> Path:
        return self._blob_folder(self._model_record(data, model_id)["properties"]["modelUri"])

    def _blob_folder(self, uri: str) -> Path:
        """A datastore or blob URI -> where the fake blob storage keeps it."""
        from fakes.azure_blob import blob_root

        m = re.match(r"azureml://.*?/datastores/[^/]+/paths/(?P<path>.+)$", uri) or \
            re.match(rf"https://{self.state.storage_account}\.blob\.core\.windows\.net/"
                     r"(?P<container>[^/?]+)/(?P<path>[^?]+)", uri)
        if m is None:
            raise bad_request(f"Cannot read asset {uri}: not in the workspace's storage.")
        container = m.groupdict().get("container") or STORAGE_CONTAINER
        folder = blob_root(self.state, self.state.storage_account, container) / m["path"].rstrip("/")
        if not folder.exists():
            raise bad_request(f"Asset {uri} has no files in storage.")
        return folder

    # ---- assets: models, code, environments --------------------------------------------------
    def _model_body(self, name: str, record: dict[str, Any]) -> dict[str, Any]:
        return {"id": f"{self.ws_id()}/models/{name}/versions/{record['version']}", "name": record["version"],
                "type": f"{PROVIDER}/workspaces/models/versions", "properties": record["properties"],
                "systemData": _system_data(record["created_at"])}

    def put_model(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        props = dict(request.json().get("properties") or {})
        name, version = match["name"], match["version"]
        if not str(version).isdigit():
            raise bad_request(f"Model version must be an integer, got {version!r}.")
        with self.state.transaction() as data:
            versions = data["models"].setdefault(name, {})
            if version in versions:
                raise ServiceRefusal(409, "Conflict", f"Model {name}:{version} already exists and cannot be "
                                                      "changed.")
            self._blob_folder(str(props.get("modelUri") or ""))
            props.setdefault("modelType", "custom_model")
            props.setdefault("tags", {})
            props.setdefault("properties", {})
            props.setdefault("isAnonymous", False)
            props.setdefault("isArchived", False)
            props["flavors"] = props.get("flavors") or {}  # the service answers {} for a model without flavors
            record = versions[version] = {"version": version, "properties": props, "created_at": _now()}
        return json_response(201, self._model_body(name, record))

    def get_model(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        record = self.state.read()["models"].get(match["name"], {}).get(match["version"])
        if record is None:
            raise not_found(f"models/{match['name']}/versions", match["version"])
        return json_response(200, self._model_body(match["name"], record))

    def list_model_versions(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        versions = self.state.read()["models"].get(match["name"], {})
        ordered = sorted(versions.values(), key=lambda r: int(r["version"]), reverse=True)
        top = request.query.get("$top")
        if top:
            ordered = ordered[:int(top)]
        return json_response(200, {"value": [self._model_body(match["name"], r) for r in ordered]})

    def list_models(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        models = self.state.read()["models"]
        return json_response(200, {"value": [
            {"id": f"{self.ws_id()}/models/{name}", "name": name, "type": f"{PROVIDER}/workspaces/models",
             "properties": {"latestVersion": max(versions, key=int), "nextVersion": str(int(max(versions, key=int)) + 1),
                            "tags": {}, "properties": {}, "isArchived": False}, "systemData": _system_data()}
            for name, versions in sorted(models.items()) if versions]})

    def get_model_container(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        versions = self.state.read()["models"].get(match["name"])
        if not versions:
            raise not_found("models", match["name"])
        latest = max(versions, key=int)
        return json_response(200, {"id": f"{self.ws_id()}/models/{match['name']}", "name": match["name"],
                                   "type": f"{PROVIDER}/workspaces/models",
                                   "properties": {"latestVersion": latest, "nextVersion": str(int(latest) + 1),
                                                  "tags": {}, "properties": {}, "isArchived": False},
                                   "systemData": _system_data()})

    def _asset_body(self, kind: str, name: str, version: str, record: dict[str, Any]) -> dict[str, Any]:
        return {"id": f"{self.ws_id()}/{kind}/{name}/versions/{version}", "name": version,
                "type": f"{PROVIDER}/workspaces/{kind}/versions", "properties": record["properties"],
                "systemData": _system_data(record["created_at"])}

    def put_code(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        props = dict(request.json().get("properties") or {})
        self._blob_folder(str(props.get("codeUri") or ""))
        with self.state.transaction() as data:
            record = data["codes"][f"{match['name']}:{match['version']}"] = {"properties": props,
                                                                             "created_at": _now()}
        return json_response(201, self._asset_body("codes", match["name"], match["version"], record))

    def get_code(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        record = self.state.read()["codes"].get(f"{match['name']}:{match['version']}")
        if record is None:
            raise not_found(f"codes/{match['name']}/versions", match["version"])
        return json_response(200, self._asset_body("codes", match["name"], match["version"], record))

    def list_codes(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        wanted = request.query.get("hash")
        found = [(key, r) for key, r in self.state.read()["codes"].items()
                 if key.split(":")[0] == match["name"] and (not wanted or r["properties"].get("hash") == wanted)]
        return json_response(200, {"value": [self._asset_body("codes", *key.split(":"), r) for key, r in found]})

    def put_data(self, request: WireRequest, match: re.Match) -> WireResponse:
        """A data asset version (a deployment's data collector registers one per collection)."""
        self._check_scope(match)
        props = dict(request.json().get("properties") or {})
        if not props.get("dataUri") or not props.get("dataType"):
            raise bad_request("A data version needs dataType and dataUri.")
        key = f"{match['name']}:{match['version']}"
        with self.state.transaction() as data:
            previous = data["data"].get(key)
            if previous is not None and previous["properties"].get("dataUri") != props["dataUri"]:
                raise ServiceRefusal(409, "Conflict", f"Data {key} already exists with another dataUri and "
                                                      "cannot be changed.")
            props.setdefault("isAnonymous", False)
            props.setdefault("tags", {})
            props.setdefault("properties", {})
            record = data["data"][key] = previous or {"properties": props, "created_at": _now()}
        return json_response(200 if previous else 201,
                             self._asset_body("data", match["name"], match["version"], record))

    def get_data(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        record = self.state.read().get("data", {}).get(f"{match['name']}:{match['version']}")
        if record is None:
            raise not_found(f"data/{match['name']}/versions", match["version"])
        return json_response(200, self._asset_body("data", match["name"], match["version"], record))

    def put_environment(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        props = dict(request.json().get("properties") or {})
        if not props.get("image") and not props.get("build"):
            raise bad_request("An environment needs an image or a build context.")
        with self.state.transaction() as data:
            record = data["environments"][f"{match['name']}:{match['version']}"] = {"properties": props,
                                                                                    "created_at": _now()}
        return json_response(201, self._asset_body("environments", match["name"], match["version"], record))

    def get_environment(self, request: WireRequest, match: re.Match) -> WireResponse:
        self._check_scope(match)
        record = self.state.read()["environments"].get(f"{match['name']}:{match['version']}")
        if record is None:
            raise not_found(f"environments/{match['name']}/versions", match["version"])
        return json_response(200, self._asset_body("environments", match["name"], match["version"], record))


def _check_traffic_rules(traffic: dict[str, int], mirror: dict[str, int], deployments: set[str]) -> None:
    """The service's traffic rules, answered as a 400 whatever the client checked."""
    for name in traffic:
        if name not in deployments:
            raise bad_request(f"Traffic rule refers to deployment '{name}', which does not exist on this endpoint.")
    total = sum(traffic.values())
    if traffic and total not in (0, 100):
        raise bad_request(f"Traffic values must sum to 0 or 100, got {total}.")
    if len(mirror) > 1:
        raise bad_request("Mirror traffic can only be set to a single deployment.")
    for name, percent in mirror.items():
        if name not in deployments:
            raise bad_request(f"Mirror traffic refers to deployment '{name}', which does not exist on this endpoint.")
        if percent > MAX_MIRROR:
            raise bad_request(f"Mirror traffic for '{name}' is {percent}%: at most {MAX_MIRROR}% is allowed.")
        if traffic.get(name, 0) > 0:
            raise bad_request(f"Deployment '{name}' cannot receive both live and mirror traffic.")


def routes(state: FakeWorkspaceState) -> list[tuple[str | None, re.Pattern, Callable]]:
    arm = ArmService(state)
    ep = rf"{_WS}/onlineendpoints/(?P<endpoint>{_NAME})"
    dep = rf"{ep}/deployments/(?P<deployment>{_NAME})"
    ops = (rf"{re.escape(ARM_HOST)}/subscriptions/[^/]+/providers/microsoft\.machinelearningservices/locations/"
           rf"[^/]+/mfeoperations")
    table = [
        ("GET", rf"{ops}status/(?P<op>[^/]+)", arm.operation_status),
        ("GET", rf"{ops}results/(?P<op>[^/]+)", arm.operation_result),
        ("GET", _WS, arm.workspace),
        ("GET", rf"{_WS}/datastores", arm.datastores),
        ("GET", rf"{_WS}/datastores/(?P<name>{_NAME})", arm.datastore),
        ("POST", rf"{_WS}/datastores/(?P<name>{_NAME})/listsecrets", arm.datastore_secrets),
        ("GET", rf"{_WS}/onlineendpoints", arm.list_endpoints),
        ("GET", ep, arm.get_endpoint),
        ("PUT", ep, arm.put_endpoint),
        ("DELETE", ep, arm.delete_endpoint),
        ("POST", rf"{ep}/listkeys", arm.list_keys),
        ("POST", rf"{ep}/token", arm.get_token),
        ("POST", rf"{ep}/regeneratekeys", arm.regenerate_keys),
        ("GET", rf"{ep}/deployments", arm.list_deployments),
        ("GET", dep, arm.get_deployment),
        ("PUT", dep, arm.put_deployment),
        ("DELETE", dep, arm.delete_deployment),
        ("POST", rf"{dep}/getlogs", arm.deployment_logs),
        ("GET", rf"{_WS}/models", arm.list_models),
        ("GET", rf"{_WS}/models/(?P<name>{_NAME})", arm.get_model_container),
        ("GET", rf"{_WS}/models/(?P<name>{_NAME})/versions", arm.list_model_versions),
        ("GET", rf"{_WS}/models/(?P<name>{_NAME})/versions/(?P<version>{_NAME})", arm.get_model),
        ("PUT", rf"{_WS}/models/(?P<name>{_NAME})/versions/(?P<version>{_NAME})", arm.put_model),
        ("POST", rf"{_WS}/(?:models|codes)/{_NAME}/versions/{_NAME}/startpendingupload", arm.pending_upload),
        ("GET", rf"{_WS}/codes/(?P<name>{_NAME})/versions", arm.list_codes),
        ("GET", rf"{_WS}/codes/(?P<name>{_NAME})/versions/(?P<version>{_NAME})", arm.get_code),
        ("PUT", rf"{_WS}/codes/(?P<name>{_NAME})/versions/(?P<version>{_NAME})", arm.put_code),
        ("GET", rf"{_WS}/environments/(?P<name>{_NAME})/versions/(?P<version>{_NAME})", arm.get_environment),
        ("GET", rf"{_WS}/data/(?P<name>{_NAME})/versions/(?P<version>{_NAME})", arm.get_data),
        ("PUT", rf"{_WS}/data/(?P<name>{_NAME})/versions/(?P<version>{_NAME})", arm.put_data),
        ("PUT", rf"{_WS}/environments/(?P<name>{_NAME})/versions/(?P<version>{_NAME})", arm.put_environment),
    ]
    return [(method, re.compile(pattern, re.IGNORECASE), handler) for method, pattern, handler in table]
