"""Deployments: create from the example deployment.yml, show, list, update instance_count, logs, delete,
and a scoring script whose init() fails."""
import pytest

from saferollout.errors import Conflict, DeploymentFailed, NotFound, SpecError


def test_deployment_records_its_model_and_settings(backend, live_endpoint, model_ref):
    blue = backend.get_deployment(live_endpoint, "blue")
    assert blue.provisioning_state == "Succeeded"
    name = model_ref.split(":", 1)[1].split("@")[0]
    assert blue.model == f"azureml:{name}:{backend.get_model(name).version}"  # @latest pinned to a version
    assert blue.instance_type == "Standard_DS3_v2" and blue.instance_count == 1
    assert blue.request_settings["max_concurrent_requests_per_instance"] == 4
    assert blue.environment_variables["SAFEROLLOUT_FAULT"] == "none"
    assert blue.code_configuration["scoring_script"] == "score.py"
    assert [d.name for d in backend.list_deployments(live_endpoint)] == ["blue", "green", "red"]


def test_creating_an_existing_deployment_conflicts(backend, live_endpoint, deployments):
    with pytest.raises(Conflict, match="already exists"):
        deployments.deploy(live_endpoint, "green")
    assert backend.get_deployment(live_endpoint, "green").provisioning_state == "Succeeded"


def test_deployment_on_unknown_endpoint_is_not_found(backend, deployments, unique_name):
    missing = unique_name("missing")
    with pytest.raises(NotFound, match=missing):
        deployments.deploy(missing, "blue")
    with pytest.raises(NotFound, match="nope"):
        backend.get_deployment(missing, "nope")


def test_update_changes_instance_count(backend, live_endpoint, deployments):
    spec = deployments.spec(live_endpoint, "green")
    updated = backend.update_deployment(spec.with_changes(instance_count=2))
    assert updated.instance_count == 2 and updated.provisioning_state == "Succeeded"
    backend.update_deployment(spec)  # back to one instance for the other tests
    assert backend.get_deployment(live_endpoint, "green").instance_count == 1


def test_update_sets_deployment_tags(backend, live_endpoint, deployments):
    spec = deployments.spec(live_endpoint, "green")
    try:
        backend.update_deployment(spec.with_changes(tags={"role": "rc", "model": "credit:2"}))
        assert backend.get_deployment(live_endpoint, "green").tags == {"role": "rc", "model": "credit:2"}
    finally:
        backend.update_deployment(spec)
    assert backend.get_deployment(live_endpoint, "green").tags == {}


def test_logs_show_the_scoring_server(backend, live_endpoint):
    logs = backend.get_deployment_logs(live_endpoint, "blue", lines=200)
    assert isinstance(logs, str) and logs.strip()
    assert len(backend.get_deployment_logs(live_endpoint, "blue", lines=2).splitlines()) <= \
        len(logs.splitlines())


def test_create_then_delete_a_deployment(backend, make_endpoint, deployments):
    name = make_endpoint()
    deployments.deploy(name, "blue")
    backend.delete_deployment(name, "blue")
    assert backend.list_deployments(name) == []
    with pytest.raises(NotFound, match="blue"):
        backend.get_deployment(name, "blue")


def test_deleting_a_deployment_with_live_traffic_is_refused(backend, live_endpoint):
    with pytest.raises(Conflict, match="cannot delete deployment 'blue': it has 100% live traffic"):
        backend.delete_deployment(live_endpoint, "blue")
    assert backend.get_deployment(live_endpoint, "blue").provisioning_state == "Succeeded"


def test_failing_init_fails_the_deployment_with_reason_and_logs(backend, make_endpoint, deployments):
    name = make_endpoint()
    with pytest.raises(DeploymentFailed) as failure:
        deployments.deploy(name, "broken", SAFEROLLOUT_FAULT="crash")
    assert "broken" in str(failure.value)
    assert "injected fault" in failure.value.logs
    assert backend.get_deployment(name, "broken").provisioning_state == "Failed"
    with pytest.raises(Conflict, match="cannot give traffic to deployment 'broken'"):
        backend.update_endpoint(name, traffic={"broken": 100})
    assert not any(backend.get_endpoint(name).traffic.values())


def test_deployment_without_scoring_script_is_refused(backend, live_endpoint, deployments):
    spec = deployments.spec(live_endpoint, "nocode").with_changes(code_path=None, scoring_script=None)
    with pytest.raises(SpecError, match="code_configuration"):
        backend.create_deployment(spec)
    assert "nocode" not in [d.name for d in backend.list_deployments(live_endpoint)]


def test_invalid_deployment_name_is_refused(backend, live_endpoint, deployments):
    spec = deployments.spec(live_endpoint, "green").with_changes(name="Bad_Name!")
    with pytest.raises(SpecError, match="invalid deployment name 'Bad_Name!'"):
        backend.create_deployment(spec)
    assert [d.name for d in backend.list_deployments(live_endpoint)] == ["blue", "green", "red"]
