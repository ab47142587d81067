"""Gate kinds by name, and gate lists built from runbook configuration.

A configuration is a list of `{"kind": ..., "name": ..., <settings>}`, or a JSON/YAML string of it
(runbook parameters arrive as strings). Unknown kinds, unknown keys and ill-typed values are refused
with a SpecError that names them.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml

from saferollout.errors import SafeRolloutError, SpecError
from saferollout.gates.base import Gate, GateBase
from saferollout.gates.compare import CompareGate
from saferollout.gates.ml import AgreementGate, QualityGate
from saferollout.gates.sequential import SequentialGate
from saferollout.gates.threshold import ThresholdGate
from saferollout.specs import load_deployment_spec

KINDS: dict[str, type[GateBase]] = {
    "threshold": ThresholdGate,
    "compare": CompareGate,
    "sequential": SequentialGate,
    "ml_quality": QualityGate,
    "ml_agreement": AgreementGate,
}

DEFAULT_GATES: list[dict[str, Any]] = [
    {"kind": "sequential", "name": "errors-sequential", "metric": "errors"},
    {"kind": "sequential", "name": "latency-sequential", "metric": "latency"},
    {"kind": "ml_quality", "name": "offline-quality"},
    {"kind": "ml_agreement", "name": "prediction-agreement", "source": "header"},
]
AGGREGATE_GATES: list[dict[str, Any]] = [
    {"kind": "compare", "name": "errors-compare", "metric": "errors", "mode": "aggregates"},
    {"kind": "compare", "name": "latency-compare", "metric": "latency", "mode": "aggregates"},
    {"kind": "ml_quality", "name": "offline-quality"},
    {"kind": "ml_agreement", "name": "prediction-agreement", "source": "header"},
]


NAMED_GATE_LISTS = ("", "auto", "default", "aggregate")  # `gates:` names the runbook takes besides a list


def is_named_gate_list(gates: Any) -> bool:
    return gates is None or (isinstance(gates, str) and gates.strip() in NAMED_GATE_LISTS)


def named_gate_list(gates: Any, supports_raw_samples: bool) -> list[dict[str, Any]] | None:
    """The entries of a named gate list on a backend with or without raw samples: `auto` (or `default`, or
    nothing) is DEFAULT_GATES where per-request samples exist, else AGGREGATE_GATES; `aggregate` is
    AGGREGATE_GATES. None when `gates` is not one of those names."""
    if not is_named_gate_list(gates):
        return None
    name = gates.strip() if isinstance(gates, str) else ""
    return DEFAULT_GATES if supports_raw_samples and name != "aggregate" else AGGREGATE_GATES


def preview_gates(gates: Any, parameters: dict[str, Any]) -> tuple[list[str], list[dict[str, str]]] | None:
    """For the plan printed when a run starts: the gates a named list (`auto`, `aggregate`) holds on the
    run's backend, and those already known to be left out, with why (the offline-quality gate, when the model
    is a file or folder the register step registers without offline metrics). None for the user's own list
    (kept whole). The validate step decides the rest once both models are registered, and lists them."""
    from saferollout.backends import backend_class  # its capabilities, without connecting to anything

    try:
        raw = backend_class(str(parameters.get("backend") or "local")).supports_raw_samples
    except SpecError:  # an unknown backend: the run refuses it with its own message
        return None
    chosen = named_gate_list(gates, raw)
    if chosen is None:
        return None
    model = str(parameters.get("model") or "")
    if not model and parameters.get("deployment_file"):
        try:
            model = load_deployment_spec(str(parameters["deployment_file"])).model or ""
        except SafeRolloutError:
            model = ""  # the register step says what is wrong with the file
    left_out = []
    if model and not model.startswith("azureml:"):
        left_out = [{"name": entry["name"], "kind": entry["kind"],
                     "reason": f"the model {model} is registered without offline metrics, so there is nothing "
                               "to compare offline (register it with its metrics as properties and pass "
                               "-p model=azureml:NAME:VERSION to compare)"}
                    for entry in chosen if entry["kind"] == "ml_quality"]
    return [entry["name"] for entry in chosen], left_out


def build_gates(config: list[dict] | str, *, defaults: dict | None = None) -> list[Gate]:
    """Gates from configuration; `defaults` fills settings a gate has and the entry leaves out."""
    entries = _parse(config)
    gates: list[Gate] = []
    names: set[str] = set()
    for i, entry in enumerate(entries):
        gate = _build_one(entry, defaults or {}, f"gate {i + 1}")
        if gate.name in names:
            raise SpecError(f"two gates are named {gate.name!r}: give each gate a unique name")
        names.add(gate.name)
        gates.append(gate)
    return gates


def gates_for_backend(gates: list[Gate], backend: Any) -> list[Gate]:
    """The gates, unless one needs what the backend cannot give (raw samples, mirrored pairs)."""
    for gate in gates:
        if gate.needs_samples and not backend.supports_raw_samples:
            alternative = ("kind: compare with mode: aggregates, or kind: threshold"
                           if gate.kind in ("sequential", "compare") else "an aggregate-based gate")
            raise SpecError(f"gate {gate.name!r} ({gate.kind}) needs raw request samples, which the "
                            f"{backend.name} backend does not provide: use {alternative}")
        if gate.needs_mirrored_pairs and not backend.supports_mirrored_pairs:
            raise SpecError(f"gate {gate.name!r} reads mirrored pairs, which the {backend.name} "
                            "backend does not provide: use source: header")
    return gates


def _parse(config: list[dict] | str) -> list[dict]:
    if isinstance(config, str):
        try:
            config = yaml.safe_load(config)
        except yaml.YAMLError as exc:
            raise SpecError(f"gate configuration is not valid JSON or YAML: {exc}") from None
    if not isinstance(config, list) or not all(isinstance(e, dict) for e in config):
        raise SpecError("gate configuration must be a list of {kind: ..., name: ..., <settings>} mappings")
    if not config:
        raise SpecError("gate configuration is empty: a gate step needs at least one gate")
    return config


def _build_one(entry: dict, defaults: dict, where: str) -> GateBase:
    kind = entry.get("kind")
    if kind not in KINDS:
        raise SpecError(f"{where}: unknown gate kind {kind!r}: choose one of {', '.join(KINDS)}")
    cls = KINDS[kind]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    where = f"gate {entry['name']!r} ({kind})" if entry.get("name") else f"{where} ({kind})"
    unknown = sorted(set(entry) - fields - {"kind"})
    renamed = {old: new for old, new in getattr(cls, "RENAMED", {}).items() if old in unknown}
    if renamed:
        detail = ", ".join(f"{old} is now {new}" for old, new in renamed.items())
        raise SpecError(f"{where}: {detail} (the worst RC the user still accepts)")
    if unknown:
        raise SpecError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    settings = {k: v for k, v in defaults.items() if k in fields}
    settings.update({k: v for k, v in entry.items() if k != "kind"})
    for key, value in settings.items():
        settings[key] = _coerce(value, hints[key], f"{where}: {key}")
        choices = getattr(cls, "CHOICES", {}).get(key)
        if choices and settings[key] is not None and settings[key] not in choices:
            raise SpecError(f"{where}: {key} must be one of {', '.join(choices)}, not {value!r}")
    gate = cls(**settings)
    problems = gate.validate() if hasattr(gate, "validate") else []
    if gate.max_duration_s <= 0:
        problems.append("max_duration_s must be positive")
    if problems:
        raise SpecError(f"{where}: {'; '.join(problems)}")
    return gate


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a setting against its annotation (int -> float allowed); SpecError naming it otherwise."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{where} must be a list, not {value!r}")
        (item_type,) = typing.get_args(hint)
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where} must be a mapping, not {value!r}")
        key_type, value_type = typing.get_args(hint)
        return {_coerce(k, key_type, where): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    raise SpecError(f"{where} must be {getattr(hint, '__name__', hint)}, not {value!r}")
