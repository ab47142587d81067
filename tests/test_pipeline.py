"""The notebooks' library calls that decide something: gate choice, bake gates, specs, lineage."""
from __future__ import annotations

import json

import pytest

from saferollout import pipeline
from saferollout.errors import SpecError


class FakeBackend:
    def __init__(self, name: str, raw: bool):
        self.name, self.supports_raw_samples, self.supports_mirrored_pairs = name, raw, raw
        self.finest_grain = "PT5S" if name == "local" else "PT1M"
        self.metrics_delay_s = 180.0 if name == "azure" else 0.0


def test_auto_gates_follow_the_backend_and_take_overrides_by_kind():
    from saferollout.gates import AGGREGATE_GATES, DEFAULT_GATES

    local = pipeline.gate_config(FakeBackend("local", True), "auto", {"ml_agreement": {"min_agreement": 0.8}})
    azure = pipeline.gate_config(FakeBackend("azure", False), "auto")
    assert [g["name"] for g in local] == [g["name"] for g in DEFAULT_GATES]
    assert azure == AGGREGATE_GATES
    assert [g.get("min_agreement") for g in local if g["kind"] == "ml_agreement"] == [0.8]


def test_an_explicit_gate_list_is_taken_as_given():
    text = json.dumps([{"kind": "threshold", "preset": "errors"}])
    assert pipeline.gate_config(FakeBackend("local", True), text, {"threshold": {"threshold": 1}}) == text


def test_chosen_gates_are_limited_to_the_window():
    gates = pipeline.choose_gates(FakeBackend("local", True), "bake", 20)
    assert [g.name for g in gates] == ["bake-errors", "bake-latency"]
    assert all(g.max_duration_s == 20 and g.intervals == 2 and g.grain == "PT5S" for g in gates)


def test_bake_gates_use_minute_intervals_on_azure_and_refuse_a_window_too_short():
    gates = pipeline.bake_gates(FakeBackend("azure", False), 480)
    assert {g["grain"] for g in gates} == {"PT1M"} and {g["intervals"] for g in gates} == {3}
    with pytest.raises(SpecError, match="bake_window_s=300 is too short for the azure backend.*complete 180 s "
                                        "after they end, so use at least 360"):
        pipeline.bake_gates(FakeBackend("azure", False), 300)


def test_candidate_spec_injects_the_fault_and_refuses_unknown_ones():
    spec = pipeline.candidate_spec("ep-one", "azureml:m:1", "latency")
    assert spec.environment_variables["SAFEROLLOUT_FAULT"] == "latency" and spec.endpoint_name == "ep-one"
    assert spec.model == "azureml:m:1"
    with pytest.raises(SpecError, match="fault must be one of none, errors, latency, crash, flip"):
        pipeline.candidate_spec("ep-one", "azureml:m:1", "slow")


def test_registration_needs_a_trained_model_folder(tmp_path):
    with pytest.raises(SpecError, match="metadata.json is missing"):
        pipeline.register_trained_model(FakeBackend("local", True), "m", tmp_path, data_hash="x")


def test_registered_model_carries_metrics_and_lineage(local_backend, credit_model_dir, unique_name):
    model = pipeline.register_trained_model(local_backend, unique_name("model"), credit_model_dir, data_hash="abc",
                                            parameters={"seed": 42})
    assert set(model.properties) == {"auc", "accuracy", "log_loss"} and float(model.properties["auc"]) > 0.5
    assert model.tags["data_hash"] == "abc" and json.loads(model.tags["parameters"])["seed"] == 42
    assert model.tags["git_commit"] != "" and model.tags["model_family"] == "logistic_regression"


def test_smoke_bodies_are_held_out_requests():
    bodies = pipeline.smoke_bodies(3, batch_size=2)
    assert len(bodies) == 3 and all(len(json.loads(b)["data"]) == 2 for b in bodies)


def test_rollback_leaves_an_endpoint_locked_by_another_run_alone(local_backend, unique_name):
    from saferollout import rollout

    endpoint = unique_name("lock")
    rollout.ensure_endpoint(local_backend, pipeline.endpoint_spec(endpoint))
    try:
        rollout.acquire_lock(local_backend, endpoint, "someone@else", "their-run")
        lines: list[str] = []
        before, after = pipeline.rollback(local_backend, endpoint, "our deploy failed", "our-run", lines.append)
        assert after is before and "locked by run 'their-run' of someone@else" in lines[0]
        assert rollout.read_state(local_backend, endpoint).lock["run"] == "their-run"
    finally:
        local_backend.delete_endpoint(endpoint)


def test_rollback_without_an_endpoint_has_nothing_to_do(local_backend, unique_name):
    lines: list[str] = []
    before, after = pipeline.rollback(local_backend, unique_name("none"), "train failed", "run", lines.append)
    assert after.phase.value == "NO_ENDPOINT" and "nothing to roll back" in lines[0]


# ---- your own model ------------------------------------------------------------------------------------
OWN_EXAMPLE = pipeline.ROOT / "examples" / "diabetes-regression"


class Registry:
    """Models and deployments as a backend holds them (for gate choice and registration)."""

    def __init__(self, models=None, deployments=None):
        from saferollout.backends.base import Model

        self.Model, self.models, self.deployments, self.registered = Model, models or {}, deployments or {}, []

    def get_deployment(self, endpoint, name):
        from types import SimpleNamespace

        return SimpleNamespace(model=self.deployments[name])

    def get_model(self, name, version=None):
        return self.models[(name, int(version))]

    def register_model(self, name, path, *, description="", tags=None, properties=None, type="custom_model"):
        self.registered.append((name, path, tags, type))
        return self.Model(name, len(self.registered), path, tags=tags or {}, properties=properties or {}, type=type)


def test_a_fault_is_refused_with_a_deployment_file_whose_script_does_not_inject_it():
    deployment = str(OWN_EXAMPLE / "deployment.yml")
    spec = pipeline.candidate_spec("ep-one", "azureml:m:1", deployment_file=deployment)
    assert spec.scoring_script == "score.py" and spec.code_path == str(OWN_EXAMPLE)
    assert "SAFEROLLOUT_FAULT" not in spec.environment_variables  # the user's YAML, unchanged
    with pytest.raises(SpecError, match="fault=latency is injected by the credit example's scoring script only"):
        pipeline.candidate_spec("ep-one", "azureml:m:1", "latency", deployment_file=deployment)


def test_the_endpoint_comes_from_the_endpoint_file_or_is_a_plain_one_for_a_deployment_file():
    own = pipeline.endpoint_spec("ep-one", endpoint_file=str(OWN_EXAMPLE / "endpoint.yml"))
    plain = pipeline.endpoint_spec("ep-two", deployment_file=str(OWN_EXAMPLE / "deployment.yml"))
    assert own.name == "ep-one" and own.description.startswith("Diabetes progression")
    assert plain.name == "ep-two" and plain.auth_mode == "key" and "deployment.yml" in plain.description


def test_registering_your_model_needs_one(tmp_path):
    with pytest.raises(SpecError, match=r"nothing to register: no model was given \(-p model=PATH"):
        pipeline.register_step(Registry(), "", endpoint_name="ep")
    bare = tmp_path / "deployment.yml"
    bare.write_text("name: blue\nendpoint_name: ep-one\ncode_configuration: {code: ., scoring_script: s.py}\n")
    (tmp_path / "s.py").write_text("")
    with pytest.raises(SpecError, match=f"nothing to register: the deployment file {bare} has no model and no model"):
        pipeline.register_step(Registry(), "", deployment_file=str(bare), endpoint_name="ep")
    with pytest.raises(SpecError, match="model '/no/such' does not exist"):
        pipeline.register_step(Registry(), "", model="/no/such", endpoint_name="ep")


def test_your_model_path_is_registered_under_the_endpoints_name_with_its_source(tmp_path):
    model = tmp_path / "model.joblib"
    model.write_text("x")
    registry = Registry()
    registered = pipeline.register_step(registry, "", model=str(model), endpoint_name="house")
    assert registered["model_ref"] == "azureml:house-model:1" and registered["source"] == f"registered from {model}"
    assert registry.registered[0][0] == "house-model" and registry.registered[0][2]["source"] == str(model)


def test_auto_leaves_out_offline_quality_without_registered_metrics_and_says_why():
    from saferollout.backends.base import Model

    registry = Registry(models={("m", 1): Model("m", 1, "/1", properties={"auc": "0.8", "accuracy": "0.7",
                                                                          "log_loss": "0.5"}),
                                ("m", 2): Model("m", 2, "/2", properties={})},
                        deployments={"blue": "azureml:m:1", "green": "azureml:m:2"})
    registry.name, registry.supports_raw_samples, registry.metrics_delay_s = "local", True, 0.0
    registry.supports_mirrored_pairs, registry.finest_grain = True, "PT5S"
    gates, left_out = pipeline.plan_gates(registry, "ep", "auto", 30, "green", "blue")
    assert "ml_quality" not in [g.kind for g in gates] and "ml_agreement" in [g.kind for g in gates]
    assert left_out == [{"name": "offline-quality", "kind": "ml_quality",
                         "reason": "model azureml:m:2 (green) has no registered offline metric(s) auc, accuracy, "
                                   "log_loss: register them as model properties to compare the models offline"}]
    mine = json.dumps([{"kind": "ml_quality"}])
    assert [g.kind for g in pipeline.plan_gates(registry, "ep", mine, 30, "green", "blue")[0]] == ["ml_quality"]


def test_a_gate_list_of_yours_gets_the_request_file_where_it_sets_none(tmp_path):
    requests = tmp_path / "r.jsonl"
    requests.write_text('{"data": [[1]]}\n' * 30)
    agreement = pipeline.agreement_settings(str(requests), 0.8, 0.5, task="regression")
    assert agreement["n"] == 30 and agreement["requests"] == str(requests)
    filled = pipeline.with_request_settings(json.dumps([{"kind": "ml_agreement", "n": 10}, {"kind": "threshold"}]),
                                            agreement)
    assert filled[0] == {"kind": "ml_agreement", "n": 10, "requests": str(requests), "batch_size": 1,
                         "answer_path": "", "task": "regression"}
    assert filled[1] == {"kind": "threshold"}
    credit = pipeline.with_request_settings([{"kind": "ml_agreement"}], pipeline.agreement_settings("", 0.8, 0.5))
    assert credit == [{"kind": "ml_agreement", "answer_path": "", "task": "auto"}]  # the gate's own n and rows


def test_request_bodies_are_your_file_or_the_credit_rows(tmp_path):
    assert pipeline.request_bodies(str(OWN_EXAMPLE / "requests.jsonl"))[0].startswith(b'{"data": [[0.019913')
    assert len(pipeline.request_bodies(str(OWN_EXAMPLE / "requests.jsonl"))) == 40
    assert len(pipeline.request_bodies("", 3)) == 3


def test_a_deployment_log_leaves_out_the_per_request_lines_and_counts_them():
    log = ["2026-12-01 22:36:01,1 I [1] azmlinfsrv - init() failed: ValueError: bad model"]
    log += [f'2026-12-01 22:36:09,9 I [6013] gunicorn.access - 127.0.0.1 - - [..] "POST /score HTTP/1.0" 200 20 "-"',
              "2026-12-01 22:36:10,0 I [6013] azmlinfsrv - POST /score 200 0.359ms 20"] * 50

    class Logs:
        def get_deployment_logs(self, endpoint, deployment, lines=100):
            return "\n".join(["---- instance-0", *log][-lines:])

    shown = pipeline.deployment_log(Logs(), "ep", "blue", lines=30)
    assert shown.splitlines() == ["---- instance-0", log[0], "(100 per-request lines left out)"]


def test_the_runners_console_does_not_echo_per_request_lines():
    import io

    from rich.console import Console

    from saferollout.runner import _Echo

    out = io.StringIO()
    sink = _Echo(Console(file=out, width=200), "rollback", True)
    sink.write('x gunicorn.access - 127.0.0.1 "POST /score HTTP/1.0" 200\nazmlinfsrv - POST /score 200 0.3ms\n'
               "last lines of the failed RC's log:\n")
    assert out.getvalue() == "  rollback | last lines of the failed RC's log:\n"


def test_an_mlflow_folder_is_registered_as_an_mlflow_model(tmp_path):
    """So that a deployment YAML without code_configuration can serve it (Azure's no-code deployment)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "MLmodel").write_text("flavors: {}\n")
    registry = Registry()
    pipeline.register_step(registry, "", model=str(folder), endpoint_name="house")
    (tmp_path / "weights.bin").write_bytes(b"x")
    pipeline.register_step(registry, "", model=str(tmp_path / "weights.bin"), endpoint_name="house")
    assert [entry[3] for entry in registry.registered] == ["mlflow_model", "custom_model"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_an_mlflow_model_rolls_out_through_the_runbook_without_a_scoring_script(local_backend, unique_name, tmp_path):
    """The user's files as Azure's no-code MLflow deployment takes them: an MLflow model folder, a deployment
    YAML without code_configuration or environment, requests with `input_data`; a first release, then a
    second version (another regularization) promoted after the gates, prediction agreement included."""
    from mlflow_models import diabetes_requests, save_diabetes_model
    from saferollout import rollout
    from saferollout.runner import run_runbook
    from test_own_model import QUICK, SAFE

    user = tmp_path / "user"
    save_diabetes_model(user / "model")
    (user / "deployment.yml").write_text(
        "name: diabetes-mlflow\nendpoint_name: diabetes\nmodel:\n  path: ./model\n  type: mlflow_model\n"
        "instance_type: Standard_DS3_v2\ninstance_count: 1\nrequest_settings:\n  request_timeout_ms: 3000\n"
        "  max_concurrent_requests_per_instance: 4\nreadiness_probe:\n  initial_delay: 1\n  period: 2\n"
        "  failure_threshold: 150\n")
    (user / "requests.jsonl").write_text("".join(json.dumps(body) + "\n" for body in diabetes_requests()))
    endpoint = unique_name("mlf")
    common = {"endpoint_name": endpoint, "deployment_file": str(user / "deployment.yml"),
              "request_file": str(user / "requests.jsonl"), **QUICK}
    try:
        first = run_runbook(SAFE, common, runs_dir=tmp_path / "runs", echo=False)
        assert first.exit_code == 0, first.summary["failure"]
        assert first.summary["records"]["deploy"]["smoke"]["ok"]
        v2 = save_diabetes_model(tmp_path / "v2" / "model", alpha=0.8)
        second = run_runbook(SAFE, {**common, "model": str(v2)}, runs_dir=tmp_path / "runs", echo=False)
        summary = second.summary
        assert second.exit_code == 0, summary["failure"]
        assert summary["records"]["deploy"]["smoke"]["ok"]
        agreement = next(v for v in summary["gates"]["validate-50"]["verdicts"] if v["gate"] == "prediction-agreement")
        assert agreement["decision"] == "pass", agreement["reason"]
        assert agreement["evidence"]["task"] == "regression"
        state = rollout.read_state(local_backend, endpoint)
        assert state.prod_model == f"azureml:{endpoint}-model:2" and state.traffic == {state.prod: 100}
        assert local_backend.get_model(f"{endpoint}-model", 2).type == "mlflow_model"
        assert local_backend.get_deployment(endpoint, state.prod).code_configuration is None
    finally:
        local_backend.delete_endpoint(endpoint)


def test_a_gate_resumed_after_its_shift_starts_a_fresh_window():
    """A shift made before this invocation of the runbook began (a killed run resumed, a later CI job) gives
    the gate no window start: it starts now, rather than past gate_window_s at its first look (issue 13)."""
    assert pipeline.gate_window_start(1000.0, run_started_at=900.0) == 1000.0  # shifted in this invocation
    assert pipeline.gate_window_start(1000.0, run_started_at=1100.0) is None  # shifted by the killed run
    assert pipeline.gate_window_start(0.0, run_started_at=1100.0) is None  # no shift recorded: now
    assert pipeline.gate_window_start(1000.0) == 1000.0  # the notebook run alone
