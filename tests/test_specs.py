"""Azure ML CLI v2 YAML loading and the Azure rules for names, traffic and mirror traffic."""
from pathlib import Path

import pytest

from saferollout.errors import SpecError
from saferollout.specs import (load_deployment_spec, load_endpoint_spec, parse_model_ref, parse_traffic,
                               validate_mirror, validate_name, validate_traffic)

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
