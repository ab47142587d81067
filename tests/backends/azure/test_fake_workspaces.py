"""Two fake workspaces in one process (the contract suite's session fake and a test's own) keep their
uploads apart: each model lands in the storage of the workspace it was registered in."""
from __future__ import annotations

from fakes.azure_wire import fake_azure
from saferollout.backends.azure import AzureBackend
from saferollout.specs import load_deployment_spec, load_endpoint_spec


def _backend(fake) -> AzureBackend:
    return AzureBackend(ml_client=fake.ml_client, metrics_client=fake.metrics_client,
                        http_session=fake.http_session, poll_interval_s=0.01)


def test_a_workspace_made_later_does_not_take_an_earlier_ones_uploads(tmp_path_factory, credit_model_dir,
                                                                      example_dir):
    first = _backend(fake_azure(tmp_path_factory.mktemp("fake-first")))
    _backend(fake_azure(tmp_path_factory.mktemp("fake-second")))  # made after the first, as a test's own
    first.register_model("credit-model", str(credit_model_dir))
    first.create_endpoint(load_endpoint_spec(example_dir / "endpoint.yml", name="ep-first"))
    deployment = first.create_deployment(load_deployment_spec(example_dir / "deployment.yml",
                                                              endpoint_name="ep-first"))
    assert deployment.provisioning_state == "Succeeded"
