"""Run a list of gates to a decision: look at every undecided gate each poll until all pass or one fails."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from saferollout.errors import GateFailed, SafeRolloutError
from saferollout.gates.base import Gate, GateContext, PinnedLedger, Verdict, expire


@dataclass
class GateReport:
    """The outcome of a gate step: its decision, the final verdict per gate and every look."""

    decision: str  # pass | fail
    verdicts: list[Verdict]
    history: list[Verdict]
    started_at: float
    ended_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "verdicts": [v.to_dict() for v in self.verdicts],
                "history": [v.to_dict() for v in self.history], "started_at": self.started_at,
                "ended_at": self.ended_at}

    def raise_if_failed(self) -> None:
        """Raise GateFailed carrying the first failing verdict (a failed run always has one)."""
        failing = [v for v in self.verdicts if v.decision == "fail"]
        if self.decision == "fail":
            first = failing[0]
            raise GateFailed(f"gate {first.gate!r} ({first.kind}) failed: {first.reason}", verdict=first)


def run_gates(gates: list[Gate], backend, endpoint: str, rc: str, prod: str | None, *,
              start: float | None = None, poll_s: float = 2.0,
              progress: Callable[[str], None] | None = None,
              clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> GateReport:
    """Look at every undecided gate each `poll_s`; the first fail ends the run, all passes pass it.

    A gate still inconclusive at its `max_duration_s` fails. `clock` and `sleep` are injectable so tests
    and the benchmark run on simulated time.
    """
    if not gates:
        raise ValueError("run_gates needs at least one gate")
    start = clock() if start is None else start
    started_at = clock()
    share = rc_share(backend, endpoint, rc, prod)
    backend = PinnedLedger(backend, clock)  # the aggregate gates subtract the requests the gates pin themselves
    latest: dict[str, Verdict] = {}
    history: list[Verdict] = []
    while True:
        ctx = GateContext(backend=backend, endpoint=endpoint, rc=rc, prod=prod, start=start, now=clock(),
                          rc_share=share)
        for gate in gates:
            if gate.name in latest and latest[gate.name].decision == "pass":
                continue
            verdict = expire(gate.check(ctx), gate.max_duration_s)
            latest[gate.name] = verdict
            history.append(verdict)
            if verdict.decision == "fail":
                _report(progress, ctx, gates, latest)
                return GateReport("fail", [latest[g.name] for g in gates if g.name in latest], history,
                                  started_at, clock())
        _report(progress, ctx, gates, latest)
        if all(latest[g.name].decision == "pass" for g in gates):
            return GateReport("pass", [latest[g.name] for g in gates], history, started_at, clock())
        sleep(poll_s)


def rc_share(backend, endpoint: str, rc: str, control: str | None) -> float | None:
    """The probability that a live request served by the RC or its control (PROD or the baseline) went to
    the RC, from the endpoint's traffic: what the sequential tests condition on."""
    if control is None:
        return None
    try:
        traffic = backend.get_endpoint(endpoint).traffic
    except SafeRolloutError:
        return None
    mine, theirs = traffic.get(rc, 0), traffic.get(control, 0)
    return mine / (mine + theirs) if mine > 0 and theirs > 0 else None


def _report(progress, ctx: GateContext, gates: list[Gate], latest: dict[str, Verdict]) -> None:
    if progress is None:
        return
    # the counts of the freshest look (a gate that passed earlier keeps the counts it passed on)
    fresh = sorted(latest.values(), key=lambda v: v.window_end, reverse=True)
    n = next((v.evidence.get("n") for v in fresh if isinstance(v.evidence.get("n"), dict)), None)
    names = {"rc": ctx.rc, "prod": ctx.prod}  # evidence says rc/prod; the line names the deployments throughout
    if n:
        counts = ", n per deployment: " + ", ".join(f"{names.get(k) or k} {v}" for k, v in n.items())
        states = "; ".join(f"{g.name}: {latest[g.name].decision}" for g in gates if g.name in latest)
    else:  # gates that judge aggregates (bake, threshold) count intervals, not requests: say what they wait for
        counts = ""
        states = "; ".join(f"{g.name}: {latest[g.name].decision}"
                           + (f" ({latest[g.name].reason})" if latest[g.name].decision == "inconclusive" else "")
                           for g in gates if g.name in latest)
    progress(f"{ctx.elapsed_s:.0f}s elapsed{counts} | {states}")
