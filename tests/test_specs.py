"""Azure ML CLI v2 YAML loading and the Azure rules for names, traffic and mirror traffic."""
from pathlib import Path

import pytest

from saferollout.errors import SpecError
from saferollout.specs import (check_model_type, check_no_code_model, load_deployment_spec, load_endpoint_spec,
                               model_type_of, parse_model_ref, parse_traffic, validate_mirror, validate_name,
                               validate_traffic)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "credit-risk"


@pytest.mark.parametrize("name", ["abc", "credit-risk", "a" * 32, "Blue1"])
def test_valid_names_are_accepted(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["ab", "a" * 33, "1abc", "abc-", "ab_c", "ab c", "", None])
def test_invalid_names_are_refused_with_the_rule(name):
    with pytest.raises(SpecError, match="3-32 letters"):
        validate_name(name)


def test_traffic_parses_the_cli_form():
    assert parse_traffic("blue=90 green=10") == {"blue": 90, "green": 10}


def test_traffic_must_sum_to_0_or_100():
    with pytest.raises(SpecError, match="sum to 0 or 100, got 95"):
        validate_traffic({"blue": 90, "green": 5})
    assert validate_traffic({"blue": 0, "green": 0}) == {"blue": 0, "green": 0}


def test_traffic_to_unknown_deployment_is_refused():
    with pytest.raises(SpecError, match="unknown deployment.*green"):
        validate_traffic({"blue": 90, "green": 10}, {"blue"})


def test_traffic_values_must_be_percentages():
    with pytest.raises(SpecError, match="at most 100"):
        parse_traffic({"blue": 150})
    with pytest.raises(SpecError, match="must be an integer"):
        parse_traffic("blue=ninety")


def test_mirror_rules():
    assert validate_mirror({"green": 10}, {"blue": 100}) == {"green": 10}
    with pytest.raises(SpecError, match="at most 50"):
        validate_mirror({"green": 60}, {"blue": 100})
    with pytest.raises(SpecError, match="live traffic"):
        validate_mirror({"blue": 10}, {"blue": 100})
    with pytest.raises(SpecError, match="at most one deployment"):
        validate_mirror({"green": 10, "red": 10}, {"blue": 100})
    with pytest.raises(SpecError, match="unknown deployment 'red'"):
        validate_mirror({"red": 10}, {"blue": 100}, {"blue", "green"})


def test_model_refs():
    assert parse_model_ref("azureml:credit-model:3") == ("credit-model", 3)
    assert parse_model_ref("azureml:credit-model@latest") == ("credit-model", None)
    with pytest.raises(SpecError, match="invalid model reference"):
        parse_model_ref("azureml:credit-model:x")


def test_example_yaml_files_load_unchanged():
    endpoint = load_endpoint_spec(EXAMPLE / "endpoint.yml")
    deployment = load_deployment_spec(EXAMPLE / "deployment.yml")
    assert endpoint.name == "credit-risk" and endpoint.auth_mode == "key"
    assert deployment.endpoint_name == "credit-risk"
    assert deployment.scoring_script == "score.py"
    assert Path(deployment.code_path, deployment.scoring_script).is_file()
    assert deployment.environment  # recorded, not built


def test_unknown_yaml_key_is_refused(tmp_path):
    path = tmp_path / "deployment.yml"
    path.write_text("name: blue\nendpoint_name: credit-risk\ninstance_cout: 2\n")
    with pytest.raises(SpecError, match="unknown key.*instance_cout"):
        load_deployment_spec(path)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "endpoint.yml"
    path.write_text("name: credit-risk\nauth_mode: [key\n")
    with pytest.raises(SpecError, match=r"malformed YAML in .*endpoint.yml at line \d+"):
        load_endpoint_spec(path)


def test_missing_model_path_is_refused(tmp_path):
    path = tmp_path / "deployment.yml"
    path.write_text("name: blue\nendpoint_name: credit-risk\nmodel: ./nowhere\n")
    with pytest.raises(SpecError, match="model path does not exist"):
        load_deployment_spec(path)


def test_bad_auth_mode_is_refused(tmp_path):
    path = tmp_path / "endpoint.yml"
    path.write_text("name: credit-risk\nauth_mode: aad\n")
    with pytest.raises(SpecError, match="auth_mode must be one of key, aml_token"):
        load_endpoint_spec(path)


def test_name_override_as_cli_n(tmp_path):
    endpoint = load_endpoint_spec(EXAMPLE / "endpoint.yml", name="other-ep")
    assert endpoint.name == "other-ep"


def test_request_settings_and_probes_are_validated(tmp_path):
    path = tmp_path / "deployment.yml"
    path.write_text("name: blue\nendpoint_name: credit-risk\nrequest_settings:\n  request_timeout_ms: 0\n")
    with pytest.raises(SpecError, match="request_timeout_ms must be at least 1"):
        load_deployment_spec(path)
    path.write_text("name: blue\nendpoint_name: credit-risk\nliveness_probe:\n  periodd: 3\n")
    with pytest.raises(SpecError, match="unknown key.*periodd"):
        load_deployment_spec(path)


# ---- no-code deployments: an MLflow model without a scoring script, as on Azure ------------------------

def mlflow_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: mlflow.sklearn\n")
    return folder


def test_a_deployment_of_an_mlflow_model_needs_no_code_configuration(tmp_path):
    mlflow_folder(tmp_path)
    path = tmp_path / "deployment.yml"
    path.write_text("name: blue\nendpoint_name: my-ep\nmodel:\n  path: ./model\n  type: mlflow_model\n"
                    "instance_type: Standard_DS3_v2\ninstance_count: 1\n")
    spec = load_deployment_spec(path)
    assert spec.code_path is None and spec.scoring_script is None
    assert spec.model == str(tmp_path / "model")
    path.write_text("name: blue\nendpoint_name: my-ep\nmodel: ./model\n")  # the type is read from MLmodel
    assert load_deployment_spec(path).model == str(tmp_path / "model")


def test_a_registered_model_without_code_is_left_to_the_backend_to_check(tmp_path):
    path = tmp_path / "deployment.yml"
    path.write_text("name: blue\nendpoint_name: my-ep\nmodel: azureml:diabetes:3\n")
    assert load_deployment_spec(path).model == "azureml:diabetes:3"


def test_no_code_configuration_and_a_model_that_is_not_mlflow_is_refused(tmp_path):
    (tmp_path / "model.pkl").write_bytes(b"not an MLflow model")
    path = tmp_path / "deployment.yml"
    path.write_text("name: blue\nendpoint_name: my-ep\nmodel: ./model.pkl\n")
    with pytest.raises(SpecError) as caught:
        load_deployment_spec(path)
    assert str(caught.value) == (
        f"deployment file {path} has no code_configuration and its model {tmp_path / 'model.pkl'} is not an "
        "MLflow model (no MLmodel file in it): add code_configuration (code and scoring_script), or deploy an "
        "MLflow model (a folder with an MLmodel file, or a registered model of type mlflow_model) without one")


def test_no_code_configuration_and_no_model_is_refused(tmp_path):
    path = tmp_path / "deployment.yml"
    path.write_text("name: blue\nendpoint_name: my-ep\n")
    with pytest.raises(SpecError, match=f"deployment file {path} has no code_configuration and no model: add "
                                        r"code_configuration \(code and scoring_script\), or deploy an MLflow model"):
        load_deployment_spec(path)


def test_an_inline_mlflow_model_type_needs_an_mlmodel_file(tmp_path):
    (tmp_path / "model").mkdir()
    path = tmp_path / "deployment.yml"
    path.write_text("name: blue\nendpoint_name: my-ep\nmodel:\n  path: ./model\n  type: mlflow_model\n")
    with pytest.raises(SpecError, match="is of type mlflow_model but has no MLmodel file"):
        load_deployment_spec(path)
    path.write_text("name: blue\nendpoint_name: my-ep\nmodel:\n  path: ./model\n  type: onnx\n")
    with pytest.raises(SpecError, match="model type must be one of custom_model, mlflow_model, triton_model, got 'onnx'"):
        load_deployment_spec(path)


def test_a_registered_custom_model_cannot_deploy_without_code(tmp_path):
    spec = load_deployment_spec(_write(tmp_path, "name: blue\nendpoint_name: my-ep\nmodel: azureml:m:2\n"))
    check_no_code_model(spec, "azureml:m:2", "mlflow_model")
    with pytest.raises(SpecError, match="has no code_configuration and its model azureml:m:2 is a custom_model, "
                                        "not an mlflow_model"):
        check_no_code_model(spec, "azureml:m:2", "custom_model")


def test_model_types_follow_the_mlmodel_file(tmp_path):
    folder = mlflow_folder(tmp_path)
    assert model_type_of(folder) == "mlflow_model" and model_type_of(tmp_path) == "custom_model"
    assert check_model_type(folder, "mlflow_model") == "mlflow_model"
    with pytest.raises(SpecError, match=f"model {tmp_path} cannot be registered as mlflow_model: it is not a "
                                        "folder with an MLmodel file"):
        check_model_type(tmp_path, "mlflow_model")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deployment.yml"
    path.write_text(text)
    return path
