"""Gate lists from runbook configuration: strings or lists, defaults, and errors that name the problem."""
import json

import pytest

from saferollout.errors import SpecError
from saferollout.gates import AGGREGATE_GATES, DEFAULT_GATES, KINDS, build_gates, gates_for_backend
from saferollout.gates.sequential import SequentialGate

from fake_backend import FakeBackend

YAML = """
- kind: sequential
  name: errors-fast
  metric: errors
  margin: 3
- {kind: threshold, preset: latency, threshold: 250}
"""


def test_build_from_a_yaml_string_with_defaults():
    gates = build_gates(YAML, defaults={"max_duration_s": 900, "poll_s": 2})
    assert [(g.name, g.kind, g.max_duration_s) for g in gates] == [("errors-fast", "sequential", 900.0),
                                                                      ("latency-threshold", "threshold", 900.0)]
    assert isinstance(gates[0], SequentialGate) and gates[0].margin == 3.0
    assert gates[1].metric == "RequestLatency_P90" and gates[1].threshold == 250.0


def test_an_entry_overrides_the_defaults():
    [gate] = build_gates(json.dumps([{"kind": "ml_quality", "max_duration_s": 30}]), defaults={"max_duration_s": 900})
    assert gate.max_duration_s == 30 and gate.name == "offline-quality"


def test_the_default_lists_build_and_the_aggregate_list_fits_a_backend_without_samples():
    assert [g.kind for g in build_gates(DEFAULT_GATES)] == ["sequential", "sequential", "ml_quality", "ml_agreement"]
    no_samples = FakeBackend(raw_samples=False, mirrored=False)
    assert len(gates_for_backend(build_gates(AGGREGATE_GATES), no_samples)) == len(AGGREGATE_GATES)
    assert set(KINDS) == {"threshold", "compare", "sequential", "ml_quality", "ml_agreement"}


@pytest.mark.parametrize("config, message", [
    ([{"kind": "canary"}], "gate 1: unknown gate kind 'canary': choose one of threshold, compare, sequential, "
                           "ml_quality, ml_agreement"),
    ([{"kind": "sequential", "name": "e", "treshold": 1}], "gate 'e' (sequential): unknown setting(s) treshold; known:"),
    ([{"kind": "sequential", "alpha": "0.05"}], "gate 1 (sequential): alpha must be float, not '0.05'"),
    ([{"kind": "sequential", "min_samples": 2.5}], "min_samples must be int, not 2.5"),
    ([{"kind": "sequential", "metric": "cpu"}], "metric must be one of errors, latency, not 'cpu'"),
    ([{"kind": "sequential", "alpha": 2.0}], "alpha and beta must be between 0 and 1"),
    ([{"kind": "sequential", "metric": "latency", "margin": 0.5}], "margin for latency is a ratio of quantiles"),
    ([{"kind": "compare", "metric": "latency", "mode": "aggregates", "quantile": 0.8}],
     "quantile must be one of 0.5, 0.9, 0.95, 0.99 in aggregates mode"),
    ([{"kind": "ml_agreement", "distance": "emd"}], "distance must be one of psi, ks, not 'emd'"),
    ([{"kind": "threshold", "metric": "RequestsPerMinute"}], "threshold is required (or set preset: errors|latency)"),
    ([{"kind": "threshold", "preset": "errors", "grain": "1m"}], "invalid grain '1m'"),
    ([{"kind": "ml_quality", "tolerances": {"auc": "a lot"}}], "tolerances.auc must be float, not 'a lot'"),
    ([{"kind": "ml_quality", "max_duration_s": 0}], "max_duration_s must be positive"),
    ([{"kind": "compare"}, {"kind": "compare"}], "two gates are named 'errors-compare'"),
    ([], "gate configuration is empty"),
    ("kind: sequential", "gate configuration must be a list"),
    ("[{kind: sequential", "gate configuration is not valid JSON or YAML"),
])
def test_bad_configuration_is_refused_naming_what_is_wrong(config, message):
    with pytest.raises(SpecError) as error:
        build_gates(config)
    assert message in str(error.value)


def test_sample_gates_are_refused_on_a_backend_without_raw_samples():
    gates = build_gates([{"kind": "sequential", "name": "errors-seq"}])
    with pytest.raises(SpecError, match=r"gate 'errors-seq' \(sequential\) needs raw request samples, which the "
                                        r"fake backend does not provide: use kind: compare with mode: aggregates"):
        gates_for_backend(gates, FakeBackend(raw_samples=False))


def test_mirror_agreement_is_refused_on_a_backend_without_mirrored_pairs():
    gates = build_gates([{"kind": "ml_agreement", "source": "mirror"}])
    with pytest.raises(SpecError, match="reads mirrored pairs, which the fake backend does not provide: use source: header"):
        gates_for_backend(gates, FakeBackend(mirrored=False))
