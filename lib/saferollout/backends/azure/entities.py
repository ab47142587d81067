"""Our specs <-> the SDK's entity classes (ManagedOnlineEndpoint, ManagedOnlineDeployment, Model, keys).

One place knows how a `DeploymentSpec` read from a CLI v2 `deployment.yml` becomes the SDK object that
`ml_client.online_deployments.begin_create_or_update` takes, and how the SDK's answers become the
backend-neutral `Endpoint`, `Deployment`, `Model` and `Credentials` of `saferollout.backends.base`.
"""
from __future__ import annotations

import io
import json
import re
import warnings
from datetime import date, datetime
from dataclasses import asdict
from enum import Enum
from typing import Any, Callable, Mapping

import yaml
from azure.ai.ml import load_online_deployment, load_online_endpoint

from azure.ai.ml.entities import (BuildContext, CodeConfiguration, EndpointAuthKeys, Environment, ManagedOnlineDeployment,
                                  ManagedOnlineEndpoint, Model as SdkModel, OnlineRequestSettings,
                                  ProbeSettings)

from saferollout.backends.base import Credentials, Deployment, Endpoint, Model
from saferollout.errors import SpecError
from saferollout.specs import DeploymentSpec, EndpointSpec

# Settings of the CLI v2 YAML that our specs keep in `extra` (the local platform records them, it has no use for
# them) and that the SDK entity must carry to Azure. The SDK's own YAML schema reads them: it knows their
# shapes (a scale type's fields, a data collector's collections, an identity's user-assigned ids) and
# refuses what Azure would refuse, with its message, before anything is sent.
ENDPOINT_AZURE_SETTINGS = ("public_network_access", "identity")
DEPLOYMENT_AZURE_SETTINGS = ("egress_public_network_access", "app_insights_enabled", "scale_settings",
                             "data_collector")


def _azure_settings(load: Callable[..., Any], document: dict[str, Any], extra: Mapping[str, Any],
                    keys: tuple[str, ...], what: str) -> dict[str, Any]:
    """The SDK objects for `keys` of `extra`, read by the SDK's YAML loader from a minimal `document`."""
    given = {k: extra[k] for k in keys if extra.get(k) is not None}
    if not given:
        return {}
    with warnings.catch_warnings():  # DataCollector is an 'experimental class': a warning per load
        warnings.simplefilter("ignore")
        try:
            loaded = load(io.StringIO(yaml.safe_dump({**document, **given})), relative_origin=".")
            if isinstance(loaded, ManagedOnlineDeployment):
                loaded._validate()  # the SDK's rules beyond the schema (managed: DefaultScaleSettings only)
        except Exception as exc:  # noqa: BLE001 - marshmallow's or the SDK's ValidationError, by version
            raise SpecError(f"{what}: Azure's schema refuses {', '.join(given)}: {_schema_problem(exc)}") from exc
    return {k: getattr(loaded, k) for k in given}


def _schema_problem(exc: Exception) -> str:
    """The SDK's validation message is a JSON block between a header and help links: keep the block."""
    text = str(exc)
    block = re.search(r"\{.*\}", text, re.DOTALL)
    if block:
        try:
            return json.dumps(json.loads(block.group(0)), separators=(", ", ": "))
        except ValueError:
            pass
    return " ".join(text.split())[:500]


def endpoint_entity(spec: EndpointSpec) -> ManagedOnlineEndpoint:
    settings = _azure_settings(load_online_endpoint, {"name": spec.name}, spec.extra, ENDPOINT_AZURE_SETTINGS,
                               f"endpoint {spec.name!r}")
    return ManagedOnlineEndpoint(name=spec.name, auth_mode=spec.auth_mode, description=spec.description or None,
                                 tags=dict(spec.tags), properties=dict(spec.properties) or None,
                                 traffic=dict(spec.traffic) or None,
                                 mirror_traffic=dict(spec.mirror_traffic) or None, **settings)


def environment_entity(value: Any) -> Any:
    """The YAML's `environment`: an `azureml:` reference stays a string, an inline mapping becomes an entity."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        known = {"name", "version", "description", "image", "conda_file", "tags"}
        fields = {k: v for k, v in value.items() if k in known}
        build = value.get("build")
        if isinstance(build, Mapping) and build.get("path"):
            fields["build"] = BuildContext(path=build["path"], dockerfile_path=build.get("dockerfile_path"))
        return Environment(**fields)
    return value


def deployment_entity(spec: DeploymentSpec, model: Any) -> ManagedOnlineDeployment:
    """`model` is already resolved: an `azureml:<name>:<version>` string or an SDK Model for a local path."""
    code = None
    if spec.code_path and spec.scoring_script:
        code = CodeConfiguration(code=spec.code_path, scoring_script=spec.scoring_script)
    settings = _azure_settings(load_online_deployment, {"name": spec.name, "endpoint_name": spec.endpoint_name,
                                                        "instance_type": spec.instance_type},
                               spec.extra, DEPLOYMENT_AZURE_SETTINGS, f"deployment {spec.name!r}")
    return ManagedOnlineDeployment(
        name=spec.name, endpoint_name=spec.endpoint_name, model=model, code_configuration=code,
        environment=environment_entity(spec.environment), instance_type=spec.instance_type,
        instance_count=spec.instance_count,
        request_settings=OnlineRequestSettings(**asdict(spec.request_settings)),
        liveness_probe=ProbeSettings(**asdict(spec.liveness_probe)),
        readiness_probe=ProbeSettings(**asdict(spec.readiness_probe)),
        environment_variables=dict(spec.environment_variables) or None,
        tags=dict(spec.tags), properties=dict(spec.properties) or None, description=spec.description or None,
        **settings)


def model_entity(name: str, path: str, description: str, tags: Mapping[str, str],
                 properties: Mapping[str, str], model_type: str = "custom_model") -> SdkModel:
    return SdkModel(name=name, path=path, type=model_type, description=description or None,
                    tags={str(k): str(v) for k, v in tags.items()},
                    properties={str(k): str(v) for k, v in properties.items()})


# ---- SDK -> ours ------------------------------------------------------------------------------

def _ints(mapping: Mapping[str, Any] | None) -> dict[str, int]:
    return {str(k): int(v) for k, v in (mapping or {}).items()}


def _strs(mapping: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): "" if v is None else str(v) for k, v in (mapping or {}).items()}


def enum_text(value: Any) -> str:
    """An SDK enum's wire value (azure-ai-ml answers states as str-Enums whose str() is 'Class.MEMBER')."""
    if isinstance(value, Enum):
        return str(value.value)
    return "" if value is None else str(value)


def endpoint_from_sdk(entity: Any) -> Endpoint:
    return Endpoint(name=entity.name, auth_mode=enum_text(entity.auth_mode or "key").lower(),
                    scoring_uri=entity.scoring_uri or "", traffic=_ints(entity.traffic),
                    mirror_traffic=_ints(entity.mirror_traffic), tags=_strs(entity.tags),
                    properties=_strs(entity.properties), description=entity.description or "",
                    provisioning_state=enum_text(entity.provisioning_state),
                    openapi_uri=entity.openapi_uri or "", kind=getattr(entity, "kind", None) or "Managed")


def model_ref_of(model: Any) -> str | None:
    """A deployment's model as `azureml:<name>:<version>` where the SDK tells us name and version."""
    if model is None:
        return None
    if isinstance(model, str):
        if model.startswith("/subscriptions/") and "/models/" in model:  # an ARM id
            parts = model.rstrip("/").split("/")
            return f"azureml:{parts[parts.index('models') + 1]}:{parts[-1]}"
        return model
    if getattr(model, "name", None) and getattr(model, "version", None):
        return f"azureml:{model.name}:{model.version}"
    return str(getattr(model, "path", "") or "") or None


def _settings(obj: Any, fields: tuple[str, ...]) -> dict[str, int]:
    if obj is None:
        return {}
    return {f: int(getattr(obj, f)) for f in fields if getattr(obj, f, None) is not None}


PROBE_FIELDS = ("initial_delay", "period", "timeout", "success_threshold", "failure_threshold")
REQUEST_FIELDS = ("request_timeout_ms", "max_concurrent_requests_per_instance", "max_queue_wait_ms")


def _environment_view(environment: Any) -> Any:
    if environment is None or isinstance(environment, str):
        return environment
    if getattr(environment, "name", None) and getattr(environment, "version", None):
        return f"azureml:{environment.name}:{environment.version}"
    return {"image": getattr(environment, "image", None)}


def deployment_from_sdk(entity: Any, reason: str = "") -> Deployment:
    code = entity.code_configuration
    return Deployment(
        name=entity.name, endpoint_name=entity.endpoint_name, model=model_ref_of(entity.model),
        provisioning_state=enum_text(entity.provisioning_state), instance_type=entity.instance_type or "",
        instance_count=int(entity.instance_count or 0), tags=_strs(entity.tags),
        properties=_strs(entity.properties), description=entity.description or "",
        environment=_environment_view(entity.environment),
        code_configuration=({"code": str(code.code), "scoring_script": str(code.scoring_script)}
                            if code is not None else None),
        request_settings=_settings(entity.request_settings, REQUEST_FIELDS),
        liveness_probe=_settings(entity.liveness_probe, PROBE_FIELDS),
        readiness_probe=_settings(entity.readiness_probe, PROBE_FIELDS),
        environment_variables=_strs(entity.environment_variables), reason=reason)


def model_from_sdk(entity: Any) -> Model:
    created = getattr(getattr(entity, "creation_context", None), "created_at", None)
    return Model(name=entity.name, version=int(entity.version), path=str(entity.path or ""),
                 description=entity.description or "", tags=_strs(entity.tags),
                 properties=_strs(entity.properties), type=str(entity.type or "custom_model"),
                 created_at=created.isoformat() if isinstance(created, (datetime, date)) else str(created or ""))


def credentials_from_sdk(keys: Any) -> Credentials:
    if isinstance(keys, EndpointAuthKeys):
        return Credentials(auth_mode="key", primary_key=keys.primary_key, secondary_key=keys.secondary_key)
    expiry = getattr(keys, "expiry_time_utc", None)
    return Credentials(auth_mode="aml_token", access_token=keys.access_token,
                       expiry_time_utc=float(expiry) if expiry is not None else None)

