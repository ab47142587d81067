"""Runbooks: YAML -> a validated plan of notebook steps (parameters typed and checked, groups expanded).

A runbook is YAML::

    name: safe-rollout
    parameters:                      # declared with a default and a type or choices; `-p key=value` overrides
      backend: {default: local, choices: [local, azure]}
      gate_window_s: {default: 20, type: float, min: 1}
      gate_preset: {default: quick, presets: {quick: {}, seed: {gate_window_s: 360, rps: 15}}}
    traffic: {endpoint: "${parameters.endpoint_name}", rps: "${parameters.rps}", backend: "${parameters.backend}"}
    steps:
      - id: train
        notebook: ../notebooks/train.ipynb          # relative to the runbook file
        parameters: {model_family: "${parameters.model_family}"}
      - foreach: "${parameters.traffic_steps}"       # expanded when parameters are known: shift-10, validate-10...
        where: "${item} < 100"                       # filters items when the plan is made
        when: "not ${steps.deploy.first_release}"    # decided when the step's turn comes
        steps:
          - {id: shift, notebook: ../notebooks/shift_traffic.ipynb, parameters: {percent: "${item}"}, live_traffic: true}
    on_failure:
      - {id: rollback, notebook: ../notebooks/rollback.ipynb, parameters: {reason: "${failure.message}"}}

References: `${parameters.x}`, `${steps.<id>.<name>}` (a value the step recorded), `${run.id}`, `${run.dir}`,
`${failure.step}`, `${failure.message}` and, inside a `foreach`, `${item}`. A string that is exactly one
reference takes the referenced value with its type; otherwise references are interpolated as text.
`when` is a small expression (and, or, not, comparisons, literals) over references, evaluated when the
step's turn comes (a false `when` skips the step); a group's `where` filters its items when the plan is made.

Everything that can be checked before a run is checked by `load_runbook` + `resolve_parameters` + `plan`:
unknown or ill-typed parameters, unknown references, missing notebooks and parameters a notebook does not
declare. Nothing is deployed before that.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from saferollout.errors import SpecError
from saferollout.expressions import REFERENCE, as_text, evaluate, is_literal, lookup, resolve, split_alternatives
from saferollout.records import RECORD_MIMETYPE, one_line, read_records, record
from saferollout.specs import read_yaml, validate_name

# `record` is what notebooks call (`from saferollout.runbook import record`); the rest is the plan's API.
__all__ = ["RECORD_MIMETYPE", "Parameter", "Runbook", "Step", "evaluate", "find_runbook", "load_runbook", "lookup",
           "one_line", "parse_overrides", "plan", "read_records", "record", "resolve", "resolve_parameters"]

PARAMETER_TYPES = ("str", "int", "float", "bool", "name", "percent_list", "path", "gates", "deployment_file",
                   "endpoint_file", "request_file", "model")
RUNBOOK_KEYS = {"name", "description", "parameters", "traffic", "steps", "on_failure"}
STEP_KEYS = {"id", "notebook", "parameters", "when", "skip_reason", "live_traffic", "description"}
GROUP_KEYS = {"foreach", "where", "when", "skip_reason", "steps", "description"}
PARAMETER_KEYS = {"default", "type", "choices", "min", "max", "help", "presets"}
TRAFFIC_KEYS = {"endpoint", "rps", "backend", "request_file", "live_traffic"}
LIVE_TRAFFIC = ("generator", "none")
ID_RE = re.compile(r"^[a-z][a-z0-9_]*$")


# ---- parameters ------------------------------------------------------------------------------------
@dataclass
class Parameter:
    name: str
    default: Any
    type: str = "str"
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def coerce(self, raw: Any) -> Any:
        """The typed value of `raw` (a YAML value or a `-p` string); SpecError naming the parameter if not."""
        try:
            value = _COERCERS[self.type](raw)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"parameter {self.name}={raw!r} is not a valid {self.type}: {exc}") from None
        if self.choices and str(value) not in self.choices:
            raise SpecError(f"parameter {self.name}={raw!r} must be one of {', '.join(self.choices)}")
        for bound, ok, word in ((self.minimum, lambda v, b: v >= b, "at least"),
                                (self.maximum, lambda v, b: v <= b, "at most")):
            if bound is not None and not ok(value, bound):
                raise SpecError(f"parameter {self.name}={raw!r} must be {word} {bound:g}")
        return value


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError("use true or false")


def _number(kind: type) -> Callable[[Any], Any]:
    def convert(raw: Any) -> Any:
        if isinstance(raw, bool):
            raise ValueError("a boolean is not a number")
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError("not a whole number")
        value = kind(str(raw).strip()) if isinstance(raw, str) else kind(raw)
        if not math.isfinite(value):  # inf passes any minimum: a gate window that never ends
            raise ValueError("not a finite number")
        return value
    return convert


def _name(raw: Any) -> str:
    try:
        return validate_name(str(raw))
    except SpecError as exc:
        raise ValueError(str(exc)) from None


def percent_list(raw: Any) -> list[int]:
    """'10,50,100' -> [10, 50, 100]: increasing percents in 1..100 ending at 100."""
    items = raw if isinstance(raw, (list, tuple)) else [p for p in str(raw).replace(" ", "").split(",") if p]
    try:
        steps = [int(p) for p in items]
    except ValueError:
        raise ValueError("use comma-separated whole percents such as 10,50,100") from None
    if not steps or steps[-1] != 100:
        raise ValueError("the last step must be 100")
    if any(not 1 <= s <= 100 for s in steps) or any(a >= b for a, b in zip(steps, steps[1:])):
        raise ValueError("percents must increase strictly within 1..100")
    return steps


# gate lists the pipeline picks by name (pipeline.gate_config); anything else is a gate list to build
GATE_LIST_NAMES = ("", "auto", "default", "aggregate", "bake")


def gate_list(raw: Any) -> str:
    """A gate list name (auto, aggregate, bake) or a JSON/YAML gate list, checked now, before anything is deployed."""
    text = "" if raw is None else raw if isinstance(raw, str) else json.dumps(raw)
    if text.strip() in GATE_LIST_NAMES:
        return text
    from saferollout.gates import build_gates

    try:
        build_gates(text)
    except SpecError as exc:
        raise ValueError(str(exc)) from None
    return text


# the user's own files: checked whole before anything is deployed, and passed on by absolute path (the
# notebooks run in their own folder); empty means not given
def _existing(raw: Any, what: str) -> Path | None:
    text = "" if raw is None else str(raw).strip()
    if not text:
        return None
    path = Path(text).expanduser().resolve()
    if not path.exists():
        raise ValueError(f"no such {what}: {path}")
    return path


def _checked_file(raw: Any, read: Callable[[Path], Any]) -> str:
    """The file's absolute path once `read` accepted it ("" when not given); its SpecError as a ValueError."""
    path = _existing(raw, "file")
    if path is None:
        return ""
    try:
        read(path)
    except SpecError as exc:
        raise ValueError(str(exc)) from None
    return str(path)


def deployment_file(raw: Any) -> str:
    """An Azure ML CLI v2 deployment YAML, read as the deploy step will read it (its name and endpoint are
    replaced by the rollout's)."""
    from saferollout.specs import load_deployment_spec

    # its model is checked by the register step: `-p model` may replace a path that does not exist yet
    return _checked_file(raw, lambda path: load_deployment_spec(path, name="check", endpoint_name="check",
                                                                 model="azureml:check:1"))


def endpoint_file(raw: Any) -> str:
    from saferollout.specs import load_endpoint_spec

    return _checked_file(raw, lambda path: load_endpoint_spec(path, name="check"))


def request_file(raw: Any) -> str:
    from saferollout.traffic import load_request_bodies

    return _checked_file(raw, load_request_bodies)


def model_reference(raw: Any) -> str:
    """`azureml:<name>:<version>`, `azureml:<name>@latest`, or a model file or folder path."""
    text = "" if raw is None else str(raw).strip()
    if text.startswith("azureml:"):
        from saferollout.specs import parse_model_ref

        try:
            parse_model_ref(text)
        except SpecError as exc:
            raise ValueError(str(exc)) from None
        return text
    path = _existing(text, "model file or folder (or use azureml:NAME:VERSION)")
    return str(path) if path else ""


_COERCERS: dict[str, Callable[[Any], Any]] = {
    "str": lambda raw: "" if raw is None else str(raw), "int": _number(int), "float": _number(float),
    "bool": _bool, "name": _name, "percent_list": percent_list, "path": lambda raw: str(raw), "gates": gate_list,
    "deployment_file": deployment_file, "endpoint_file": endpoint_file, "request_file": request_file,
    "model": model_reference,
}


def _parameter(name: str, decl: Any) -> Parameter:
    if not isinstance(decl, Mapping):
        decl = {"default": decl}  # shorthand: `rps: 10` (type taken from the default)
    unknown = set(decl) - PARAMETER_KEYS
    if unknown:
        raise SpecError(f"parameter {name}: unknown key(s) {', '.join(sorted(unknown))}")
    default = decl.get("default")
    presets = dict(decl.get("presets") or {})
    choices = tuple(str(c) for c in (decl.get("choices") or presets))
    kind = decl.get("type") or {bool: "bool", int: "int", float: "float"}.get(type(default), "str")
    if kind not in PARAMETER_TYPES:
        raise SpecError(f"parameter {name}: type {kind!r} is not one of {', '.join(PARAMETER_TYPES)}")
    param = Parameter(name, default, kind, choices, decl.get("min"), decl.get("max"), str(decl.get("help") or ""),
                      presets)
    param.default = param.coerce(default)  # a bad default is the runbook's fault: say so now
    return param


# ---- steps and the runbook --------------------------------------------------------------------------
@dataclass
class Step:
    id: str
    notebook: Path
    parameters: dict[str, Any] = field(default_factory=dict)
    when: str | None = None
    live_traffic: bool = False
    description: str = ""
    skip_reason: str = ""  # recorded (references resolved) when `when` skips the step


@dataclass
class Runbook:
    name: str
    path: Path
    parameters: dict[str, Parameter]
    steps: list[Any]  # Step or a foreach group dict {"foreach", "when", "steps": [Step]}
    on_failure: list[Step]
    traffic: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def _step(data: Any, base: Path, where: str) -> Step:
    if not isinstance(data, Mapping):
        raise SpecError(f"{where} must be a mapping with id and notebook")
    unknown = set(data) - STEP_KEYS
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    step_id = str(data.get("id") or "")
    if not ID_RE.match(step_id):
        raise SpecError(f"{where}: id {step_id!r} must be lower-case letters, digits and _")
    if not data.get("notebook"):
        raise SpecError(f"{where} ({step_id}) needs a notebook")
    notebook = (base / str(data["notebook"])).resolve()
    if not notebook.is_file():
        raise SpecError(f"step {step_id}: notebook not found: {notebook}")
    params = data.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise SpecError(f"step {step_id}: parameters must be a mapping")
    when = data.get("when")
    return Step(step_id, notebook, dict(params), None if when is None else str(when),
                bool(data.get("live_traffic", False)), str(data.get("description") or ""),
                str(data.get("skip_reason") or ""))


def load_runbook(path: str | Path) -> Runbook:
    """Read and check a runbook file (structure, notebooks, parameter declarations, references)."""
    path = Path(path)
    data = read_yaml(path)
    unknown = set(data) - RUNBOOK_KEYS
    if unknown:
        raise SpecError(f"runbook {path}: unknown key(s) {', '.join(sorted(unknown))}")
    name = str(data.get("name") or path.stem)
    params = {str(k): _parameter(str(k), v) for k, v in (data.get("parameters") or {}).items()}
    base = path.parent
    steps: list[Any] = []
    for i, item in enumerate(data.get("steps") or []):
        if isinstance(item, Mapping) and "foreach" in item:
            extra = set(item) - GROUP_KEYS
            if extra:
                raise SpecError(f"runbook {path}: steps[{i}] (foreach): unknown key(s) {', '.join(sorted(extra))}")
            children = [_step(c, base, f"steps[{i}].steps[{j}]") for j, c in enumerate(item.get("steps") or [])]
            steps.append({"foreach": str(item["foreach"]), "where": item.get("where"), "when": item.get("when"),
                          "skip_reason": str(item.get("skip_reason") or ""), "steps": children})
        else:
            steps.append(_step(item, base, f"steps[{i}]"))
    if not steps:
        raise SpecError(f"runbook {path} has no steps")
    on_failure = [_step(s, base, f"on_failure[{i}]") for i, s in enumerate(data.get("on_failure") or [])]
    traffic = dict(data.get("traffic") or {})
    if set(traffic) - TRAFFIC_KEYS:
        raise SpecError(f"runbook {path}: traffic: unknown key(s) {', '.join(sorted(set(traffic) - TRAFFIC_KEYS))}")
    book = Runbook(name, path, params, steps, on_failure, traffic, str(data.get("description") or ""))
    _check_references(book)
    return book


def _check_references(book: Runbook) -> None:
    """Every reference names a declared parameter or an earlier step; every notebook parameter exists."""
    from papermill.inspection import inspect_notebook

    seen: list[str] = []
    declared_cache: dict[Path, set[str]] = {}

    def check(step: Step, known_steps: list[str], extra_roots: set[str]) -> None:
        texts = [str(v) for v in step.parameters.values()] + ([step.when] if step.when else []) + (
            [step.skip_reason] if step.skip_reason else [])
        for text in texts:
            for ref in (alt for whole in REFERENCE.findall(text) for alt in split_alternatives(whole)):
                if is_literal(ref):
                    continue
                root, _, rest = ref.partition(".")
                if root == "parameters" and rest not in book.parameters:
                    raise SpecError(f"step {step.id}: ${{{ref}}} names unknown parameter {rest!r}")
                if root == "steps" and not _known_step(rest.split(".")[0], known_steps):
                    raise SpecError(f"step {step.id}: ${{{ref}}} names no earlier step")
                if root not in {"parameters", "steps", "run"} | extra_roots:
                    raise SpecError(f"step {step.id}: unknown reference ${{{ref}}}")
        if step.notebook not in declared_cache:
            declared_cache[step.notebook] = set(inspect_notebook(str(step.notebook)))
        unknown = set(step.parameters) - declared_cache[step.notebook]
        if unknown:
            raise SpecError(f"step {step.id}: notebook {step.notebook.name} has no parameter(s) "
                            f"{', '.join(sorted(unknown))}")

    for item in book.steps:
        if isinstance(item, Step):
            check(item, seen, set())
            seen.append(item.id)
            continue
        # inside a foreach, `${item}` stands for each value: check the children with a placeholder value
        expanded: list[str] = []
        for child in item["steps"]:
            placeholder = Step(child.id, child.notebook, _substitute_item(child.parameters, "ITEM"),
                               _substitute_item(child.when, "ITEM") if child.when else None)
            check(placeholder, seen + expanded, set())
            expanded.append(f"{child.id}-ITEM")
        seen.extend(f"{c.id}-ITEM" for c in item["steps"])
    for step in book.on_failure:
        check(step, seen, {"failure"})
        seen.append(step.id)
    for key, value in book.traffic.items():
        for ref in REFERENCE.findall(str(value)):
            if not ref.startswith("parameters.") or ref.split(".", 1)[1] not in book.parameters:
                raise SpecError(f"traffic.{key}: ${{{ref}}} must name a declared parameter")


def _known_step(step_id: str, known: list[str]) -> bool:
    """A step id defined earlier; `shift-10` matches `shift-ITEM`, an expanded foreach child."""
    return step_id in known or re.sub(r"-[^-]+$", "-ITEM", step_id) in known


def resolve_parameters(book: Runbook, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults, then the chosen presets, then `-p` overrides; unknown or ill-typed values are refused."""
    unknown = sorted(set(overrides) - set(book.parameters))
    if unknown:
        raise SpecError(f"unknown parameter(s) {', '.join(unknown)} for runbook {book.name}; "
                        f"known: {', '.join(book.parameters)}")
    values = {name: p.default for name, p in book.parameters.items()}
    for name, raw in overrides.items():
        values[name] = book.parameters[name].coerce(raw)
    for name, param in book.parameters.items():  # presets fill what -p did not set explicitly
        for key, raw in param.presets.get(str(values[name]), {}).items():
            if key not in book.parameters:
                raise SpecError(f"preset {name}={values[name]} sets unknown parameter {key!r}")
            if key not in overrides:
                values[key] = book.parameters[key].coerce(raw)
    _check_gates_fit_the_backend(book, values)
    return values


def _check_gates_fit_the_backend(book: Runbook, values: Mapping[str, Any]) -> None:
    """An explicit gate list the chosen backend cannot feed (raw samples on Azure) is refused now, not after
    the RC has live traffic."""
    if book.parameters.get("gates") is None or book.parameters["gates"].type != "gates" or "backend" not in values:
        return
    text = str(values["gates"] or "")
    if text.strip() in GATE_LIST_NAMES:
        return
    from saferollout.backends import backend_class
    from saferollout.gates import build_gates, gates_for_backend

    try:
        gates_for_backend(build_gates(text), backend_class(str(values["backend"])))
    except SpecError as exc:
        raise SpecError(f"parameter gates: {exc}") from None


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """['a=1', 'b=x=y'] -> {'a': '1', 'b': 'x=y'}; a pair without '=' is refused."""
    result: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"-p {pair!r}: use -p key=value")
        result[key.strip()] = value
    return result


# ---- the plan ---------------------------------------------------------------------------------------------
def _substitute_item(value: Any, item: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _substitute_item(v, item) for k, v in value.items()}
    if isinstance(value, str):
        if value.strip() == "${item}":
            return item
        return value.replace("${item}", as_text(item))
    return value


def plan(book: Runbook, parameters: Mapping[str, Any]) -> list[Step]:
    """The flat list of steps for these parameters: `foreach` groups expanded (`shift` -> `shift-10`...)."""
    context = {"parameters": dict(parameters)}
    steps: list[Step] = []
    for item in book.steps:
        if isinstance(item, Step):
            steps.append(item)
            continue
        values = resolve(item["foreach"], context)
        if not isinstance(values, list):
            raise SpecError(f"foreach {item['foreach']!r} must name a list (e.g. a percent_list parameter)")
        for value in values:
            if item.get("where") and not evaluate(str(item["where"]), {**context, "item": value}):
                continue  # `where` filters the items when the plan is made (parameters and item only)
            for child in item["steps"]:
                conditions = [c for c in (item.get("when"), child.when) if c]
                when = " and ".join(f"({c})" for c in conditions) or None
                steps.append(Step(f"{child.id}-{value}", child.notebook, _substitute_item(child.parameters, value),
                                  None if when is None else _substitute_item(when, value), child.live_traffic,
                                  child.description,
                                  _substitute_item(child.skip_reason or item.get("skip_reason") or "", value)))
    ids = [s.id for s in steps] + [s.id for s in book.on_failure]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise SpecError(f"runbook {book.name}: step id(s) used twice: {', '.join(duplicates)}")
    return steps


def find_runbook(name_or_path: str) -> Path:
    """A runbook by path, or by name under ./runbooks (`safe_rollout` -> runbooks/safe_rollout.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (Path("runbooks") / f"{name_or_path}.yaml", Path("runbooks") / name_or_path):
        if candidate.is_file():
            return candidate
    raise SpecError(f"runbook not found: {name_or_path}")
