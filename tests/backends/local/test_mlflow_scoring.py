"""No-code MLflow deployments on the local platform: an instance serves an MLflow model folder without a
scoring script (saferollout's `mlflow_scoring.py` under azmlinfsrv, the model loaded by MLflow's pyfunc
loader), answering as Azure's no-code deployment does; input the model cannot take is a 400 with a message."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from saferollout.backends.local.instances import Instance, InstanceConfig, tail
from saferollout.errors import SpecError
from saferollout.specs import DeploymentSpec, ProbeSettings

from echo_platform import FAST_LIVENESS, new_endpoint
from mlflow_models import diabetes_requests, save_diabetes_model

# importing MLflow takes seconds (tens on a loaded machine): Azure's default budget (310 s), polled at once
READINESS = ProbeSettings(initial_delay=0, period=1, timeout=2, failure_threshold=300)
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """AZUREML_MODEL_DIR as the platform lays it out: the registered folder `model/` inside it."""
    root = tmp_path_factory.mktemp("registered")
    save_diabetes_model(root / "model")
    return root


def score_all(model_dir: Path, log: Path, bodies: list[bytes]) -> list[tuple[int, bytes]]:
    config = InstanceConfig(endpoint="ep", deployment="mlflow", index=0, code_dir=None, scoring_script=None,
                            model_dir=str(model_dir), environment_variables={}, readiness=READINESS,
                            liveness=FAST_LIVENESS, log_path=log)

    async def scenario() -> list[tuple[int, bytes]]:
        inst = Instance(config, on_change=lambda: None)
        try:
            assert await inst.start(), inst.reason + tail(log)
            return [await inst.score(body, "application/json") for body in bodies]
        finally:
            await inst.stop(drain_s=0)
    return asyncio.run(scenario())


def test_an_instance_serves_an_mlflow_model_without_a_scoring_script(model_dir, tmp_path):
    split = diabetes_requests(rows_per_request=3)[0]
    missing = {"input_data": {**split["input_data"], "columns": ["age"], "data": [[0.01]] * 3}}
    answers = score_all(model_dir, tmp_path / "instance.log", [
        json.dumps(split).encode(),
        json.dumps({"data": split["input_data"]["data"]}).encode(),
        b"not json",
        json.dumps(missing).encode()])
    status, body = answers[0]
    assert status == 200, body
    predictions = json.loads(body)  # as Azure's no-code deployment answers: the predictions, a bare list
    assert isinstance(predictions, list) and len(predictions) == 3 and all(isinstance(p, float) for p in predictions)
    assert [(s, json.loads(b)) for s, b in answers[1:]] == [
        (400, {"message": 'the request must be a JSON object with the key "input_data": {"input_data": {"columns": '
                          '[...], "index": [...], "data": [[...]]}} or {"input_data": [[...], ...]}'}),
        (400, {"message": "the request is not JSON: Expecting value: line 1 column 1 (char 0)"}),
        (400, {"message": "the model refused the input: Model is missing inputs ['sex', 'bmi', 'bp', 's1', 's2', "
                          "'s3', 's4', 's5', 's6']."})]


def test_the_platform_deploys_an_mlflow_folder_without_code_and_answers_through_the_endpoint(
        local_backend, model_dir):
    endpoint = new_endpoint(local_backend)
    try:
        spec = DeploymentSpec(name="mlflow", endpoint_name=endpoint, model=str(model_dir / "model"),
                              readiness_probe=READINESS, liveness_probe=FAST_LIVENESS)
        dep = local_backend.create_deployment(spec)
        assert dep.provisioning_state == "Succeeded" and dep.code_configuration is None
        model = local_backend.get_model(*dep.model.removeprefix("azureml:").split(":"))
        assert model.type == "mlflow_model"  # the anonymous model a path becomes, typed from its MLmodel file
        local_backend.update_endpoint(endpoint, traffic={"mlflow": 100})
        answer = local_backend.invoke(endpoint, diabetes_requests(rows_per_request=2)[0])
        assert answer.status == 200 and len(json.loads(answer.body)) == 2
        refused = local_backend.invoke(endpoint, {"data": [[1.0] * 10]})
        assert refused.status == 424  # the model server's 400, as a managed endpoint reports it
    finally:
        local_backend.delete_endpoint(endpoint)


def test_a_registered_custom_model_is_refused_without_code(local_backend, model_dir, tmp_path):
    endpoint = new_endpoint(local_backend)
    try:
        plain = tmp_path / "plain"
        plain.mkdir()
        (plain / "model.pkl").write_bytes(b"x")
        registered = local_backend.register_model(f"{endpoint}-plain", str(plain))
        spec = DeploymentSpec(name="nocode", endpoint_name=endpoint, model=registered.ref)
        with pytest.raises(SpecError) as caught:
            local_backend.create_deployment(spec)
        assert str(caught.value) == (
            f"deployment 'nocode' has no code_configuration and its model {registered.ref} is a custom_model, not "
            "an mlflow_model: add code_configuration (code and scoring_script), or register the model folder "
            "(with its MLmodel file) as type mlflow_model")
        mlflow = local_backend.register_model(f"{endpoint}-mlflow", str(model_dir / "model"), type="mlflow_model")
        assert mlflow.type == "mlflow_model"
        with pytest.raises(SpecError, match="cannot be registered as mlflow_model: it is not a folder with an MLmodel"):
            local_backend.register_model(f"{endpoint}-plain", str(plain), type="mlflow_model")
    finally:
        local_backend.delete_endpoint(endpoint)
