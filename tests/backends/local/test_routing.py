"""The traffic split over 10,000 real requests, on a private platform whose routing draws are seeded.

Seeded draws make the test exact rather than right 99 times in 100: however the concurrent requests
interleave, the platform makes the same 10,000 draws, so the counts (and the chi-square p-value) are the
same on every run. The draws themselves are the gateway's own, through real HTTP.
"""
from __future__ import annotations

from collections import Counter

import pytest
from scipy.stats import chisquare

from saferollout.backends.local.backend import LocalBackend
from saferollout.backends.local.client import stop_platform
from saferollout.backends.local.platform import ROUTING_SEED_ENV, routing_rng
from saferollout.errors import SpecError

from echo_platform import auth, deploy_all, echo_spec, fire, new_endpoint

N = 10_000


@pytest.fixture(scope="module")
def seeded_backend(tmp_path_factory):
    home = tmp_path_factory.mktemp("seeded-home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ROUTING_SEED_ENV, "20261127")  # read by the platform process this starts
        backend = LocalBackend(home)
        backend.list_endpoints()
    try:
        yield backend
    finally:
        stop_platform(home)


def test_a_90_10_split_over_10000_requests_does_not_reject_at_1_percent(seeded_backend):
    endpoint = new_endpoint(seeded_backend)
    deploy_all(seeded_backend, [echo_spec(endpoint, "blue"), echo_spec(endpoint, "green")])
    seeded_backend.update_endpoint(endpoint, traffic={"blue": 90, "green": 10})
    uri = seeded_backend.get_endpoint(endpoint).scoring_uri
    answers = fire(uri, [{"i": i} for i in range(N)], headers=auth(seeded_backend, endpoint), concurrency=16)
    assert Counter(a.status for a in answers) == {200: N}
    served = Counter(a.deployment for a in answers)
    result = chisquare([served["blue"], served["green"]], [0.9 * N, 0.1 * N])
    assert result.pvalue > 0.01, f"split {dict(served)} rejects 90/10 (p={result.pvalue:.4g})"
    # the platform's own record agrees with what the clients saw
    samples = Counter(s.deployment for s in seeded_backend.request_samples(endpoint))
    assert samples == served


def test_a_routing_seed_that_is_not_a_number_is_refused(monkeypatch):
    monkeypatch.setenv(ROUTING_SEED_ENV, "abc")
    with pytest.raises(SpecError, match="SAFEROLLOUT_ROUTING_SEED must be a whole number, got 'abc'"):
        routing_rng()
