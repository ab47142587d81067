"""What the rollout notebooks do, as tested functions: lineage, specs, smoke requests, gate choice, demos.

The notebooks under notebooks/ stay a few calls long; anything with a branch or a loop lives here.
A notebook run at its default parameters is a self-contained demo (`standalone`): it makes the endpoint
and model it needs with `demo_endpoint` and removes the endpoint afterwards, so notebooks can be run
alone (nbmake) without touching a real rollout.
"""
from __future__ import annotations

import atexit
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from typing import Any

from saferollout import data, rollout, training
from saferollout.backends.base import Backend, Model
from saferollout.backends.query import grain_seconds
from saferollout.errors import NotFound, SpecError
from saferollout.specs import (DeploymentSpec, EndpointSpec, load_deployment_spec, load_endpoint_spec,
                              model_type_of, parse_model_ref)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = ROOT / "examples" / "credit-risk"
FAULTS = ("none", "errors", "latency", "crash", "flip")
METRIC_KEYS = ("auc", "accuracy", "log_loss")


# ---- lineage and registration ----------------------------------------------------------------------
def git_commit(cwd: str | Path = ROOT) -> str:
    """The checkout's commit (with '+dirty' when files changed), or 'unknown' outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def model_metadata(model_dir: str | Path) -> dict[str, Any]:
    """The metadata.json a trained model folder holds (family, metrics, params)."""
    path = Path(model_dir) / "metadata.json"
    if not path.is_file():
        raise SpecError(f"{model_dir} is not a trained model folder: metadata.json is missing")
    return json.loads(path.read_text())


def register_trained_model(backend: Backend, name: str, model_dir: str | Path, *, data_hash: str,
                           parameters: dict[str, Any] | None = None, description: str = "") -> Model:
    """Register a model folder with its held-out metrics as properties and its lineage as tags."""
    meta = model_metadata(model_dir)
    metrics = meta.get("metrics") or {}
    missing = [k for k in METRIC_KEYS if k not in metrics]
    if missing:
        raise SpecError(f"{model_dir}/metadata.json has no metric(s) {', '.join(missing)}")
    params = {**(meta.get("params") or {}), **(parameters or {})}
    tags = {"data_hash": data_hash, "git_commit": git_commit(), "model_family": str(meta.get("family", "")),
            "parameters": json.dumps(params, sort_keys=True, default=str)}
    return backend.register_model(name, str(model_dir), description=description or f"{meta.get('family')} credit model",
                                  tags=tags, properties={k: str(metrics[k]) for k in METRIC_KEYS})


def register_step(backend: Backend, model_name: str, *, model_dir: str = "", model: str = "",
                  deployment_file: str = "", endpoint_name: str = "", data_hash: str = "",
                  parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """The register step: what it registered (or, for an `azureml:` reference, found), for the notebook to record.

    A trained model folder (`model_dir`, the credit demo) is registered with its held-out metrics. Otherwise
    the user's model: `model` if given, else the deployment YAML's `model`; a path becomes a new version of
    `model_name` (default `<endpoint_name>-model`), an `azureml:` reference is resolved to its version and
    rolled out as it is.
    """
    if model_dir:
        registered = register_trained_model(backend, model_name or "credit-model", model_dir,
                                            data_hash=data_hash or "unknown", parameters=parameters)
        return _registered(registered, "trained by the train step")
    source = model or (load_deployment_spec(deployment_file).model if deployment_file else None)
    if not source:
        where = f"the deployment file {deployment_file} has no model and " if deployment_file else ""
        raise SpecError(f"nothing to register: {where}no model was given (-p model=PATH, or -p model=azureml:NAME:VERSION)")
    if source.startswith("azureml:"):
        name, version = parse_model_ref(rollout.resolve_model_ref(backend, source))
        return _registered(backend.get_model(name, version), f"{source}, already registered")
    if not Path(source).exists():
        raise SpecError(f"model {source!r} does not exist (a model is a file or folder path, or azureml:NAME:VERSION)")
    name = model_name or f"{endpoint_name or 'own'}-model"
    tags = {"git_commit": git_commit(), "source": str(Path(source).resolve()),
            "deployment_file": str(Path(deployment_file).resolve()) if deployment_file else ""}
    registered = backend.register_model(name, str(Path(source).resolve()), tags=tags,
                                        description=f"registered by saferollout from {source}",
                                        type=model_type_of(source))  # an MLflow folder deploys without code
    return _registered(registered, f"registered from {source}")


def _registered(model: Model, source: str) -> dict[str, Any]:
    return {"model_ref": model.ref, "model_version": model.version, "properties": model.properties,
            "tags": model.tags, "source": source}


def train_and_save(family: str, seed: int, model_dir: str | Path | None = None) -> tuple[training.TrainedModel, data.Split, Path]:
    """Train on the German credit split and write the model folder (a temporary one if none is given)."""
    split = data.split(seed=seed)
    trained = training.train(family, split, seed=seed)
    folder = Path(model_dir) if model_dir else Path(tempfile.mkdtemp(prefix="saferollout-model-")) / "model"
    return trained, split, trained.save(folder)


# ---- endpoint and deployment specs ---------------------------------------------------------------------
def endpoint_spec(endpoint_name: str, example_dir: str | Path = EXAMPLE_DIR, *, endpoint_file: str = "",
                  deployment_file: str = "") -> EndpointSpec:
    """The endpoint to create when it is missing: the user's `endpoint_file`, a plain key-auth endpoint for
    their `deployment_file`, or the credit demo's endpoint.yml; named `endpoint_name` in every case."""
    if endpoint_file:
        return load_endpoint_spec(endpoint_file, name=endpoint_name)
    if deployment_file:
        return EndpointSpec(name=endpoint_name, description=f"rolled out by saferollout from {Path(deployment_file).name}")
    return load_endpoint_spec(Path(example_dir) / "endpoint.yml", name=endpoint_name)


def candidate_spec(endpoint_name: str, model_ref: str, fault: str = "none",
                   example_dir: str | Path = EXAMPLE_DIR, deployment_file: str = "") -> DeploymentSpec:
    """The deployment YAML (the user's `deployment_file`, unchanged but for endpoint and model, or the credit
    example's) for this endpoint and model; `fault` goes to SAFEROLLOUT_FAULT, which only the credit
    example's scoring script reads, so a fault with another deployment file is refused."""
    if fault not in FAULTS:
        raise SpecError(f"fault must be one of {', '.join(FAULTS)}, got {fault!r}")
    if deployment_file and fault != "none":
        raise SpecError(f"fault={fault} is injected by the credit example's scoring script only, not by "
                        f"{deployment_file}: to see a rollback, roll out a model that misbehaves")
    spec = load_deployment_spec(deployment_file or Path(example_dir) / "deployment.yml", endpoint_name=endpoint_name,
                                model=model_ref)
    if deployment_file:
        return spec
    return spec.with_changes(environment_variables={**spec.environment_variables, "SAFEROLLOUT_FAULT": fault})


def smoke_bodies(n: int = 5, batch_size: int = 2, seed: int = 42) -> list[bytes]:
    """`n` request bodies of held-out rows for a smoke test."""
    rows = data.split(seed=seed).X_test.head(n * batch_size)
    return data.sample_requests(rows, batch_size=batch_size)[:n]


def request_bodies(request_file: str = "", n: int = 5) -> list[bytes]:
    """The user's request bodies (all of `request_file`), or `n` bodies of held-out credit rows (the demo)."""
    if request_file:
        from saferollout.traffic import load_request_bodies

        return load_request_bodies(request_file)
    return smoke_bodies(n)


def deploy(backend: Backend, endpoint_name: str, model_ref: str, *, fault: str = "none", run_id: str = "",
           deployment_file: str = "", endpoint_file: str = "", baseline: bool = False,
           progress: Any = print) -> dict[str, Any]:
    """The deploy step: endpoint if missing, the rollout lock, then first release or an RC at 0%.

    Returns what the notebook records: first_release, prod, rc, baseline, model, phase. A fault applies to a
    release candidate only: a first release always deploys healthy. A first release (or a model PROD
    already serves) ends the rollout here, so the lock is released. With `baseline`, PROD's model is
    deployed afresh beside the RC (same code and settings: the same deployment file), and the gates compare
    the RC with it. The deployment and endpoint files are read (and refused when wrong) before anything
    changes.
    """
    spec = candidate_spec(endpoint_name, model_ref, fault, deployment_file=deployment_file)
    endpoint = endpoint_spec(endpoint_name, endpoint_file=endpoint_file, deployment_file=deployment_file)
    rollout.ensure_endpoint(backend, endpoint)
    rollout.acquire_lock(backend, endpoint_name, rollout.default_owner(), run_id)
    before = rollout.read_state(backend, endpoint_name)
    if before.phase == rollout.Phase.PROMOTED:
        return _finish_promotion(backend, before, model_ref, progress)
    first_release = before.prod is None
    if first_release and fault != "none":
        progress(f"first release: fault={fault} ignored (faults apply to a release candidate only)")
        spec = candidate_spec(endpoint_name, model_ref, "none", deployment_file=deployment_file)
    state = rollout.deploy_candidate(backend, endpoint_name, spec, model_ref, progress=progress)
    nothing_to_roll_out = first_release or state.rc is None
    if nothing_to_roll_out:
        rollout.release_lock(backend, endpoint_name)
    elif baseline:
        assert state.prod_model is not None
        same_code = candidate_spec(endpoint_name, state.prod_model, deployment_file=deployment_file)
        state = rollout.deploy_baseline(backend, endpoint_name, same_code, progress=progress)
    return {"first_release": nothing_to_roll_out, "unfinished_promotion": False, "prod": state.prod, "rc": state.rc,
            "baseline": state.baseline, "model": rollout.resolve_model_ref(backend, model_ref),
            "phase": state.phase.value}


def _finish_promotion(backend: Backend, state: rollout.RolloutState, model_ref: str, progress: Any) -> dict[str, Any]:
    """An earlier rollout was promoted and killed before its bake gate and the old PROD's deletion: this run
    finishes that rollout (the runbook skips the traffic steps; promote runs the bake gate and deletes the
    old PROD) rather than deploying `model_ref`, which deploy_candidate refuses while a promotion is
    unfinished, and whose failure would roll the promotion back."""
    model = rollout.resolve_model_ref(backend, model_ref)
    progress(f"{state.endpoint}: an earlier rollout promoted {state.prod} ({state.prod_model}) and was not finished "
             f"({state.old_prod} kept for a rollback): this run finishes it (bake gate, then {state.old_prod} "
             f"deleted) and does not deploy {model}: run the runbook again to roll that out")
    return {"first_release": False, "unfinished_promotion": True, "prod": state.prod, "rc": None,
            "old_prod": state.old_prod, "baseline": state.baseline, "model": model, "not_deployed": model,
            "phase": state.phase.value}


def smoke(backend: Backend, endpoint_name: str, deployment: str, n: int = 5, *, request_file: str = "",
          prod: str | None = None) -> Any:
    """Smoke-test a deployment through the deployment header with the first `n` request bodies: each answer
    must be a 200 with JSON shaped like `prod`'s answer to the same request (when there is a PROD to compare
    with). An RC that passes is marked smoke-tested. Returns the SmokeResult; the notebook raises on failure.
    """
    bodies = request_bodies(request_file, n)[:n]
    result = rollout.smoke_test(backend, endpoint_name, deployment, bodies, reference=prod)
    if result.ok and prod is not None:
        rollout.mark_smoke_tested(backend, endpoint_name)
    return result


def warm_up(backend: Backend, endpoint_name: str, rc: str, n: int = 50, request_file: str = "") -> dict[str, Any]:
    """Warm the smoke-tested RC (and the baseline, if any) with `n` requests pinned to each (the request
    file's bodies in turn, or held-out credit rows), before any live traffic.

    A freshly started process answers its first requests more slowly (imports, caches, lazy model state)
    than PROD, which has been serving for a while; the latency gates compare like with like once it is
    warm. The requests go through the deployment header, so the platform marks them pinned and no gate
    counts them as live traffic. Returns, for the RC, the median latencies of the first and last tenth
    and the failures (`baseline`: the same for the baseline).
    """
    if n <= 0:
        return {"n": 0, "failed": 0}
    bodies = request_bodies(request_file, min(n, 50))
    baseline = rollout.read_state(backend, endpoint_name).baseline

    def warm(deployment: str) -> dict[str, Any]:
        latencies, failed = [], 0
        for i in range(n):
            result = backend.invoke(endpoint_name, bodies[i % len(bodies)], deployment=deployment, timeout_s=30.0)
            latencies.append(result.latency_ms)
            failed += not result.ok
        tenth = max(1, n // 10)
        return {"n": n, "failed": failed, "first_ms": float(np.median(latencies[:tenth])),
                "last_ms": float(np.median(latencies[-tenth:]))}

    outcome = warm(rc)
    if baseline:
        outcome["baseline"] = warm(baseline)
    return outcome


# ---- gates -------------------------------------------------------------------------------------------
def gate_config(backend: Backend, gates: str | list[dict] | None,
                overrides: dict[str, dict[str, Any]] | None = None, window_s: float = 30.0) -> list[dict] | str:
    """The gate list to build: `auto` (or empty) picks DEFAULT_GATES, or AGGREGATE_GATES for a backend
    without raw per-request samples (Azure); `aggregate` and `bake` name those lists; anything else is a
    gate list (or its JSON/YAML text) for build_gates, taken as given.

    `overrides` (gate kind -> settings) adjusts the named lists, e.g. the prediction agreement a new model
    must keep with PROD: a different model family legitimately changes some decisions.
    """
    from saferollout import gates as gate_module

    chosen = gate_module.named_gate_list(gates, backend.supports_raw_samples)
    if chosen is None and gates == "bake":
        chosen = bake_gates(backend, window_s)
    if chosen is None:
        return gates or []  # the user's own list (None and "" are named lists, so never reach here)
    return [{**entry, **(overrides or {}).get(entry["kind"], {})} for entry in chosen]


def choose_gates(backend: Backend, gates: str | list[dict] | None, window_s: float,
                 overrides: dict[str, dict[str, Any]] | None = None) -> list[Any]:
    """Build the configured gates (each limited to `window_s`) and refuse any the backend cannot feed."""
    from saferollout import gates as gate_module

    built = gate_module.build_gates(gate_config(backend, gates, overrides, window_s),
                                    defaults={"max_duration_s": float(window_s)})
    return gate_module.gates_for_backend(built, backend)


def agreement_settings(request_file: str, min_agreement: float, max_distance: float, *, answer_path: str = "",
                       task: str = "auto", rel_tolerance: float = 0.1, abs_tolerance: float = 0.0) -> dict[str, Any]:
    """The prediction-agreement gate's settings for the named gate lists: the credit demo compares 100 held-out
    rows in 20 requests per deployment (little load beside what the other gates measure); your request file
    gives its bodies (at most 50 per deployment)."""
    settings: dict[str, Any] = {"min_agreement": min_agreement, "max_distance": max_distance, "answer_path": answer_path,
                                "task": task, "rel_tolerance": rel_tolerance, "abs_tolerance": abs_tolerance}
    if request_file:
        return {**settings, "requests": str(request_file), "n": min(50, len(request_bodies(request_file))),
                "batch_size": 1}
    return {**settings, "n": 20, "batch_size": 5}


def plan_gates(backend: Backend, endpoint_name: str, gates: str | list[dict] | None, window_s: float, rc: str,
               prod: str | None, overrides: dict[str, dict[str, Any]] | None = None) -> tuple[list[Any], list[dict]]:
    """(the gates to run, the gates left out with why): choose_gates, then for a named list (`auto`,
    `aggregate`) only the gates whose evidence can exist on this rollout (leave_out_gates)."""
    from saferollout import gates as gate_module

    named = gate_module.is_named_gate_list(gates)
    if not named and gates is not None:  # the user's own list: it keeps its settings; the request file fills
        gates = with_request_settings(gates, (overrides or {}).get("ml_agreement", {}))  # what it leaves out
    built = choose_gates(backend, gates, window_s, overrides)
    return leave_out_gates(backend, endpoint_name, built, rc, prod) if named else (built, [])


REQUEST_SETTINGS = ("requests", "n", "batch_size", "answer_path", "task")


def with_request_settings(gates: str | list[dict], agreement: dict[str, Any]) -> list[dict]:
    """A gate list given by the user, its ml_agreement entries completed with the rollout's request file
    settings (requests, n, answer_path, task) where an entry does not set them itself."""
    import yaml

    entries = yaml.safe_load(gates) if isinstance(gates, str) else gates
    if not isinstance(entries, list):
        return entries  # build_gates refuses it with its own message
    fills = {k: v for k, v in agreement.items() if k in REQUEST_SETTINGS}
    if "requests" not in fills:
        fills.pop("n", None), fills.pop("batch_size", None)  # the credit rows: the gate's own n
    return [{**fills, **entry} if isinstance(entry, dict) and entry.get("kind") == "ml_agreement" else entry
            for entry in entries]


def leave_out_gates(backend: Backend, endpoint_name: str, gates: list[Any], rc: str,
                    prod: str | None) -> tuple[list[Any], list[dict[str, str]]]:
    """(gates kept, gates left out with why): `gates: auto` includes a gate only where its evidence can exist
    on this rollout. An offline-quality gate needs its metrics registered on both models (a model brought
    without them is not compared); a gate list the user gave is kept whole (a gate without evidence fails)."""
    kept, left_out = [], []
    for gate in gates:
        missing = _missing_offline_metrics(backend, endpoint_name, gate, rc, prod)
        if missing:
            left_out.append({"name": gate.name, "kind": gate.kind, "reason": missing})
        else:
            kept.append(gate)
    if not kept:  # nothing left to judge the RC is never a pass
        raise SpecError("every gate was left out: " + "; ".join(f"{g['name']}: {g['reason']}" for g in left_out))
    return kept, left_out


def _missing_offline_metrics(backend: Backend, endpoint_name: str, gate: Any, rc: str, prod: str | None) -> str:
    if gate.kind != "ml_quality" or prod is None:
        return ""
    wanted = list(gate.tolerances)
    for deployment in (rc, prod):
        ref = backend.get_deployment(endpoint_name, deployment).model or ""
        if not ref.startswith("azureml:"):
            return f"{deployment} serves no registered model, so there are no offline metrics to compare"
        name, version = parse_model_ref(ref)
        absent = [m for m in wanted if m not in backend.get_model(name, version).properties]
        if absent:
            return (f"model {ref} ({deployment}) has no registered offline metric(s) {', '.join(absent)}: "
                    "register them as model properties to compare the models offline")
    return ""


def bake_gates(backend: Backend, window_s: float = 30.0) -> list[dict]:
    """Gates for the bake after promotion: the new PROD alone (no other deployment has traffic to compare
    with), held to absolute limits: no server errors and p90 latency under a second, interval after interval.
    A model that fails is answered 424 by the gateway (as on Azure), not 5xx: it counts as a server error.

    As many complete metric intervals as the window holds (at most 5), leaving two for alignment:
    5-second intervals locally, 1-minute ones on Azure (Azure Monitor's finest grain). A window too short for
    even one complete interval is refused, since such a gate could only fail.
    """
    grain = backend.finest_grain
    grain_s = grain_seconds(grain)
    delay_s = backend.metrics_delay_s  # an interval is judged only once its metrics are complete
    intervals = min(5, int((window_s - delay_s) // grain_s) - 2)
    if intervals < 1:
        raise SpecError(f"bake_window_s={window_s:g} is too short for the {backend.name} backend: its metrics come "
                        f"in {grain_s}-second intervals, complete {delay_s:g} s after they end, so use at least "
                        f"{delay_s + 3 * grain_s:g} (or 0 for no bake gate)")
    return [
        {"kind": "threshold", "name": "bake-errors", "metric": "RequestsPerMinute", "aggregation": "Total",
         "filter": "deployment eq '{rc}' and (statusCodeClass eq '5xx' or statusCode eq '424')",
         "condition": "lte", "threshold": 0, "grain": grain, "intervals": intervals},
        {"kind": "threshold", "name": "bake-latency", "metric": "RequestLatency_P90", "aggregation": "Average",
         "filter": "deployment eq '{rc}'", "condition": "lte", "threshold": 1000, "grain": grain,
         "intervals": intervals},
    ]


def gate_window_start(shifted_at: float, run_started_at: float = 0.0) -> float | None:
    """Where a gate's window starts: at the shift when this invocation of the runbook made it; now (None) when
    the shift was made before this invocation began (a killed run resumed with --run-dir, or a later CI job).
    A resumed gate starts a fresh window: with the killed run's start it would be past `gate_window_s` at its
    first look (the kill also stopped the live traffic), and an undecided gate would fail a healthy RC."""
    if not shifted_at or (run_started_at and shifted_at < run_started_at):
        return None
    return shifted_at


def finish_gate(backend: Backend, endpoint_name: str, decision: str, percent: int | None) -> None:
    """Remember a passed gate on the endpoint, so a resumed run does not repeat it."""
    if decision == "pass":
        rollout.mark_gate_passed(backend, endpoint_name, percent)


def finish_promotion(backend: Backend, endpoint_name: str) -> rollout.RolloutState:
    """After a passed bake (or without one): delete the former PROD and release the lock; the state left."""
    rollout.delete_old_prod(backend, endpoint_name)
    rollout.release_lock(backend, endpoint_name)
    return rollout.read_state(backend, endpoint_name)


def latency_threshold_ms(gates: list[Any]) -> float | None:
    """A latency limit in ms to draw on the dashboard, taken from a threshold gate on latency if any."""
    for gate in gates:
        metric = str(getattr(gate, "metric", ""))
        if getattr(gate, "kind", "") == "threshold" and metric.startswith("RequestLatency"):
            return float(gate.threshold)
    return None


# ---- standalone demos --------------------------------------------------------------------------------
def demo_model(backend: Backend, name: str, family: str = "logistic_regression", seed: int = 42) -> str:
    """Train and register a model for a standalone notebook run; returns its versioned reference."""
    _, split, folder = train_and_save(family, seed)
    return register_trained_model(backend, name, folder, data_hash=data.data_hash(split.train),
                                  parameters={"standalone": True}).ref


def cleanup_at_exit(backend: Backend, endpoint_name: str, progress: Any = print) -> None:
    """Delete `endpoint_name` when the kernel exits (a notebook run alone never leaves its demo behind)."""
    atexit.register(end_demo, backend, endpoint_name, progress)


def start_demo_traffic(backend: Backend, endpoint_name: str, rps: float) -> Any:
    """Live traffic from held-out rows in this process, for a notebook run alone; `.stop()` it."""
    from saferollout import traffic

    rows = data.split(seed=42).X_test
    generator = traffic.LoadGenerator(backend, endpoint_name, data.sample_requests(rows), rps)
    generator.start()
    atexit.register(generator.stop)
    return generator


def rollback(backend: Backend, endpoint_name: str, reason: str, run_id: str = "",
             progress: Any = print) -> tuple[rollout.RolloutState, rollout.RolloutState]:
    """Roll back what this run started: (state before, state after).

    Nothing to do without an endpoint. Refuses to touch an endpoint whose lock another run holds: that run's
    rollout is not ours to undo (our own run most likely failed to get the lock).
    """
    before = rollout.read_state(backend, endpoint_name)
    if before.phase == rollout.Phase.NO_ENDPOINT:
        progress(f"{endpoint_name}: no endpoint, nothing was deployed: nothing to roll back")
        return before, before
    if before.lock and run_id and before.lock.get("run") != run_id:
        progress(f"{endpoint_name}: locked by run {before.lock.get('run')!r} of {before.lock.get('owner')}, "
                 f"not this run ({run_id}): left untouched")
        return before, before
    return before, rollout.rollback(backend, endpoint_name, reason)


def deployment_log(backend: Backend, endpoint_name: str, deployment: str, lines: int = 30) -> str:
    """The last `lines` lines of a deployment's log that say something: its per-request lines (thousands
    under live traffic) are left out, and counted, so init() errors and tracebacks stay in view."""
    from saferollout.runner import REQUEST_LOG_LINE

    text = backend.get_deployment_logs(endpoint_name, deployment, lines=max(lines * 40, 1000))
    kept = [line for line in text.splitlines() if not REQUEST_LOG_LINE.search(line)]
    dropped = len(text.splitlines()) - len(kept)
    note = [f"({dropped} per-request lines left out)"] if dropped else []
    return "\n".join(kept[-lines:] + note)


def start_demo(backend: Backend, endpoint_name: str, *, rc_percent: int | None = None, fault: str = "none",
               model_name: str = "credit-model-demo", promote: bool = False,
               progress: Any = print) -> rollout.RolloutState:
    """An endpoint with a PROD (and, with `rc_percent`, a smoke-tested RC at that traffic) for a notebook run
    alone: it demonstrates its step there instead of on a real rollout. `end_demo` deletes it; so does the
    kernel's exit, should a cell fail before the notebook's last cell."""
    cleanup_at_exit(backend, endpoint_name, progress)
    ref = demo_model(backend, model_name)
    deploy(backend, endpoint_name, ref, progress=progress)
    if rc_percent is not None:
        candidate = demo_model(backend, model_name)  # same data and seed: a new version that agrees with PROD
        outcome = deploy(backend, endpoint_name, candidate, fault=fault, progress=progress)
        smoke(backend, endpoint_name, outcome["rc"], prod=outcome["prod"]).raise_if_failed()
        rollout.shift_traffic(backend, endpoint_name, rc_percent)
        if promote:
            rollout.promote(backend, endpoint_name)
    return rollout.read_state(backend, endpoint_name)


def end_demo(backend: Backend, endpoint_name: str, progress: Any = print) -> None:
    """Delete a demo endpoint (and its deployments); nothing happens if it is gone already."""
    try:
        backend.delete_endpoint(endpoint_name)
        progress(f"demo endpoint {endpoint_name} deleted")
    except NotFound:
        pass
