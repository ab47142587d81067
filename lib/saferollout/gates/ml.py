"""ML gates: judge the model, not only the service.

ml_quality    the RC's registered held-out metrics (model properties) against PROD's: each metric may be
              worse than PROD's by at most its tolerance (higher is better, except losses).
ml_agreement  the same requests scored by RC and PROD: the share of rows where the decisions agree, and a
              distance between the score distributions (PSI over PROD's deciles, or the KS statistic).
              Requests come from held-out rows sent to each deployment through the
              `azureml-model-deployment` header (source: header), or from the mirrored pairs of live
              traffic (source: mirror, local backend). Answers are {"predictions": [...],
              "probabilities": [...]}.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from saferollout.gates.base import GateBase, GateContext, Inconclusive, require_prod, to_datetime
from saferollout.specs import parse_model_ref

LOWER_IS_BETTER = ("log_loss", "loss", "rmse", "mae", "mse", "brier")
BUILTIN_REQUESTS = "german-credit"


def model_metrics(ctx: GateContext, deployment: str, names: list[str]) -> tuple[str, dict[str, float]]:
    """(model reference, {metric: value}) registered for the model a deployment serves."""
    ref = ctx.backend.get_deployment(ctx.endpoint, deployment).model
    if not ref:
        raise Inconclusive(f"deployment {deployment!r} serves no registered model")
    name, version = parse_model_ref(ref)
    properties = ctx.backend.get_model(name, version).properties
    missing = [m for m in names if m not in properties]
    if missing:
        raise Inconclusive(f"model {ref} of {deployment!r} has no registered metric {', '.join(missing)}",
                           {"model": ref, "properties": sorted(properties)})
    try:
        values = {m: float(properties[m]) for m in names}
    except ValueError:
        raise Inconclusive(f"model {ref} has a metric that is not a number: "
                           f"{ {m: properties[m] for m in names} }") from None
    not_finite = [m for m, v in values.items() if not math.isfinite(v)]
    if not_finite:  # nan compares false with everything: it would never be "worse"
        raise Inconclusive(f"model {ref} has a metric that is not a finite number: "
                           f"{ {m: properties[m] for m in not_finite} }", {"model": ref})
    return ref, values


def judge_quality(rc: dict[str, float], prod: dict[str, float],
                  tolerances: dict[str, float]) -> tuple[str, str, list[str]]:
    worse = []
    for metric, tolerance in tolerances.items():
        delta = rc[metric] - prod[metric]
        degradation = delta if metric in LOWER_IS_BETTER else -delta
        if degradation > tolerance:
            worse.append(f"{metric} {rc[metric]:g} vs PROD {prod[metric]:g} (tolerance {tolerance:g})")
    if worse:
        return "fail", "the RC's held-out metrics are worse than PROD's: " + "; ".join(worse), worse
    return "pass", "the RC's held-out metrics are within tolerance of PROD's: " + ", ".join(
        f"{m} {rc[m]:g} vs {prod[m]:g}" for m in tolerances), worse


@dataclass
class QualityGate(GateBase):
    """RC's registered held-out metrics against PROD's, with a tolerance per metric."""

    tolerances: dict[str, float] = field(default_factory=lambda: {"auc": 0.02, "accuracy": 0.02,
                                                                   "log_loss": 0.05})
    kind = "ml_quality"

    def __post_init__(self) -> None:
        self.name = self.name or "offline-quality"

    def validate(self) -> list[str]:
        return ["tolerances must be a non-empty mapping of metric -> tolerance >= 0"] if (
            not self.tolerances or any(v < 0 for v in self.tolerances.values())) else []

    def look(self, ctx: GateContext) -> tuple[str, str, dict[str, Any]]:
        prod = require_prod(ctx)
        names = list(self.tolerances)
        rc_ref, rc = model_metrics(ctx, ctx.rc, names)
        prod_ref, prod_metrics = model_metrics(ctx, prod, names)
        decision, reason, worse = judge_quality(rc, prod_metrics, self.tolerances)
        return decision, reason, {"models": {"rc": rc_ref, "prod": prod_ref}, "metrics": {"rc": rc, "prod": prod_metrics},
                                  "tolerances": self.tolerances, "worse": worse}


# ---- agreement -------------------------------------------------------------------------------------

def psi(expected, actual, bins: int = 10) -> float:
    """Population stability index of `actual` against `expected`, over `expected`'s quantile bins."""
    expected, actual = np.asarray(expected, float), np.asarray(actual, float)
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    e = np.histogram(expected, edges)[0] / expected.size
    a = np.histogram(actual, edges)[0] / actual.size
    e, a = np.clip(e, 1e-4, None), np.clip(a, 1e-4, None)
    return float(np.sum((a - e) * np.log(a / e)))


def judge_agreement(rc_pred, prod_pred, rc_prob, prod_prob, *, min_agreement: float, distance: str,
                    max_distance: float) -> tuple[str, str, dict[str, Any]]:
    rc_pred, prod_pred = np.asarray(rc_pred), np.asarray(prod_pred)
    agreement = float(np.mean(rc_pred == prod_pred))
    if distance == "ks":
        value = float(stats.ks_2samp(rc_prob, prod_prob).statistic)
    else:
        value = psi(prod_prob, rc_prob)
    evidence = {"rows": int(rc_pred.size), "agreement": agreement, "min_agreement": min_agreement,
                "distance": distance, "distance_value": value, "max_distance": max_distance}
    summary = f"decisions agree on {agreement:.1%} of {rc_pred.size} rows, {distance} {value:.3f}"
    problems = []
    if agreement < min_agreement:
        problems.append(f"agreement below {min_agreement:.1%}")
    if value > max_distance:
        problems.append(f"{distance} above {max_distance:g}")
    if problems:
        return "fail", f"{summary}: {' and '.join(problems)}", evidence
    return "pass", f"{summary}: within thresholds", evidence


def parse_answer(body: bytes) -> tuple[list, list]:
    """{"predictions": [...], "probabilities": [...]} -> the two lists (probabilities optional)."""
    try:
        answer = json.loads(body)
        return list(answer["predictions"]), list(answer.get("probabilities") or answer["predictions"])
    except (ValueError, KeyError, TypeError):
        raise Inconclusive(f"an answer is not JSON with a 'predictions' list: {body[:80]!r}") from None


def load_requests(source: str, n: int, batch_size: int) -> list[bytes]:
    """Held-out request bodies: the built-in German credit test rows, or a JSON file of bodies."""
    if source == BUILTIN_REQUESTS:
        from saferollout import data  # the dataset loads on demand only

        rows = data.split().X_test.iloc[: n * batch_size]
        return data.sample_requests(rows, batch_size)[:n]
    path = Path(source)
    if not path.is_file():
        raise Inconclusive(f"the requests file {source!r} does not exist")
    try:
        bodies = json.loads(path.read_text())
    except ValueError as exc:
        raise Inconclusive(f"the requests file {source!r} is not JSON: {exc}") from None
    if not isinstance(bodies, list):
        raise Inconclusive(f"the requests file {source!r} must hold a JSON list of request bodies")
    if len(bodies) < n:  # never judge on fewer requests than configured
        raise Inconclusive(f"the requests file {source!r} holds {len(bodies)} request bodies; the gate compares n={n}")
    return [json.dumps(b).encode() for b in bodies][:n]


@dataclass
class AgreementGate(GateBase):
    """Agreement of RC and PROD on the same requests: decision agreement rate and score distance."""

    source: str = "header"  # header | mirror
    requests: str = BUILTIN_REQUESTS  # header source: the built-in held-out rows or a JSON file of bodies
    n: int = 100  # requests to compare
    batch_size: int = 1
    min_agreement: float = 0.95
    distance: str = "psi"
    max_distance: float = 0.2

    kind = "ml_agreement"
    CHOICES = {"source": ("header", "mirror"), "distance": ("psi", "ks")}

    def __post_init__(self) -> None:
        self.name = self.name or "prediction-agreement"
        self._scored: tuple | None = None  # header source: the paired answers, sent once per window

    def validate(self) -> list[str]:
        problems = []
        if self.n < 1 or self.batch_size < 1:
            problems.append("n and batch_size must be at least 1")
        if not 0 <= self.min_agreement <= 1:
            problems.append("min_agreement must be between 0 and 1")
        return problems

    def look(self, ctx: GateContext) -> tuple[str, str, dict[str, Any]]:
        prod = require_prod(ctx)
        pairs = self._pairs_from_mirror(ctx, prod) if self.source == "mirror" else self._pairs_from_header(ctx, prod)
        rc_pred, prod_pred, rc_prob, prod_prob = pairs
        if len(rc_pred) < self.n * self.batch_size and (self.source == "mirror" or len(rc_pred) == 0):
            raise Inconclusive(f"only {len(rc_pred)} of {self.n * self.batch_size} rows scored by both "
                               f"{ctx.rc} and {prod} so far", {"rows": len(rc_pred)})
        decision, reason, evidence = judge_agreement(rc_pred, prod_pred, rc_prob, prod_prob,
                                                     min_agreement=self.min_agreement, distance=self.distance,
                                                     max_distance=self.max_distance)
        return decision, reason, dict(evidence, source=self.source)

    def _pairs_from_header(self, ctx: GateContext, prod: str) -> tuple[list, list, list, list]:
        key = (ctx.endpoint, ctx.rc, prod, ctx.start)
        if self._scored is not None and self._scored[0] == key:
            return self._scored[1]
        out: tuple[list, list, list, list] = ([], [], [], [])
        failures = 0
        for body in load_requests(self.requests, self.n, self.batch_size):
            rc_answer = ctx.backend.invoke(ctx.endpoint, body, deployment=ctx.rc)
            prod_answer = ctx.backend.invoke(ctx.endpoint, body, deployment=prod)
            if not (rc_answer.ok and prod_answer.ok):
                failures += 1
                continue
            _extend(out, parse_answer(rc_answer.body), parse_answer(prod_answer.body))
        if failures:  # retry at the next look: a failing deployment is the other gates' business
            raise Inconclusive(f"{failures} of {self.n} paired requests failed on {ctx.rc} or {prod}",
                               {"failed_requests": failures})
        self._scored = (key, out)
        return out

    def _pairs_from_mirror(self, ctx: GateContext, prod: str) -> tuple[list, list, list, list]:
        if not hasattr(ctx.backend, "mirrored_pairs"):
            raise Inconclusive(f"backend {ctx.backend.name!r} has no mirrored pairs: use source: header")
        out: tuple[list, list, list, list] = ([], [], [], [])
        for pair in ctx.backend.mirrored_pairs(ctx.endpoint, start=to_datetime(ctx.start), end=to_datetime(ctx.now)):
            if pair.mirror_deployment != ctx.rc or pair.live_deployment != prod:
                continue
            if not (200 <= pair.live_status < 300 and 200 <= pair.mirror_status < 300):
                continue
            _extend(out, parse_answer(pair.mirror_body), parse_answer(pair.live_body))
        return out


def _extend(out, rc_answer, prod_answer) -> None:
    (rc_pred, rc_prob), (prod_pred, prod_prob) = rc_answer, prod_answer
    if not len(rc_pred) == len(prod_pred) == len(rc_prob) == len(prod_prob):
        raise Inconclusive(f"RC and PROD answered the same request with different numbers of rows "
                           f"({len(rc_pred)} and {len(prod_pred)}): their answers cannot be paired")
    rows = len(rc_pred)
    out[0].extend(rc_pred[:rows])
    out[1].extend(prod_pred[:rows])
    out[2].extend(rc_prob[:rows])
    out[3].extend(prod_prob[:rows])
