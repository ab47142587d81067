"""AzureBackend over the real SDK on the wire fake: what only the Azure backend does (or must never do)."""
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
from azure.core.exceptions import HttpResponseError

from fakes.azure_wire import arm_error
from saferollout.backends.base import Backend
from saferollout.data import to_request
from saferollout.errors import BackendError, NotFound, SpecError
from saferollout.specs import EndpointSpec, load_deployment_spec

TESTS = Path(__file__).resolve().parents[2]


def test_it_is_a_backend_without_raw_samples(azure):
    assert isinstance(azure, Backend)
    assert azure.name == "azure" and azure.supports_raw_samples is False


def test_raw_samples_are_refused_with_what_to_use_instead(azure, served):
    with pytest.raises(BackendError, match="no raw request samples.*use a gate that works on aggregates"):
        azure.request_samples(served)


def test_metrics_are_asked_of_the_endpoint_arm_resource_in_the_endpoint_namespace(azure, fake, served):
    azure.query_metrics(served, "RequestLatency_P90", filter="deployment eq 'blue'")
    query = fake.transport.sent("GET", "/providers/Microsoft.Insights/metrics")[-1]
    assert query.path.endswith("/providers/Microsoft.MachineLearningServices/workspaces/ws-saferollout-fake/"
                               "onlineEndpoints/ep-served/providers/Microsoft.Insights/metrics")
    assert query.query["metricnamespace"] == "Microsoft.MachineLearningServices/workspaces/onlineEndpoints"
    assert query.query["$filter"] == "deployment eq 'blue'"
    assert azure.last_metric_filters == ["deployment eq 'blue'"]


def test_latest_model_is_pinned_to_a_version_in_the_deployment(azure, served, credit_model_dir, example_dir):
    azure.register_model("credit-model", str(credit_model_dir))  # v2 arrives after blue was deployed
    spec = load_deployment_spec(example_dir / "deployment.yml", name="green", endpoint_name=served)
    assert azure.create_deployment(spec).model == "azureml:credit-model:2"
    assert azure.get_deployment(served, "blue").model == "azureml:credit-model:1"


def test_a_local_model_path_is_uploaded_as_an_anonymous_model(azure, served, credit_model_dir, example_dir,
                                                               credit_split):
    spec = load_deployment_spec(example_dir / "deployment.yml", name="local", endpoint_name=served,
                                model=str(credit_model_dir))
    deployment = azure.create_deployment(spec)
    # the SDK uploads the folder and registers it as an anonymous model named by its content hash
    assert re.fullmatch(r"azureml:[0-9a-f]{64}:1", deployment.model)
    body = to_request(credit_split.X_test.head(1))
    assert azure.invoke(served, body, deployment="local").status == 200


def test_long_operations_report_progress_without_secrets(azure, served, example_dir):
    lines = []
    spec = load_deployment_spec(example_dir / "deployment.yml", name="green", endpoint_name=served)
    azure.create_deployment(spec, progress=lines.append)
    assert lines and all("green" in line for line in lines)
    assert lines[-1].startswith("create deployment 'green' on endpoint 'ep-served': done")
    keys = azure.get_credentials(served)
    assert not any(keys.primary_key in line or keys.secondary_key in line for line in lines)


def test_keys_never_leave_through_results_errors_or_repr(azure, served):
    keys = azure.get_credentials(served)
    result = azure.invoke(served, {"data": [{"age": 1}]}, deployment="nope")
    with pytest.raises(NotFound) as missing:
        azure.get_deployment(served, "nope")
    exposed = " ".join([repr(azure), str(result.headers), result.text, str(missing.value),
                        json.dumps(azure.get_endpoint(served).to_dict())])
    assert keys.primary_key not in exposed and keys.secondary_key not in exposed


def test_invoke_posts_to_the_scoring_uri_and_never_uses_the_sdk_invoke(azure, fake, served):
    body = {"data": [{"age": 1}]}
    assert azure.invoke(served, body, deployment="blue").deployment == "blue"
    assert not fake.transport.sent("POST", r"inference\.ml\.azure\.com")  # the SDK's invoke would go this way


def test_an_unreachable_scoring_uri_is_a_backend_error(azure, served, monkeypatch):
    monkeypatch.setitem(azure._scoring_uris, served, "https://elsewhere.westeurope.inference.ml.azure.com/score")
    with pytest.raises(BackendError, match="cannot reach endpoint 'ep-served'"):
        azure.invoke(served, {"data": []})


def test_the_fake_service_enforces_azure_rules_too(fake, served):
    """Even a client that skipped our checks is refused by the (fake) service, with Azure's 400."""
    ml_client = fake.ml_client
    endpoint = ml_client.online_endpoints.get(served)
    endpoint.traffic = {"blue": 60}
    with pytest.raises(HttpResponseError, match="must sum to 0 or 100"):
        ml_client.online_endpoints.begin_create_or_update(endpoint).result()
    endpoint.traffic, endpoint.mirror_traffic = {"blue": 100}, {"blue": 10}
    with pytest.raises(HttpResponseError, match="cannot receive both live and mirror traffic"):
        ml_client.online_endpoints.begin_create_or_update(endpoint).result()
    with pytest.raises(HttpResponseError, match="has 100% traffic and cannot be deleted"):
        ml_client.online_deployments.begin_delete(name="blue", endpoint_name=served).result()
    assert ml_client.online_endpoints.get(served).traffic == {"blue": 100}


def test_a_service_side_refusal_reaches_the_user_as_a_spec_error(azure, fake, served, monkeypatch):
    # the service refuses something our own checks let through (e.g. a rule Azure adds later)
    fake.transport.inject("PUT", r"/onlineEndpoints/ep-served\?",
                          arm_error(400, "BadArgument", "A new Azure rule refused this traffic."))
    with pytest.raises(SpecError, match="Azure rejected the request on update endpoint 'ep-served': "
                                        "\\(BadArgument\\) A new Azure rule"):
        azure.update_endpoint(served, tags={"a": "b"})


def test_token_endpoint_invocations_use_a_fresh_token(azure, credit_model_dir, example_dir, credit_split):
    azure.register_model("credit-model", str(credit_model_dir))
    azure.create_endpoint(EndpointSpec(name="ep-token", auth_mode="aml_token"))
    azure.create_deployment(load_deployment_spec(example_dir / "deployment.yml", endpoint_name="ep-token"))
    azure.update_endpoint("ep-token", traffic={"blue": 100})
    assert azure.invoke("ep-token", to_request(credit_split.X_test.head(1))).status == 200


def test_another_process_sees_the_same_fake_workspace(azure, fake, served, tmp_path):
    """Notebook kernels are other processes: the factory named in the environment reaches the same state."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               SAFEROLLOUT_AZURE_CLIENT_FACTORY="fakes.azure_wire:client_factory",
               SAFEROLLOUT_AZURE_FAKE_DIR=str(fake.state.root))
    script = ("from saferollout.backends import get_backend\n"
              "be = get_backend('azure')\n"
              "print(be.get_endpoint('ep-served').traffic)\n"
              "r = be.invoke('ep-served', {'data': [{'age': 1}]}, deployment='blue')\n"
              "print(r.status, r.deployment)\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["{'blue': 100}", "424 blue"]  # 424: that body lacks the features
    # and the request that process made is in the metrics this process reads
    [series] = azure.query_metrics(served, "RequestsPerMinute", aggregation="Total",
                                   filter="deployment eq 'blue' and statusCodeClass eq '4xx'")
    assert sum(p.value or 0 for p in series.points) == 1
