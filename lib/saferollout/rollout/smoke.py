"""The smoke test: the RC's answers to sample requests sent to it alone, compared in structure with PROD's.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from saferollout.backends.base import Backend
from saferollout.errors import GateFailed

@dataclass
class SmokeResult:
    """The RC's answers to sample requests sent to it directly (through the deployment header)."""

    ok: bool
    n: int
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # milliseconds, one per request
    deployment: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def raise_if_failed(self) -> "SmokeResult":
        """Raise GateFailed (carrying this result) when the smoke test did not pass."""
        if not self.ok:
            shown = "; ".join(self.failures[:3]) or "no requests were sent"
            raise GateFailed(f"smoke test of {self.deployment!r} failed: {len(self.failures)} of {self.n} "
                             f"requests ({shown})", self)
        return self


def smoke_test(backend: Backend, endpoint: str, deployment: str, bodies: list[bytes], *,
               reference: str | None = None, check: Callable[[Any], str | None] | None = None) -> SmokeResult:
    """Send each body to `deployment` only (pinned with the deployment header) and check each answer.

    An answer fails when its status is not 200, when another deployment served it, when it is not JSON,
    when it has another structure than `reference`'s answer to the same body (PROD's: JSON types, keys and
    list lengths; both answers are shown), or when `check(answer)` returns a message. Without a reference
    (a first release) a 200 with valid JSON passes. No bodies is a failed smoke test.
    """
    failures: list[str] = []
    latencies: list[float] = []
    for index, body in enumerate(bodies):
        result = backend.invoke(endpoint, body, deployment=deployment, timeout_s=30.0)
        latencies.append(result.latency_ms)
        problem = _smoke_problem(result, deployment, check)
        if problem is None and reference is not None:
            problem = _compare_with_reference(backend, endpoint, reference, body, result.json())
        if problem:
            failures.append(f"request {index}: {problem}")
    return SmokeResult(ok=bool(bodies) and not failures, n=len(bodies), failures=failures, latencies=latencies,
                       deployment=deployment)


def _smoke_problem(result: Any, deployment: str, check: Callable[[Any], str | None] | None) -> str | None:
    if result.status != 200:
        return f"status {result.status}: {result.text[:200]}"
    if result.deployment and result.deployment != deployment:
        return f"served by {result.deployment!r}, not {deployment!r}"
    try:
        answer = result.json()
    except ValueError:
        return f"answer is not JSON: {result.text[:200]}"
    return check(answer) if check is not None else None


def _compare_with_reference(backend: Backend, endpoint: str, reference: str, body: bytes, answer: Any) -> str | None:
    """None when `reference` answers `body` with the structure of `answer`; otherwise what differs."""
    theirs = backend.invoke(endpoint, body, deployment=reference, timeout_s=30.0)
    if theirs.status != 200:  # no structure to compare with is never a pass
        return f"PROD {reference!r} answered status {theirs.status}, so the answer's structure cannot be compared"
    try:
        expected = theirs.json()
    except ValueError:
        return f"PROD {reference!r} answered no JSON, so the answer's structure cannot be compared"
    difference = structure_difference(answer, expected)
    if difference is None:
        return None
    return (f"the answer's structure differs from PROD's ({difference}): RC answered {_shown(answer)}, "
            f"PROD {reference!r} answered {_shown(expected)}")


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "list", str: "string", type(None): "null"}.get(type(value), type(value).__name__)


def structure_difference(answer: Any, expected: Any, where: str = "$") -> str | None:
    """Where two decoded JSON answers differ in structure (JSON type, object keys, list lengths), or None.

    Values may differ (that is what a new model is for); an integer and a float are both numbers.
    """
    mine, theirs = _json_type(answer), _json_type(expected)
    if mine != theirs:
        article = lambda kind: ("an " if kind[0] in "aeiou" else "a ") + kind  # noqa: E731
        return f"{where} is {article(mine)}, PROD's {article(theirs)}"
    if isinstance(answer, dict):
        if set(answer) != set(expected):
            extra, missing = sorted(set(answer) - set(expected)), sorted(set(expected) - set(answer))
            parts = ([f"extra key(s) {', '.join(extra)}"] if extra else []) + (
                [f"missing key(s) {', '.join(missing)}"] if missing else [])
            return f"{where} has {' and '.join(parts)}"
        return next((d for k in answer if (d := structure_difference(answer[k], expected[k], f"{where}.{k}"))), None)
    if isinstance(answer, list):
        if len(answer) != len(expected):
            return f"{where} has {len(answer)} items, PROD's {len(expected)}"
        return next((d for i, (a, e) in enumerate(zip(answer, expected))
                     if (d := structure_difference(a, e, f"{where}[{i}]"))), None)
    return None


def _shown(answer: Any, width: int = 200) -> str:
    text = json.dumps(answer, default=str)
    return text if len(text) <= width else text[:width - 3] + "..."


