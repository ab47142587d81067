"""How fast and how often each gate kind is right, on simulated request streams at the runbook's defaults.

Streams (simulated time): Poisson arrivals at 20 rps (the runbook's `rps`), each request routed to the RC
with probability 10% (its first traffic step), as the gateway's weighted random routing does. Errors are
Bernoulli (PROD 0.5%); latency is log-normal (median 50 ms, sigma 0.5) with a tail (2% of requests 3-6x
slower). A gate step looks every 2 s (`poll_s`) for at most 180 s (`gate_window_s`).

Scenarios: PROD's distribution; healthy releases that differ a little (latency x1.05/x1.10/x1.20, a
warm-up: 1.5x slower for its first 30 s, errors +0.2/+0.5 points, a time-varying load that moves both
deployments); regressions (errors +2/+5 points, p90 +30%/+50%) and a model flipping 10% of its decisions.
A healthy release that is not passed is rolled back: "rolled back" = fail + undecided at the window's end.

Kinds, each as a gate step runs it (an errors gate and a latency gate, the first fail ends the step):
- threshold (seed): the seed's 5 one-minute intervals (decides at 300 s, its own window of 420 s);
- compare: decided once at 200 RC samples;
- sequential: ours, with the defaults of `SequentialGate`;
- savvi: the PyPI package `savvi` (Lindon, Sanden & Shirikian 2022): its `Multinomial` count test on the
  errors and on the requests slower than PROD's calibrated p90, per deployment against the routing
  probabilities; a rejection with more events on the RC than its share fails the step. It has no pass side,
  so it passes at the window's end when it never rejected (the same rule our gate keeps);
- ml_agreement: n held-out rows through the deployment header at the first look.
The gates' own decision functions are fed the simulated samples directly (the fast path); a check at the
start runs a few streams through the real `run_gates` and `Gate.check` and asserts the same decisions
at the same times.

Writes `bench/results/gates.json`, `bench/results/gates.png` and the `## Gates` section of
`docs/benchmarks.md`.

    .venv/bin/python bench/gates.py [--healthy-runs 1000] [--regression-runs 300] [--no-docs]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "bench"))  # for publish, also when the tests load this file by path

from saferollout.backends.base import Endpoint, RequestSample  # noqa: E402
from saferollout.gates import run_gates  # noqa: E402
from saferollout.gates.compare import CompareGate, compare_errors, compare_latency  # noqa: E402
from saferollout.gates.ml import judge_agreement  # noqa: E402
from saferollout.gates.sequential import SequentialGate, error_statistics, latency_statistics  # noqa: E402
from saferollout.gates.threshold import judge_intervals  # noqa: E402

import publish  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "gates.json"
PLOT = ROOT / "bench" / "results" / "gates.png"
SECTION = "## Gates"

RPS, RC_SHARE, WINDOW_S, POLL_S = 20.0, 0.10, 180.0, 2.0  # the runbook's rps, first step, gate_window_s, poll_s
SEED_WINDOW_S, SEED_SCHEDULE_S = 420.0, 300.0  # the seed preset: 5 one-minute intervals, decided at 5 minutes
PROD_ERROR_RATE, MEDIAN_MS, SIGMA, TAIL_SHARE, TAIL_FACTOR = 0.005, 50.0, 0.5, 0.02, (3.0, 6.0)
LOAD_PERIOD_S, LOAD_SWING = 60.0, 0.5  # time-varying load: rps x (1 +- 0.5), latency and errors follow


@dataclass(frozen=True)
class Scenario:
    rc_error_rate: float = PROD_ERROR_RATE
    rc_scale: float = 1.0  # every RC latency multiplied by this
    warmup: tuple[float, float] = (1.0, 0.0)  # (factor, seconds): the RC this much slower for its first seconds
    varying_load: bool = False
    flip: float = 0.0  # share of RC decisions flipped
    healthy: bool = True  # within the gates' tolerance: should pass


SCENARIOS: dict[str, Scenario] = {
    "PROD's distribution": Scenario(),
    "latency x1.05": Scenario(rc_scale=1.05),
    "latency x1.10": Scenario(rc_scale=1.10),
    "latency x1.20": Scenario(rc_scale=1.20),
    "warm-up 1.5x for 30 s": Scenario(warmup=(1.5, 30.0)),
    "errors +0.2 pts": Scenario(rc_error_rate=PROD_ERROR_RATE + 0.002),
    "errors +0.5 pts": Scenario(rc_error_rate=PROD_ERROR_RATE + 0.005),
    "time-varying load": Scenario(varying_load=True),
    "errors +2 pts": Scenario(rc_error_rate=PROD_ERROR_RATE + 0.02, healthy=False),
    "errors +5 pts": Scenario(rc_error_rate=PROD_ERROR_RATE + 0.05, healthy=False),
    "p90 +30%": Scenario(rc_scale=1.3, healthy=False),
    "p90 +50%": Scenario(rc_scale=1.5, healthy=False),
    "flip 10%": Scenario(flip=0.10, healthy=False),
}

# The seed's thresholds, which the seed leaves to the user: set so that a healthy RC is rarely rolled back.
THRESHOLD = {"errors": {"threshold": 5.0, "condition": "lte", "intervals": 5},
             "latency": {"threshold": 150.0, "condition": "lte", "intervals": 5}}
COMPARE = CompareGate()
COMPARE_LATENCY = CompareGate(metric="latency")
SEQUENTIAL = SequentialGate(metric="errors", max_duration_s=WINDOW_S)
SEQUENTIAL_LATENCY = SequentialGate(metric="latency", max_duration_s=WINDOW_S)
SAVVI = {"alpha": 0.01, "k": 100.0, "quantile": 0.9, "calibration": 200}
AGREEMENT = {"n": 100, "min_agreement": 0.95, "distance": "psi", "max_distance": 0.2}


@dataclass
class Stream:
    """One simulated window: per request its arrival time, deployment, error flag and latency."""

    ts: np.ndarray
    rc: np.ndarray
    error: np.ndarray
    ms: np.ndarray
    flip: float

    @classmethod
    def simulate(cls, rng: np.random.Generator, sc: Scenario, horizon: float = SEED_WINDOW_S) -> "Stream":
        peak = 1 + LOAD_SWING if sc.varying_load else 1.0
        n = rng.poisson(RPS * peak * horizon)
        ts = np.sort(rng.uniform(0, horizon, n))
        load = 1 + LOAD_SWING * np.sin(2 * np.pi * ts / LOAD_PERIOD_S) if sc.varying_load else np.ones(n)
        keep = rng.random(n) < load / peak  # thinning: arrivals follow the load
        ts, load = ts[keep], load[keep]
        n = ts.size
        rc = rng.random(n) < RC_SHARE
        error = rng.random(n) < np.where(rc, sc.rc_error_rate, PROD_ERROR_RATE) * load
        ms = rng.lognormal(np.log(MEDIAN_MS), SIGMA, n) * load  # a busier server answers more slowly
        tail = rng.random(n) < TAIL_SHARE
        ms[tail] *= rng.uniform(*TAIL_FACTOR, tail.sum())
        ms[rc] *= sc.rc_scale
        factor, seconds = sc.warmup
        ms[rc & (ts < seconds)] *= factor
        return cls(ts, rc, error, ms, sc.flip)


# ---- each kind's gates on a stream: (decision, seconds) per gate --------------------------------------

def looks(window: float = WINDOW_S) -> np.ndarray:
    return np.arange(POLL_S, window + POLL_S / 2, POLL_S)


def threshold_gates(s: Stream) -> list[tuple[str, float]]:
    minutes = np.arange(0, SEED_WINDOW_S + 1, 60)
    rc_errors = np.histogram(s.ts[s.rc & s.error], minutes)[0].astype(float)
    ok = s.rc & ~s.error
    bucket = np.digitize(s.ts[ok], minutes) - 1
    p90 = [float(np.quantile(s.ms[ok][bucket == m], 0.9)) if np.any(bucket == m) else None
           for m in range(len(minutes) - 1)]
    return [_first_interval_decision(list(rc_errors), THRESHOLD["errors"]),
            _first_interval_decision(p90, THRESHOLD["latency"])]


def _first_interval_decision(values: list, settings: dict) -> tuple[str, float]:
    for m in range(1, len(values) + 1):  # a minute's value is known when the minute ends
        decision, _, _ = judge_intervals(values[:m], **settings)
        if decision != "inconclusive":
            return decision, 60.0 * m
    return "none", SEED_WINDOW_S


def compare_gates(s: Stream) -> list[tuple[str, float]]:
    rc_count, prod_count = np.cumsum(s.rc), np.cumsum(~s.rc)
    need = COMPARE.min_samples
    ready = np.flatnonzero((rc_count >= need) & (prod_count >= need))
    t = looks()
    if ready.size == 0 or s.ts[ready[0]] > t[-1]:
        return [("none", WINDOW_S), ("none", WINDOW_S)]
    at = t[np.searchsorted(t, s.ts[ready[0]])]  # the first look that sees enough samples
    seen = s.ts <= at
    rc, prod = seen & s.rc, seen & ~s.rc
    errors = compare_errors(int(rc.sum()), int((rc & s.error).sum()), int(prod.sum()), int((prod & s.error).sum()),
                            tolerance_points=COMPARE.tolerance, alpha=COMPARE.alpha)[0]
    warm = seen & ~s.error & (s.ts >= COMPARE_LATENCY.warmup_s)
    latency = compare_latency(s.ms[warm & s.rc], s.ms[warm & ~s.rc], quantile=COMPARE_LATENCY.quantile,
                              tolerance_ratio=COMPARE_LATENCY.tolerance, alpha=COMPARE_LATENCY.alpha)[0]
    return [(errors, at), (latency, at)]


def sequential_gates(s: Stream, g: SequentialGate = SEQUENTIAL,
                     g_latency: SequentialGate = SEQUENTIAL_LATENCY) -> list[tuple[str, float]]:
    t = looks(g.max_duration_s)
    idx = np.searchsorted(s.ts, t, side="right")
    n_rc, x_rc = np.cumsum(s.rc)[idx - 1], np.cumsum(s.rc & s.error)[idx - 1]
    n_prod, x_prod = np.cumsum(~s.rc)[idx - 1], np.cumsum(~s.rc & s.error)[idx - 1]
    st = error_statistics(n_rc, x_rc, n_prod, x_prod, rho=RC_SHARE, tolerance_points=g.tolerance,
                          tolerance_ratio=g.tolerance_ratio, margin_points=g.margin, alpha=g.alpha, beta=g.beta)
    enough = (n_rc >= g.min_samples) & (n_prod >= g.min_samples)
    final = (t >= g.max_duration_s) & (g.undecided == "pass")
    errors = _first(t, enough & (st["fail"] | (final & st["end_fail"])), enough & (st["pass"] | final))
    return [errors, _sequential_latency(s, g_latency)]


def _sequential_latency(s: Stream, g: SequentialGate) -> tuple[str, float]:
    ok = ~s.error
    rc_ts, rc_ms, prod_ts, prod_ms = s.ts[ok & s.rc], s.ms[ok & s.rc], s.ts[ok & ~s.rc], s.ms[ok & ~s.rc]
    for at in looks(g.max_duration_s):
        if at < g.warmup_s:
            continue
        a, b = np.searchsorted(rc_ts, at, side="right"), np.searchsorted(prod_ts, at, side="right")
        if a < g.min_samples or b < g.min_samples:
            continue
        st = latency_statistics(rc_ts[:a], rc_ms[:a], prod_ts[:b], prod_ms[:b], rho=RC_SHARE, quantile=g.quantile,
                                fail_quantiles=tuple(g.fail_quantiles), tolerance_ratio=g.tolerance,
                                tolerance_ms=g.tolerance_ms, margin_ratio=g.margin, alpha=g.alpha, beta=g.beta,
                                calibration=g.calibration_samples, warm_after=g.warmup_s)
        final = at >= g.max_duration_s and g.undecided == "pass" and st["calibrated"]
        if st["fail"] or (final and st["end_fail"]):
            return "fail", float(at)
        if st["pass"] or final:
            return "pass", float(at)
    return "none", g.max_duration_s


def savvi_gates(s: Stream) -> list[tuple[str, float]]:
    """savvi's Multinomial count test on error events and on slow requests, fed each look's new events."""
    from savvi.multinomial import Multinomial

    theta0 = np.array([RC_SHARE, 1 - RC_SHARE])
    t = looks()
    ok = ~s.error
    prod_ok = np.flatnonzero(ok & ~s.rc)
    calibration = SAVVI["calibration"]
    slow_ms = float(np.quantile(s.ms[prod_ok[:calibration]], SAVVI["quantile"]))
    cut = s.ts[prod_ok[calibration - 1]]
    slow = ok & (s.ts > cut) & (s.ms > slow_ms)
    out = []
    for events in (s.error, slow):
        test = Multinomial(SAVVI["alpha"], theta0, k=SAVVI["k"])
        decision, at, seen = "pass", WINDOW_S, 0
        for look in t:
            upto = np.searchsorted(s.ts, look, side="right")
            new = np.flatnonzero(events[seen:upto]) + seen
            seen = upto
            if new.size:
                test.update(np.array([int(s.rc[new].sum()), int((~s.rc[new]).sum())]))
            counts = test.counts
            if 1 / test.odds <= SAVVI["alpha"] and counts[0] / max(counts.sum(), 1) > RC_SHARE:
                decision, at = "fail", float(look)
                break
        out.append((decision, at))
    return out


def agreement_gate(s: Stream, rng: np.random.Generator) -> list[tuple[str, float]]:
    """Header source: n held-out rows scored by both at the first look (scores are deterministic)."""
    prod_prob = rng.beta(2.0, 2.0, AGREEMENT["n"])
    flipped = rng.random(AGREEMENT["n"]) < s.flip
    rc_prob = np.where(flipped, 1.0 - prod_prob, prod_prob)
    decision = judge_agreement(rc_prob >= 0.5, prod_prob >= 0.5, rc_prob, prod_prob,
                               min_agreement=AGREEMENT["min_agreement"], distance=AGREEMENT["distance"],
                               max_distance=AGREEMENT["max_distance"])[0]
    return [(decision, POLL_S)]


def _first(t: np.ndarray, fail: np.ndarray, passed: np.ndarray) -> tuple[str, float]:
    decided = np.flatnonzero(fail | passed)
    if decided.size == 0:
        return "none", float(t[-1])
    i = decided[0]
    return ("fail" if fail[i] else "pass"), float(t[i])


def step(results: list[tuple[str, float]]) -> tuple[str, float]:
    """A gate step: the first fail ends it; all passes pass it at the last pass; otherwise it times out."""
    fails = [t for d, t in results if d == "fail"]
    if fails:
        return "fail", min(fails)
    if all(d == "pass" for d, _ in results):
        return "pass", max(t for _, t in results)
    return "timeout", max(t for _, t in results)


KINDS: dict[str, Callable[..., list[tuple[str, float]]]] = {
    "threshold (seed)": lambda s, rng: threshold_gates(s),
    "compare": lambda s, rng: compare_gates(s),
    "sequential": lambda s, rng: sequential_gates(s),
    "savvi (Lindon et al.)": lambda s, rng: savvi_gates(s),
    "ml_agreement": agreement_gate,
}


# ---- the check that the fast path is the gates' path ------------------------------------------------------

class StreamBackend:
    """A Backend double serving one simulated stream's requests as raw samples, RC `green` at 10%."""

    name, supports_raw_samples = "simulated", True

    def __init__(self, s: Stream, t0: float):
        self.s, self.t0 = s, t0

    def get_endpoint(self, name: str) -> Endpoint:
        rc = round(RC_SHARE * 100)
        return Endpoint(name, "key", "", traffic={"green": rc, "blue": 100 - rc})

    def request_samples(self, endpoint, *, deployment=None, start=None, end=None, include_mirrored=False):
        lo, hi = start.timestamp() - self.t0, end.timestamp() - self.t0
        keep = (self.s.ts >= lo) & (self.s.ts <= hi) & (self.s.rc == (deployment == "green"))
        return [RequestSample(self.t0 + t, endpoint, deployment, 500 if e else 200, float(m))
                for t, e, m in zip(self.s.ts[keep], self.s.error[keep], self.s.ms[keep])]


def check_fast_path(runs: int = 6) -> dict[str, Any]:
    """Run a few streams through run_gates + Gate.check and compare with the fast path."""
    rng = np.random.default_rng(7)
    checked = 0
    for scenario in ("PROD's distribution", "errors +5 pts", "p90 +50%"):
        for _ in range(runs // 3):
            s = Stream.simulate(rng, SCENARIOS[scenario], horizon=WINDOW_S + 10)
            t0 = 1_800_000_000.0
            clock = [t0]
            report = run_gates([SequentialGate(metric="errors", max_duration_s=WINDOW_S),
                                SequentialGate(metric="latency", max_duration_s=WINDOW_S)],
                               StreamBackend(s, t0), "sim", "green", "blue", start=t0, poll_s=POLL_S,
                               clock=lambda: clock[0], sleep=lambda d: clock.__setitem__(0, clock[0] + d))
            fast = step(sequential_gates(s))
            if fast[0] == "timeout":
                fast = ("fail", fast[1])
            full = (report.decision, report.ended_at - t0)
            assert fast == full, f"{scenario}: fast path {fast} != run_gates {full}"
            checked += 1
    return {"runs": checked, "kind": "sequential", "identical": True}


# ---- the benchmark ---------------------------------------------------------------------------------------

def summarise(outcomes: list[tuple[str, float]], healthy: bool) -> dict[str, Any]:
    decisions = np.array([d for d, _ in outcomes])
    times = np.array([t for _, t in outcomes])
    n = len(outcomes)
    summary: dict[str, Any] = {"runs": n, "pass": float(np.mean(decisions == "pass")),
                               "fail": float(np.mean(decisions == "fail")),
                               "timeout": float(np.mean(decisions == "timeout"))}
    if healthy:  # undecided at the window's end is a rollback too: the RC did not get through
        summary["rolled_back"] = summary["fail"] + summary["timeout"]
        decided = times[decisions == "pass"]
    else:
        summary["missed"] = summary["pass"]
        summary["detected_by_evidence"] = summary["fail"]
        decided = times[decisions != "pass"]  # detected: failed by evidence or at the limit
    key = "time_to_pass_s" if healthy else "time_to_detect_s"
    summary[key] = ({"median": float(np.median(decided)), "p90": float(np.percentile(decided, 90))}
                    if decided.size else None)
    return summary


def run(healthy_runs: int, regression_runs: int, seed: int = 2026) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    results: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
    timings = {}
    for name, sc in SCENARIOS.items():
        runs = healthy_runs if name == "PROD's distribution" else regression_runs
        started = time.perf_counter()
        outcomes: dict[str, list] = {kind: [] for kind in KINDS}
        for _ in range(runs):
            s = Stream.simulate(rng, sc)
            for kind, gates in KINDS.items():
                outcomes[kind].append(step(gates(s, rng)))
        for kind in KINDS:
            results[kind][name] = summarise(outcomes[kind], sc.healthy)
        timings[name] = round(time.perf_counter() - started, 1)
        print(f"{name}: {runs} runs in {timings[name]}s", file=sys.stderr)
    return {"results": results, "simulation_seconds": timings}


def _median(r: dict[str, Any], key: str) -> float | None:
    value = r.get(key)
    return value["median"] if value else None


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets for the sequential gate (ours), each with the figure it is judged on."""
    seq = results["sequential"]
    healthy = {name: seq[name]["rolled_back"] for name, sc in SCENARIOS.items() if sc.healthy}
    out: dict[str, Any] = {"healthy rolled back at most 1%": {"figures": healthy,
                                                             "met": all(v <= 0.01 for v in healthy.values())}}
    for name, limit in (("errors +5 pts", 60.0), ("p90 +50%", 90.0)):
        r = seq[name]
        median = _median(r, "time_to_detect_s")
        out[f"{name} detected in 99%, median at most {limit:g} s"] = {
            "detected": r["detected_by_evidence"], "median_s": median,
            "met": bool(r["detected_by_evidence"] >= 0.99 and median is not None and median <= limit)}
    median = _median(seq["PROD's distribution"], "time_to_pass_s")
    out["healthy passes in a median of at most 100 s"] = {"median_s": median,
                                                          "met": bool(median is not None and median <= 100)}
    return out


def settings() -> dict[str, Any]:
    return {"stream": {"rps": RPS, "rc_share": RC_SHARE, "prod_error_rate": PROD_ERROR_RATE,
                       "latency": f"lognormal(median {MEDIAN_MS:g} ms, sigma {SIGMA:g}) with {TAIL_SHARE:.0%} of "
                                  f"requests {TAIL_FACTOR[0]:g}-{TAIL_FACTOR[1]:g}x slower",
                       "poll_s": POLL_S, "gate_window_s": WINDOW_S, "seed_window_s": SEED_WINDOW_S,
                       "varying_load": {"period_s": LOAD_PERIOD_S, "swing": LOAD_SWING}},
            "threshold (seed)": THRESHOLD, "compare": [COMPARE.settings(), COMPARE_LATENCY.settings()],
            "sequential": [SEQUENTIAL.settings(), SEQUENTIAL_LATENCY.settings()], "savvi": SAVVI,
            "ml_agreement": AGREEMENT,
            "scenarios": {k: {"rc_error_rate": v.rc_error_rate, "rc_latency_scale": v.rc_scale,
                              "warmup": list(v.warmup), "varying_load": v.varying_load, "rc_flipped_share": v.flip,
                              "healthy": v.healthy} for k, v in SCENARIOS.items()}}


# ---- reporting ---------------------------------------------------------------------------------------------

def plot(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(SCENARIOS)
    kinds = [k for k in results if k != "ml_agreement"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    width = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        x = np.arange(len(names)) + (k - (len(kinds) - 1) / 2) * width
        wrong = [results[kind][n]["rolled_back"] if SCENARIOS[n].healthy else results[kind][n]["missed"]
                 for n in names]
        medians = []
        for n in names:
            r = results[kind][n]
            value = r.get("time_to_pass_s" if SCENARIOS[n].healthy else "time_to_detect_s")
            medians.append(value["median"] if value else np.nan)
        top.bar(x, np.array(wrong) * 100, width, label=kind)
        bottom.bar(x, medians, width, label=kind)
    top.axhline(1, color="grey", linestyle="--", linewidth=1)
    top.set_ylabel("% wrong\n(healthy: rolled back;\nregression: passed)")
    top.set_title("Gate kinds at the runbook's defaults (20 rps, RC 10%, a look every 2 s, 180 s window)")
    top.legend(fontsize=8, ncol=len(kinds))
    bottom.axhline(SEED_SCHEDULE_S, color="grey", linestyle="--", linewidth=1)
    bottom.set_ylabel("median seconds to\npass (healthy) / detect")
    bottom.set_xticks(np.arange(len(names)))
    bottom.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def _cell(r: dict[str, Any], healthy: bool) -> str:
    if healthy:
        t = r["time_to_pass_s"]
        times = f"{t['median']:.0f} s" if t else "never passes"
        return f"{r['rolled_back']:.1%} ({times})"
    t = r["time_to_detect_s"]
    times = f"{t['median']:.0f} s" if t and r["missed"] <= 0.9 else "-"
    return f"{1 - r['missed']:.0%} ({times})"


def section(data: dict[str, Any]) -> str:
    env, results, goals = data["environment"], data["results"], data["targets"]
    healthy = [n for n, sc in SCENARIOS.items() if sc.healthy]
    regressions = [n for n, sc in SCENARIOS.items() if not sc.healthy]
    lines = [SECTION, "",
             f"Gate kinds on simulated request streams at the runbook's defaults (`bench/gates.py`, raw figures in "
             f"`bench/results/gates.json`, plot `bench/results/gates.png`), run on {env['date']} at commit "
             f"`{env['commit']}` (simulated time: the machine's load does not matter). {RPS:g} rps, RC at "
             f"{RC_SHARE:.0%}, PROD errors {PROD_ERROR_RATE:.1%}, latency log-normal (median {MEDIAN_MS:g} ms) with a "
             f"{TAIL_SHARE:.0%} tail; a look every {POLL_S:g} s for at most {WINDOW_S:g} s (the seed's threshold "
             f"gates: five one-minute intervals in {SEED_WINDOW_S:g} s). PROD's distribution: "
             f"{results['sequential'][healthy[0]]['runs']} runs; each other row: "
             f"{results['sequential'][healthy[1]]['runs']} runs.", "",
             "**Healthy releases**: share rolled back (fail + undecided at the window's end), and in brackets the "
             "median time to pass.", "",
             "| scenario | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for name in healthy:
        lines.append(f"| {name} | " + " | ".join(_cell(results[k][name], True) for k in results) + " |")
    lines += ["", "**Regressions**: share detected (failed by evidence or at the limit), and in brackets the median "
                  "time to detect.", "",
              "| scenario | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for name in regressions:
        lines.append(f"| {name} | " + " | ".join(_cell(results[k][name], False) for k in results) + " |")
    lines += ["", "Targets (the sequential gate, with its defaults):", ""]
    for goal, value in goals.items():
        figures = {k: v for k, v in value.items() if k != "met"}
        lines.append(f"- {goal}: {'met' if value['met'] else 'NOT met'} ({_figures(figures)})")
    lines += [""] + data["notes"]
    return "\n".join(lines) + "\n"


def _figures(figures: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k} {fmt(x)}" for k, x in v.items())
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    return fmt(figures)


NOTES = [
    "What the numbers say, and what they do not:",
    "",
    "- The sequential gate (ours) fails only on evidence that the RC is worse than its tolerance (errors: PROD's",
    "  rate + 0.5 points; latency: 1.2x PROD's + 1 ms at every quantile), so none of the healthy rows rolls a",
    "  release back more than 0.3% of the time, where the former gate (equality with PROD) rolled back 12-57% of",
    "  the slightly slower ones and 53% of the warm-ups (issue 8's measurements of the landed code).",
    "- Errors +5 points: detected in 97.3% of runs, not the 99% targeted. The misses are runs in which the RC's",
    "  5.5% error rate came out at about 3% over its ~360 requests in 180 s: indistinguishable at this traffic from",
    "  an RC 2.5 points worse, which the tests cannot call within the window while tolerating 0.5 points. It is",
    "  the information, not the threshold: with alpha 0.05 instead of 0.01 detection rose to 98.0% only (300-run",
    "  check, while 2.3% of RCs at +0.5 points were then rolled back). The seed's threshold gate catches 100% here",
    "  because its limit (5 errors a minute, ~4% of the RC's requests) sits below +5 points; the same absolute limit",
    "  rolls back 5% of healthy RCs under a moving load and 4.3% of warm-ups.",
    "- The rows between tolerance and margin (errors +2 points, p90 +30%) are what the tolerance accepts unless",
    "  shown worse: detected in 24% and 10% of runs, otherwise passed at the window's end, saying so.",
    "- savvi (Lindon, Sanden & Shirikian's count test, equality with PROD) detects p90 +30% and +50% sooner than",
    "  ours (52 s against 68 s for +50%): an equality test needs less evidence than a test against a 1.2x tolerance.",
    "  The same property rolls back 47.7% of RCs 1.2x slower, 4% of those 1.1x slower and 8% of warm-ups: the",
    "  false alarms that make users switch a gate off. On errors it is behind (83% in a median 128 s, against 97% in",
    "  56 s): its two-sided Dirichlet mixture (k = 100) spends evidence on \"RC better\" too. It has no pass side, so",
    "  a healthy RC waits for the whole window (180 s) instead of ours' median 100 s.",
    "- The compare gate decides once, at 200 RC samples (~100 s); at the tolerance itself (latency x1.20) its point",
    "  estimate exceeds 1.2 about half the time and the U test agrees, so it rolls back 43% there.",
    "- ml_agreement is scored through the deployment header at the first look; only it sees the flipped model.",
    "- The fast path is checked against `run_gates` on a few streams (identical decisions and times).",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--healthy-runs", type=int, default=1000)
    parser.add_argument("--regression-runs", type=int, default=300)
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the docs section (and plot) from bench/results/gates.json without simulating")
    args = parser.parse_args(argv)
    if args.render_only:
        data = json.loads(RESULTS.read_text())
        data["notes"] = NOTES
        plot(data["results"])
        publish.write_section(SECTION, section(data))
        return 0
    started = time.perf_counter()
    fast_path = check_fast_path()
    note = "simulated time: results do not depend on the machine's load"
    data = {"environment": publish.environment(note, with_load=False), "settings": settings(),
            "fast_path_check": fast_path, **run(args.healthy_runs, args.regression_runs)}
    data["targets"] = targets(data["results"])
    data["notes"] = NOTES
    data["wall_s"] = round(time.perf_counter() - started, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    plot(data["results"])
    text = section(data)
    if not args.no_docs:
        publish.write_section(SECTION, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
