"""Deployments on the local platform: ready only when every instance is, failures explained, scale, delete, logs."""
from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import pytest

from saferollout import data
from saferollout.backends.local.instances import STARTUP_NICENESS
from saferollout.errors import Conflict, DeploymentFailed, NotFound, SpecError
from saferollout.specs import load_deployment_spec
from saferollout.processes import pid_alive

from echo_platform import deploy_all, echo_spec, new_endpoint, wait_for


@pytest.fixture
def endpoint(local_backend):
    name = new_endpoint(local_backend)
    yield name
    local_backend.delete_endpoint(name)


def credit_spec(example_dir, endpoint, name, model, **env):
    spec = load_deployment_spec(example_dir / "deployment.yml", name=name, endpoint_name=endpoint, model=str(model))
    return spec.with_changes(environment_variables={**spec.environment_variables, **env})


def test_example_deployment_yaml_runs_unchanged_and_scores(local_backend, endpoint, example_dir,
                                                           credit_model_dir, credit_split):
    dep = local_backend.create_deployment(credit_spec(example_dir, endpoint, "blue", credit_model_dir))
    assert dep.provisioning_state == "Succeeded"
    assert [i["state"] for i in dep.instances] == ["ready"]
    assert dep.model.startswith("azureml:") and dep.instance_type == "Standard_DS3_v2"
    assert dep.environment["conda_file"].endswith("conda.yml")  # recorded, not built
    local_backend.update_endpoint(endpoint, traffic={"blue": 100})
    result = local_backend.invoke(endpoint, data.to_request(credit_split.X_test.head(3)))
    assert result.status == 200 and result.deployment == "blue"
    answer = result.json()
    assert len(answer["predictions"]) == 3 and all(0 <= p <= 1 for p in answer["probabilities"])
    # the inference server's own line ("POST /score 200 20.9ms") or gunicorn's access line, whichever is
    # written first: gunicorn writes its own after the answer has gone out
    assert re.search(r'POST /score(?: HTTP/1\.\d")? 200', local_backend.get_deployment_logs(endpoint, "blue"))


def test_init_failure_leaves_the_deployment_failed_with_reason_and_log(local_backend, endpoint, example_dir,
                                                                       credit_model_dir):
    spec = credit_spec(example_dir, endpoint, "crashy", credit_model_dir, SAFEROLLOUT_FAULT="crash")
    with pytest.raises(DeploymentFailed) as failure:
        local_backend.create_deployment(spec)
    assert str(failure.value).startswith(f"deployment 'crashy' on '{endpoint}' failed: the inference server "
                                          "exited with code")
    assert "init() probably failed" in failure.value.reason
    assert "injected fault: init() crashes (SAFEROLLOUT_FAULT=crash)" in failure.value.logs
    dep = local_backend.get_deployment(endpoint, "crashy")
    assert dep.provisioning_state == "Failed" and dep.reason == failure.value.reason


def test_a_failed_deployment_gets_no_traffic_and_no_mirror(local_backend, endpoint):
    states = deploy_all(local_backend, [echo_spec(endpoint, "blue"),
                                        echo_spec(endpoint, "ghost", env={"ECHO_INIT_FAIL": "1"})])
    assert states["ghost"].provisioning_state == "Failed"
    local_backend.update_endpoint(endpoint, traffic={"blue": 100})
    before = local_backend.get_endpoint(endpoint)
    with pytest.raises(Conflict, match=r"cannot give traffic to deployment 'ghost': its state is Failed "
                                       r"\(the inference server exited"):
        local_backend.update_endpoint(endpoint, traffic={"blue": 50, "ghost": 50})
    with pytest.raises(Conflict, match="cannot mirror to deployment 'ghost': its state is Failed"):
        local_backend.update_endpoint(endpoint, mirror_traffic={"ghost": 10})
    assert local_backend.get_endpoint(endpoint) == before
    pinned = local_backend.invoke(endpoint, {"x": 1}, deployment="ghost")
    assert pinned.status == 424 and pinned.json()["message"] == "deployment 'ghost' failed and cannot serve requests"


def test_a_scoring_script_that_does_not_import_fails_with_its_error_in_the_log(local_backend, endpoint, tmp_path):
    (tmp_path / "score.py").write_text("import no_such_module_for_saferollout\n\ndef init():\n    pass\n\n"
                                       "def run(raw):\n    return raw\n")
    with pytest.raises(DeploymentFailed) as failure:
        local_backend.create_deployment(echo_spec(endpoint, "broken", code=tmp_path))
    assert "No module named 'no_such_module_for_saferollout'" in failure.value.logs
    assert local_backend.get_deployment(endpoint, "broken").provisioning_state == "Failed"


def test_scale_out_and_in_keeps_serving_instances(local_backend, endpoint):
    deploy_all(local_backend, [echo_spec(endpoint, "blue")])
    [first] = local_backend.get_deployment(endpoint, "blue").instances
    spec = echo_spec(endpoint, "blue", instance_count=3)
    scaled = local_backend.update_deployment(spec)
    assert scaled.provisioning_state == "Succeeded" and scaled.instance_count == 3
    assert [i["state"] for i in scaled.instances] == ["ready"] * 3
    assert scaled.instances[0]["pid"] == first["pid"]  # scaling out does not restart what runs
    # one request at a time still reaches every instance: idle instances take turns
    served_by = {local_backend.invoke(endpoint, {"i": i}, deployment="blue").json()["pid"] for i in range(6)}
    assert len(served_by) == 3
    shrunk = local_backend.update_deployment(spec.with_changes(instance_count=1))
    assert [i["pid"] for i in shrunk.instances] == [first["pid"]]
    dropped = [i["pid"] for i in scaled.instances[1:]]
    wait_for(lambda: not any(pid_alive(p) for p in dropped), 15, what="surplus instances to stop")


def test_a_failed_update_keeps_the_previous_version_serving(local_backend, endpoint):
    deploy_all(local_backend, [echo_spec(endpoint, "blue")])
    local_backend.update_endpoint(endpoint, traffic={"blue": 100})
    [before] = local_backend.get_deployment(endpoint, "blue").instances
    with pytest.raises(DeploymentFailed) as failure:
        local_backend.update_deployment(echo_spec(endpoint, "blue", env={"ECHO_INIT_FAIL": "1"}))
    assert failure.value.reason.startswith("update failed: the inference server exited with code")
    assert failure.value.reason.endswith("; the previous version keeps serving")
    assert "echo init failed on purpose" in failure.value.logs
    dep = local_backend.get_deployment(endpoint, "blue")
    assert dep.provisioning_state == "Failed" and dep.environment_variables == {"ECHO_NAME": "blue"}
    assert [i["pid"] for i in dep.instances] == [before["pid"]]
    answers = [local_backend.invoke(endpoint, {"i": i}) for i in range(3)]
    assert [(a.status, a.deployment) for a in answers] == [(200, "blue")] * 3


def test_delete_stops_the_instances_and_forgets_the_deployment(local_backend, endpoint):
    deploy_all(local_backend, [echo_spec(endpoint, "blue", instance_count=2)])
    pids = [i["pid"] for i in local_backend.get_deployment(endpoint, "blue").instances]
    local_backend.delete_deployment(endpoint, "blue")
    with pytest.raises(NotFound, match=f"deployment 'blue' not found on endpoint '{endpoint}'"):
        local_backend.get_deployment(endpoint, "blue")
    assert local_backend.list_deployments(endpoint) == []
    wait_for(lambda: not any(pid_alive(p) for p in pids), 15, what="instances to stop")


def test_deleting_a_live_deployment_is_refused_and_changes_nothing(local_backend, endpoint):
    deploy_all(local_backend, [echo_spec(endpoint, "blue"), echo_spec(endpoint, "green")])
    local_backend.update_endpoint(endpoint, traffic={"blue": 100}, mirror_traffic={"green": 20})
    before = local_backend.get_endpoint(endpoint), local_backend.list_deployments(endpoint)
    with pytest.raises(Conflict, match="cannot delete deployment 'blue': it has 100% live traffic; move its "
                                       "traffic to another deployment first"):
        local_backend.delete_deployment(endpoint, "blue")
    with pytest.raises(Conflict, match="cannot delete deployment 'green': it receives mirror traffic"):
        local_backend.delete_deployment(endpoint, "green")
    after = local_backend.get_endpoint(endpoint), local_backend.list_deployments(endpoint)
    assert after == before
    assert local_backend.invoke(endpoint, {"x": 1}).status == 200


def test_a_model_path_that_does_not_exist_is_refused_and_nothing_is_created(local_backend, endpoint, tmp_path):
    missing = tmp_path / "no-model-here"
    with pytest.raises(SpecError, match=f"model path does not exist: {missing}"):
        local_backend.create_deployment(echo_spec(endpoint, "blue").with_changes(model=str(missing)))
    with pytest.raises(SpecError, match=f"model path does not exist: {missing}"):
        local_backend.register_model("ghost-model", str(missing))
    assert local_backend.list_deployments(endpoint) == []
    with pytest.raises(NotFound, match="model ghost-model not found"):
        local_backend.get_model("ghost-model")


def test_logs_hold_each_instance_and_can_be_tailed(local_backend, endpoint):
    deploy_all(local_backend, [echo_spec(endpoint, "blue", instance_count=2)])
    logs = local_backend.get_deployment_logs(endpoint, "blue")
    assert "---- instance-0" in logs and "---- instance-1" in logs
    tail = local_backend.get_deployment_logs(endpoint, "blue", lines=2)
    sections = [s for s in tail.split("---- instance-") if s]
    assert len(sections) == 2 and all(len(s.strip().splitlines()) == 1 + 2 for s in sections)


def test_models_get_versions_and_latest(local_backend, credit_model_dir):
    name = f"m-{time.time_ns()}"
    first = local_backend.register_model(name, str(credit_model_dir), tags={"k": "v"}, properties={"auc": 0.8})
    second = local_backend.register_model(name, str(credit_model_dir))
    assert (first.version, second.version) == (1, 2)
    assert local_backend.get_model(name).version == 2 and local_backend.get_model(name, 1).tags == {"k": "v"}
    assert local_backend.get_model(name, 1).properties == {"auc": "0.8"}
    assert [m.version for m in local_backend.list_models(name)] == [1, 2]


def test_an_instance_starts_niced_and_serves_at_the_platforms_priority(local_backend, endpoint):
    """A starting instance must not starve serving ones; once ready it competes as an equal."""
    deploy_all(local_backend, [echo_spec(endpoint, "blue")])
    local_backend.update_endpoint(endpoint, traffic={"blue": 100})
    answer = local_backend.invoke(endpoint, {"x": 1}).json()
    platform = os.getpriority(os.PRIO_PROCESS, local_backend._platform()["pid"])  # 10 under `nice -n 10`
    assert answer["init_niceness"] == min(19, platform + STARTUP_NICENESS)
    assert answer["niceness"] == (platform if os.geteuid() == 0 else answer["init_niceness"])


def test_copying_a_large_model_does_not_stall_the_platform(local_backend, tmp_path):
    """Copies run in a worker thread: control calls (and the gateway, on the same loop) keep answering."""
    import threading

    import requests

    from saferollout.backends.local.workspace import admin_token

    folder = tmp_path / "model"
    folder.mkdir()
    FILES = 20_000
    chunk = os.urandom(1024)
    for i in range(FILES):  # many files: a copy that takes a while on any disk
        (folder / f"part-{i:05d}.bin").write_bytes(chunk)
    url = f"http://127.0.0.1:{local_backend._platform()['control_port']}/api/status"
    headers = {"Authorization": f"Bearer {admin_token(local_backend.home)}"}
    done, gaps = threading.Event(), []

    def poll() -> None:
        while not done.is_set():
            started = time.perf_counter()
            requests.get(url, headers=headers, timeout=60)
            gaps.append(time.perf_counter() - started)
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    started = time.perf_counter()
    try:
        model = local_backend.register_model(f"big-{uuid.uuid4().hex[:6]}", str(folder))
    finally:
        done.set()
        poller.join()
    took = time.perf_counter() - started
    assert len(list(Path(model.path).iterdir())) == FILES
    assert took > 0.5, f"the copy took {took:.2f} s: too fast to tell"
    assert max(gaps) < took / 3, f"a status call waited {max(gaps):.2f} s during a {took:.2f} s copy"
