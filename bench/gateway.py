"""Gateway overhead: the same load against the gateway, against nginx and directly against the instance.

For an echo scoring script and for the credit model, at concurrency 1 and 8, it sends the same request
bodies through the endpoint's scoring URI (auth, routing, recording, proxying), straight to the
deployment's `azmlinfsrv` port, and, when nginx is installed (Debian: `apt-get install nginx-light`),
through an nginx the benchmark starts on loopback (one worker, `proxy_pass` to the instance: the reference
for what a plain reverse proxy costs). Rounds alternate between the paths so that all see the same machine
load. It reports p50/p99 latency, throughput and the ratios to direct, writes `bench/results/gateway.json`
and the `## Gateway` section of `docs/benchmarks.md`.

    .venv/bin/python bench/gateway.py [--requests 2000] [--rounds 4]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import aiohttp
import numpy as np

from saferollout import data, training
from saferollout.backends.local.backend import LocalBackend
from saferollout.backends.local.client import stop_platform
from saferollout.backends.local.instances import SPARE_IDLE_S, free_port
from saferollout.specs import EndpointSpec, ProbeSettings, RequestSettings, load_deployment_spec

import publish

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gateway.json"
SECTION = "## Gateway"
CONCURRENCY = (1, 8)
# Between one path's round and the next, the gateway's connection opened ahead to the instance closes (it holds
# the instance's one sync worker while it waits): without the pause, the first request of a direct or nginx round
# would wait for it, which no caller of a real platform does (only the gateway talks to an instance).
PATH_PAUSE_S = 2 * SPARE_IDLE_S
TARGET = {"p50_ratio_max": 1.05, "throughput_ratio_min": 0.95}
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


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{servers}
}}
"""
NGINX_SERVER = """\
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://127.0.0.1:{upstream}; }}
    }}"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


@contextlib.contextmanager
def nginx_reference(targets: dict[str, dict], workdir: Path) -> Iterator[int | None]:
    """An nginx on loopback, one worker, one `proxy_pass` server per target's instance, added to each target
    as its `nginx` path; yields the worker's pid (None, and no nginx path, when nginx is not installed)."""
    binary = nginx_binary()
    if binary is None:
        print("nginx is not installed (Debian: apt-get install -y nginx-light): no reference path", flush=True)
        yield None
        return
    workdir.mkdir(parents=True, exist_ok=True)
    servers, urls = [], {}
    for name, target in targets.items():
        upstream = int(target["direct"][0].split(":")[2].split("/")[0])
        port = free_port()
        servers.append(NGINX_SERVER.format(port=port, upstream=upstream))
        urls[name] = f"http://127.0.0.1:{port}/score"
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, servers="\n".join(servers)))
    process = subprocess.Popen([binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        worker = _nginx_worker(process, urls)
        for name, url in urls.items():
            targets[name]["nginx"] = (url, {})
        yield worker
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _nginx_worker(process: subprocess.Popen, urls: dict[str, str]) -> int:
    """Wait until nginx answers on every port; the pid of its one worker."""
    import psutil
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}: {process.stderr.read().decode()}")
        children = psutil.Process(process.pid).children()
        if children and all(_listening(url) for url in urls.values()):
            return children[0].pid
        time.sleep(0.1)
    raise RuntimeError("nginx did not start listening within 10 s")


def _listening(url: str) -> bool:
    import socket
    port = int(url.split(":")[2].split("/")[0])
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


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
            proxy_pids: dict[str, int]) -> dict:
    """Rotate the paths' order each round (after a warm-up of each) and pool their samples.

    `proxy_pids` names the process behind each proxy path (gateway: the platform; nginx: its worker), whose
    CPU time per request is recorded.
    """
    paths = [p for p in ("direct", "nginx", "gateway") if p in target]
    samples = {p: ([], 0.0) for p in paths}
    cpu = {p: 0.0 for p in proxy_pids if p in paths}
    per_round = max(1, n_requests // rounds)
    for path in paths:  # warm-up: connections, caches, the model's first calls
        time.sleep(PATH_PAUSE_S)
        asyncio.run(run_load(*target[path], bodies[:100], concurrency))
    for r in range(rounds):
        order = paths[r % len(paths):] + paths[:r % len(paths)]
        if r // len(paths) % 2:
            order.reverse()
        for path in order:
            chunk = [bodies[(r * per_round + i) % len(bodies)] for i in range(per_round)]
            time.sleep(PATH_PAUSE_S)
            cpu_before = cpu_seconds(proxy_pids[path]) if path in cpu else 0.0
            lat, wall = asyncio.run(run_load(*target[path], chunk, concurrency))
            if path in cpu:
                cpu[path] += cpu_seconds(proxy_pids[path]) - cpu_before
            samples[path] = (samples[path][0] + lat, samples[path][1] + wall)
    out: dict = {}
    for path, (lat, wall) in samples.items():
        out[path] = {"requests": len(lat), "p50_ms": round(float(np.percentile(lat, 50)), 3),
                     "p99_ms": round(float(np.percentile(lat, 99)), 3),
                     "mean_ms": round(statistics.fmean(lat), 3), "throughput_rps": round(len(lat) / wall, 1)}
        if path in cpu:
            out[path]["cpu_ms_per_request"] = round(cpu[path] * 1000.0 / len(lat), 3)
    d = out["direct"]
    for path in paths[1:]:
        g = out[path]
        g["ratios"] = {"p50": round(g["p50_ms"] / d["p50_ms"], 3), "p99": round(g["p99_ms"] / d["p99_ms"], 3),
                       "throughput": round(g["throughput_rps"] / d["throughput_rps"], 3)}
        g["added_p50_ms"] = round(g["p50_ms"] - d["p50_ms"], 3)
    return out


def bodies_for(name: str, split: data.Split) -> list[bytes]:
    if name == "credit":
        return data.sample_requests(split.X_test, batch_size=1)
    return [json.dumps({"data": [i, i + 1, i + 2]}).encode() for i in range(250)]




def _ratio(ratios: dict, spread: dict | None, key: str) -> str:
    """A median ratio, with its range over the repeats when there were several."""
    low, high = spread[key] if spread else (ratios[key], ratios[key])
    return f"{ratios[key]:.2f}" if low == high else f"{ratios[key]:.2f} ({low:.2f}-{high:.2f})"


def markdown(result: dict) -> str:
    env = result["environment"]
    nginx = any("nginx" in case for case in result["cases"])
    lines = [
        "## Gateway",
        "",
        "Same requests, same client, rounds rotating between the paths: straight to the deployment's "
        "`azmlinfsrv` port (direct), "
        + ("through nginx (one worker, `proxy_pass` to the instance, started on loopback by the benchmark: "
           "the reference for a plain reverse proxy), " if nginx else "")
        + "and through the gateway (key auth, weighted routing, the deployment header, per-request metrics "
        "recording, timeouts and admission all on). One instance per deployment, "
        "`max_concurrent_requests_per_instance: 8`. Run `make bench` (`bench/gateway.py`); raw figures in "
        f"`bench/results/gateway.json`. Run on {env['date']} at commit `{env['commit']}`, {env['cpus']} CPUs "
        f"shared by client, proxies and instance (load average {env['loadavg_at_start'][0]:.2f} at the start"
        + (f", {env['loadavg_at_end'][0]:.2f} at the end" if "loadavg_at_end" in env else "") + "). "
        + (f"{len(result['repeats'])} repeats, each on a new platform and nginx (where the scheduler places "
           "client, proxy and instance on the two cores stays for a platform's life and moves a ratio by several "
           "hundredths): each figure is the median over the repeats, each ratio the median of the repeats' "
           "ratios with their range in brackets. " if len(result.get("repeats", [])) > 1 else "")
        + "Read the ratios more than the milliseconds.",
        "",
        "| model | concurrency | path | p50 ms | p99 ms | throughput req/s | p50 / direct | p99 / direct "
        "| throughput / direct | proxy CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        for path in ("direct", "nginx", "gateway"):
            if path not in case:
                continue
            row = case[path]
            ratios, spread = row.get("ratios"), row.get("ratio_range")
            tail = (f"{_ratio(ratios, spread, 'p50')} | {_ratio(ratios, spread, 'p99')} | "
                    f"{_ratio(ratios, spread, 'throughput')} | {row['cpu_ms_per_request']:.2f}" if ratios
                    else " | | | ")
            lines.append(f"| {case['model']} | {case['concurrency']} | {path} | {row['p50_ms']:.2f} | "
                         f"{row['p99_ms']:.2f} | {row['throughput_rps']:.0f} | {tail} |")
    lines += ["", result["verdict"], "", FINDINGS, ""]
    return "\n".join(lines)


# What the profiles and experiments showed (2026-12-02 and -03, quiet 2-core machine, load average 0-1.2); kept
# beside the code that measures it.
FINDINGS = (
    "What the gateway does per request: the client's connection to the gateway is kept alive; `azmlinfsrv` runs "
    "gunicorn's sync worker, which closes each connection after one answer (keep-alive would need another "
    "gunicorn worker class, which changes how the scoring script runs compared with Azure), so each request "
    "needs a new connection to the instance. Since commit `2a74b5e` the gateway opens it ahead: when a request "
    "takes a connection, the one for the next request is opened at once (while the model computes), so the next "
    "request finds it connected and already accepted by the worker, and writes to it straight away "
    "(`Instance._exchange`; every request the platform sends the instance goes this way, and one left unused "
    "for 0.2 s is closed, freeing the worker; the benchmark pauses 0.4 s between paths so that direct and nginx "
    "never wait on it). The same benchmark the morning of that change, at commit `c135c2e` (3 repeats, load "
    "average 0.7-1.2), where the gateway connected for every request as nginx's `proxy_pass` does: credit c=1 "
    "p50 ratio 1.06 (1.04-1.07), throughput 0.96 (0.94-0.97), 0.74 ms of platform CPU per request; echo c=1 "
    "1.15 (1.07-1.20); concurrency 8 within the target. With it, credit c=1 meets the target in the median: "
    "1.03 (0.90-1.09) and throughput 1.03 in 3 repeats at commit `2a74b5e`, and in the table (5 repeats, at a "
    "moment the machine was slower: direct's p50 9.4 ms against 6.5) 1.00 with two repeats of five above 1.05 "
    "(1.07 and 1.14). The placement of client, gateway and instance on the two cores moves that ratio by as much "
    "as the change did: nginx's own c=1 ratio ranged 0.86-1.01 and 0.91-1.05 in the same runs. "
    "Earlier steps: uvloop, a bare protocol with httptools for the hop to the instance, and since commit "
    "`92884b7` the gateway's own HTTP/1.1 server facing clients (`backends/local/http_server.py`) instead of "
    "aiohttp's (at commit `707ee89` credit c=1 was 1.20 at 0.93 ms of CPU per request). A proxy of some forty "
    "lines (`bench/thin_proxy.py`: httptools, uvloop and a new connection per request, no auth, routing, "
    "recording or timeouts), measured on 2026-12-02 interleaved with direct on the credit model at c=1 in six "
    "runs, gave p50 ratios 0.93 to 1.16, the gateway in the same runs 1.00 to 1.26. A profile "
    "of the platform at credit c=1 (py-spy with native frames, 2026-12-02, 3,000 requests, before opening "
    "ahead) found no hot spot in our code: system calls about a quarter (`write` 7.7%, `epoll_pwait` 6.9%, "
    "`connect` 2.8%, `socket` 1.8%), llhttp's parsing 14%, the rest spread over asyncio's tasks, futures and "
    "callbacks, no function of ours above 1% of its own. Scoring through a unix socket to the instance instead "
    "of loopback TCP left the CPU per request where it was, so it was not kept. The gateway costs 2-3 times "
    "nginx's CPU per request, which at concurrency 8 on two shared cores it can afford; the platform idle costs "
    "4 ms of CPU per second (supervision, sampling, the log writer)."
)


def verdict(cases: list[dict]) -> str:
    credit = [c for c in cases if c["model"] == "credit"]
    misses = [f"concurrency {c['concurrency']}: p50 ratio {c['gateway']['ratios']['p50']:.2f}, throughput ratio "
              f"{c['gateway']['ratios']['throughput']:.2f}" for c in credit
              if c["gateway"]["ratios"]["p50"] > TARGET["p50_ratio_max"]
              or c["gateway"]["ratios"]["throughput"] < TARGET["throughput_ratio_min"]]
    if not credit:
        return "The credit model was not measured: no verdict on the target."
    target = (f"Target for the credit model: gateway/direct p50 ratio <= {TARGET['p50_ratio_max']:.2f} and "
              f"throughput ratio >= {TARGET['throughput_ratio_min']:.2f} at concurrency 1 and 8.")
    return f"{target} Met." if not misses else f"{target} Missed at " + "; ".join(misses) + "."


def measure_once(args: argparse.Namespace, split: data.Split) -> list[dict]:
    """One platform, one nginx, every case: where the scheduler puts client, proxies and instance on the cores
    is fixed for a platform's life and moves a ratio by several hundredths, so the run is repeated."""
    cases = []
    with tempfile.TemporaryDirectory(prefix="saferollout-bench-") as tmp:
        home = Path(tmp) / "home"
        model_dir = Path(tmp) / "model"
        training.train("logistic_regression", split).save(model_dir)
        backend = LocalBackend(home)
        try:
            targets = deploy(backend, model_dir)
            pids = {"gateway": json.loads((home / "platform.json").read_text())["pid"]}
            with nginx_reference(targets, Path(tmp) / "nginx") as nginx_worker:
                if nginx_worker:
                    pids["nginx"] = nginx_worker
                for name, target in targets.items():
                    if args.models and name not in args.models:
                        continue
                    bodies = bodies_for(name, split)
                    for concurrency in CONCURRENCY:
                        case = {"model": name, "concurrency": concurrency,
                                **measure(target, bodies, concurrency, args.requests, args.rounds, pids)}
                        cases.append(case)
                        print(f"{name:6s} c={concurrency}: " + " | ".join(
                            f"{path} p50 {case[path]['p50_ms']:.2f} ms {case[path]['throughput_rps']:.0f} rps"
                            + (f" ratios {case[path]['ratios']} CPU {case[path]['cpu_ms_per_request']:.2f} ms/req"
                               if "ratios" in case[path] else "")
                            for path in ("direct", "nginx", "gateway") if path in case), flush=True)
        finally:
            stop_platform(home)
    return cases


def combine(repeats: list[list[dict]]) -> list[dict]:
    """Per case and path, the median over the repeats of each figure and of each ratio, with the ratios' range."""
    combined = []
    for runs in zip(*repeats):
        case = {"model": runs[0]["model"], "concurrency": runs[0]["concurrency"]}
        for path in ("direct", "nginx", "gateway"):
            if path not in runs[0]:
                continue
            rows = [run[path] for run in runs]
            row = {key: round(statistics.median(r[key] for r in rows), 3)
                   for key in ("p50_ms", "p99_ms", "throughput_rps", "cpu_ms_per_request") if key in rows[0]}
            row["requests"] = sum(r["requests"] for r in rows)
            if "ratios" in rows[0]:
                row["ratios"] = {k: round(statistics.median(r["ratios"][k] for r in rows), 3)
                                 for k in rows[0]["ratios"]}
                row["ratio_range"] = {k: [min(r["ratios"][k] for r in rows), max(r["ratios"][k] for r in rows)]
                                      for k in rows[0]["ratios"]}
            case[path] = row
        combined.append(case)
    return combined


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per path, case and repeat (default 2000)")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds per case (default 8)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="whole runs, each on a new platform; the figures are their medians (default 3)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--models", nargs="*", choices=("echo", "credit"),
                        help="measure only these models (default both; a partial run is not published)")
    parser.add_argument("--docs-only", action="store_true",
                        help="rewrite the docs section from bench/results/gateway.json without measuring")
    args = parser.parse_args(argv)
    if args.docs_only:
        publish.write_section(SECTION, markdown(json.loads(RESULTS.read_text())))
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    split = data.split(seed=42)
    note = "client, proxies and instance share this machine; other work on it adds noise"
    result: dict = {"environment": publish.environment(note), "target": TARGET}
    repeats = []
    for repeat in range(args.repeats):
        print(f"-- repeat {repeat + 1} of {args.repeats} (load average {os.getloadavg()[0]:.2f})", flush=True)
        repeats.append(measure_once(args, split))
    result["environment"]["loadavg_at_end"] = os.getloadavg()
    result["cases"] = combine(repeats)
    result["repeats"] = repeats
    result["verdict"] = verdict(result["cases"])
    if args.models:
        print(result["verdict"])
        return 0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_docs:
        publish.write_section(SECTION, markdown(result))
    print(result["verdict"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
