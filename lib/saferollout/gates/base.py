"""What every gate shares: the Verdict, the context of one look, the Gate protocol and its base class.

A gate looks at the data gathered since traffic shifted and answers pass, fail or inconclusive. Missing
data (no samples, too few, an unknown metric, a filter matching nothing) is inconclusive, never a pass;
a gate still inconclusive at its `max_duration_s` fails, with the reason it could not decide.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar, Mapping, Protocol, runtime_checkable

import numpy as np

from saferollout.backends.base import Backend, RequestSample
from saferollout.errors import SafeRolloutError

DECISIONS = ("pass", "fail", "inconclusive")
DEFAULT_MAX_DURATION_S = 600.0


@dataclass
class Verdict:
    """One gate's answer at one look, with everything needed to check or plot it."""

    gate: str
    kind: str
    decision: str  # pass | fail | inconclusive
    reason: str
    evidence: dict[str, Any]
    window_start: float
    window_end: float
    checked_at: float

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


@dataclass
class GateContext:
    """Where and when a gate looks: the endpoint, RC and PROD names, the window [start, now].

    `rc_share` is the probability that a live request served by the RC or by `prod` (PROD, or the
    baseline) went to the RC, from the endpoint's traffic when known; the sequential tests then use it
    instead of the share realised so far.
    """

    backend: Backend
    endpoint: str
    rc: str
    prod: str | None
    start: float
    now: float
    rc_share: float | None = None

    @property
    def elapsed_s(self) -> float:
        return self.now - self.start


class PinnedLedger:
    """The backend as the gates see it, counting the requests they pin to a deployment themselves.

    The agreement gate sends its rows through the deployment header. Where the backend records requests
    one by one (local), they are marked pinned and left out; where it only has aggregates (Azure
    Monitor has no dimension for it), the aggregate gates subtract what this ledger counted, once the
    metrics have had time to include them (`metrics_delay_s`).
    """

    def __init__(self, backend: Backend, clock: Any = time.time):
        self._backend = backend
        self._clock = clock
        self.sent: list[tuple[float, str, str]] = []  # (when, deployment, status class)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def invoke(self, endpoint: str, body: Any, *, deployment: str | None = None, timeout_s: float = 60.0) -> Any:
        result = self._backend.invoke(endpoint, body, deployment=deployment, timeout_s=timeout_s)
        if deployment:
            self.sent.append((self._clock(), deployment, f"{result.status // 100}xx"))
        return result

    def counts(self, start: float, settled_by: float) -> dict[tuple[str, str], int]:
        """Pinned requests per (deployment, status class) sent in [start, settled_by]."""
        out: dict[tuple[str, str], int] = {}
        for when, deployment, status_class in self.sent:
            if start <= when <= settled_by:
                out[(deployment, status_class)] = out.get((deployment, status_class), 0) + 1
        return out


@runtime_checkable
class Gate(Protocol):
    name: str
    max_duration_s: float

    @property
    def kind(self) -> str: ...
    @property
    def needs_samples(self) -> bool:  # reads raw request samples (`Backend.supports_raw_samples`)
        ...
    @property
    def needs_mirrored_pairs(self) -> bool:  # reads mirrored pairs (`Backend.supports_mirrored_pairs`)
        ...

    def check(self, ctx: GateContext) -> Verdict: ...


class Inconclusive(Exception):
    """Raised inside a gate's look when data is missing; `reason` says which data."""

    def __init__(self, reason: str, evidence: dict[str, Any] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.evidence = evidence or {}


@dataclass
class GateBase:
    """Base of the built-in gates: `check` wraps the kind's `look` with the rules every gate obeys.

    A subclass sets `kind` and implements `look(ctx) -> (decision, reason, evidence)`, raising
    `Inconclusive` when data is missing. Backend errors (an unknown metric, a deployment that does not
    exist, a platform that cannot be reached) become inconclusive too: they may be transient, and even
    when they are not, waiting and then failing with the message is the safe answer.
    """

    name: str = ""
    max_duration_s: float = DEFAULT_MAX_DURATION_S

    kind: ClassVar[str] = ""
    needs_samples: ClassVar[bool] = False
    needs_mirrored_pairs: ClassVar[bool] = False

    def look(self, ctx: GateContext) -> tuple[str, str, dict[str, Any]]:
        raise NotImplementedError

    def check(self, ctx: GateContext) -> Verdict:
        try:
            decision, reason, evidence = self.look(ctx)
        except Inconclusive as missing:
            decision, reason, evidence = "inconclusive", missing.reason, missing.evidence
        except SafeRolloutError as exc:
            decision, reason = "inconclusive", f"{type(exc).__name__}: {exc}"
            evidence = {"error": str(exc)}
        verdict = Verdict(self.name, self.kind, decision, reason, json_safe(evidence),
                          ctx.start, ctx.now, time.time())
        return expire(verdict, self.max_duration_s)

    def settings(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def expire(verdict: Verdict, max_duration_s: float) -> Verdict:
    """An inconclusive verdict at or past the gate's limit becomes a fail that keeps the reason."""
    elapsed = verdict.window_end - verdict.window_start
    if verdict.decision != "inconclusive" or elapsed < max_duration_s:
        return verdict
    reason = f"no decision within {max_duration_s:g}s: {verdict.reason}"
    evidence = dict(verdict.evidence, timed_out=True)
    return Verdict(verdict.gate, verdict.kind, "fail", reason, evidence, verdict.window_start,
                   verdict.window_end, verdict.checked_at)


# ---- reading data through the Backend ------------------------------------------------------------

def to_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def fetch_samples(ctx: GateContext, deployment: str) -> list[RequestSample]:
    """Live requests served by `deployment` in the window: not mirrored, not pinned with the header, not held.

    Pinned requests (the rollout's smoke test, warm-up and agreement rows) were not routed by the traffic
    split, so counting them would break the routing the tests rely on and weigh the RC with our own calls.
    Held ones waited through a restart of the local platform: the platform's outage, not the deployment's.
    """
    samples = ctx.backend.request_samples(ctx.endpoint, deployment=deployment, start=to_datetime(ctx.start),
                                          end=to_datetime(ctx.now), include_mirrored=False)
    return [s for s in samples if s.deployment == deployment and not s.mirrored and not s.pinned and not s.held]


def require_prod(ctx: GateContext) -> str:
    if not ctx.prod:
        raise Inconclusive("there is no PROD deployment to compare the RC with")
    return ctx.prod


def require_samples(counts: Mapping[str, float], minimum: int) -> None:
    """Inconclusive unless every deployment has `minimum` samples; the reason names who is short."""
    short = {name: n for name, n in counts.items() if n < minimum}
    if short:
        detail = ", ".join(f"{name} has {n}" for name, n in short.items())
        raise Inconclusive(f"too few samples: {detail} (need {minimum} per deployment)",
                           {"n": counts, "min_samples": minimum})


def json_safe(value: Any) -> Any:
    """numpy scalars -> Python, inf/nan -> strings, so evidence survives json.dumps and summary.json."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return value


def is_error(status_code: int) -> bool:
    """An error as the seed's gates count it: any answer outside 2xx (throttling and timeouts too)."""
    return not 200 <= status_code < 300

