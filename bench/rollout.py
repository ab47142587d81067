"""Wall time of a rollout, per phase, with live traffic at 15 rps: a healthy rollout and a rollback.

Two measurements, each in a private workspace (its own platform, stopped at the end):

1. The runner, as a user runs it: `saferollout run runbooks/safe_rollout.yaml` (papermill, one kernel per
   notebook, the runbook's quick gate windows, live traffic from the runner's background generator).
   First a first release (reported as setup), then a safe rollout of a second model, then a rollout whose
   RC injects errors (`fault=errors`) and is rolled back by its gates. Per-step times come from each
   run's `summary.json`; client-side outcomes from its traffic results.
2. The state machine alone: the same transitions called directly (no notebooks, no gates) while a
   LoadGenerator sends the same rate, to show what the transitions themselves cost.

Writes `bench/results/rollout.json` and the `## Rollout` section of `docs/benchmarks.md`.

    .venv/bin/python bench/rollout.py [--rps 15] [--direct-only] [--no-docs]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import publish

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "rollout.json"
RUNBOOK = ROOT / "runbooks" / "safe_rollout.yaml"
EXAMPLE = ROOT / "examples" / "credit-risk"
SECTION = "## Rollout"
BASELINE_S = 15.0  # seconds of traffic to PROD alone, before any rollout, for comparison


# ---- 1. the runner --------------------------------------------------------------------------------------

def runner_run(endpoint: str, runs_dir: Path, rps: float, **overrides: Any) -> dict[str, Any]:
    """One `saferollout run` of the safe runbook; -> status, total and per-step wall times, client outcome."""
    from rich.console import Console

    from saferollout.runner import run_runbook

    params = {"endpoint_name": endpoint, "rps": rps, "model_name": f"{endpoint}-model", **overrides}
    started = time.perf_counter()
    result = run_runbook(RUNBOOK, params, runs_dir=runs_dir, console=Console(quiet=True), echo=False)
    wall = time.perf_counter() - started
    summary = result.summary
    steps = [{"step": s["id"], "status": s["status"], "seconds": round(s["duration_s"] or 0.0, 2)}
             for s in summary["steps"] if s["status"] != "skipped"]
    traffic = summary.get("traffic") or {}
    per = traffic.get("per_deployment", {})
    return {"status": summary["status"], "exit_code": result.exit_code, "wall_s": round(wall, 2),
            **_roles(endpoint),
            "steps": steps, "parameters": {k: summary["parameters"].get(k) for k in
                                            ("rps", "gate_window_s", "bake_window_s", "traffic_steps", "fault")},
            "client": {"sent": traffic.get("sent"), "failed": traffic.get("failed"),
                       "failed_by_deployment": {d: c["failed"] for d, c in per.items() if c.get("failed")},
                       "per_deployment": per},
            "run_dir": str(result.run_dir)}


def _roles(endpoint: str) -> dict[str, Any]:
    """Who is PROD now and which candidate this rollout tried (the RC, promoted or rolled back)."""
    from saferollout import rollout
    from saferollout.backends.local.backend import LocalBackend

    state = rollout.read_state(LocalBackend(), endpoint)
    candidate = state.failed_rc if state.phase == rollout.Phase.ROLLED_BACK else state.prod
    return {"phase": state.phase.value, "prod": state.prod, "candidate": candidate}


def bench_runner(rps: float) -> dict[str, Any]:
    endpoint = f"bench-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="saferollout-bench-runs-") as runs:
        first = runner_run(endpoint, Path(runs), rps)
        healthy = runner_run(endpoint, Path(runs), rps)
        # inverted predictions pass the smoke test (the answers have the right shape) and are caught by the
        # agreement gate under live traffic; errors are caught earlier, by the smoke test
        flip = runner_run(endpoint, Path(runs), rps, fault="flip")
        errors = runner_run(endpoint, Path(runs), rps, fault="errors")
    return {"endpoint": endpoint, "first_release": first, "healthy": healthy, "rollback": flip,
            "rollback_errors": errors}


# ---- 2. the state machine alone ---------------------------------------------------------------------------

def timed(phases: list[dict[str, Any]], name: str, fn: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    value = fn()
    phases.append({"step": name, "seconds": round(time.perf_counter() - started, 3)})
    return value


def bench_direct(rps: float) -> dict[str, Any]:
    from saferollout import data, rollout, training
    from saferollout.backends.local.backend import LocalBackend
    from saferollout.errors import DeploymentFailed
    from saferollout.specs import load_deployment_spec, load_endpoint_spec
    from saferollout.traffic import LoadGenerator

    backend = LocalBackend()
    split = data.split(seed=42)
    with tempfile.TemporaryDirectory(prefix="saferollout-bench-model-") as folder:
        model_dir = Path(folder) / "model"
        training.train("logistic_regression", split).save(model_dir)
        name = f"bench-direct-{uuid.uuid4().hex[:6]}"
        refs = [backend.register_model(name, str(model_dir)).ref for _ in range(3)]
        endpoint = name
        rollout.ensure_endpoint(backend, load_endpoint_spec(EXAMPLE / "endpoint.yml", name=endpoint))
        spec = load_deployment_spec(EXAMPLE / "deployment.yml", endpoint_name=endpoint)
        bodies = data.sample_requests(split.X_test, 1)
        smoke_bodies = bodies[:5]
        setup: list[dict[str, Any]] = []
        timed(setup, "first release (deploy PROD)", lambda: rollout.deploy_candidate(backend, endpoint, spec, refs[0]))

        def sequence(phases: list[dict[str, Any]], ref: str, candidate: Any, healthy: bool) -> None:
            try:
                state = timed(phases, "deploy RC at 0%",
                              lambda: rollout.deploy_candidate(backend, endpoint, candidate, ref))
            except DeploymentFailed:
                return
            timed(phases, "smoke test (5 requests)",
                  lambda: rollout.smoke_test(backend, endpoint, state.rc, smoke_bodies))
            timed(phases, "mark smoke-tested", lambda: rollout.mark_smoke_tested(backend, endpoint))
            timed(phases, "shift 10%", lambda: rollout.shift_traffic(backend, endpoint, 10))
            if not healthy:
                timed(phases, "rollback", lambda: rollout.rollback(backend, endpoint, "benchmark rollback"))
                return
            timed(phases, "shift 50%", lambda: rollout.shift_traffic(backend, endpoint, 50))
            timed(phases, "promote (100%, tags swapped)", lambda: rollout.promote(backend, endpoint))
            timed(phases, "delete old PROD", lambda: rollout.delete_old_prod(backend, endpoint))

        # the same load with nothing changing: failures here are the machine's, not the rollout's
        load = LoadGenerator(backend, endpoint, bodies, rps, duration_s=BASELINE_S)
        baseline = load.run()
        scenarios: dict[str, Any] = {"baseline": {
            "seconds": BASELINE_S, "prod": "blue",
            "client": {"sent": baseline.sent, "failed": baseline.failed,
                       "by_status": {str(k): v for k, v in baseline.by_status.items()},
                       "failed_by_deployment": baseline.failed_by_deployment,
                       "latency_ms": baseline.latencies_ms}}}
        for label, ref, candidate, healthy in (
                ("healthy", refs[1], spec, True),
                ("rollback", refs[2], spec.with_changes(environment_variables={"SAFEROLLOUT_FAULT": "errors"}),
                 False)):
            phases: list[dict[str, Any]] = []
            load = LoadGenerator(backend, endpoint, bodies, rps)
            load.start()
            started = time.perf_counter()
            try:
                sequence(phases, ref, candidate, healthy)
            finally:
                total = time.perf_counter() - started
                client = load.stop()
            state = rollout.read_state(backend, endpoint)
            scenarios[label] = {"total_s": round(total, 3), "steps": phases, "phase": state.phase.value,
                                "prod": state.prod,
                                "candidate": state.failed_rc if not healthy else state.prod,
                                "client": {"sent": client.sent, "failed": client.failed,
                                           "by_status": {str(k): v for k, v in client.by_status.items()},
                                           "failed_by_deployment": client.failed_by_deployment,
                                           "by_deployment": client.by_deployment,
                                           "latency_ms": client.latencies_ms}}
        backend.delete_endpoint(endpoint)
    return {"setup": setup, **scenarios}


# ---- report -------------------------------------------------------------------------------------------------

def _steps_table(title: str, run: dict[str, Any], total_key: str) -> list[str]:
    lines = [f"**{title}** ({run.get('status', 'done')}, {run[total_key]:.1f} s in all)", "",
             "| step | seconds |", "|---|---|"]
    lines += [f"| {s['step']}{'' if s.get('status', 'ok') == 'ok' else ' (' + s['status'] + ')'} | "
              f"{s['seconds']:.2f} |" for s in run["steps"]]
    return lines + [""]


def _client_line(run: dict[str, Any]) -> str:
    client = run["client"]
    if client.get("sent") is None:
        return "Clients: no live traffic (the step that starts it never ran)."
    failed = client.get("failed_by_deployment") or {}
    shown = ", ".join(f"{d}: {n}" for d, n in sorted(failed.items())) or "none"
    if client.get("by_status"):
        shown += f"; statuses {client['by_status']}"
    return (f"Clients: {client.get('sent')} requests; failed, by serving deployment: {shown} "
            f"(the candidate was `{run.get('candidate')}`, PROD at the end `{run.get('prod')}`).")


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [SECTION, "",
             f"Wall time of a rollout with live traffic at {result['rps']:g} rps, per phase. Run `.venv/bin/python "
             f"bench/rollout.py`; raw figures in `bench/results/rollout.json`. Run on {env['date']} at commit "
             f"`{env['commit']}`, {env['cpus']} CPUs shared with other work (load average "
             f"{env['loadavg_at_start'][0]:.1f} at the start): read the proportions more than the seconds.", ""]
    runner = result.get("runner")
    if runner:
        params = runner["healthy"]["parameters"]
        lines += [f"### With the runner (`saferollout run runbooks/safe_rollout.yaml`)", "",
                  f"The runbook's default gates and windows (`gate_window_s={params['gate_window_s']}` at most "
                  f"per gate, `bake_window_s={params['bake_window_s']}`, steps `{params['traffic_steps']}`); "
                  "each run trains and registers its own model first. Each step is a notebook executed by "
                  "papermill in a fresh kernel, so every step pays a kernel start.", ""]
        lines += _steps_table("Healthy rollout", runner["healthy"], "wall_s")
        lines += [_client_line(runner["healthy"]), ""]
        lines += _steps_table("Rollback by a gate under live traffic (RC with `fault=flip`: inverted predictions)",
                              runner["rollback"], "wall_s")
        lines += [_client_line(runner["rollback"]), ""]
        if runner.get("rollback_errors"):
            lines += _steps_table("Rollback by the smoke test, before any live traffic (RC with `fault=errors`)",
                                  runner["rollback_errors"], "wall_s")
            lines += [_client_line(runner["rollback_errors"]), ""]
        lines += [f"Setup, not counted above: the first release took {runner['first_release']['wall_s']:.1f} s "
                  f"({runner['first_release']['status']}).", ""]
    elif result.get("runner_error"):
        lines += [f"The runner was not measured: {result['runner_error']}", ""]
    direct = result["direct"]
    lines += ["### The state machine alone (no notebooks, no gates)", "",
              "The same transitions called directly from one process while a load generator sends the same "
              "rate: what the rollout itself costs when gates are not waiting.", ""]
    base = direct["baseline"]["client"]
    lines += [f"Baseline, PROD alone for {direct['baseline']['seconds']:.0f} s before any rollout: "
              f"{base['sent']} requests, {base['failed']} failed (statuses {base['by_status']}), "
              f"p50 {base['latency_ms']['p50']} ms, p99 {base['latency_ms']['p99']} ms.", ""]
    lines += _steps_table("Healthy rollout", direct["healthy"], "total_s")
    lines += [_client_line(direct["healthy"]), ""]
    lines += _steps_table("Rollback after 10% (RC with `fault=errors`)", direct["rollback"], "total_s")
    lines += [_client_line(direct["rollback"]), ""]
    lines += [result["verdict"], ""]
    return "\n".join(lines)


def verdict(result: dict[str, Any]) -> str:
    parts = []
    runner = result.get("runner")
    if runner:
        healthy, rollback = runner["healthy"], runner["rollback"]
        gate_s = sum(s["seconds"] for s in healthy["steps"] if s["step"].startswith(("validate", "promote")))
        parts.append(f"With the runner a healthy rollout took {healthy['wall_s']:.0f} s, {gate_s:.0f} s of it "
                     f"in the gated steps (validate, promote with its bake gate); the RC with inverted predictions "
                     f"was {rollback['status'].replace('_', ' ')} after {rollback['wall_s']:.0f} s.")
    direct = result["direct"]
    parts.append(f"Without gates and notebooks the transitions take {direct['healthy']['total_s']:.1f} s for a "
                 f"whole rollout (mostly starting the RC) and {direct['rollback']['total_s']:.1f} s up to and "
                 f"including a rollback.")
    prod_failures = _prod_failures(result)
    baseline = direct["baseline"]["client"]["failed"]
    if prod_failures == 0:
        parts.append("Clients saw no failed request served by PROD.")
    else:
        parts.append(f"Clients saw {prod_failures} failed requests served by PROD during the rollouts, against "
                     f"{baseline} in the {direct['baseline']['seconds']:.0f} s baseline with nothing changing: "
                     "see the statuses (429 is the deployment's admission limit, 2 x max_concurrent x instances "
                     "in flight, reached when the shared machine slows every answer down).")
    return " ".join(parts)


def _prod_failures(result: dict[str, Any]) -> int:
    """Failed client requests served by anything but the candidate: PROD must never fail a client."""
    runs = [result["direct"]["healthy"], result["direct"]["rollback"]]
    if result.get("runner"):
        runs += [result["runner"][k] for k in ("healthy", "rollback", "rollback_errors") if k in result["runner"]]
    return sum(n for run in runs for d, n in (run["client"].get("failed_by_deployment") or {}).items()
               if d != run.get("candidate"))




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rps", type=float, default=15.0, help="live traffic during the rollout (default 15)")
    parser.add_argument("--direct-only", action="store_true", help="measure the state machine alone")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the docs section from bench/results/rollout.json without measuring")
    args = parser.parse_args(argv)
    if args.render_only:
        result = json.loads(RESULTS.read_text())
        result["verdict"] = verdict(result)
        publish.write_section(SECTION, markdown(result))
        return 0

    from saferollout.backends.local.client import stop_platform

    note = "client, platform, instances and kernels share this machine; other work on it adds noise"
    result: dict[str, Any] = {"environment": publish.environment(note), "rps": args.rps}
    with tempfile.TemporaryDirectory(prefix="saferollout-bench-home-") as home:
        os.environ["SAFEROLLOUT_HOME"] = home  # the runner's kernels and traffic process inherit it
        try:
            result["direct"] = bench_direct(args.rps)
            print(json.dumps(result["direct"], indent=2), file=sys.stderr)
            if not args.direct_only:
                try:
                    result["runner"] = bench_runner(args.rps)
                except Exception as exc:  # report the state machine's figures even if the runner fails
                    result["runner_error"] = f"{type(exc).__name__}: {exc}"
                    print(f"runner failed: {result['runner_error']}", file=sys.stderr)
        finally:
            stop_platform(home)
    result["verdict"] = verdict(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    section = markdown(result)
    if not args.no_docs:
        publish.write_section(SECTION, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
