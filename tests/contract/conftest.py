"""The contract suite's backends: every test here runs on `local` (the real platform of the session) and on
`azure` (AzureBackend with the real azure-ai-ml and azure-monitor-query clients over the wire fake in
tests/fakes). Both must behave the same through the protocol.

Deployments are the expensive part on the local platform (an azmlinfsrv process each), so one endpoint
with three deployments is shared by the tests that leave it as they found it:
`blue` (100% of the traffic), `green` (0%) and `red` (0%, every request fails: SAFEROLLOUT_FAULT=errors at
rate 1.0). Tests that change an endpoint's shape make their own.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from fakes.azure_wire import fake_clients
from saferollout.backends.azure import AzureBackend
from saferollout.backends.base import Backend
from saferollout.errors import NotFound
from saferollout.specs import DeploymentSpec, load_deployment_spec, load_endpoint_spec

BACKENDS = ("local", "azure")


@pytest.fixture(scope="session")
def azure_backend(tmp_path_factory) -> AzureBackend:
    """AzureBackend on a fresh fake workspace (state in a tmp folder, as kernels would share it)."""
    ml_client, metrics_client, session = fake_clients(tmp_path_factory.mktemp("azure-fake"))
    return AzureBackend(ml_client=ml_client, metrics_client=metrics_client, http_session=session,
                        poll_interval_s=0.01)


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request) -> Backend:
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.fixture(scope="session")
def model_ref(backend, credit_model_dir) -> str:
    """The trained credit model, registered once per backend under a name no other test uses."""
    model = backend.register_model(f"credit-{uuid.uuid4().hex[:6]}", str(credit_model_dir),
                                   properties={"auc": "0.8"})
    return f"azureml:{model.name}@latest"


@dataclass
class DeploymentFactory:
    backend: Backend
    example_dir: Path
    model_ref: str

    def spec(self, endpoint: str, name: str, **environment: str) -> DeploymentSpec:
        spec = load_deployment_spec(self.example_dir / "deployment.yml", name=name, endpoint_name=endpoint,
                                    model=self.model_ref)
        return spec.with_changes(environment_variables={**spec.environment_variables, **environment})

    def deploy(self, endpoint: str, name: str, **environment: str):
        return self.backend.create_deployment(self.spec(endpoint, name, **environment))


@pytest.fixture(scope="session")
def deployments(backend, example_dir, model_ref) -> DeploymentFactory:
    return DeploymentFactory(backend, example_dir, model_ref)


@pytest.fixture
def make_endpoint(backend, example_dir, unique_name):
    """Create endpoints from the example endpoint.yml; each is deleted after the test (if still there)."""
    created: list[str] = []

    def make(prefix: str = "ct", **changes) -> str:
        spec = load_endpoint_spec(example_dir / "endpoint.yml", name=unique_name(prefix))
        for key, value in changes.items():
            setattr(spec, key, value)
        backend.create_endpoint(spec)
        created.append(spec.name)
        return spec.name

    yield make
    for name in created:
        _delete_quietly(backend, name)


def _delete_quietly(backend: Backend, name: str) -> None:
    try:
        endpoint = backend.get_endpoint(name)
        if any(endpoint.traffic.values()) or any(endpoint.mirror_traffic.values()):
            backend.update_endpoint(name, traffic={}, mirror_traffic={})
        backend.delete_endpoint(name)
    except NotFound:
        pass


@pytest.fixture(scope="session")
def live_endpoint(backend, deployments, example_dir) -> str:
    """Shared: blue 100%, green 0%, red 0% (red fails every request). Tests must leave it like this."""
    name = f"live-{uuid.uuid4().hex[:8]}"
    backend.create_endpoint(load_endpoint_spec(example_dir / "endpoint.yml", name=name))
    deployments.deploy(name, "blue")
    deployments.deploy(name, "green")
    deployments.deploy(name, "red", SAFEROLLOUT_FAULT="errors", SAFEROLLOUT_FAULT_ERROR_RATE="1.0")
    backend.update_endpoint(name, traffic={"blue": 100})
    yield name
    _delete_quietly(backend, name)

