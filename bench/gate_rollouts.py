"""Gates on the real platform: gated rollouts of healthy and faulty RCs, as a user runs them.

Every rollout is `saferollout run runbooks/safe_rollout.yaml` with the runbook's defaults (20 rps of live
traffic from the runner's generator, steps 10 -> 50 -> 100, the default gates), on one endpoint of a private
workspace (its own platform, stopped at the end):

1. a first release (logistic regression; setup, not counted);
2. `--healthy` healthy rollouts, alternating a retrain of PROD's family and a new family
   (LR -> LR, LR -> GB, GB -> GB, GB -> LR, ...): each should be promoted;
3. each faulty RC (`fault=errors|latency|crash|flip`) `--faulty` times, in turn: each should be rolled back.

For each rollout: the outcome, the step and gate that failed (with its reason), every gate's final verdict
at each step and the client-side failures. Writes `bench/results/gate_rollouts.json` and the
`## Gates on the real platform` section of `docs/benchmarks.md`.

    .venv/bin/python bench/gate_rollouts.py [--healthy 20] [--faulty 3] [--no-docs]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import publish

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gate_rollouts.json"
RUNBOOK = ROOT / "runbooks" / "safe_rollout.yaml"
SECTION = "## Gates on the real platform"
ENDPOINT = "gate-bench"
FAMILIES = ("logistic_regression", "gradient_boosting")
FAULTS = ("errors", "latency", "crash", "flip")
SHORT = {"logistic_regression": "LR", "gradient_boosting": "GB"}


def one_rollout(runs_dir: Path, **params: Any) -> dict[str, Any]:
    """One runner invocation; -> outcome, failing step and gate, verdicts per gate step, client figures."""
    from rich.console import Console

    from saferollout.runner import run_runbook

    started = time.perf_counter()
    result = run_runbook(RUNBOOK, {"endpoint_name": ENDPOINT, **params}, runs_dir=runs_dir,
                         console=Console(quiet=True), echo=False)
    summary = result.summary
    failure = summary.get("failure") or {}
    message = str(failure.get("message", ""))
    gate = re.search(r"gate '([^']+)'", message)
    verdicts = {step: {v["gate"]: {"decision": v["decision"], "reason": v["reason"],
                                   "seconds": round(v["window_end"] - v["window_start"], 1),
                                   "at_window_end": bool(v["evidence"].get("passed_at_window_end"))}
                       for v in g.get("verdicts", [])} for step, g in (summary.get("gates") or {}).items()}
    traffic = summary.get("traffic") or {}
    per_deployment = traffic.get("per_deployment") or {}
    return {"status": summary["status"], "exit_code": result.exit_code,
            "wall_s": round(time.perf_counter() - started, 1), "failed_step": failure.get("step"),
            "failed_gate": gate.group(1) if gate else None, "failure": message[:400], "gates": verdicts,
            "steps": {s["id"]: round(s["duration_s"] or 0.0, 1) for s in summary["steps"] if s["status"] != "skipped"},
            "client": {"sent": traffic.get("sent"), "failed": traffic.get("failed"),
                       "failed_by_deployment": {d: c["failed"] for d, c in per_deployment.items() if c.get("failed")}},
            "run_dir": str(result.run_dir)}


def plan(healthy: int, faulty: int) -> list[dict[str, Any]]:
    """The rollouts in order: healthy ones alternating retrain / new family, then the faults in turn."""
    rollouts, prod = [], FAMILIES[0]
    for i in range(healthy):
        family = prod if i % 2 == 0 else next(f for f in FAMILIES if f != prod)
        rollouts.append({"kind": "healthy", "change": f"{SHORT[prod]} -> {SHORT[family]}",
                         "params": {"model_family": family}})
        prod = family
    for _ in range(faulty):
        for fault in FAULTS:
            rollouts.append({"kind": fault, "change": f"{SHORT[prod]} -> fault={fault}",
                             "params": {"model_family": prod, "fault": fault}})
    return rollouts


def run(healthy: int, faulty: int) -> dict[str, Any]:
    from saferollout.backends.local.client import stop_platform

    note = "client, platform, instances and kernels share this machine; other work on it adds noise"
    data: dict[str, Any] = {"environment": publish.environment(note), "healthy": healthy, "faulty": faulty,
                            "rollouts": []}
    with tempfile.TemporaryDirectory(prefix="saferollout-gatebench-") as home:
        os.environ["SAFEROLLOUT_HOME"] = home  # the runner's kernels and traffic process inherit it
        runs = Path(home) / "runs"
        try:
            data["first_release"] = one_rollout(runs, model_family=FAMILIES[0])
            for i, item in enumerate(plan(healthy, faulty), start=1):
                outcome = {**item, **one_rollout(runs, **item["params"]), "load_before": os.getloadavg()[0]}
                data["rollouts"].append(outcome)
                print(f"{i:>2} {item['kind']:<8} {item['change']:<22} {outcome['status']:<12} "
                      f"{outcome['wall_s']:>6.0f}s {outcome['failed_gate'] or outcome['failed_step'] or ''}",
                      file=sys.stderr, flush=True)
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(data, indent=2) + "\n")  # progress survives an interrupted run
        finally:
            stop_platform(home)
    data["environment"]["loadavg_at_end"] = os.getloadavg()
    return data


def summarise(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("healthy", *FAULTS):
        rows = [r for r in data["rollouts"] if r["kind"] == kind]
        if not rows:
            continue
        good = "completed" if kind == "healthy" else "rolled_back"
        out[kind] = {"runs": len(rows), "as_expected": sum(r["status"] == good for r in rows),
                     "statuses": dict(Counter(r["status"] for r in rows)),
                     "caught_by": dict(Counter(r["failed_gate"] or r["failed_step"] or "-" for r in rows
                                               if r["status"] != "completed")),
                     "median_wall_s": sorted(r["wall_s"] for r in rows)[len(rows) // 2]}
    return out


def markdown(data: dict[str, Any]) -> str:
    env, summary = data["environment"], data["summary"]
    load = env.get("loadavg_at_start", [0])[0]
    before = [r["load_before"] for r in data["rollouts"] if "load_before" in r]
    lines = [SECTION, "",
             f"Gated rollouts on the local platform, as a user runs them (`bench/gate_rollouts.py`, raw figures in "
             f"`bench/results/gate_rollouts.json`), run on {env['date']} at commit `{env['commit']}`, "
             f"{env['cpus']} CPUs (load average {load:.1f} at the start, "
             f"{env.get('loadavg_at_end', [0])[0]:.1f} at the end; before each rollout between "
             f"{min(before, default=0):.1f} and {max(before, default=0):.1f}: other work shared the machine). "
             "Each is `saferollout run "
             "runbooks/safe_rollout.yaml` with the runbook's defaults on one endpoint: healthy RCs alternate a "
             "retrain of PROD's family and a new family (LR = logistic regression, GB = gradient boosting), then "
             "each faulty RC in turn.", "",
             "| RC | rollouts | as expected | outcomes | caught by | median wall time |", "|---|---|---|---|---|---|"]
    for kind, s in summary.items():
        expected = "promoted" if kind == "healthy" else "rolled back"
        outcomes = ", ".join(f"{k} {v}" for k, v in s["statuses"].items())
        caught = ", ".join(f"{k} {v}" for k, v in s["caught_by"].items()) or "-"
        lines.append(f"| {kind if kind == 'healthy' else 'fault=' + kind} | {s['runs']} | {s['as_expected']} "
                     f"{expected} | {outcomes} | {caught} | {s['median_wall_s']:.0f} s |")
    healthy = [r for r in data["rollouts"] if r["kind"] == "healthy"]
    at_end = sum(v["at_window_end"] for r in healthy for per in r["gates"].values() for v in per.values())
    first = [per["seconds"] for r in healthy for g, per in r["gates"].get("validate-10", {}).items()
             if g.endswith("sequential")]
    failed_healthy = sum(r["client"]["failed"] or 0 for r in healthy)
    faulty = [r for r in data["rollouts"] if r["kind"] != "healthy"]
    promoted = summary.get("healthy", {}).get("as_expected", 0)
    lines += ["", f"In short: {promoted} of {len(healthy)} healthy RCs promoted, "
                  f"every gate passing on evidence ({at_end} passes at a window's end); the sequential gates at 10% "
                  f"decided in {min(first, default=0):.0f}-{max(first, default=0):.0f} s; clients saw "
                  f"{failed_healthy} failed requests in the healthy rollouts. "
                  f"{sum(r['status'] == 'rolled_back' for r in faulty)} of {len(faulty)} faulty RCs rolled back; "
                  f"clients saw {sum(r['client']['failed'] or 0 for r in faulty)} failed requests in them "
                  "(by rollout in the table below; for runs that recorded it, by serving deployment in the JSON)."]
    lines += ["", "Every rollout, in order (gate steps: each gate's final decision and when; `end` = passed at the "
                  "window's end without evidence of harm):", "",
              "| # | change | outcome | validate-10 | validate-50 | failed | client requests (failed) |",
              "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(data["rollouts"], start=1):
        cells = []
        for step in ("validate-10", "validate-50"):
            per = r["gates"].get(step, {})
            cells.append("; ".join(f"{g.split('-')[0]} {v['decision']} {v['seconds']:.0f}s"
                                   f"{' end' if v['at_window_end'] else ''}" for g, v in per.items()) or "-")
        failed = r["failed_gate"] or r["failed_step"] or ""
        lines.append(f"| {i} | {r['change']} | {r['status']} | {cells[0]} | {cells[1]} | {failed} | "
                     f"{r['client']['sent'] or 0} ({r['client']['failed'] or 0}) |")
    lines += ["", "Reasons of the rollbacks:", ""]
    lines += [f"- #{i} {r['change']}: {r['failure']}" for i, r in enumerate(data["rollouts"], start=1)
              if r["status"] != "completed"] or ["- none"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--healthy", type=int, default=20)
    parser.add_argument("--faulty", type=int, default=3, help="rollouts of each faulty RC")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--render-only", action="store_true", help="rewrite the docs section from the JSON")
    args = parser.parse_args(argv)
    data = json.loads(RESULTS.read_text()) if args.render_only else run(args.healthy, args.faulty)
    data["summary"] = summarise(data)
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    section = markdown(data)
    if not args.no_docs:
        publish.write_section(SECTION, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
