"""An in-memory Backend double for gate tests: synthetic request rows behind the Backend protocol.

Metrics come from the local platform's own aggregation code (`metrics.aggregate`) over the rows, so a
gate reads the same series here as on the real platform; samples, models, deployments, invoke and
mirrored pairs are plain in-memory data.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

import numpy as np

from saferollout.backends.base import (Deployment, Endpoint, InvokeResult, MetricPoint, MetricSeries, MirroredPair, Model,
                                       RequestSample)
from saferollout.backends.local.metrics import aggregate, request_row
from saferollout.errors import NotFound

ENDPOINT = "credit"
T0 = 1_800_000_000.0  # a minute boundary, so PT1M buckets line up with the window in known-answer tests


def _epoch(moment: Any) -> float:
    return moment.timestamp() if isinstance(moment, datetime) else float(moment)


def stream(deployment: str, n: int, start: float, end: float, *, error_rate: float = 0.0,
           latency: Callable[[np.random.Generator, int], np.ndarray] | None = None,
           seed: int = 0) -> list[tuple]:
    """n request rows spread uniformly over [start, end): Bernoulli errors (500), latencies in ms."""
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(start, end, n))
    errors = rng.random(n) < error_rate
    ms = latency(rng, n) if latency else rng.lognormal(np.log(50), 0.4, n)
    return [(float(t), ENDPOINT, deployment, 500 if e else 200, float(l), 0, f"r{deployment}{i}", 500 if e else 200)
            for i, (t, e, l) in enumerate(zip(times, errors, ms))]


class FakeBackend:
    """Backend protocol over in-memory rows; `scorers` answer `invoke` per deployment."""

    name = "fake"
    finest_grain = "PT1M"

    def __init__(self, rows: Iterable[tuple] = (), *, models: dict[tuple[str, int], Model] | None = None,
                 deployments: dict[str, str] | None = None, pairs: Iterable[MirroredPair] = (),
                 scorers: dict[str, Callable[[bytes], tuple[int, Any]]] | None = None,
                 raw_samples: bool = True, mirrored: bool = True, traffic: dict[str, int] | None = None):
        self.rows = list(rows)
        self.traffic = traffic or {}
        self.models = models or {}
        self.deployments = deployments or {}  # deployment -> model reference
        self.pairs = list(pairs)
        self.scorers = scorers or {}
        self.supports_raw_samples = raw_samples
        self.metrics_delay_s = 0.0
        self.supports_mirrored_pairs = mirrored
        self.invocations = 0

    def query_metrics(self, endpoint: str, metric: str, *, aggregation: str = "Average", grain: str = "PT1M",
                      start=None, end=None, filter: str | None = None, split_by=()) -> list[MetricSeries]:
        rows = [request_row(*r) for r in self.rows if r[1] == endpoint]
        series = aggregate(rows, metric, aggregation, grain, _epoch(start), _epoch(end), filter, split_by)
        return [MetricSeries(s["metric"], s["aggregation"], s["grain"], s["dimensions"],
                             [MetricPoint(datetime.fromtimestamp(p["timestamp"], tz=timezone.utc), p["value"])
                              for p in s["points"]]) for s in series]

    def request_samples(self, endpoint: str, *, deployment: str | None = None, start=None, end=None,
                        include_mirrored: bool = False) -> list[RequestSample]:
        lo, hi = _epoch(start), _epoch(end)
        rows = [request_row(*r) for r in self.rows]
        return [RequestSample(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], bool(r[8]), bool(r[9]))
                for r in rows
                if r[1] == endpoint and lo <= r[0] < hi and (deployment is None or r[2] == deployment)
                and (include_mirrored or not r[5])]

    def get_endpoint(self, name: str) -> Endpoint:
        """The endpoint with `traffic` as given (none by default: the gates then use the realised share)."""
        return Endpoint(name=name, auth_mode="key", scoring_uri="", traffic=dict(self.traffic))

    def get_deployment(self, endpoint: str, name: str) -> Deployment:
        if name not in self.deployments:
            raise NotFound(f"deployment {name!r} not found on endpoint {endpoint!r}")
        return Deployment(name=name, endpoint_name=endpoint, model=self.deployments[name],
                          provisioning_state="Succeeded")

    def get_model(self, name: str, version: int | str | None = None) -> Model:
        key = (name, int(version)) if version is not None else max(k for k in self.models if k[0] == name)
        if key not in self.models:
            raise NotFound(f"model {name}:{version} not found")
        return self.models[key]

    def invoke(self, endpoint: str, body, *, deployment: str | None = None, timeout_s: float = 60.0) -> InvokeResult:
        self.invocations += 1
        status, answer = self.scorers[deployment](body)
        return InvokeResult(status, json.dumps(answer).encode(), deployment, None, 1.0)

    def mirrored_pairs(self, endpoint: str, *, start=None, end=None) -> list[MirroredPair]:
        lo, hi = _epoch(start), _epoch(end)
        return [p for p in self.pairs if p.endpoint == endpoint and lo <= p.timestamp < hi]


def lognormal(median_ms: float = 50.0, sigma: float = 0.4, scale: float = 1.0):
    return lambda rng, n: rng.lognormal(np.log(median_ms), sigma, n) * scale
