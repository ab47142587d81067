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
from saferollout.errors import NotFound, SpecError
from saferollout.specs import DeploymentSpec, EndpointSpec, load_deployment_spec, load_endpoint_spec

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


def train_and_save(family: str, seed: int, model_dir: str | Path | None = None) -> tuple[training.TrainedModel, data.Split, Path]:
    """Train on the German credit split and write the model folder (a temporary one if none is given)."""
    split = data.split(seed=seed)
    trained = training.train(family, split, seed=seed)
    folder = Path(model_dir) if model_dir else Path(tempfile.mkdtemp(prefix="saferollout-model-")) / "model"
    return trained, split, trained.save(folder)


# ---- endpoint and deployment specs ---------------------------------------------------------------------
def endpoint_spec(endpoint_name: str, example_dir: str | Path = EXAMPLE_DIR) -> EndpointSpec:
    return load_endpoint_spec(Path(example_dir) / "endpoint.yml", name=endpoint_name)


def candidate_spec(endpoint_name: str, model_ref: str, fault: str = "none",
                   example_dir: str | Path = EXAMPLE_DIR) -> DeploymentSpec:
    """The example deployment.yml for this endpoint and model; `fault` goes to SAFEROLLOUT_FAULT."""
    if fault not in FAULTS:
        raise SpecError(f"fault must be one of {', '.join(FAULTS)}, got {fault!r}")
    spec = load_deployment_spec(Path(example_dir) / "deployment.yml", endpoint_name=endpoint_name, model=model_ref)
    return spec.with_changes(environment_variables={**spec.environment_variables, "SAFEROLLOUT_FAULT": fault})


def smoke_bodies(n: int = 5, batch_size: int = 2, seed: int = 42) -> list[bytes]:
    """`n` request bodies of held-out rows for a smoke test."""
    rows = data.split(seed=seed).X_test.head(n * batch_size)
    return data.sample_requests(rows, batch_size=batch_size)[:n]


def deploy(backend: Backend, endpoint_name: str, model_ref: str, *, fault: str = "none", run_id: str = "",
           baseline: bool = False, progress: Any = print) -> dict[str, Any]:
    """The deploy step: endpoint if missing, the rollout lock, then first release or an RC at 0%.

    Returns what the notebook records: first_release, prod, rc, baseline, model, phase. A fault applies to a
    release candidate only: a first release always deploys healthy. A first release (or a model PROD
    already serves) ends the rollout here, so the lock is released. With `baseline`, PROD's model is
    deployed afresh beside the RC (same code and settings), and the gates compare the RC with it.
    """
    rollout.ensure_endpoint(backend, endpoint_spec(endpoint_name))
    rollout.acquire_lock(backend, endpoint_name, rollout.default_owner(), run_id)
    before = rollout.read_state(backend, endpoint_name)
    first_release = before.prod is None
    if first_release and fault != "none":
        progress(f"first release: fault={fault} ignored (faults apply to a release candidate only)")
    spec = candidate_spec(endpoint_name, model_ref, "none" if first_release else fault)
    state = rollout.deploy_candidate(backend, endpoint_name, spec, model_ref, progress=progress)
    nothing_to_roll_out = first_release or state.rc is None
    if nothing_to_roll_out:
        rollout.release_lock(backend, endpoint_name)
    elif baseline:
        assert state.prod_model is not None
        state = rollout.deploy_baseline(backend, endpoint_name, candidate_spec(endpoint_name, state.prod_model),
                                        progress=progress)
    return {"first_release": nothing_to_roll_out, "prod": state.prod, "rc": state.rc, "baseline": state.baseline,
            "model": rollout.resolve_model_ref(backend, model_ref), "phase": state.phase.value}


def smoke(backend: Backend, endpoint_name: str, rc: str, n: int = 5) -> Any:
    """Smoke-test the RC through the deployment header; mark it smoke-tested when every answer is right.

    Returns the SmokeResult; a failed smoke test raises GateFailed after the notebook has shown it.
    """
    result = rollout.smoke_test(backend, endpoint_name, rc, smoke_bodies(n))
    if result.ok:
        rollout.mark_smoke_tested(backend, endpoint_name)
    return result


def warm_up(backend: Backend, endpoint_name: str, rc: str, n: int = 50) -> dict[str, Any]:
    """Warm the smoke-tested RC (and the baseline, if any) with `n` held-out requests pinned to each.

    A freshly started process answers its first requests more slowly (imports, caches, lazy model state)
    than PROD, which has been serving for a while; the latency gates compare like with like once it is
    warm. The requests go through the deployment header, so the platform marks them pinned and no gate
    counts them as live traffic. Returns, for the RC, the median latencies of the first and last tenth
    and the failures (`baseline`: the same for the baseline).
    """
    if n <= 0:
        return {"n": 0, "failed": 0}
    bodies = smoke_bodies(min(n, 50))
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

    if gates in (None, "", "auto", "default"):
        chosen = gate_module.DEFAULT_GATES if backend.supports_raw_samples else gate_module.AGGREGATE_GATES
    elif gates == "aggregate":
        chosen = gate_module.AGGREGATE_GATES
    elif gates == "bake":
        chosen = bake_gates(backend, window_s)
    else:
        return gates
    return [{**entry, **(overrides or {}).get(entry["kind"], {})} for entry in chosen]


def choose_gates(backend: Backend, gates: str | list[dict] | None, window_s: float,
                 overrides: dict[str, dict[str, Any]] | None = None) -> list[Any]:
    """Build the configured gates (each limited to `window_s`) and refuse any the backend cannot feed."""
    from saferollout import gates as gate_module

    built = gate_module.build_gates(gate_config(backend, gates, overrides, window_s),
                                    defaults={"max_duration_s": float(window_s)})
    return gate_module.gates_for_backend(built, backend)


def bake_gates(backend: Backend, window_s: float = 30.0) -> list[dict]:
    """Gates for the bake after promotion: the new PROD alone (no other deployment has traffic to compare
    with), held to absolute limits: no server errors and p90 latency under a second, interval after interval.
    A model that fails is answered 424 by the gateway (as on Azure), not 5xx: it counts as a server error.

    As many complete metric intervals as the window holds (at most 5), leaving two for alignment:
    5-second intervals locally, 1-minute ones on Azure (Azure Monitor's finest grain). A window too short for
    even one complete interval is refused, since such a gate could only fail.
    """
    grain, grain_s = ("PT5S", 5) if backend.name == "local" else ("PT1M", 60)
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


def finish_gate(backend: Backend, endpoint_name: str, decision: str, percent: int | None) -> None:
    """Remember a passed gate on the endpoint, so a resumed run does not repeat it."""
    if decision == "pass":
        rollout.mark_gate_passed(backend, endpoint_name, percent)


def latency_threshold_ms(gates: list[Any]) -> float | None:
    """A latency limit in ms to draw on the dashboard, taken from a threshold gate on latency if any."""
    for gate in gates:
        metric = str(getattr(gate, "metric", ""))
        if getattr(gate, "kind", "") == "threshold" and metric.startswith("RequestLatency"):
            return float(getattr(gate, "threshold"))
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
        smoke(backend, endpoint_name, outcome["rc"]).raise_if_failed()
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
