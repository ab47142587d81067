"""Chaos: N rollouts of the real runbook, each SIGKILLed once at a random point, then driven to an end.

Each rollout runs `saferollout run runbooks/safe_rollout.yaml` (the short windows of tests/kill/harness.py,
live traffic from the runner's generator) on one endpoint of a private platform. A seeded random draw picks
the target (the runner with its kernels and traffic generator, or the platform process, started again 1 s
later), the step whose console line triggers the kill and a delay after it. A killed runner is then resumed
(`--run-dir`) or run afresh, alternately; a killed platform leaves the runner going. A rollout converged when
the last invocation ended completed or rolled back with PROD at 100%, the rollout tags cleared, the lock
released, and no sample of the endpoint (every 0.25 s) saw traffic on a missing, failed or unready deployment.

Reported: converged / total, time to converge (from the kill to the end of the last invocation), the live
clients' failed requests (from each run's traffic.jsonl: all of them, and those sent outside the platform's
outage), in `bench/results/chaos.json` and the `## Chaos` section of `docs/benchmarks.md`.

    .venv/bin/python bench/chaos.py [-n 10] [--seed 13] [--no-docs]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import publish

sys.path.insert(0, str(publish.ROOT / "tests" / "kill"))
import harness  # noqa: E402 (the fault-injection harness the kill tests use)
from harness import KillPoint  # noqa: E402

RESULTS = publish.ROOT / "bench" / "results" / "chaos.json"
SECTION = "## Chaos"
ENDPOINT = "chaos"
# (name, console line, largest delay after it) a kill may follow; steps of traffic_steps=50,100
TRIGGERS = [
    ("train", r"^>> \d+ train", 4.0),
    ("register", r"^>> \d+ register", 3.0),
    ("deploy", r"^>> \d+ deploy", 12.0),
    ("shift-50", r"^>> \d+ shift-50", 3.0),
    ("validate-50", r"^>> \d+ validate-50", 12.0),
    ("promote", r"^>> \d+ promote", 15.0),
]
PLATFORM_TRIGGERS = {"deploy", "validate-50", "promote"}  # the platform dies while the rollout uses it


def draw(rng: random.Random, i: int) -> tuple[KillPoint, str]:
    target = "platform" if rng.random() < 0.3 else "runner"
    choices = [t for t in TRIGGERS if target == "runner" or t[0] in PLATFORM_TRIGGERS]
    step, pattern, longest = rng.choice(choices)
    delay = round(rng.uniform(0.0, longest), 1)
    then = "" if target == "platform" else ("resume" if i % 2 == 0 else "fresh")
    return KillPoint(f"{target}@{step}+{delay}s", pattern, delay_s=delay, target=target), then


def one_rollout(home: Path, runs: Path, point: KillPoint, then: str) -> dict[str, Any]:
    sampler = harness.TrafficSampler(home, ENDPOINT)
    sampler.start()
    record: dict[str, Any] = {"kill": point.name, "then": then or "runner kept going"}
    try:
        killed = harness.run_runbook(home, ENDPOINT, None, runs, kill=point)
        run_dir = harness.run_dir_of(killed)
        record["killed"] = killed.killed_at is not None
        last = killed
        if killed.killed_at is not None and point.target == "runner":
            last = harness.run_runbook(home, ENDPOINT, run_dir if then == "resume" else None, runs)
        end = time.time()
        final_dir = harness.run_dir_of(last)
        status = harness.summary(final_dir)["status"] if final_dir and (final_dir / "summary.json").exists() \
            else "no summary"
        problems, state = harness.endpoint_problems(home, ENDPOINT)
        record.update(status=status, problems=problems, violations=len(sampler.violations),
                      converged=status in ("completed", "rolled_back") and not problems and not sampler.violations,
                      converge_s=round(end - killed.killed_at, 1) if killed.killed_at else None,
                      platform_down_s=round(killed.platform_down_s, 1) if killed.platform_down_s else None)
        dirs = {d for d in (run_dir, final_dir) if d is not None}
        failed = [harness.client_failures(d) for d in dirs]
        record["client"] = {"sent": sum(f["sent"] for f in failed), "failed": sum(f["failed"] for f in failed),
                            "by": _merge([f["by"] for f in failed])}
        if killed.platform_down_s and run_dir is not None:
            outage_end = killed.killed_at + killed.platform_down_s + 5
            outside = [harness.client_failures(run_dir, None, killed.killed_at - 1),
                       harness.client_failures(run_dir, outage_end, None)]
            record["client"]["failed_outside_outage"] = sum(f["failed"] for f in outside)
        else:
            record["client"]["failed_outside_outage"] = record["client"]["failed"]
    except Exception as exc:  # noqa: BLE001 (a rollout that broke the harness did not converge)
        record.update(converged=False, error=f"{type(exc).__name__}: {exc}"[:500])
    finally:
        sampler.stop()
    if not record.get("converged"):  # back to a stable endpoint for the next rollout
        harness.cli(home, "rollout", "rollback", "-n", ENDPOINT, "--reason", "chaos cleanup", check=False)
        harness.cli(home, "rollout", "unlock", "-n", ENDPOINT, "--force", check=False)
        if harness.endpoint_problems(home, ENDPOINT)[0]:  # PROD itself is gone or Failed: start over
            record["recreated_endpoint"] = True
            harness.cli(home, "online-endpoint", "delete", "-n", ENDPOINT, "-y", check=False)
            harness.run_runbook(home, ENDPOINT, None, runs)
    return record


def _merge(counts: list[dict[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            merged[k] = merged.get(k, 0) + v
    return merged


def markdown(result: dict[str, Any]) -> str:
    env, rows, q = result["environment"], result["rollouts"], harness.QUICK
    converged = sum(1 for r in rows if r.get("converged"))
    times = [r["converge_s"] for r in rows if r.get("converge_s") is not None]
    lines = [SECTION, "",
             f"`make bench-chaos` (`bench/chaos.py -n {len(rows)} --seed {result['seed']}`): {len(rows)} rollouts of "
             f"`runbooks/safe_rollout.yaml` (traffic_steps {q['traffic_steps']}, a gate of no server error from the RC in "
             f"two 5 s intervals, {q['gate_window_s']} s gate window, {q['bake_window_s']} s bake, {q['rps']} rps live "
             "traffic), each killed once at a random point: the runner with its kernels and "
             "traffic generator (SIGKILL of the whole process tree; then resumed with `--run-dir` or run afresh, "
             "alternately), or the platform process (SIGKILL, started again 1 s later, the runner going on). "
             f"Measured {env['date']} at commit `{env['commit']}`, {env['cpus']} CPUs shared with other work (load "
             f"average {env['loadavg_at_start'][0]:.1f} at the start, {result['loadavg_at_end'][0]:.1f} at the end).",
             "",
             f"**Converged: {converged} / {len(rows)}** (completed or rolled back, PROD at 100%, tags and lock clear, "
             "no traffic ever sampled on a missing, failed or unready deployment). Time to converge from the kill: "
             + (f"median {statistics.median(times):.0f} s, max {max(times):.0f} s." if times else "-"),
             "",
             "| # | kill | then | status | converged | s to converge | platform down s | client sent | failed | "
             "failed outside the outage |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        client = r.get("client", {})
        lines.append(f"| {i} | {r['kill']} | {r['then']} | {r.get('status', r.get('error', '-'))} | "
                     f"{'yes' if r.get('converged') else 'no'} | {r.get('converge_s', '-')} | "
                     f"{r.get('platform_down_s') or '-'} | {client.get('sent', '-')} | {client.get('failed', '-')} | "
                     f"{client.get('failed_outside_outage', '-')} |")
    lines += ["", result.get("reading", ""), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10, help="rollouts (default 10)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--render-only", action="store_true", help="rewrite the docs section from chaos.json")
    args = parser.parse_args(argv)
    if args.render_only:
        publish.write_section(SECTION, markdown(json.loads(RESULTS.read_text())))
        return 0
    note = "runner, kernels, traffic generator, platform and instances share this machine"
    result: dict[str, Any] = {"environment": publish.environment(note), "seed": args.seed, "rollouts": []}
    rng = random.Random(args.seed)
    home = Path(tempfile.mkdtemp(prefix="chaos-home-", dir=os.environ.get("CHAOS_HOME_DIR")))
    os.chmod(home, 0o700)
    runs = home / "runs"
    started = time.time()
    section = ""
    try:
        harness.cli(home, "local", "start", timeout=180)
        first = harness.run_runbook(home, ENDPOINT, None, runs)
        if first.returncode != 0:
            raise SystemExit(f"the first release failed:\n{first.tail}")
        for i in range(args.n):
            point, then = draw(rng, i)
            record = one_rollout(home, runs, point, then)
            result["rollouts"].append(record)
            print(json.dumps(record), file=sys.stderr, flush=True)
            section = save(result, started, publish_docs=not args.no_docs)  # so far: an interrupted run keeps them
    finally:
        harness.cli(home, "local", "stop", timeout=120, check=False)
    print(section)
    return 0


def save(result: dict[str, Any], started: float, *, publish_docs: bool) -> str:
    result["duration_s"] = round(time.time() - started, 1)
    result["loadavg_at_end"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    section = markdown(result)
    if publish_docs:
        publish.write_section(SECTION, section)
    return section


if __name__ == "__main__":
    sys.exit(main())
