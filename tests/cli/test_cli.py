"""The `saferollout` command, run for real against the session's local platform.

Most tests call `main(argv)` in-process and read stdout/stderr; a few run the installed console script
(`.venv/bin/saferollout`) as a subprocess to prove the entry point, the exit codes and the one-line
errors, and one runs a bash script written for `az ml` with `az ml` replaced by `saferollout`.
Every error case asserts the exit code, the message and that nothing changed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from saferollout import cli
from saferollout.backends.local.client import stop_platform
from saferollout.cli import apply_remove, apply_set, build_parser, main, metrics_window
from saferollout.errors import NotFound, SpecError, UsageError

CONSOLE_SCRIPT = Path(sys.executable).parent / "saferollout"


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)

    @property
    def error_line(self) -> str:
        """The one `error:` line, last on stderr (progress lines of long operations may precede it)."""
        lines = self.err.strip().splitlines()
        errors = [line for line in lines if line.startswith("error")]
        assert len(errors) == 1 and lines[-1] == errors[0], f"expected one final error line, got: {self.err!r}"
        assert "Traceback" not in self.err
        return errors[0]


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    monkeypatch.delenv("SAFEROLLOUT_BACKEND", raising=False)


@pytest.fixture
def sr(capsys):
    """Run `saferollout ARGS...` in-process; returns the exit code and what it printed."""
    def run(*argv: str) -> Run:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)
    return run


def _wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _request_file(tmp_path: Path, credit_split, rows: int = 3) -> Path:
    from saferollout.data import to_request

    path = tmp_path / "request.json"
    path.write_text(json.dumps(to_request(credit_split.X_test.iloc[:rows])))
    return path


# ---- usage errors (no platform needed) ------------------------------------------------------

def test_unknown_flag_exits_2_with_one_line_naming_it(sr):
    run = sr("online-endpoint", "list", "--bogus-flag")
    assert run.code == 2 and run.out == ""
    assert "unrecognized arguments: --bogus-flag" in run.error_line


def test_missing_required_flag_exits_2_naming_it(sr):
    run = sr("online-endpoint", "show")
    assert run.code == 2
    assert run.error_line == ("error: saferollout online-endpoint show: the following arguments are required: "
                              "-n/--name")


def test_missing_verb_exits_2(sr):
    run = sr("online-deployment")
    assert run.code == 2 and "required: VERB" in run.error_line


def test_invalid_choice_exits_2_naming_the_flag(sr, unique_name):
    run = sr("online-endpoint", "regenerate-keys", "-n", unique_name(), "--key-type", "tertiary")
    assert run.code == 2 and "argument --key-type: invalid choice: 'tertiary'" in run.error_line


@pytest.mark.parametrize("argv, flag, message", [
    (["online-endpoint", "show", "-n", "a/b"], "-n/--name", "invalid endpoint name 'a/b'"),
    (["online-deployment", "list", "-e", "x"], "-e/--endpoint-name", "invalid endpoint name 'x'"),
    (["online-deployment", "show", "-e", "credit", "-n", "blue_1"], "-n/--name", "invalid deployment name 'blue_1'"),
    (["model", "show", "-n", "x/y"], "-n/--name", "invalid model name 'x/y'"),
])
def test_invalid_names_are_usage_errors_naming_the_flag(sr, argv, flag, message):
    run = sr(*argv)
    assert run.code == 2 and f"argument {flag}: {message}" in run.error_line


def test_help_exits_0(sr):
    run = sr("online-deployment", "create", "--help")
    assert run.code == 0 and "--all-traffic" in run.out and "--endpoint-name" in run.out


def test_az_abbreviations_reach_the_full_flags():
    parser = build_parser(extra_modules=[])
    args = parser.parse_args(["online-endpoint", "invoke", "-n", "ep1", "--request", "r.json",
                              "--deployment", "green"])
    assert (args.request_file, args.deployment_name) == ("r.json", "green")
    args = parser.parse_args(["online-deployment", "list", "--endpoint", "ep1"])
    assert args.endpoint_name == "ep1"


def test_leaf_output_and_query_override_the_global_defaults():
    parser = build_parser(extra_modules=[])
    args = parser.parse_args(["online-endpoint", "list", "-o", "TSV", "--query", "[].name"])
    assert (args.output, args.query) == ("tsv", "[].name")
    args = parser.parse_args(["-o", "table", "online-endpoint", "list"])
    assert (args.output, args.query) == ("table", None)


def test_backend_comes_from_the_flag_then_the_environment(monkeypatch):
    monkeypatch.setenv("SAFEROLLOUT_BACKEND", "azure")
    assert build_parser(extra_modules=[]).parse_args(["model", "list"]).backend == "azure"
    assert build_parser(extra_modules=[]).parse_args(["model", "list", "--backend", "local"]).backend == "local"
    monkeypatch.delenv("SAFEROLLOUT_BACKEND")
    assert build_parser(extra_modules=[]).parse_args(["model", "list"]).backend == "local"


def test_backend_factory_makes_the_named_backend_once(monkeypatch):
    made = []
    monkeypatch.setattr("saferollout.backends.get_backend",
                        lambda name, **settings: made.append((name, settings)) or object())
    factory = cli.BackendFactory("azure", {"resource_group": "rg"})
    assert factory() is factory()
    assert made == [("azure", {"resource_group": "rg"})]


def test_az_workspace_flags_become_azure_settings_and_are_ignored_locally(sr, monkeypatch):
    made = []

    class Listing:
        def list_endpoints(self):
            return []

    monkeypatch.setattr("saferollout.backends.get_backend",
                        lambda name, **settings: made.append((name, settings)) or Listing())
    run = sr("online-endpoint", "list", "--backend", "azure", "-g", "rg1", "-w", "ws1", "--subscription", "sub1")
    assert run.code == 0 and run.json() == []
    run = sr("online-endpoint", "list", "-g", "rg1", "-w", "ws1")
    assert run.code == 0
    assert made == [("azure", {"subscription_id": "sub1", "resource_group": "rg1", "workspace_name": "ws1"}),
                    ("local", {})]


# ---- --set / --remove and the metrics window ------------------------------------------------

def test_set_parses_json_literals_but_keeps_tag_values_as_strings():
    data = apply_set({"tags": {"a": "1"}}, ["instance_count=2", "tags.build=007", "request_settings.request_timeout_ms=900",
                                            "description=hello world"])
    assert data == {"tags": {"a": "1", "build": "007"}, "instance_count": 2,
                    "request_settings": {"request_timeout_ms": 900}, "description": "hello world"}


def test_set_without_equals_is_a_usage_error():
    with pytest.raises(UsageError, match="--set expects KEY=VALUE"):
        apply_set({}, ["tags.owner"])


def test_set_through_a_scalar_is_a_usage_error():
    with pytest.raises(UsageError, match="instance_count is not a mapping"):
        apply_set({"instance_count": 1}, ["instance_count.x=1"])


def test_remove_deletes_a_nested_key_and_refuses_a_missing_one():
    assert apply_remove({"tags": {"a": "1", "b": "2"}}, ["tags.a"]) == {"tags": {"b": "2"}}
    with pytest.raises(UsageError, match="--remove 'tags.zz': there is no such property"):
        apply_remove({"tags": {}}, ["tags.zz"])


def test_metrics_window_from_timespan_start_end_or_default():
    now = datetime(2026, 11, 27, 8, 0, tzinfo=timezone.utc)
    assert metrics_window("PT15M", None, None, now) == (now - timedelta(minutes=15), now)
    assert metrics_window(None, None, None, now) == (now - timedelta(hours=1), now)
    assert metrics_window("2026-11-27T07:00:00Z/PT10M", None, None, now) == (
        now - timedelta(hours=1), now - timedelta(minutes=50))
    assert metrics_window(None, "2026-11-27T07:30:00", "2026-11-27T07:45:00Z", now) == (
        now - timedelta(minutes=30), now - timedelta(minutes=15))


@pytest.mark.parametrize("timespan, start, end, message", [
    ("15 minutes", None, None, "invalid --timespan '15 minutes'"),
    (None, "yesterday", None, "invalid --start-time 'yesterday'"),
    (None, "2026-11-27T08:00:00Z", "2026-11-27T07:00:00Z", "the metrics window is empty"),
    ("PT5M", "2026-11-27T08:00:00Z", None, "give --timespan or --start-time, not both"),
])
def test_bad_metrics_window_is_refused(timespan, start, end, message):
    with pytest.raises(SpecError, match=message):
        metrics_window(timespan, start, end)


# ---- extra command modules -------------------------------------------------------------------

def _write_module(folder: Path, source: str) -> str:
    name = f"cli_extra_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return name


def test_extra_command_module_registers_a_command_with_shared_error_handling(sr, tmp_path, monkeypatch):
    name = _write_module(tmp_path, """
        from saferollout.cli import common_options
        from saferollout.errors import SpecError
        from saferollout.output import emit

        def register(subparsers):
            parser = subparsers.add_parser("hello", parents=[common_options()])
            parser.add_argument("--fail", action="store_true")
            parser.set_defaults(handler=handle)

        def handle(args, backend_factory):
            if args.fail:
                raise SpecError("hello refused:\\nbad input")
            emit({"backend": type(backend_factory()).__name__}, args.output, args.query)
            return 0
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "EXTRA_COMMAND_MODULES", [name])
    run = sr("hello", "--query", "backend", "-o", "tsv")
    assert run.code == 0 and run.out == "LocalBackend\n"
    run = sr("hello", "--fail")
    assert run.code == 2 and run.error_line == "error: hello refused: bad input"
    run = sr("hello", "--nope")
    assert run.code == 2 and "unrecognized arguments: --nope" in run.error_line


def test_extra_module_with_a_broken_import_is_not_hidden(tmp_path, monkeypatch):
    name = _write_module(tmp_path, """
        import a_dependency_nobody_installed_4d2f  # noqa: F401

        def register(subparsers):
            pass
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_nobody_installed_4d2f"):
        build_parser(extra_modules=[name])


# ---- endpoints --------------------------------------------------------------------------------

def test_endpoint_create_show_list_print_az_json(sr, local_backend, example_dir, unique_name):
    name = unique_name("cli")
    run = sr("online-endpoint", "create", "-f", example_dir / "endpoint.yml", "-n", name,
             "-g", "my-rg", "-w", "my-ws")
    assert run.code == 0, run.err
    created = run.json()
    assert created["name"] == name and created["auth_mode"] == "key"
    assert created["provisioning_state"] == "Succeeded" and created["traffic"] == {}
    assert created["tags"] == {"project": "saferollout"}
    assert created["scoring_uri"] == local_backend.get_endpoint(name).scoring_uri
    run = sr("online-endpoint", "show", "-n", name, "--query", "scoring_uri", "-o", "tsv")
    assert run.out == created["scoring_uri"] + "\n"
    assert name in sr("online-endpoint", "list", "--query", "[].name").json()
    local_backend.delete_endpoint(name)


def test_endpoint_create_from_flags_with_token_auth(sr, local_backend, unique_name):
    name = unique_name("cli")
    run = sr("online-endpoint", "create", "-n", name, "--auth-mode", "aml_token", "--set", "tags.team=risk")
    assert run.code == 0, run.err
    assert (run.json()["auth_mode"], run.json()["tags"]) == ("aml_token", {"team": "risk"})
    creds = sr("online-endpoint", "get-credentials", "-n", name).json()
    assert creds["tokenType"] == "Bearer" and creds["accessToken"] and creds["expiryTimeUtc"] > time.time()
    local_backend.delete_endpoint(name)


def test_endpoint_create_twice_exits_1_and_keeps_the_first(sr, local_backend, unique_name):
    name = unique_name("cli")
    assert sr("online-endpoint", "create", "-n", name, "--set", "tags.v=1").code == 0
    run = sr("online-endpoint", "create", "-n", name, "--set", "tags.v=2")
    assert run.code == 1 and name in run.error_line and "exists" in run.error_line
    assert local_backend.get_endpoint(name).tags == {"v": "1"}
    local_backend.delete_endpoint(name)


def test_invalid_endpoint_name_exits_2_and_creates_nothing(sr, local_backend):
    run = sr("online-endpoint", "create", "-n", "9-starts-with-a-digit")
    assert run.code == 2 and "invalid endpoint name '9-starts-with-a-digit'" in run.error_line
    assert "9-starts-with-a-digit" not in [e.name for e in local_backend.list_endpoints()]


def test_endpoint_create_without_a_name_exits_2(sr):
    run = sr("online-endpoint", "create", "--auth-mode", "key")
    assert run.code == 2 and "needs --name or a --file" in run.error_line


def test_malformed_yaml_exits_2_naming_file_and_line(sr, local_backend, tmp_path, unique_name):
    name = unique_name("cli")
    path = tmp_path / "endpoint.yml"
    path.write_text(f"name: {name}\nauth_mode: key\ntags: [unclosed\n")
    run = sr("online-endpoint", "create", "-f", path)
    assert run.code == 2 and f"malformed YAML in {path}" in run.error_line and "line" in run.error_line
    assert name not in [e.name for e in local_backend.list_endpoints()]


def test_unknown_yaml_key_exits_2_and_creates_nothing(sr, local_backend, tmp_path, unique_name):
    name = unique_name("cli")
    path = tmp_path / "endpoint.yml"
    path.write_text(f"name: {name}\nauth_mod: key\n")
    run = sr("online-endpoint", "create", "-f", path)
    assert run.code == 2 and "unknown key(s) in endpoint file" in run.error_line and "auth_mod" in run.error_line
    assert name not in [e.name for e in local_backend.list_endpoints()]


def test_missing_file_exits_2(sr, tmp_path):
    run = sr("online-endpoint", "create", "-f", tmp_path / "nope.yml")
    assert run.code == 2 and run.error_line == f"error: file not found: {tmp_path / 'nope.yml'}"


def test_update_sets_and_removes_tags_and_description(sr, local_backend, unique_name):
    name = unique_name("cli")
    local_backend.create_endpoint(cli_endpoint_spec(name, tags={"keep": "1", "drop": "2"}))
    run = sr("online-endpoint", "update", "-n", name, "--set", "tags.owner=me", "description=new one",
             "--remove", "tags.drop")
    assert run.code == 0, run.err
    assert run.json()["tags"] == {"keep": "1", "owner": "me"} and run.json()["description"] == "new one"
    assert local_backend.get_endpoint(name).tags == {"keep": "1", "owner": "me"}
    local_backend.delete_endpoint(name)


def test_update_from_a_file_applies_its_tags_and_description(sr, local_backend, tmp_path, unique_name):
    name = unique_name("cli")
    local_backend.create_endpoint(cli_endpoint_spec(name, tags={"old": "1"}, description="before"))
    path = tmp_path / "endpoint.yml"
    path.write_text(f"name: {name}\nauth_mode: key\ndescription: after\ntags:\n  project: saferollout\n")
    run = sr("online-endpoint", "update", "-f", path, "--set", "tags.extra=yes")
    assert run.code == 0, run.err
    endpoint = local_backend.get_endpoint(name)
    assert (endpoint.description, endpoint.tags) == ("after", {"project": "saferollout", "extra": "yes"})
    local_backend.delete_endpoint(name)


def test_update_with_tags_that_are_not_a_mapping_exits_2_and_changes_nothing(sr, local_backend, unique_name):
    name = unique_name("cli")
    local_backend.create_endpoint(cli_endpoint_spec(name, tags={"a": "1"}))
    run = sr("online-endpoint", "update", "-n", name, "--set", "tags=5")
    assert run.code == 2 and run.error_line == "error: tags must be a mapping of names to values, got 5"
    assert local_backend.get_endpoint(name).tags == {"a": "1"}
    local_backend.delete_endpoint(name)


def test_update_remove_tags_clears_them(sr, local_backend, unique_name):
    name = unique_name("cli")
    local_backend.create_endpoint(cli_endpoint_spec(name, tags={"a": "1", "b": "2"}))
    run = sr("online-endpoint", "update", "-n", name, "--remove", "tags")
    assert run.code == 0 and run.json()["tags"] == {}
    local_backend.delete_endpoint(name)


def test_update_refuses_fields_that_cannot_change(sr, local_backend, unique_name):
    name = unique_name("cli")
    local_backend.create_endpoint(cli_endpoint_spec(name))
    run = sr("online-endpoint", "update", "-n", name, "--set", "auth_mode=aml_token")
    assert run.code == 2 and "cannot update 'auth_mode' of an endpoint" in run.error_line
    assert local_backend.get_endpoint(name).auth_mode == "key"
    local_backend.delete_endpoint(name)


def test_update_removing_a_missing_tag_exits_2_and_changes_nothing(sr, local_backend, unique_name):
    name = unique_name("cli")
    local_backend.create_endpoint(cli_endpoint_spec(name, tags={"a": "1"}))
    run = sr("online-endpoint", "update", "-n", name, "--set", "tags.b=2", "--remove", "tags.zz")
    assert run.code == 2 and "--remove 'tags.zz': there is no such property" in run.error_line
    assert local_backend.get_endpoint(name).tags == {"a": "1"}
    local_backend.delete_endpoint(name)


def test_bad_query_fails_before_anything_changes(sr, local_backend, unique_name):
    name = unique_name("cli")
    local_backend.create_endpoint(cli_endpoint_spec(name, tags={"a": "1"}))
    run = sr("online-endpoint", "update", "-n", name, "--set", "tags.b=2", "--query", "tags[")
    assert run.code == 2 and "invalid --query 'tags['" in run.error_line
    assert local_backend.get_endpoint(name).tags == {"a": "1"}
    local_backend.delete_endpoint(name)


def test_delete_without_yes_exits_2_and_keeps_the_endpoint(sr, local_backend, unique_name):
    name = unique_name("cli")
    local_backend.create_endpoint(cli_endpoint_spec(name))
    run = sr("online-endpoint", "delete", "-n", name)
    assert run.code == 2 and "needs confirmation" in run.error_line and "--yes" in run.error_line
    assert local_backend.get_endpoint(name).name == name
    run = sr("online-endpoint", "delete", "-n", name, "--yes")
    assert run.code == 0 and run.out == ""
    with pytest.raises(NotFound):
        local_backend.get_endpoint(name)


def test_show_of_a_missing_endpoint_exits_1(sr, unique_name):
    name = unique_name("cli")
    run = sr("online-endpoint", "show", "-n", name)
    assert run.code == 1 and name in run.error_line and "not found" in run.error_line


def test_regenerate_secondary_key_changes_only_that_key(sr, local_backend, unique_name):
    name = unique_name("cli")
    local_backend.create_endpoint(cli_endpoint_spec(name))
    before = sr("online-endpoint", "get-credentials", "-n", name).json()
    run = sr("online-endpoint", "regenerate-keys", "-n", name, "--key-type", "secondary")
    assert run.code == 0 and run.out == ""
    after = sr("online-endpoint", "get-credentials", "-n", name).json()
    assert after["primaryKey"] == before["primaryKey"]
    assert after["secondaryKey"] != before["secondaryKey"] and len(after["secondaryKey"]) >= 32
    local_backend.delete_endpoint(name)


def test_regenerate_keys_of_a_token_endpoint_exits_2(sr, local_backend, unique_name):
    name = unique_name("cli")
    local_backend.create_endpoint(cli_endpoint_spec(name, auth_mode="aml_token"))
    run = sr("online-endpoint", "regenerate-keys", "-n", name)
    assert run.code == 2 and "only key endpoints have keys" in run.error_line
    local_backend.delete_endpoint(name)


def cli_endpoint_spec(name: str, **fields):
    from saferollout.specs import EndpointSpec

    return EndpointSpec(name=name, **fields)


# ---- models -------------------------------------------------------------------------------------

def test_model_create_show_latest_and_list(sr, credit_model_dir):
    model = f"cli-model-{uuid.uuid4().hex[:8]}"
    run = sr("model", "create", "-n", model, "-p", credit_model_dir, "--tags", "family=lr", "stage=dev",
             "--set", "properties.auc=0.81", "-d", "first")
    assert run.code == 0, run.err
    first = run.json()
    assert (first["name"], first["version"], first["tags"]) == (model, 1, {"family": "lr", "stage": "dev"})
    assert first["properties"] == {"auc": "0.81"} and first["description"] == "first"
    assert sr("model", "create", "-n", model, "-p", credit_model_dir, "-v", "2").json()["version"] == 2
    assert sr("model", "show", "-n", model, "--query", "version").out == "2\n"
    assert sr("model", "show", "-n", model, "--version", "1", "--query", "tags.family", "-o", "tsv").out == "lr\n"
    assert sr("model", "show", "-n", model, "--label", "latest", "--query", "version").out == "2\n"
    assert sr("model", "list", "-n", model, "--query", "[].version").json() == [1, 2]


def test_model_create_from_a_yaml_file(sr, credit_model_dir, tmp_path):
    model = f"cli-model-{uuid.uuid4().hex[:8]}"
    shutil.copytree(credit_model_dir, tmp_path / "model")
    (tmp_path / "model.yml").write_text(f"name: {model}\npath: ./model\ntags:\n  source: yaml\n")
    run = sr("model", "create", "-f", tmp_path / "model.yml")
    assert run.code == 0, run.err
    assert run.json()["tags"] == {"source": "yaml"} and run.json()["version"] == 1


def test_model_create_with_a_missing_path_exits_2_and_registers_nothing(sr, local_backend, tmp_path):
    model = f"cli-model-{uuid.uuid4().hex[:8]}"
    run = sr("model", "create", "-n", model, "-p", tmp_path / "absent")
    assert run.code == 2 and run.error_line == f"error: model path does not exist: {tmp_path / 'absent'}"
    assert local_backend.list_models(model) == []


def test_model_create_with_a_taken_or_skipped_version_changes_nothing(sr, local_backend, credit_model_dir):
    model = f"cli-model-{uuid.uuid4().hex[:8]}"
    assert sr("model", "create", "-n", model, "-p", credit_model_dir).code == 0
    run = sr("model", "create", "-n", model, "-p", credit_model_dir, "--version", "1")
    assert run.code == 1 and run.error_line == f"error: model {model!r} version 1 already exists"
    run = sr("model", "create", "-n", model, "-p", credit_model_dir, "--version", "5")
    assert run.code == 2 and "the next version of" in run.error_line and "not 5" in run.error_line
    assert [m.version for m in local_backend.list_models(model)] == [1]


def test_model_properties_that_are_not_a_mapping_exit_2_and_register_nothing(sr, local_backend, credit_model_dir):
    model = f"cli-model-{uuid.uuid4().hex[:8]}"
    run = sr("model", "create", "-n", model, "-p", credit_model_dir, "--set", "properties=[1, 2]")
    assert run.code == 2 and run.error_line == "error: properties must be a mapping of names to values, got [1, 2]"
    assert local_backend.list_models(model) == []


def test_model_show_errors(sr, credit_model_dir):
    model = f"cli-model-{uuid.uuid4().hex[:8]}"
    run = sr("model", "show", "-n", model)
    assert run.code == 1 and model in run.error_line and "not found" in run.error_line
    run = sr("model", "show", "-n", model, "--version", "one")
    assert run.code == 2 and run.error_line == "error: model version must be a positive integer, got 'one'"
    run = sr("model", "create", "-n", "bad name!", "-p", credit_model_dir)
    assert run.code == 2 and "invalid model name 'bad name!'" in run.error_line


# ---- deployments, traffic, invoke, logs, metrics (one served endpoint) ------------------------

@pytest.fixture(scope="module")
def served(platform_home, local_backend, credit_model_dir, example_dir):
    """An endpoint with blue (model v1, all traffic) and green (latest), both made through the CLI."""
    model = f"cli-credit-{uuid.uuid4().hex[:8]}"
    name = f"cli-served-{uuid.uuid4().hex[:6]}"
    deployment_yml = example_dir / "deployment.yml"
    assert main(["model", "create", "-n", model, "-p", str(credit_model_dir), "-o", "none"]) == 0
    assert main(["online-endpoint", "create", "-f", str(example_dir / "endpoint.yml"), "-n", name, "-o", "none"]) == 0
    try:
        assert main(["online-deployment", "create", "-f", str(deployment_yml), "--endpoint", name, "-n", "blue",
                     "--all-traffic", "--set", f"model=azureml:{model}:1", "-o", "none"]) == 0
        traffic_after_blue = local_backend.get_endpoint(name).traffic
        assert main(["online-deployment", "create", "-f", str(deployment_yml), "-e", name, "-n", "green",
                     "--set", f"model=azureml:{model}@latest", "--no-wait"]) == 0
        green_state_at_return = local_backend.get_deployment(name, "green").provisioning_state
        _wait_for(lambda: local_backend.get_deployment(name, "green").provisioning_state == "Succeeded",
                  what="green to be ready")
        yield SimpleNamespace(endpoint=name, model=model, traffic_after_blue=traffic_after_blue,
                              green_state_at_return=green_state_at_return)
    finally:
        local_backend.delete_endpoint(name)


def test_deployment_create_with_all_traffic_routes_everything_to_it(served):
    assert served.traffic_after_blue == {"blue": 100}


def test_deployment_create_no_wait_returns_while_creating(served):
    assert served.green_state_at_return == "Creating"


def test_deployment_show_and_list_print_az_fields(sr, served):
    shown = sr("online-deployment", "show", "-e", served.endpoint, "-n", "blue").json()
    assert shown["name"] == "blue" and shown["endpoint_name"] == served.endpoint
    assert shown["model"] == f"azureml:{served.model}:1" and shown["provisioning_state"] == "Succeeded"
    assert shown["instance_type"] == "Standard_DS3_v2"
    assert shown["request_settings"]["max_concurrent_requests_per_instance"] == 4
    table = sr("online-deployment", "list", "--endpoint", served.endpoint, "-o", "table").out.splitlines()
    assert table[0].split()[:2] == ["Name", "Endpoint_name"]
    assert sorted(line.split()[0] for line in table[2:]) == ["blue", "green"]


def test_update_traffic_and_show_query_traffic(sr, local_backend, served):
    run = sr("online-endpoint", "update", "-n", served.endpoint, "--traffic", "blue=90 green=10", "--query", "traffic")
    assert run.code == 0 and run.json() == {"blue": 90, "green": 10}
    assert sr("online-endpoint", "show", "-n", served.endpoint, "--query", "traffic").json() == {"blue": 90, "green": 10}
    run = sr("online-endpoint", "update", "-n", served.endpoint, "--set", "traffic.blue=100", "--set", "traffic.green=0")
    assert run.code == 0 and local_backend.get_endpoint(served.endpoint).traffic == {"blue": 100, "green": 0}


@pytest.mark.parametrize("argv, code, message", [
    (["--traffic", "blue=90 purple=10"], 2, "traffic names unknown deployment(s): purple"),
    (["--traffic", "blue=90 green=20"], 2, "traffic must sum to 0 or 100, got 110"),
    (["--traffic", "blue=ninety"], 2, "must be an integer"),
    (["--set", "traffic.green=10"], 2, "traffic must sum to 0 or 100, got 110"),
    (["--mirror-traffic", "green=60"], 2, "at most 50 is allowed"),
    (["--mirror-traffic", "blue=10"], 2, "cannot mirror to 'blue': it has 100% live traffic"),
])
def test_bad_traffic_exits_with_a_message_and_changes_nothing(sr, local_backend, served, argv, code, message):
    local_backend.update_endpoint(served.endpoint, traffic={"blue": 100, "green": 0}, mirror_traffic={})
    run = sr("online-endpoint", "update", "-n", served.endpoint, *argv)
    assert run.code == code and message in run.error_line
    endpoint = local_backend.get_endpoint(served.endpoint)
    assert endpoint.traffic == {"blue": 100, "green": 0} and endpoint.mirror_traffic == {}


def test_mirror_traffic_on_and_off(sr, local_backend, served):
    local_backend.update_endpoint(served.endpoint, traffic={"blue": 100, "green": 0})
    assert sr("online-endpoint", "update", "-n", served.endpoint, "--mirror-traffic", "green=10",
              "--query", "mirror_traffic").json() == {"green": 10}
    assert sr("online-endpoint", "update", "-n", served.endpoint, "--mirror-traffic", "green=0",
              "--query", "mirror_traffic").json() == {}


def test_invoke_prints_the_answer_body(sr, served, tmp_path, credit_split):
    request = _request_file(tmp_path, credit_split, rows=3)
    run = sr("online-endpoint", "invoke", "-n", served.endpoint, "--request-file", request)
    assert run.code == 0, run.err
    answer = json.loads(run.out)
    assert len(answer["predictions"]) == 3 and all(0 <= p <= 1 for p in answer["probabilities"])


def test_invoke_with_the_deployment_flag_is_served_by_that_deployment(sr, local_backend, served, tmp_path,
                                                                       credit_split):
    local_backend.update_endpoint(served.endpoint, traffic={"blue": 100, "green": 0})
    request = _request_file(tmp_path, credit_split, rows=1)
    since = datetime.now(timezone.utc)
    for _ in range(3):
        assert sr("online-endpoint", "invoke", "-n", served.endpoint, "-r", request, "--deployment", "green").code == 0
    samples = _wait_for(lambda: (lambda s: s if len(s) >= 3 else None)(
        local_backend.request_samples(served.endpoint, start=since)), what="3 recorded requests")
    assert [s.deployment for s in samples] == ["green"] * 3


def test_invoke_non_2xx_exits_1_naming_status_and_message(sr, served, tmp_path, credit_split):
    request = _request_file(tmp_path, credit_split)
    run = sr("online-endpoint", "invoke", "-n", served.endpoint, "-r", request, "-d", "purple")
    assert run.code == 1 and run.out == ""
    assert run.error_line.startswith(f"error: endpoint {served.endpoint!r} answered 404: ")
    assert "purple" in run.error_line


def test_invoke_with_a_missing_request_file_exits_2(sr, served, tmp_path):
    run = sr("online-endpoint", "invoke", "-n", served.endpoint, "-r", tmp_path / "nope.json")
    assert run.code == 2 and run.error_line.startswith(f"error: cannot read request file {tmp_path / 'nope.json'}")


def test_deployment_update_with_an_unknown_key_exits_2_and_changes_nothing(sr, local_backend, served):
    run = sr("online-deployment", "update", "-e", served.endpoint, "-n", "green", "--set", "instance_cout=3")
    assert run.code == 2 and "unknown key(s)" in run.error_line and "instance_cout" in run.error_line
    dep = local_backend.get_deployment(served.endpoint, "green")
    assert (dep.instance_count, dep.provisioning_state) == (1, "Succeeded")


def test_deployment_update_cannot_rename(sr, local_backend, served):
    run = sr("online-deployment", "update", "-e", served.endpoint, "-n", "green", "--set", "name=teal")
    assert run.code == 2 and "cannot change a deployment's name" in run.error_line
    assert [d.name for d in local_backend.list_deployments(served.endpoint)] == ["blue", "green"]


def test_deployment_update_set_instance_count_scales_out(sr, local_backend, served):
    run = sr("online-deployment", "update", "-e", served.endpoint, "-n", "green", "--set", "instance_count=2",
             "--set", "tags.role=candidate")
    assert run.code == 0, run.err
    assert run.json()["instance_count"] == 2 and run.json()["tags"] == {"role": "candidate"}
    assert "green" in run.err  # progress went to stderr
    dep = local_backend.get_deployment(served.endpoint, "green")
    assert dep.provisioning_state == "Succeeded" and len(dep.instances) == 2


def test_deleting_a_live_deployment_exits_1_and_keeps_it(sr, local_backend, served):
    local_backend.update_endpoint(served.endpoint, traffic={"blue": 100, "green": 0})
    run = sr("online-deployment", "delete", "-e", served.endpoint, "-n", "blue", "--yes")
    assert run.code == 1 and "cannot delete deployment 'blue': it has 100% live traffic" in run.error_line
    assert local_backend.get_deployment(served.endpoint, "blue").provisioning_state == "Succeeded"


def test_deployment_create_with_a_bad_model_path_exits_2_and_creates_nothing(sr, local_backend, served, example_dir):
    run = sr("online-deployment", "create", "-f", example_dir / "deployment.yml", "-e", served.endpoint,
             "-n", "teal", "--set", "model=./no-such-model")
    assert run.code == 2 and "model path does not exist" in run.error_line
    assert [d.name for d in local_backend.list_deployments(served.endpoint)] == ["blue", "green"]


def test_deployment_whose_scoring_script_fails_exits_1_pointing_at_its_logs(sr, local_backend, served, tmp_path,
                                                                             example_dir):
    (tmp_path / "score.py").write_text("def init():\n    raise RuntimeError('no model here')\n\n"
                                       "def run(raw_data):\n    return raw_data\n")
    try:
        run = sr("online-deployment", "create", "-f", example_dir / "deployment.yml", "-e", served.endpoint,
                 "-n", "broken", "--set", f"code_configuration.code={tmp_path}", "--set",
                 f"model=azureml:{served.model}:1")
        assert run.code == 1 and run.out == ""
        assert run.error_line.startswith(f"error: deployment 'broken' on {served.endpoint!r} failed: ")
        assert run.error_line.endswith(f"see `saferollout online-deployment get-logs -e {served.endpoint} -n broken`")
        assert local_backend.get_deployment(served.endpoint, "broken").provisioning_state == "Failed"
        assert local_backend.get_endpoint(served.endpoint).traffic.get("broken", 0) == 0
        logs = sr("online-deployment", "get-logs", "-e", served.endpoint, "-n", "broken").out
        assert "no model here" in logs
    finally:
        assert sr("online-deployment", "delete", "-e", served.endpoint, "-n", "broken", "-y").code == 0


def test_deployment_create_on_a_missing_endpoint_exits_1(sr, example_dir, unique_name):
    name = unique_name("cli")
    run = sr("online-deployment", "create", "-f", example_dir / "deployment.yml", "-e", name, "-n", "blue")
    assert run.code == 1 and name in run.error_line and "not found" in run.error_line


def test_deployment_update_from_a_file_for_a_missing_deployment_exits_1(sr, local_backend, served, example_dir):
    run = sr("online-deployment", "update", "-f", example_dir / "deployment.yml", "-e", served.endpoint,
             "-n", "purple", "--set", f"model=azureml:{served.model}:1")
    assert run.code == 1 and "purple" in run.error_line and "not found" in run.error_line
    assert [d.name for d in local_backend.list_deployments(served.endpoint)] == ["blue", "green"]


def test_all_traffic_with_no_wait_is_a_usage_error(sr, local_backend, served, example_dir):
    run = sr("online-deployment", "create", "-f", example_dir / "deployment.yml", "-e", served.endpoint,
             "-n", "teal", "--all-traffic", "--no-wait")
    assert run.code == 2 and "--all-traffic needs the deployment ready" in run.error_line
    assert [d.name for d in local_backend.list_deployments(served.endpoint)] == ["blue", "green"]


def test_get_logs_prints_each_instance_log(sr, served):
    run = sr("online-deployment", "get-logs", "-e", served.endpoint, "-n", "blue", "--lines", "3")
    assert run.code == 0 and run.out.startswith("---- instance-0\n")
    section = run.out.split("---- instance-0\n", 1)[1].split("---- ", 1)[0].strip().splitlines()
    assert 1 <= len(section) <= 3


def test_metrics_split_by_deployment_counts_every_request(sr, local_backend, served):
    local_backend.update_endpoint(served.endpoint, traffic={"blue": 100, "green": 0}, mirror_traffic={})
    start = datetime.now(timezone.utc).isoformat()
    body = {"data": [{"job": 2, "credit_amount": 1000, "duration": 12, "age": 30, "sex": "male",
                      "housing": "own", "saving_accounts": "little", "checking_account": "moderate",
                      "purpose": "car"}]}
    for deployment, count in (("blue", 5), ("green", 3)):
        for _ in range(count):
            assert local_backend.invoke(served.endpoint, body, deployment=deployment).status == 200

    def totals():
        run = sr("metrics", "-e", served.endpoint, "--metric", "requestsperminute", "--aggregation", "total",
                 "--interval", "PT5S", "--start-time", start, "--split-by", "deployment",
                 "--query", "[].{d: dimensions.deployment, n: sum(points[?value != null].value)}")
        assert run.code == 0, run.err
        found = {row["d"]: row["n"] for row in run.json()}
        return found if found == {"blue": 5.0, "green": 3.0} else None
    assert _wait_for(totals, timeout=20, what="metrics to count 5 blue and 3 green requests")
    samples = sr("metrics", "-e", served.endpoint, "--samples", "-d", "green", "--start-time", start).json()
    assert len(samples) == 3 and {s["deployment"] for s in samples} == {"green"}
    assert all(s["status_code"] == 200 for s in samples)


@pytest.mark.parametrize("argv, message", [
    (["--metric", "RequestCount"], "unknown metric 'RequestCount'"),
    (["--aggregation", "Median"], "unknown aggregation 'Median'"),
    (["--split-by", "color"], "cannot split RequestsPerMinute by 'color'"),
    (["--filter", "deployment eq"], "filter"),
    (["--timespan", "an hour"], "invalid --timespan 'an hour'"),
])
def test_bad_metrics_queries_exit_2(sr, served, argv, message):
    run = sr("metrics", "-e", served.endpoint, *argv)
    assert run.code == 2 and message in run.error_line


# ---- the console script, for real ---------------------------------------------------------------

def _script(*argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(CONSOLE_SCRIPT), *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_console_script_usage_error_is_one_line_and_exit_2(platform_home):
    result = _script("online-endpoint", "update", "-n", "credit", "--traffic")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: saferollout online-endpoint update: argument --traffic: expected one argument\n"


def test_console_script_not_found_is_one_line_and_exit_1(platform_home, unique_name):
    name = unique_name("cli")
    result = _script("online-deployment", "show", "-e", name, "-n", "blue")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_local_start_status_stop_on_a_fresh_workspace(sr, tmp_path, monkeypatch):
    home = tmp_path / "ws"
    monkeypatch.setenv("SAFEROLLOUT_HOME", str(home))
    try:
        started = sr("local", "start")
        assert started.code == 0, started.err
        assert started.json()["running"] is True and "starting the local platform" in started.err
        assert sr("local", "status", "--query", "[[running, endpoints]]", "-o", "tsv").out == "True\t0\n"
        stopped = sr("local", "stop")
        assert stopped.code == 0 and stopped.err.strip() == f"stopped the local platform for {home}"
        assert sr("local", "status").json() == {"running": False, "home": str(home)}
        again = sr("local", "stop")
        assert again.code == 0 and again.err.strip() == f"no local platform was running for {home}"
    finally:
        stop_platform(home)


AZ_SCRIPT = """\
set -euo pipefail
ENDPOINT="$1"; MODEL="$2"; EXAMPLE="$3"; REQUEST="$4"
az ml online-endpoint create -f "$EXAMPLE/endpoint.yml" --name "$ENDPOINT" -g my-rg -w my-ws -o none
az ml online-deployment create -f "$EXAMPLE/deployment.yml" --endpoint-name "$ENDPOINT" --name blue \\
    --set model="azureml:$MODEL:1" --all-traffic -g my-rg -w my-ws -o none
az ml online-endpoint update --name "$ENDPOINT" --traffic "blue=100" -g my-rg -w my-ws -o none
az ml online-endpoint invoke --name "$ENDPOINT" --request-file "$REQUEST" -g my-rg -w my-ws
SCORING_URI=$(az ml online-endpoint show -n "$ENDPOINT" --query scoring_uri -o tsv)
KEY=$(az ml online-endpoint get-credentials -n "$ENDPOINT" --query primaryKey -o tsv)
echo "uri=$SCORING_URI key_length=${#KEY}"
az ml online-endpoint show --name "$ENDPOINT" --query traffic -g my-rg -w my-ws
az ml online-endpoint delete --name "$ENDPOINT" --yes -g my-rg -w my-ws
"""


def test_an_az_ml_script_runs_with_az_ml_replaced_by_saferollout(platform_home, local_backend, credit_model_dir,
                                                                  example_dir, credit_split, tmp_path, unique_name):
    model = f"cli-script-{uuid.uuid4().hex[:8]}"
    local_backend.register_model(model, str(credit_model_dir))
    endpoint = unique_name("cli-az")
    request = _request_file(tmp_path, credit_split, rows=2)
    script = tmp_path / "deploy.sh"
    script.write_text(AZ_SCRIPT.replace("az ml ", "saferollout "))
    env = dict(os.environ, PATH=f"{CONSOLE_SCRIPT.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        result = subprocess.run(["bash", str(script), endpoint, model, str(example_dir), str(request)],
                                capture_output=True, text=True, timeout=180, env=env)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(json.loads(lines[0])["predictions"]) == 2
        assert lines[1].startswith(f"uri={local_backend.gateway_url}/endpoints/{endpoint}/score key_length=")
        assert int(lines[1].rsplit("=", 1)[1]) >= 32
        assert json.loads("\n".join(lines[2:])) == {"blue": 100}
        with pytest.raises(NotFound):
            local_backend.get_endpoint(endpoint)
    finally:
        if endpoint in [e.name for e in local_backend.list_endpoints()]:
            local_backend.delete_endpoint(endpoint)


def test_model_create_refuses_a_misspelled_field_and_registers_nothing(sr, local_backend, credit_model_dir):
    model = f"cli-model-{uuid.uuid4().hex[:8]}"
    run = sr("model", "create", "-n", model, "-p", credit_model_dir, "--set", "versoin=7")
    assert run.code == 2
    assert run.error_line == ("error: model create: unknown field(s) versoin (did you mean version?); known: "
                              "description, name, path, properties, tags, type, version")
    assert local_backend.list_models(model) == []
