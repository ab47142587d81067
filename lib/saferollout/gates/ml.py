"""ML gates: judge the model, not only the service.

ml_quality    the RC's registered held-out metrics (model properties) against PROD's: each metric may be
              worse than PROD's by at most its tolerance (higher is better, except losses).
ml_agreement  the same requests scored by RC and PROD: the share of rows where the decisions agree, and a
              distance between the score distributions (PSI over PROD's deciles, or the KS statistic).
              Requests come from held-out rows sent to each deployment through the
              `azureml-model-deployment` header (source: header), or from the mirrored pairs of live
              traffic (source: mirror, local backend). Any answer shape: a bare list, a list of lists
              (class probabilities), {"predictions": ...} (MLflow's and ours, whose "probabilities" are
              the scores), or where a JMESPath `answer_path` points. The task (classification: equal
              decisions; regression: predictions within a tolerance) is inferred from the answers
              unless given, and the evidence says what was inferred and how.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
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


TASKS = ("auto", "classification", "regression")
MAX_CLASS_LABELS = 20  # whole numbers with at most this many distinct values read as class labels


@dataclass
class Rows:
    """One deployment's answer, row by row: `values` (a prediction per row: a label, a number, or a list of
    numbers such as class probabilities) and `scores` (a probability per row, when the answer gives them
    beside the predictions, as `{"predictions": [...], "probabilities": [...]}` does)."""

    values: list
    scores: list | None = None


def answer_rows(answer: Any, answer_path: str = "") -> Rows:
    """The rows of predictions in one decoded answer, whatever its shape.

    `answer_path` (a JMESPath expression) says where the predictions are; without it a bare list is the
    predictions, and so is an object's "predictions" (MLflow's answer, and ours, whose "probabilities"
    become the scores). A single prediction is one row.
    """
    if answer_path:
        import jmespath

        values = jmespath.search(answer_path, answer)
        if values is None:
            raise Inconclusive(f"answer_path {answer_path!r} finds nothing in the answer {_short(answer)}")
        scores = None
    elif isinstance(answer, list):
        values, scores = answer, None
    elif isinstance(answer, dict) and "predictions" in answer:
        values, scores = answer["predictions"], answer.get("probabilities")
    else:
        keys = ", ".join(sorted(map(str, answer))) if isinstance(answer, dict) else type(answer).__name__
        raise Inconclusive(f"an answer is neither a list nor an object with 'predictions' ({keys}): give "
                           f"answer_path, a JMESPath to the predictions: {_short(answer)}")
    values = values if isinstance(values, list) else [values]
    if scores is not None and (not isinstance(scores, list) or len(scores) != len(values)):
        scores = None  # scores that do not pair with the predictions row by row are not scores
    return Rows(values, scores)


def parse_answer(body: bytes, answer_path: str = "") -> Rows:
    """answer_rows of an answer body; Inconclusive when it is not JSON."""
    try:
        answer = json.loads(body)
    except ValueError:
        raise Inconclusive(f"an answer is not JSON: {body[:80]!r}") from None
    return answer_rows(answer, answer_path)


def _short(value: Any, width: int = 120) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[:width - 3] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def infer_task(values: list) -> tuple[str, str]:
    """(task, how it was inferred) from the predictions of both deployments."""
    if values and all(isinstance(v, list) and v and all(_is_number(x) for x in v) for v in values):
        array = np.asarray(values, float) if len({len(v) for v in values}) == 1 else None
        if array is not None and np.all((array >= 0) & (array <= 1)) and np.allclose(array.sum(axis=1), 1, atol=1e-3):
            return "classification", "each row is a list of numbers in [0, 1] summing to 1: class probabilities"
        return "regression", "each row is a list of numbers that are not probabilities: several outputs per row"
    if values and all(isinstance(v, (str, bool)) for v in values):
        return "classification", "the predictions are labels (strings or booleans)"
    if values and all(_is_number(v) for v in values):
        whole = all(float(v).is_integer() for v in values)
        if whole and len(set(values)) <= MAX_CLASS_LABELS:
            return "classification", (f"the predictions are whole numbers with {len(set(values))} distinct values "
                                       f"(at most {MAX_CLASS_LABELS}): class labels")
        return "regression", ("the predictions are numbers, not all whole" if not whole else
                              f"the predictions are whole numbers with more than {MAX_CLASS_LABELS} distinct values")
    example = next((v for v in values if not (_is_number(v) or isinstance(v, (str, bool, list)))), values[:1])
    raise Inconclusive(f"cannot tell the task from the predictions (e.g. {_short(example)}): they are not labels, "
                       "numbers or lists of numbers; give answer_path to the predictions, and task")


def _distance(kind: str, prod: np.ndarray, rc: np.ndarray) -> float:
    if prod.ndim == 2:  # class probabilities: the class whose distribution moved most
        return max(_distance(kind, prod[:, c], rc[:, c]) for c in range(prod.shape[1]))
    if kind == "ks":
        return float(stats.ks_2samp(rc, prod).statistic)
    return psi(prod, rc)


def judge_agreement(rc_pred, prod_pred, rc_prob, prod_prob, *, min_agreement: float, distance: str,
                    max_distance: float, task: str = "classification", rel_tolerance: float = 0.1,
                    abs_tolerance: float = 0.0) -> tuple[str, str, dict[str, Any]]:
    """Classification: the share of rows whose decisions are equal, and the distance between the score
    distributions (`rc_prob`/`prod_prob`; None when the answers carry no scores). Regression: the share of
    rows whose RC prediction is within `rel_tolerance` (of PROD's) or `abs_tolerance` of PROD's, and the
    distance between the prediction distributions."""
    value: float | None
    if task == "regression":
        try:
            rc_values, prod_values = np.asarray(rc_pred, float).ravel(), np.asarray(prod_pred, float).ravel()
        except (TypeError, ValueError):
            raise Inconclusive("task is regression but the predictions are not all numbers "
                               f"(e.g. RC {_short(list(rc_pred)[:3])}, PROD {_short(list(prod_pred)[:3])})") from None
        if rc_values.size != prod_values.size:
            raise Inconclusive("RC and PROD give different numbers of outputs per row: their answers cannot be paired")
        agree = np.isclose(rc_values, prod_values, rtol=rel_tolerance, atol=abs_tolerance)
        value = _distance(distance, prod_values, rc_values)
        what = f"predictions within {rel_tolerance:g} (relative) or {abs_tolerance:g} (absolute) of PROD's"
        tolerances = {"rel_tolerance": rel_tolerance, "abs_tolerance": abs_tolerance}
    else:
        agree = np.asarray([r == p for r, p in zip(_decisions(rc_pred), _decisions(prod_pred))])
        if rc_prob is None and prod_prob is None and len(rc_pred) and all(isinstance(v, list) for v in rc_pred):
            rc_prob, prod_prob = rc_pred, prod_pred  # rows of class probabilities are their own scores
        value = None if rc_prob is None or prod_prob is None else _distance(
            distance, np.asarray(prod_prob, float), np.asarray(rc_prob, float))
        what, tolerances = "decisions agree", {}
    agreement = float(np.mean(agree)) if agree.size else 0.0
    rows = len(rc_pred)
    evidence = {"rows": rows, "task": task, "agreement": agreement, "min_agreement": min_agreement,
                "distance": distance, "distance_value": value, "max_distance": max_distance, **tolerances}
    shown = f", {distance} {value:.3f}" if value is not None else f", no scores to compare ({distance} not computed)"
    summary = f"{task}: {what} on {agreement:.1%} of {rows} rows{shown}"
    problems = []
    if agreement < min_agreement:
        problems.append(f"agreement below {min_agreement:.1%}")
    if value is not None and value > max_distance:
        problems.append(f"{distance} above {max_distance:g}")
    if problems:
        return "fail", f"{summary}: {' and '.join(problems)}", evidence
    return "pass", f"{summary}: within thresholds", evidence


def _decisions(values) -> list:
    """A decision per row: the class of highest probability for a row of probabilities, else the value."""
    return [int(np.argmax(v)) if isinstance(v, list) else v for v in values]


def load_requests(source: str, n: int, batch_size: int) -> list[bytes]:
    """Request bodies to score on both deployments: the built-in German credit test rows, or the first `n`
    bodies of a request file (one JSON body, or a .jsonl file of one per line)."""
    from saferollout.errors import SpecError
    from saferollout.traffic import load_request_bodies

    if source == BUILTIN_REQUESTS:
        from saferollout import data  # the dataset loads on demand only

        rows = data.split().X_test.iloc[: n * batch_size]
        return data.sample_requests(rows, batch_size)[:n]
    try:
        bodies = load_request_bodies(source)
    except SpecError as exc:
        raise Inconclusive(str(exc)) from None
    if len(bodies) < n:  # never judge on fewer requests than configured
        raise Inconclusive(f"the request file {source!r} holds {len(bodies)} request bodies; the gate compares n={n}")
    return bodies[:n]


@dataclass
class Paired:
    """The rows RC and PROD answered to the same requests, in the same order."""

    rc: list = field(default_factory=list)
    prod: list = field(default_factory=list)
    rc_scores: list | None = field(default_factory=list)  # None once a pair of answers came without scores
    prod_scores: list | None = field(default_factory=list)

    def add(self, rc: Rows, prod: Rows) -> None:
        if len(rc.values) != len(prod.values):
            raise Inconclusive(f"RC and PROD answered the same request with different numbers of rows "
                               f"({len(rc.values)} and {len(prod.values)}): their answers cannot be paired")
        self.rc.extend(rc.values)
        self.prod.extend(prod.values)
        if rc.scores is None or prod.scores is None or self.rc_scores is None or self.prod_scores is None:
            self.rc_scores = self.prod_scores = None
        else:
            self.rc_scores.extend(rc.scores)
            self.prod_scores.extend(prod.scores)


@dataclass
class AgreementGate(GateBase):
    """Agreement of RC and PROD on the same requests, for any answer shape and either task: the share of
    rows that agree (equal decisions; for regression, predictions within tolerance) and a distance between
    the score (or prediction) distributions."""

    source: str = "header"  # header | mirror
    requests: str = BUILTIN_REQUESTS  # header source: the built-in held-out rows or a request file
    n: int = 100  # requests to compare
    batch_size: int = 1
    min_agreement: float = 0.95
    distance: str = "psi"
    max_distance: float = 0.2
    answer_path: str = ""  # JMESPath to the predictions in an answer; empty: a bare list or "predictions"
    task: str = "auto"  # auto (inferred from the answers) | classification | regression
    rel_tolerance: float = 0.1  # regression: a row agrees when within this share of PROD's prediction...
    abs_tolerance: float = 0.0  # ... or within this absolute difference

    kind = "ml_agreement"
    CHOICES = {"source": ("header", "mirror"), "distance": ("psi", "ks"), "task": TASKS}

    def __post_init__(self) -> None:
        self.name = self.name or "prediction-agreement"
        self._scored: tuple | None = None  # header source: the paired answers, sent once per window

    @property
    def needs_mirrored_pairs(self) -> bool:  # type: ignore[override]
        return self.source == "mirror"

    def validate(self) -> list[str]:
        problems = []
        if self.n < 1 or self.batch_size < 1:
            problems.append("n and batch_size must be at least 1")
        if not 0 <= self.min_agreement <= 1:
            problems.append("min_agreement must be between 0 and 1")
        if self.rel_tolerance < 0 or self.abs_tolerance < 0:
            problems.append("rel_tolerance and abs_tolerance must be at least 0")
        if self.answer_path:
            import jmespath
            from jmespath.exceptions import JMESPathError

            try:
                jmespath.compile(self.answer_path)
            except JMESPathError as exc:
                problems.append(f"answer_path {self.answer_path!r} is not a JMESPath expression: "
                                f"{str(exc).splitlines()[0]}")
        return problems

    def look(self, ctx: GateContext) -> tuple[str, str, dict[str, Any]]:
        prod = require_prod(ctx)
        pairs = self._pairs_from_mirror(ctx, prod) if self.source == "mirror" else self._pairs_from_header(ctx, prod)
        if len(pairs.rc) < self.n * self.batch_size and (self.source == "mirror" or len(pairs.rc) == 0):
            raise Inconclusive(f"only {len(pairs.rc)} of {self.n * self.batch_size} rows scored by both "
                               f"{ctx.rc} and {prod} so far", {"rows": len(pairs.rc)})
        if self.task == "auto":
            task, how = infer_task(pairs.rc + pairs.prod)
        else:
            task, how = self.task, "given by the gate's task setting"
        decision, reason, evidence = judge_agreement(
            pairs.rc, pairs.prod, pairs.rc_scores, pairs.prod_scores, min_agreement=self.min_agreement,
            distance=self.distance, max_distance=self.max_distance, task=task, rel_tolerance=self.rel_tolerance,
            abs_tolerance=self.abs_tolerance)
        return decision, reason, dict(evidence, source=self.source, task_inferred=how,
                                      answer_path=self.answer_path or None)

    def _pairs_from_header(self, ctx: GateContext, prod: str) -> Paired:
        """Each request body sent pinned to the RC and to PROD, once per window. A pair that failed (a 429
        while PROD is busy, a timeout) is sent again at the next look, the pairs already answered are kept:
        the gate decides once every body has both answers, or stays inconclusive until its window ends."""
        key = (ctx.endpoint, ctx.rc, prod, ctx.start)
        if self._scored is None or self._scored[0] != key:
            self._scored = (key, {})
        answered: dict[int, tuple[Rows, Rows]] = self._scored[1]
        bodies = load_requests(self.requests, self.n, self.batch_size)
        failed: dict[str, int] = {}
        for i, body in enumerate(bodies):
            if i in answered:
                continue
            rc_answer = ctx.backend.invoke(ctx.endpoint, body, deployment=ctx.rc)
            prod_answer = ctx.backend.invoke(ctx.endpoint, body, deployment=prod) if rc_answer.ok else None
            if not rc_answer.ok or prod_answer is None or not prod_answer.ok:
                who, answer = (ctx.rc, rc_answer) if not rc_answer.ok else (prod, prod_answer)
                what = f"{answer.status} from {who}" if answer is not None else who
                failed[what] = failed.get(what, 0) + 1
                continue
            answered[i] = (parse_answer(rc_answer.body, self.answer_path),
                           parse_answer(prod_answer.body, self.answer_path))
        if failed:  # sent again at the next look: a failing deployment is the other gates' business
            detail = ", ".join(f"{n} x {what}" for what, n in sorted(failed.items()))
            raise Inconclusive(f"{len(answered)} of {len(bodies)} requests answered by both {ctx.rc} and {prod}; "
                               f"the others are sent again at the next look ({detail})",
                               {"failed_requests": sum(failed.values()), "answered": len(answered)})
        out = Paired()
        for i in range(len(bodies)):
            out.add(*answered[i])
        return out

    def _pairs_from_mirror(self, ctx: GateContext, prod: str) -> Paired:
        if not ctx.backend.supports_mirrored_pairs:
            raise Inconclusive(f"backend {ctx.backend.name!r} has no mirrored pairs: use source: header")
        out = Paired()
        for pair in ctx.backend.mirrored_pairs(ctx.endpoint, start=to_datetime(ctx.start), end=to_datetime(ctx.now)):
            if pair.mirror_deployment != ctx.rc or pair.live_deployment != prod:
                continue
            if not (200 <= pair.live_status < 300 and 200 <= pair.mirror_status < 300):
                continue
            out.add(parse_answer(pair.mirror_body, self.answer_path), parse_answer(pair.live_body, self.answer_path))
        return out
