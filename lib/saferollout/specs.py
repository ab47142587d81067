"""Azure ML CLI v2 YAML -> validated EndpointSpec / DeploymentSpec / ModelSpec.

The files users already have for `az ml online-endpoint create -f endpoint.yml` load here unchanged.
Keys the Azure schema knows but the local platform has no use for (identity, networking, scale
settings...) are kept in `extra`: the local platform records them, the Azure backend sends those it names
(`backends/azure/entities.py`) to Azure; keys the schema does not know are refused, because a typo such as
`instance_cout` must not silently deploy one instance.

A deployment runs a scoring script (`code_configuration`), or, as Azure's no-code deployment, serves an
MLflow model without one: a model folder holding an `MLmodel` file, or a registered model of type
`mlflow_model` (which only the backend that registered it can check).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, asdict, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from saferollout.errors import SpecError

NAME_RE = re.compile(r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$")
MODEL_NAME_RE = re.compile(r"^[a-zA-Z0-9][-._a-zA-Z0-9]{0,254}$")
AUTH_MODES = ("key", "aml_token")
MAX_MIRROR_PERCENT = 50

ENDPOINT_KEYS = {
    "$schema", "name", "description", "tags", "properties", "auth_mode", "traffic", "mirror_traffic",
    # known to Azure, kept in `extra` (sent by the Azure backend: identity, public_network_access)
    "identity", "public_network_access", "kind", "location", "compute", "id", "scoring_uri",
    "openapi_uri", "provisioning_state",
}
DEPLOYMENT_KEYS = {
    "$schema", "name", "endpoint_name", "description", "tags", "properties", "model",
    "code_configuration", "environment", "instance_type", "instance_count", "request_settings",
    "liveness_probe", "readiness_probe", "environment_variables",
    # known to Azure, kept in `extra` (sent by the Azure backend: app_insights_enabled, scale_settings,
    # egress_public_network_access, data_collector)
    "app_insights_enabled", "scale_settings", "egress_public_network_access", "data_collector",
    "private_network_connection", "model_mount_path", "with_package", "type", "kind", "id",
    "provisioning_state", "resources",
}
REQUEST_SETTINGS_KEYS = {"request_timeout_ms", "max_concurrent_requests_per_instance", "max_queue_wait_ms"}
PROBE_KEYS = {"initial_delay", "period", "timeout", "success_threshold", "failure_threshold",
              "path", "port", "scheme", "method"}
CODE_CONFIGURATION_KEYS = {"code", "scoring_script"}
MODEL_KEYS = {"$schema", "name", "version", "path", "type", "description", "tags", "properties",
              "stage", "flavors", "id"}
MODEL_TYPES = ("custom_model", "mlflow_model", "triton_model")
MLFLOW_MODEL = "mlflow_model"
MLMODEL_FILE = "MLmodel"


def is_mlflow_model(path: str | Path) -> bool:
    """An MLflow model is a folder holding an `MLmodel` file (as MLflow saves one)."""
    return (Path(path).expanduser() / MLMODEL_FILE).is_file()


def model_type_of(path: str | Path) -> str:
    """The type to register a model folder or file as: `mlflow_model` when it holds an `MLmodel` file."""
    return MLFLOW_MODEL if is_mlflow_model(path) else "custom_model"


def check_model_type(path: str | Path, model_type: str) -> str:
    """A model type Azure knows; `mlflow_model` only for a folder holding an `MLmodel` file."""
    if model_type not in MODEL_TYPES:
        raise SpecError(f"model type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    if model_type == MLFLOW_MODEL and not is_mlflow_model(path):
        raise SpecError(f"model {path} cannot be registered as {MLFLOW_MODEL}: it is not a folder with an "
                        f"{MLMODEL_FILE} file (save it with mlflow.<flavor>.save_model)")
    return model_type


def check_scoring(spec: "DeploymentSpec", what: str = "deployment") -> None:
    """A deployment runs a scoring script, or serves an MLflow model without one (no-code, as on Azure).

    A registered model (`azureml:`) passes here: its type is the backend's to check (`check_no_code_model`).
    """
    if spec.code_path and spec.scoring_script:
        return
    fix = ("add code_configuration (code and scoring_script), or deploy an MLflow model (a folder with an "
           f"{MLMODEL_FILE} file, or a registered model of type {MLFLOW_MODEL}) without one")
    if not spec.model:
        raise SpecError(f"{what} has no code_configuration and no model: {fix}")
    if not spec.model.startswith("azureml:") and not is_mlflow_model(spec.model):
        raise SpecError(f"{what} has no code_configuration and its model {spec.model} is not an MLflow model "
                        f"(no {MLMODEL_FILE} file in it): {fix}")


def check_no_code_model(spec: "DeploymentSpec", model_ref: str, model_type: str, what: str = "deployment") -> None:
    """A deployment without code_configuration serves a registered model only if it is an MLflow model."""
    if not (spec.code_path and spec.scoring_script) and model_type != MLFLOW_MODEL:
        raise SpecError(f"{what} has no code_configuration and its model {model_ref} is a {model_type}, not an "
                        f"{MLFLOW_MODEL}: add code_configuration (code and scoring_script), or register the "
                        f"model folder (with its {MLMODEL_FILE} file) as type {MLFLOW_MODEL}")


def validate_name(name: Any, what: str = "endpoint") -> str:
    """Azure's rule for endpoint and deployment names: 3-32 chars, letter first, no trailing dash."""
    if not isinstance(name, str) or not (3 <= len(name) <= 32) or not NAME_RE.match(name):
        raise SpecError(
            f"invalid {what} name {name!r}: use 3-32 letters, digits and '-', starting with a letter "
            "and not ending with '-'"
        )
    return name


def validate_model_name(name: Any) -> str:
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise SpecError(f"invalid model name {name!r}: use letters, digits, '-', '_' and '.', at most 255 chars")
    return name


def _int(value: Any, what: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SpecError(f"{what} must be an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise SpecError(f"{what} must be an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise SpecError(f"{what} must be at least {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise SpecError(f"{what} must be at most {maximum}, got {number}")
    return number


def string_map(value: Any, what: str) -> dict[str, str]:
    """Tags, properties, environment variables: a mapping of names to string values (None becomes '')."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{what} must be a mapping of names to values, got {json.dumps(value, default=str)}")
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def _check_keys(data: Mapping, allowed: set[str], what: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SpecError(f"unknown key(s) in {what}: {', '.join(unknown)} (allowed: {', '.join(sorted(allowed - {'$schema'}))})")


def parse_traffic(value: Any, what: str = "traffic") -> dict[str, int]:
    """Parse `{"blue": 90, "green": 10}` or the CLI's `"blue=90 green=10"` into a mapping."""
    if value is None:
        return {}
    if isinstance(value, str):
        items: dict[str, Any] = {}
        for part in value.replace(",", " ").split():
            if "=" not in part:
                raise SpecError(f"{what} must look like 'blue=90 green=10', got {value!r}")
            key, _, number = part.partition("=")
            items[key.strip()] = number.strip()
        value = items
    if not isinstance(value, Mapping):
        raise SpecError(f"{what} must be a mapping of deployment names to percentages")
    return {validate_name(k, "deployment"): _int(v, f"{what} for {k!r}", 0, 100) for k, v in value.items()}


def validate_traffic(traffic: Mapping[str, int], deployments: set[str] | None = None) -> dict[str, int]:
    """Traffic sums to 0 or 100 and names only existing deployments."""
    traffic = parse_traffic(dict(traffic))
    total = sum(traffic.values())
    if total not in (0, 100):
        shown = " ".join(f"{k}={v}" for k, v in traffic.items())
        raise SpecError(f"traffic must sum to 0 or 100, got {total} ({shown})")
    if deployments is not None:
        unknown = sorted(set(traffic) - deployments)
        if unknown:
            raise SpecError(f"traffic names unknown deployment(s): {', '.join(unknown)}")
    return traffic


def validate_mirror(mirror: Mapping[str, int], traffic: Mapping[str, int],
                    deployments: set[str] | None = None) -> dict[str, int]:
    """At most one mirrored deployment, at most 50%, never one that has live traffic."""
    mirror = {k: v for k, v in parse_traffic(dict(mirror), "mirror_traffic").items() if v > 0}
    if len(mirror) > 1:
        raise SpecError(f"mirror_traffic may name at most one deployment, got {', '.join(mirror)}")
    for name, percent in mirror.items():
        if percent > MAX_MIRROR_PERCENT:
            raise SpecError(f"mirror_traffic for {name!r} is {percent}: at most {MAX_MIRROR_PERCENT} is allowed")
        if traffic.get(name, 0) > 0:
            raise SpecError(f"cannot mirror to {name!r}: it has {traffic[name]}% live traffic")
        if deployments is not None and name not in deployments:
            raise SpecError(f"mirror_traffic names unknown deployment {name!r}")
    return mirror


@dataclass
class EndpointSpec:
    name: str
    auth_mode: str = "key"
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    properties: dict[str, str] = field(default_factory=dict)
    traffic: dict[str, int] = field(default_factory=dict)
    mirror_traffic: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RequestSettings:
    request_timeout_ms: int = 5000
    max_concurrent_requests_per_instance: int = 1
    max_queue_wait_ms: int = 500


@dataclass
class ProbeSettings:
    initial_delay: int = 10
    period: int = 10
    timeout: int = 2
    success_threshold: int = 1
    failure_threshold: int = 30


@dataclass
class DeploymentSpec:
    name: str
    endpoint_name: str
    model: str | None = None  # azureml:<name>:<version>, azureml:<name>@latest, or a local path
    code_path: str | None = None
    scoring_script: str | None = None
    environment: Any = None  # recorded, not built
    instance_type: str = "Standard_DS3_v2"
    instance_count: int = 1
    request_settings: RequestSettings = field(default_factory=RequestSettings)
    liveness_probe: ProbeSettings = field(default_factory=ProbeSettings)
    readiness_probe: ProbeSettings = field(default_factory=lambda: ProbeSettings(failure_threshold=30))
    environment_variables: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    properties: dict[str, str] = field(default_factory=dict)
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DeploymentSpec":
        data = dict(data)
        data["request_settings"] = RequestSettings(**data.get("request_settings") or {})
        data["liveness_probe"] = ProbeSettings(**data.get("liveness_probe") or {})
        data["readiness_probe"] = ProbeSettings(**data.get("readiness_probe") or {})
        return cls(**data)

    def with_changes(self, **changes: Any) -> "DeploymentSpec":
        return replace(self, **changes)


@dataclass
class ModelSpec:
    name: str
    path: str
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    properties: dict[str, str] = field(default_factory=dict)
    type: str = "custom_model"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"malformed YAML in {path}{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{path} must hold a YAML mapping, got {type(data).__name__}")
    return data


def endpoint_spec_from_dict(data: Mapping[str, Any], what: str = "endpoint") -> EndpointSpec:
    _check_keys(data, ENDPOINT_KEYS, what)
    if "name" not in data:
        raise SpecError(f"{what} needs a name")
    auth_mode = str(data.get("auth_mode") or "key").lower()
    if auth_mode not in AUTH_MODES:
        raise SpecError(f"auth_mode must be one of {', '.join(AUTH_MODES)}, got {data.get('auth_mode')!r}")
    traffic = parse_traffic(data.get("traffic"))
    mirror = parse_traffic(data.get("mirror_traffic"), "mirror_traffic")
    return EndpointSpec(
        name=validate_name(data["name"]),
        auth_mode=auth_mode,
        description=str(data.get("description") or ""),
        tags=string_map(data.get("tags"), "tags"),
        properties=string_map(data.get("properties"), "properties"),
        traffic=traffic,
        mirror_traffic=mirror,
        extra={k: v for k, v in data.items() if k in ENDPOINT_KEYS - {
            "$schema", "name", "description", "tags", "properties", "auth_mode", "traffic", "mirror_traffic"}},
    )


def load_endpoint_spec(path: str | Path, name: str | None = None) -> EndpointSpec:
    """Load an Azure ML CLI v2 `endpoint.yml`; `name` overrides the file's name (as `az ml -n`)."""
    data = read_yaml(path)
    if name:
        data["name"] = name
    return endpoint_spec_from_dict(data, f"endpoint file {path}")


def _probe(data: Any, what: str, default: ProbeSettings) -> ProbeSettings:
    if data is None:
        return default
    if not isinstance(data, Mapping):
        raise SpecError(f"{what} must be a mapping")
    _check_keys(data, PROBE_KEYS, what)
    values = asdict(default)
    for key in ("initial_delay", "period", "timeout", "success_threshold", "failure_threshold"):
        if key in data:
            values[key] = _int(data[key], f"{what}.{key}", 0 if key == "initial_delay" else 1)
    return ProbeSettings(**values)


def _request_settings(data: Any) -> RequestSettings:
    if data is None:
        return RequestSettings()
    if not isinstance(data, Mapping):
        raise SpecError("request_settings must be a mapping")
    _check_keys(data, REQUEST_SETTINGS_KEYS, "request_settings")
    base = RequestSettings()
    return RequestSettings(
        request_timeout_ms=_int(data.get("request_timeout_ms", base.request_timeout_ms),
                                "request_settings.request_timeout_ms", 1, 180000),
        max_concurrent_requests_per_instance=_int(
            data.get("max_concurrent_requests_per_instance", base.max_concurrent_requests_per_instance),
            "request_settings.max_concurrent_requests_per_instance", 1, 1000),
        max_queue_wait_ms=_int(data.get("max_queue_wait_ms", base.max_queue_wait_ms),
                               "request_settings.max_queue_wait_ms", 0),
    )


def _resolve(base_dir: Path, value: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def _environment(value: Any, base_dir: Path) -> Any:
    """An inline environment's conda_file (and build path) resolve against the YAML's folder, as in az ml."""
    if not isinstance(value, Mapping):
        return value
    value = dict(value)
    if isinstance(value.get("conda_file"), str):
        value["conda_file"] = _resolve(base_dir, value["conda_file"])
    if isinstance(value.get("build"), Mapping) and isinstance(value["build"].get("path"), str):
        value["build"] = dict(value["build"], path=_resolve(base_dir, value["build"]["path"]))
    return value


def deployment_spec_from_dict(data: Mapping[str, Any], base_dir: str | Path = ".",
                              what: str = "deployment") -> DeploymentSpec:
    """Validate a deployment mapping; relative paths resolve against `base_dir` (the YAML's folder)."""
    base_dir = Path(base_dir)
    _check_keys(data, DEPLOYMENT_KEYS, what)
    for key in ("name", "endpoint_name"):
        if not data.get(key):
            raise SpecError(f"{what} needs {key}")
    model = data.get("model")
    inline_type = None
    if isinstance(model, Mapping):
        if "path" not in model:
            raise SpecError(f"{what}: an inline model needs a path")
        inline_type = model.get("type")
        model = model["path"]
    if model is not None and not isinstance(model, str):
        raise SpecError(f"{what}: model must be a path or an azureml: reference, got {model!r}")
    if model and not model.startswith("azureml:"):
        model = _resolve(base_dir, model)
        if not Path(model).exists():
            raise SpecError(f"{what}: model path does not exist: {model}")
    if inline_type is not None:
        if inline_type not in MODEL_TYPES:
            raise SpecError(f"{what}: model type must be one of {', '.join(MODEL_TYPES)}, got {inline_type!r}")
        if inline_type == MLFLOW_MODEL and not (isinstance(model, str) and is_mlflow_model(model)):
            raise SpecError(f"{what}: model {model} is of type {MLFLOW_MODEL} but has no {MLMODEL_FILE} file")
    code = data.get("code_configuration")
    code_path = scoring_script = None
    if code is not None:
        if not isinstance(code, Mapping):
            raise SpecError(f"{what}: code_configuration must be a mapping with code and scoring_script")
        _check_keys(code, CODE_CONFIGURATION_KEYS, "code_configuration")
        if not code.get("code") or not code.get("scoring_script"):
            raise SpecError(f"{what}: code_configuration needs both code and scoring_script")
        code_path = _resolve(base_dir, str(code["code"]))
        scoring_script = str(code["scoring_script"])
        if not (Path(code_path) / scoring_script).is_file():
            raise SpecError(f"{what}: scoring script not found: {Path(code_path) / scoring_script}")
    recorded = {"$schema", "name", "endpoint_name", "description", "tags", "properties", "model",
                "code_configuration", "environment", "instance_type", "instance_count",
                "request_settings", "liveness_probe", "readiness_probe", "environment_variables"}
    spec = DeploymentSpec(
        name=validate_name(data["name"], "deployment"),
        endpoint_name=validate_name(data["endpoint_name"]),
        model=model,
        code_path=code_path,
        scoring_script=scoring_script,
        environment=_environment(data.get("environment"), base_dir),
        instance_type=str(data.get("instance_type") or "Standard_DS3_v2"),
        instance_count=_int(data.get("instance_count", 1), "instance_count", 1, 20),
        request_settings=_request_settings(data.get("request_settings")),
        liveness_probe=_probe(data.get("liveness_probe"), "liveness_probe", ProbeSettings()),
        readiness_probe=_probe(data.get("readiness_probe"), "readiness_probe", ProbeSettings()),
        environment_variables=string_map(data.get("environment_variables"), "environment_variables"),
        tags=string_map(data.get("tags"), "tags"),
        properties=string_map(data.get("properties"), "properties"),
        description=str(data.get("description") or ""),
        extra={k: v for k, v in data.items() if k not in recorded},
    )
    check_scoring(spec, what)
    return spec


def load_deployment_spec(path: str | Path, name: str | None = None, endpoint_name: str | None = None,
                         model: str | None = None) -> DeploymentSpec:
    """Load an Azure ML CLI v2 `deployment.yml`, with the CLI's overrides for name, endpoint and model."""
    path = Path(path)
    data = read_yaml(path)
    if name:
        data["name"] = name
    if endpoint_name:
        data["endpoint_name"] = endpoint_name
    if model:
        data["model"] = model
    return deployment_spec_from_dict(data, path.parent, f"deployment file {path}")


def load_model_spec(path: str | Path) -> ModelSpec:
    path = Path(path)
    data = read_yaml(path)
    _check_keys(data, MODEL_KEYS, f"model file {path}")
    if not data.get("name") or not data.get("path"):
        raise SpecError(f"model file {path} needs name and path")
    return ModelSpec(
        name=validate_model_name(data["name"]),
        path=_resolve(path.parent, str(data["path"])),
        description=str(data.get("description") or ""),
        tags=string_map(data.get("tags"), "tags"),
        properties=string_map(data.get("properties"), "properties"),
        type=str(data.get("type") or "custom_model"),
    )


MODEL_REF_RE = re.compile(r"^azureml:(?P<name>[^:@/]+)(?::(?P<version>\d+)|@(?P<label>latest))?$")


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """`azureml:name:3` -> ("name", 3); `azureml:name@latest` or `azureml:name` -> ("name", None)."""
    match = MODEL_REF_RE.match(ref or "")
    if not match:
        raise SpecError(f"invalid model reference {ref!r}: use azureml:<name>:<version> or azureml:<name>@latest")
    version = match.group("version")
    return validate_model_name(match.group("name")), int(version) if version else None
