"""AzureBackend over the real SDK on the wire fake: what only the Azure backend does (or must never do)."""
import json
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from azure.core.exceptions import HttpResponseError

from fakes.azure_wire import arm_error
from mlflow_models import diabetes_requests, save_diabetes_model
from saferollout.backends.base import Backend
from saferollout.data import to_request
from saferollout.errors import BackendError, Conflict, DeploymentFailed, NotFound, SpecError
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


# ---- what the real SDK answers, read right (issue 9's findings) ---------------------------------

def test_states_are_read_as_azure_names_them_so_a_succeeded_deployment_takes_traffic(azure, served):
    # azure-ai-ml answers provisioning states as str-Enums; str() of one is 'DeploymentProvisioningState.SUCCEEDED'
    assert azure.get_deployment(served, "blue").provisioning_state == "Succeeded"
    assert azure.get_endpoint(served).provisioning_state == "Succeeded"
    assert azure.get_endpoint(served).traffic == {"blue": 100}


def test_a_deployment_whose_init_crashes_is_failed_with_the_operation_error(azure, served, example_dir):
    spec = load_deployment_spec(example_dir / "deployment.yml", name="crash", endpoint_name=served)
    spec = spec.with_changes(environment_variables={"SAFEROLLOUT_FAULT": "crash"})
    with pytest.raises(DeploymentFailed) as failed:
        azure.create_deployment(spec)
    message = str(failed.value)
    assert "the operation failed: (ResourceOperationFailure)" in message and "init() crashes" in message
    assert "HTTP 200" not in message
    assert azure.get_deployment(served, "crash").provisioning_state == "Failed"
    assert "init() failed" in failed.value.logs


def test_mixed_case_deployment_names_are_azure_lower_case_names(azure, served, example_dir):
    spec = load_deployment_spec(example_dir / "deployment.yml", name="Green", endpoint_name=served)
    assert azure.create_deployment(spec).name == "green"
    endpoint = azure.update_endpoint(served, traffic={"blue": 90, "Green": 10})
    assert endpoint.traffic == {"blue": 90, "green": 10}
    assert azure.update_endpoint(served, traffic={"blue": 100, "Green": 0}).traffic["blue"] == 100
    azure.delete_deployment(served, "Green")
    assert [d.name for d in azure.list_deployments(served)] == ["blue"]


def test_an_operation_in_progress_is_a_conflict_to_retry_not_already_exists(azure, fake, served):
    fake.transport.inject("PUT", r"/onlineEndpoints/ep-served\?", arm_error(
        409, "Conflict", "There is an operation in progress on endpoint ep-served."))
    with pytest.raises(Conflict) as raised:
        azure.update_endpoint(served, tags={"a": "b"})
    assert "operation in progress" in str(raised.value) and "wait for it to finish, then retry" in str(raised.value)
    assert "already exists" not in str(raised.value)


@pytest.mark.parametrize("status, code, kind, message", [
    (401, "InvalidAuthenticationToken", BackendError, "Azure refused the credentials.*az login"),
    (403, "AuthorizationFailed", BackendError, "HTTP 403.*AzureML Data Scientist"),
    (404, "ResourceNotFound", NotFound, "endpoint 'ep-served' not found"),
])
def test_arm_refusals_reach_the_user_with_what_to_do(azure, fake, served, status, code, kind, message):
    fake.transport.inject("GET", r"/onlineEndpoints/ep-served\?", arm_error(status, code, f"{code} says no."))
    with pytest.raises(kind, match=message):
        azure.get_endpoint(served)


def test_throttling_that_outlasts_the_sdk_retries_says_wait_and_retry(azure, fake, served):
    for _ in range(12):  # azure-core retries a 429 itself; only a lasting one reaches us
        fake.transport.inject("GET", r"/onlineEndpoints/ep-served\?",
                              arm_error(429, "TooManyRequests", "Too many requests.", **{"Retry-After": "0"}))
    with pytest.raises(BackendError, match="throttled.*wait a minute and retry"):
        azure.get_endpoint(served)


def test_the_sdk_progress_dots_never_reach_stdout(azure, served, example_dir, capfd):
    spec = load_deployment_spec(example_dir / "deployment.yml", name="green", endpoint_name=served)
    capfd.readouterr()
    azure.create_deployment(spec)
    out, err = capfd.readouterr()
    assert out == "" and "." in err  # the SDK's poller still shows its progress, on stderr


def test_a_deployment_that_fails_unwatched_says_why(azure, served, example_dir):
    """The rollout starts a deployment without waiting and polls it: its failure must carry Azure's error."""
    spec = load_deployment_spec(example_dir / "deployment.yml", name="green", endpoint_name=served)
    spec = spec.with_changes(environment_variables={"SAFEROLLOUT_FAULT": "crash"})
    azure.create_deployment(spec, wait=False)
    deadline = time.monotonic() + 120  # a bound, not a timing: the fake's container fails within seconds
    while (deployment := azure.get_deployment(served, "green")).provisioning_state != "Failed":
        assert time.monotonic() < deadline, deployment.provisioning_state
        time.sleep(0.05)
    assert "the scoring container crashed in init()" in deployment.reason
    assert "SAFEROLLOUT_FAULT=crash" in deployment.reason


def test_a_failure_read_before_its_poller_has_seen_it_still_says_why(azure, fake, served, example_dir,
                                                                      monkeypatch):
    """The resource reads Failed while the operation's poller is still on its way back with the error (seen in a
    fresh-clone CI run under load): the reason is still the operation's error, not a pointer to the logs."""
    dispatch = fake.transport._dispatch
    slowed = []

    def slow_terminal_poll(wire):
        answer = dispatch(wire)
        if "mfeOperationsStatus" in wire.path and b'"Failed"' in answer.body:
            slowed.append(wire.path)
            time.sleep(1.0)  # the poller's answer arrives late; the resource already reads Failed
        return answer

    monkeypatch.setattr(fake.transport, "_dispatch", slow_terminal_poll)
    spec = load_deployment_spec(example_dir / "deployment.yml", name="green", endpoint_name=served)
    spec = spec.with_changes(environment_variables={"SAFEROLLOUT_FAULT": "crash"})
    azure.create_deployment(spec, wait=False)
    deadline = time.monotonic() + 120
    while not slowed:  # the operation has ended: its terminal status is on its way back to the poller
        assert time.monotonic() < deadline, "the operation never ended"
        time.sleep(0.01)
    deployment = azure.get_deployment(served, "green")
    assert deployment.provisioning_state == "Failed"
    assert "the scoring container crashed in init()" in deployment.reason


def test_a_failed_deployment_this_backend_did_not_start_says_where_to_look(azure, fake, served, example_dir):
    spec = load_deployment_spec(example_dir / "deployment.yml", name="green", endpoint_name=served)
    spec = spec.with_changes(environment_variables={"SAFEROLLOUT_FAULT": "crash"})
    with pytest.raises(DeploymentFailed):
        azure.create_deployment(spec)
    other = type(azure)(ml_client=fake.ml_client, metrics_client=fake.metrics_client,
                        http_session=fake.http_session, poll_interval_s=0.01)  # e.g. the next notebook's kernel
    assert other.get_deployment(served, "green").reason == (
        "Azure reports its provisioning Failed; its logs say why: saferollout online-deployment get-logs "
        "-n green -e ep-served --backend azure")


# ---- no-code MLflow deployments: what the SDK sends, and what the (fake) service accepts ----------------

def mlflow_deployment_yaml(folder: Path, name: str = "mlflow") -> Path:
    """An Azure no-code deployment YAML beside an MLflow model folder: no code_configuration, no environment."""
    save_diabetes_model(folder / "model")
    path = folder / "deployment.yml"
    path.write_text(f"name: {name}\nendpoint_name: any\nmodel:\n  path: ./model\n  type: mlflow_model\n"
                    "instance_type: Standard_DS3_v2\ninstance_count: 1\n")
    return path


def test_an_mlflow_folder_deploys_without_code_as_an_mlflow_model(azure, fake, served, tmp_path):
    spec = load_deployment_spec(mlflow_deployment_yaml(tmp_path), endpoint_name=served)
    deployment = azure.create_deployment(spec)
    assert deployment.provisioning_state == "Succeeded" and deployment.code_configuration is None
    puts = [r for r in fake.transport.requests if r.method == "PUT"]
    model_put = [r for r in puts if "/models/" in r.path][-1]  # after the served credit model's
    assert model_put.json()["properties"]["modelType"] == "mlflow_model"  # the anonymous model the path becomes
    sent = next(r for r in puts if r.path.endswith("/deployments/mlflow")).json()["properties"]
    assert "codeConfiguration" not in sent and "environmentId" not in sent
    assert sent["model"].endswith(model_put.path.split("/models/", 1)[1])
    answer = azure.invoke(served, diabetes_requests(rows_per_request=2)[0], deployment="mlflow")
    assert answer.status == 200 and len(json.loads(answer.body)) == 2  # the predictions, as Azure answers
    assert azure.invoke(served, {"data": [[0.0] * 10]}, deployment="mlflow").status == 424  # no input_data


def test_a_registered_mlflow_model_deploys_without_code_and_a_custom_one_does_not(azure, fake, served, tmp_path):
    save_diabetes_model(tmp_path / "model")
    mlflow = azure.register_model("diabetes", str(tmp_path / "model"), type="mlflow_model")
    assert mlflow.type == "mlflow_model"
    spec = load_deployment_spec(mlflow_deployment_yaml(tmp_path / "v2"), endpoint_name=served, model=mlflow.ref)
    assert azure.create_deployment(spec).model == mlflow.ref
    custom = azure.register_model("plain", str(tmp_path / "model"))  # custom_model, as az ml model create's default
    with pytest.raises(SpecError, match=f"its model {custom.ref} is a custom_model, not an mlflow_model"):
        azure.create_deployment(spec.with_changes(name="plain", model=custom.ref))
    # a client that skipped that check is refused by the (fake) service, as Azure refuses it
    from azure.ai.ml.entities import ManagedOnlineDeployment

    with pytest.raises(HttpResponseError, match="without an MLflow model needs codeConfiguration"):
        fake.ml_client.online_deployments.begin_create_or_update(ManagedOnlineDeployment(
            name="plain", endpoint_name=served, model=f"azureml:plain:{custom.version}",
            instance_type="Standard_DS3_v2", instance_count=1)).result()
