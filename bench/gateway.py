"""Gateway overhead: the same load against the gateway and directly against the instance, side by side.

For an echo scoring script and for the credit model, at concurrency 1 and 8, it sends the same request
bodies through the endpoint's scoring URI (auth, routing, recording, proxying) and straight to the
deployment's `azmlinfsrv` port, alternating rounds so that both see the same machine load. It reports
p50/p99 latency, throughput and the gateway/direct ratios, writes `bench/results/gateway.json` and the
`## Gateway` section of `docs/benchmarks.md`.

    .venv/bin/python bench/gateway.py [--requests 2000] [--rounds 4]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from saferollout import data, training
from saferollout.backends.local.backend import LocalBackend
from saferollout.backends.local.daemon import stop_platform
from saferollout.specs import EndpointSpec, ProbeSettings, RequestSettings, load_deployment_spec

import publish

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gateway.json"
SECTION = "## Gateway"
CONCURRENCY = (1, 8)
TARGET = {"p50_ratio_max": 1.10, "throughput_ratio_min": 0.90}
# Both deployments accept 8 requests per instance, so the gateway forwards the concurrency-8 load as it
# comes instead of queueing it: the comparison is about the hop, not about admission.
SETTINGS = RequestSettings(request_timeout_ms=10_000, max_concurrent_requests_per_instance=8)


def deploy(backend: LocalBackend, model_dir: Path) -> dict[str, dict]:
    """Two endpoints at 100% on one deployment each: echo, and the credit model from the example YAML."""
    targets = {}
    echo = load_deployment_spec(ROOT / "examples" / "credit-risk" / "deployment.yml", name="echo",
                                endpoint_name="bench-echo").with_changes(
        model=None, code_path=str(ROOT / "bench" / "echo"), scoring_script="score.py", environment_variables={})
    credit = load_deployment_spec(ROOT / "examples" / "credit-risk" / "deployment.yml", name="credit",
                                  endpoint_name="bench-credit", model=str(model_dir))
    fast = ProbeSettings(initial_delay=0, period=1, failure_threshold=30)
    for spec in (echo, credit):
        spec = spec.with_changes(request_settings=SETTINGS, readiness_probe=fast)
        backend.create_endpoint(EndpointSpec(name=spec.endpoint_name))
        dep = backend.create_deployment(spec)
        backend.update_endpoint(spec.endpoint_name, traffic={spec.name: 100})
        endpoint = backend.get_endpoint(spec.endpoint_name)
        targets[spec.name] = {
            "gateway": (endpoint.scoring_uri,
                        {"Authorization": f"Bearer {backend.get_credentials(endpoint.name).bearer}"}),
            "direct": (f"http://127.0.0.1:{dep.instances[0]['port']}/score", {}),
        }
    return targets


async def run_load(url: str, headers: dict[str, str], bodies: list[bytes], concurrency: int) -> tuple[list[float], float]:
    """Send every body with `concurrency` workers on keep-alive connections: (latencies in ms, wall seconds)."""
    headers = {**headers, "Content-Type": "application/json"}
    latencies: list[float] = []
    next_index = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            nonlocal next_index
            while next_index < len(bodies):
                body = bodies[next_index]
                next_index += 1
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{url} answered {resp.status}")
                latencies.append((time.perf_counter() - started) * 1000.0)
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - began


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc), to see what the gateway costs per request."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(target: dict, bodies: list[bytes], concurrency: int, n_requests: int, rounds: int,
            platform_pid: int) -> dict:
    """Alternate direct and gateway rounds (after a warm-up of each) and pool their samples."""
    samples = {"direct": ([], 0.0), "gateway": ([], 0.0)}
    gateway_cpu = 0.0
    per_round = max(1, n_requests // rounds)
    for path in ("direct", "gateway"):  # warm-up: connections, caches, the model's first calls
        asyncio.run(run_load(*target[path], bodies[:100], concurrency))
    for r in range(rounds):
        order = ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct")
        for path in order:
            chunk = [bodies[(r * per_round + i) % len(bodies)] for i in range(per_round)]
            cpu_before = cpu_seconds(platform_pid)
            lat, wall = asyncio.run(run_load(*target[path], chunk, concurrency))
            if path == "gateway":
                gateway_cpu += cpu_seconds(platform_pid) - cpu_before
            samples[path] = (samples[path][0] + lat, samples[path][1] + wall)
    out = {}
    for path, (lat, wall) in samples.items():
        out[path] = {"requests": len(lat), "p50_ms": round(float(np.percentile(lat, 50)), 3),
                     "p99_ms": round(float(np.percentile(lat, 99)), 3),
                     "mean_ms": round(statistics.fmean(lat), 3), "throughput_rps": round(len(lat) / wall, 1)}
    g, d = out["gateway"], out["direct"]
    out["ratios"] = {"p50": round(g["p50_ms"] / d["p50_ms"], 3), "p99": round(g["p99_ms"] / d["p99_ms"], 3),
                     "throughput": round(g["throughput_rps"] / d["throughput_rps"], 3)}
    out["added_p50_ms"] = round(g["p50_ms"] - d["p50_ms"], 3)
    out["gateway_cpu_ms_per_request"] = round(gateway_cpu * 1000.0 / g["requests"], 3)
    return out


def bodies_for(name: str, split: data.Split) -> list[bytes]:
    if name == "credit":
        return data.sample_requests(split.X_test, batch_size=1)
    return [json.dumps({"data": [i, i + 1, i + 2]}).encode() for i in range(250)]




def markdown(result: dict) -> str:
    lines = [
        "## Gateway",
        "",
        "Same requests, same client, alternating rounds: through the gateway (auth, routing, recording, "
        "proxying) and straight to the deployment's `azmlinfsrv` port. One instance per deployment, "
        f"`max_concurrent_requests_per_instance: 8`. Run `make bench` (`bench/gateway.py`); raw figures in "
        f"`bench/results/gateway.json`. Run on {result['environment']['date']} at commit "
        f"`{result['environment']['commit']}`, {result['environment']['cpus']} CPUs shared by client, "
        f"gateway and instance, and by other work (load average {result['environment']['loadavg_at_start'][0]:.1f} "
        "at the start): read the ratios more than the milliseconds.",
        "",
        "| model | concurrency | path | p50 ms | p99 ms | throughput req/s | gateway/direct p50 | p99 | throughput "
        "| gateway CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        for path in ("direct", "gateway"):
            row = case[path]
            ratios = case["ratios"] if path == "gateway" else None
            tail = (f"{ratios['p50']:.2f} | {ratios['p99']:.2f} | {ratios['throughput']:.2f} | "
                    f"{case['gateway_cpu_ms_per_request']:.2f}" if ratios else " | | | ")
            lines.append(f"| {case['model']} | {case['concurrency']} | {path} | {row['p50_ms']:.2f} | "
                         f"{row['p99_ms']:.2f} | {row['throughput_rps']:.0f} | {tail} |")
    credit = next(c for c in result["cases"] if c["model"] == "credit" and c["concurrency"] == 1)
    lines += ["", result["verdict"], "",
              f"Where the gap comes from: at concurrency 1 the gateway adds {credit['added_p50_ms']:.1f} ms to the "
              f"credit model's p50 and its process spends {credit['gateway_cpu_ms_per_request']:.2f} ms of CPU per "
              "request: one more loopback HTTP exchange (parse, authorize, route, record, proxy) and a fresh TCP "
              "connection to the instance for every request, because `azmlinfsrv` runs gunicorn's sync worker, "
              "which closes each connection after one answer (the client-to-gateway connection is kept alive). "
              "In a py-spy profile of the gateway the socket calls (connect, send) take the largest share and "
              "our own code (auth, routing, recording) a few percent. Sending the request to the instance in one "
              "HTTP/1.0 write instead of through aiohttp's client cut that half's CPU from 0.51 to 0.32 ms per "
              "request (microbenchmark, same machine). That fixed cost weighs most where the model is fastest: "
              f"here the credit model's direct p50 was {credit['direct']['p50_ms']:.1f} ms. At concurrency 8 one "
              "sync worker is the bottleneck and the gateway's CPU competes with it for the two cores. "
              "The gateway's CPU per request is higher for the credit model than for echo although the code path "
              "is the same: between two requests it sleeps for the model's time and wakes with cold caches (an "
              "echo deployment that sleeps 12 ms in run() cost the gateway 1.56 ms per request against 0.9 ms "
              "without the sleep). Client, gateway and instance share the machine, and ratios move by several "
              "hundredths from run to run (an earlier run at load 4.4 gave, for the credit model, p50 ratios 1.09 "
              "and 1.20 and throughput ratios 0.88 and 0.88 at concurrency 1 and 8).",
              ""]
    return "\n".join(lines)


def verdict(cases: list[dict]) -> str:
    credit = [c for c in cases if c["model"] == "credit"]
    misses = [f"concurrency {c['concurrency']}: p50 ratio {c['ratios']['p50']:.2f}, throughput ratio "
              f"{c['ratios']['throughput']:.2f}" for c in credit
              if c["ratios"]["p50"] > TARGET["p50_ratio_max"] or c["ratios"]["throughput"] < TARGET["throughput_ratio_min"]]
    target = (f"Target for the credit model: gateway/direct p50 ratio <= {TARGET['p50_ratio_max']:.2f} and "
              f"throughput ratio >= {TARGET['throughput_ratio_min']:.2f}.")
    return f"{target} Met." if not misses else f"{target} Missed at " + "; ".join(misses) + "."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per path and case (default 2000)")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds per case (default 8)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--docs-only", action="store_true",
                        help="rewrite the docs section from bench/results/gateway.json without measuring")
    args = parser.parse_args(argv)
    if args.docs_only:
        publish.write_section(SECTION, markdown(json.loads(RESULTS.read_text())))
        return 0
    split = data.split(seed=42)
    with tempfile.TemporaryDirectory(prefix="saferollout-bench-") as tmp:
        home = Path(tmp) / "home"
        model_dir = Path(tmp) / "model"
        training.train("logistic_regression", split).save(model_dir)
        backend = LocalBackend(home)
        try:
            targets = deploy(backend, model_dir)
            platform_pid = json.loads((home / "platform.json").read_text())["pid"]
            note = "client, gateway and instance share this machine; other work on it adds noise"
            result = {"environment": publish.environment(note), "target": TARGET, "cases": []}
            for name, target in targets.items():
                bodies = bodies_for(name, split)
                for concurrency in CONCURRENCY:
                    case = {"model": name, "concurrency": concurrency,
                            **measure(target, bodies, concurrency, args.requests, args.rounds, platform_pid)}
                    result["cases"].append(case)
                    print(f"{name:6s} c={concurrency}: direct p50 {case['direct']['p50_ms']:.2f} ms "
                          f"{case['direct']['throughput_rps']:.0f} rps | gateway p50 {case['gateway']['p50_ms']:.2f} ms "
                          f"{case['gateway']['throughput_rps']:.0f} rps | ratios {case['ratios']} | gateway CPU "
                          f"{case['gateway_cpu_ms_per_request']:.2f} ms/request", flush=True)
        finally:
            stop_platform(home)
    result["verdict"] = verdict(result["cases"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_docs:
        publish.write_section(SECTION, markdown(result))
    print(result["verdict"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
