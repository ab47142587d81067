"""The notebooks' library calls that decide something: gate choice, bake gates, specs, lineage."""
from __future__ import annotations

import json

import pytest

from saferollout import pipeline
from saferollout.errors import SpecError


class FakeBackend:
    def __init__(self, name: str, raw: bool):
        self.name, self.supports_raw_samples = name, raw
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
