"""The Backend protocol: what the notebooks, the rollout and the gates may ask of an endpoint platform.

Two implementations: `local` (the embedded platform on this machine) and `azure` (Azure ML managed
online endpoints). Both speak Azure's vocabulary: entity fields, traffic rules and metric names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, asdict
from datetime import datetime
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

from saferollout.specs import DeploymentSpec, EndpointSpec

# Metric names as Azure Monitor publishes them for Microsoft.MachineLearningServices/workspaces/onlineEndpoints.
METRIC_NAMES = (
    "RequestsPerMinute",
    "RequestLatency",
    "RequestLatency_P50",
    "RequestLatency_P90",
    "RequestLatency_P95",
    "RequestLatency_P99",
)
METRIC_DIMENSIONS = {
    "RequestsPerMinute": ("deployment", "statusCode", "statusCodeClass", "modelStatusCode"),
    "RequestLatency": ("deployment",),
    "RequestLatency_P50": ("deployment",),
    "RequestLatency_P90": ("deployment",),
    "RequestLatency_P95": ("deployment",),
    "RequestLatency_P99": ("deployment",),
}
# Instance metrics Azure Monitor publishes on each deployment (namespace
# Microsoft.MachineLearningServices/workspaces/onlineEndpoints/deployments), by their REST API names; a query
# names its deployment with `deployment eq '<name>'` in the filter (or splits by `deployment`).
DEPLOYMENT_METRIC_DIMENSIONS = {
    "CpuUtilizationPercentage": ("deployment", "instanceId"),
    "CpuMemoryUtilizationPercentage": ("deployment", "instanceId"),
    "DiskUtilization": ("deployment", "instanceId", "disk"),
    "GpuUtilizationPercentage": ("deployment", "instanceId"),
    "GpuMemoryUtilizationPercentage": ("deployment", "instanceId"),
    "GpuEnergyJoules": ("deployment", "instanceId"),
    "DeploymentCapacity": ("deployment", "instanceId", "State"),
}
AGGREGATIONS = ("Average", "Minimum", "Maximum", "Total", "Count")

Progress = Callable[[str], None]


def _as_dict(obj: Any) -> dict[str, Any]:
    data = asdict(obj)
    for key, value in data.items():
        if isinstance(value, datetime):
            data[key] = value.isoformat()
    return data


@dataclass
class Model:
    name: str
    version: int
    path: str
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    properties: dict[str, str] = field(default_factory=dict)
    type: str = "custom_model"
    created_at: str = ""

    @property
    def ref(self) -> str:
        return f"azureml:{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        data = _as_dict(self)
        data["id"] = self.ref
        return data


@dataclass
class Endpoint:
    name: str
    auth_mode: str
    scoring_uri: str
    traffic: dict[str, int] = field(default_factory=dict)
    mirror_traffic: dict[str, int] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    properties: dict[str, str] = field(default_factory=dict)
    description: str = ""
    provisioning_state: str = "Succeeded"
    openapi_uri: str = ""
    kind: str = "Managed"

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)

    def to_spec(self) -> EndpointSpec:
        return EndpointSpec(name=self.name, auth_mode=self.auth_mode, description=self.description,
                            tags=dict(self.tags), properties=dict(self.properties),
                            traffic=dict(self.traffic), mirror_traffic=dict(self.mirror_traffic))


@dataclass
class Deployment:
    name: str
    endpoint_name: str
    model: str | None
    provisioning_state: str  # Creating | Updating | Succeeded | Failed | Deleting
    instance_type: str = ""
    instance_count: int = 1
    tags: dict[str, str] = field(default_factory=dict)
    properties: dict[str, str] = field(default_factory=dict)
    description: str = ""
    environment: Any = None
    code_configuration: dict[str, str] | None = None
    request_settings: dict[str, int] = field(default_factory=dict)
    liveness_probe: dict[str, int] = field(default_factory=dict)
    readiness_probe: dict[str, int] = field(default_factory=dict)
    environment_variables: dict[str, str] = field(default_factory=dict)
    reason: str = ""  # why it failed, when provisioning_state is Failed
    instances: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


@dataclass
class Credentials:
    auth_mode: str
    primary_key: str | None = None
    secondary_key: str | None = None
    access_token: str | None = None
    expiry_time_utc: float | None = None

    @property
    def bearer(self) -> str:
        value = self.primary_key if self.auth_mode == "key" else self.access_token
        if not value:
            raise ValueError("no credential available")
        return value

    def to_dict(self) -> dict[str, Any]:
        if self.auth_mode == "key":
            return {"primaryKey": self.primary_key, "secondaryKey": self.secondary_key}
        return {"accessToken": self.access_token, "expiryTimeUtc": self.expiry_time_utc, "tokenType": "Bearer"}


@dataclass
class InvokeResult:
    status: int
    body: bytes
    deployment: str | None  # who served (the `azureml-model-deployment` answer header)
    request_id: str | None
    latency_ms: float
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass
class MetricPoint:
    timestamp: datetime
    value: float | None  # None: no data in this interval (never read as zero errors or zero latency)


@dataclass
class MetricSeries:
    metric: str
    aggregation: str
    grain: str
    dimensions: dict[str, str]
    points: list[MetricPoint]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "aggregation": self.aggregation, "grain": self.grain,
            "dimensions": self.dimensions,
            "points": [{"timestamp": p.timestamp.isoformat(), "value": p.value} for p in self.points],
        }


@dataclass
class RequestSample:
    """One request as the platform saw it (raw samples: the local backend has them, Azure does not)."""

    timestamp: float  # unix seconds when the request arrived
    endpoint: str
    deployment: str
    status_code: int
    latency_ms: float
    mirrored: bool = False
    request_id: str = ""
    model_status_code: int | None = None
    pinned: bool = False  # sent with the `azureml-model-deployment` header: not routed by the traffic split
    held: bool = False  # (local) waited for instances coming back after a platform restart: no deployment's doing

    @property
    def status_class(self) -> str:
        return f"{self.status_code // 100}xx"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Backend(Protocol):
    """An Azure-ML-shaped endpoint platform. Everything above the backends uses only this."""

    name: str
    # capabilities: callers read these, never probe a backend by its name or its attributes
    supports_raw_samples: bool  # `request_samples` answers (per-request rows); else only aggregates
    supports_mirrored_pairs: bool  # `mirrored_pairs` answers (live and mirrored answers to one request)
    finest_grain: str  # the finest metric interval it serves, as an ISO 8601 duration (PT5S, PT1M)
    # seconds after an interval ends before its metrics are complete (Azure Monitor ingests with a delay)
    metrics_delay_s: float

    # models
    def register_model(self, name: str, path: str, *, description: str = "",
                       tags: dict[str, str] | None = None,
                       properties: dict[str, str] | None = None,
                       type: str = "custom_model") -> Model: ...  # or mlflow_model, triton_model, as on Azure
    def get_model(self, name: str, version: int | str | None = None) -> Model: ...
    def list_models(self, name: str | None = None) -> list[Model]: ...

    # endpoints
    def create_endpoint(self, spec: EndpointSpec) -> Endpoint: ...
    def get_endpoint(self, name: str) -> Endpoint: ...
    def list_endpoints(self) -> list[Endpoint]: ...
    def update_endpoint(self, name: str, *, traffic: dict[str, int] | None = None,
                        mirror_traffic: dict[str, int] | None = None,
                        tags: dict[str, str] | None = None,
                        description: str | None = None,
                        set_tags: dict[str, str] | None = None,
                        remove_tags: Iterable[str] = ()) -> Endpoint: ...
    # `tags` replaces the whole map; `set_tags` / `remove_tags` change only those keys, applied to the tags
    # the endpoint has when the update lands (one step on the local platform, so two clients changing
    # different tags never undo each other; on Azure within this call's read and write). Not both.
    def delete_endpoint(self, name: str) -> None: ...
    def get_credentials(self, name: str) -> Credentials: ...
    def regenerate_keys(self, name: str, key_type: str = "primary") -> Credentials: ...

    # deployments
    def create_deployment(self, spec: DeploymentSpec, *, wait: bool = True,
                          progress: Progress | None = None) -> Deployment: ...
    def update_deployment(self, spec: DeploymentSpec, *, wait: bool = True,
                          progress: Progress | None = None) -> Deployment: ...
    def get_deployment(self, endpoint: str, name: str) -> Deployment: ...
    def list_deployments(self, endpoint: str) -> list[Deployment]: ...
    def delete_deployment(self, endpoint: str, name: str) -> None: ...
    def get_deployment_logs(self, endpoint: str, name: str, lines: int | None = None) -> str: ...

    # data plane
    def invoke(self, endpoint: str, body: bytes | str | dict | list, *, deployment: str | None = None,
               timeout_s: float = 60.0) -> InvokeResult: ...

    # metrics
    def query_metrics(self, endpoint: str, metric: str, *, aggregation: str = "Average",
                      grain: str = "PT1M", start: datetime | None = None, end: datetime | None = None,
                      filter: str | None = None,
                      split_by: Iterable[str] = ()) -> list[MetricSeries]: ...
    def request_samples(self, endpoint: str, *, deployment: str | None = None,
                        start: datetime | None = None, end: datetime | None = None,
                        include_mirrored: bool = False) -> list[RequestSample]: ...
    def mirrored_pairs(self, endpoint: str, *, start: datetime | None = None,
                       end: datetime | None = None) -> list[MirroredPair]: ...


@dataclass
class MirroredPair:
    """One live request answered by the serving deployment and, in the background, by the mirror."""

    timestamp: float
    endpoint: str
    request_id: str
    request_body: bytes
    live_deployment: str
    live_status: int
    live_body: bytes
    mirror_deployment: str
    mirror_status: int
    mirror_body: bytes
