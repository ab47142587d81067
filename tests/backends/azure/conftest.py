"""Fixtures for the Azure backend's own tests: the real SDK clients over a fresh wire fake per test."""
from __future__ import annotations

import pytest

from fakes.azure_wire import FakeAzure, fake_azure
from saferollout.backends.azure import AzureBackend
from saferollout.specs import load_deployment_spec, load_endpoint_spec


@pytest.fixture
def fake(tmp_path_factory) -> FakeAzure:
    """A fresh fake workspace: its state, the transport (what was sent) and the real clients over it.

    Its state (and the fake blob storage) lives in a folder of its own, never inside the test's `tmp_path`:
    a test that deploys code from `tmp_path` would otherwise upload the fake's own files while the fake
    writes them, and the SDK's upload waits forever for a file count that is never reached."""
    return fake_azure(tmp_path_factory.mktemp("fake-azure"))


@pytest.fixture
def azure(fake) -> AzureBackend:
    return AzureBackend(ml_client=fake.ml_client, metrics_client=fake.metrics_client,
                        http_session=fake.http_session, poll_interval_s=0.01)


@pytest.fixture
def served(azure, credit_model_dir, example_dir):
    """An endpoint `ep-served` whose deployment `blue` (the example, credit model v1) has all the traffic."""
    azure.register_model("credit-model", str(credit_model_dir), properties={"auc": "0.8"})
    azure.create_endpoint(load_endpoint_spec(example_dir / "endpoint.yml", name="ep-served"))
    azure.create_deployment(load_deployment_spec(example_dir / "deployment.yml", endpoint_name="ep-served"))
    azure.update_endpoint("ep-served", traffic={"blue": 100})
    return "ep-served"
