"""Output formats of the `saferollout` command: az's json, tsv, table, yaml and none, after --query."""
from __future__ import annotations

import io
import json

import pytest
import yaml

from saferollout.backends.base import Endpoint
from saferollout.errors import UsageError
from saferollout.output import apply_query, compile_query, emit, format_result

ENDPOINT = {"name": "credit", "traffic": {"blue": 90, "green": 10}, "tags": {}, "auth_mode": "key",
            "scoring_uri": "http://127.0.0.1:1/endpoints/credit/score", "instances": [1, 2, 3], "id": "x"}


def test_json_is_indented_with_sorted_keys_like_az():
    text = format_result({"b": 1, "a": {"d": 2, "c": 3}}, "json")
    assert text == '{\n  "a": {\n    "c": 3,\n    "d": 2\n  },\n  "b": 1\n}\n'


def test_tsv_of_a_scalar_is_the_bare_value_for_shell_scripts():
    assert format_result("http://127.0.0.1:1/score", "tsv") == "http://127.0.0.1:1/score\n"
    assert format_result(True, "tsv") == "true\n"
    assert format_result(90, "tsv") == "90\n"


def test_tsv_of_a_mapping_sorts_keys_and_flattens_nested_values_as_az():
    # sorted keys: auth_mode, id, instances, name, scoring_uri, tags, traffic
    line = format_result(ENDPOINT, "tsv")
    assert line == "key\tx\t3\tcredit\thttp://127.0.0.1:1/endpoints/credit/score\t\t\n"


def test_tsv_of_a_list_prints_one_line_per_item():
    assert format_result([{"name": "a", "v": 1}, {"name": "b", "v": 2}], "tsv") == "a\t1\nb\t2\n"


def test_table_shows_scalar_fields_under_capitalized_headers_and_skips_id():
    text = format_result([{"name": "blue", "instance_count": 1, "id": "x", "tags": {}},
                          {"name": "green-long", "instance_count": 2, "id": "y", "tags": {}}], "table")
    lines = text.splitlines()
    assert lines[0].split() == ["Name", "Instance_count"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["blue", "1"] and lines[3].split() == ["green-long", "2"]
    assert "Id" not in text and "Tags" not in text


def test_yaml_round_trips():
    assert yaml.safe_load(format_result(ENDPOINT, "yaml")) == ENDPOINT


def test_none_format_and_none_result_print_nothing():
    assert format_result(ENDPOINT, "none") == ""
    assert format_result(None, "json") == ""


def test_unknown_format_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown output format 'xml'"):
        format_result(ENDPOINT, "xml")


def test_query_selects_with_jmespath():
    assert apply_query(ENDPOINT, "traffic.blue") == 90
    assert apply_query([ENDPOINT], "[].name") == ["credit"]


def test_bad_query_is_a_usage_error_naming_it():
    with pytest.raises(UsageError, match=r"invalid --query 'traffic\[': "):
        compile_query("traffic[")


def test_emit_turns_entities_into_their_az_shaped_dicts():
    endpoint = Endpoint(name="credit", auth_mode="key", scoring_uri="http://127.0.0.1:1/endpoints/credit/score",
                        traffic={"blue": 100})
    out = io.StringIO()
    emit([endpoint], "json", compile_query("[0]"), stream=out)
    data = json.loads(out.getvalue())
    assert data["scoring_uri"].endswith("/credit/score")
    assert data["traffic"] == {"blue": 100} and data["provisioning_state"] == "Succeeded"
