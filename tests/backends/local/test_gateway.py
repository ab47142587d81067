"""The gateway against real azmlinfsrv instances: routing, the deployment header, mirror, auth, limits.

One endpoint with several echo deployments serves the module; each test reaches the deployment it needs
through the `azureml-model-deployment` header or the endpoint's split, and leaves traffic as it found it.
"""
from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
import requests
from scipy.stats import chisquare

from saferollout.backends.local.gateway import DeploymentPool, EndpointRoute

from echo_platform import PATIENT_LIVENESS, auth, deploy_all, echo_spec, fire, new_endpoint

SPLIT = {"blue": 90, "green": 10}


@pytest.fixture(scope="module")
def gw(local_backend):
    """An endpoint at blue=90 green=10, plus deployments without live traffic for the edge cases."""
    endpoint = new_endpoint(local_backend)
    states = deploy_all(local_backend, [
        echo_spec(endpoint, "blue", liveness=PATIENT_LIVENESS),
        echo_spec(endpoint, "green", liveness=PATIENT_LIVENESS),
        # the mirror's target: an admission limit (2*128) above any burst of copies these tests make
        echo_spec(endpoint, "shadow", max_concurrent=128, liveness=PATIENT_LIVENESS),
        # two instances, one request each at a time, each request held 2 s: admission limit 2*1*2 = 4
        echo_spec(endpoint, "slow", instance_count=2, max_concurrent=1, env={"ECHO_DELAY_MS": "2000"},
                  liveness=PATIENT_LIVENESS),
        echo_spec(endpoint, "late", timeout_ms=300, env={"ECHO_DELAY_MS": "1500"}, liveness=PATIENT_LIVENESS),
        echo_spec(endpoint, "broken", env={"ECHO_FAIL": "1"}, liveness=PATIENT_LIVENESS),
    ])
    assert {n: d.provisioning_state for n, d in states.items()} == dict.fromkeys(states, "Succeeded")
    local_backend.update_endpoint(endpoint, traffic=SPLIT)
    yield endpoint
    local_backend.delete_endpoint(endpoint)


@pytest.fixture
def uri(local_backend, gw):
    return local_backend.get_endpoint(gw).scoring_uri


def post(uri: str, body: bytes | dict, headers: dict[str, str]) -> requests.Response:
    data = body if isinstance(body, bytes) else None
    return requests.post(uri, data=data, json=None if data is not None else body, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def split_run(local_backend, gw):
    """1,000 unpinned requests sent 16 at a time, and the window they were sent in."""
    uri = local_backend.get_endpoint(gw).scoring_uri
    started = time.time()
    answers = fire(uri, [{"i": i} for i in range(1_000)], headers=auth(local_backend, gw), concurrency=16)
    return answers, started, time.time() + 0.001


def test_the_routing_choice_honours_the_90_10_split_over_10000_draws():
    """The draw the gateway makes for every unpinned request, 10,000 times (fast: no HTTP)."""
    route = EndpointRoute("ep", "key", ("k",), dict(SPLIT), {}, pools={
        name: DeploymentPool("ep", name, 1, 5000) for name in ("blue", "green", "idle")})
    rng = random.Random(20261127)  # seeded: a fair draw passes a 1% test 99% of the time, so fix which 1%
    draws = Counter(route.choose(rng).name for _ in range(10_000))
    assert set(draws) == {"blue", "green"}  # a deployment at 0% is never drawn
    result = chisquare([draws["blue"], draws["green"]], [9_000, 1_000])
    assert result.pvalue > 0.01, f"split {dict(draws)} rejects 90/10 (p={result.pvalue:.4g})"


def test_a_failed_deployment_is_never_drawn():
    route = EndpointRoute("ep", "key", ("k",), {"blue": 50, "green": 50}, {}, pools={
        name: DeploymentPool("ep", name, 1, 5000) for name in ("blue", "green")})
    route.pools["green"].failed = True
    assert {route.choose(random.Random(seed)).name for seed in range(200)} == {"blue"}


def test_weighted_routing_honours_the_90_10_split_end_to_end(split_run):
    answers, _, _ = split_run
    assert Counter(a.status for a in answers) == {200: 1_000}, Counter((a.status, str(a.body)[:80]) for a in answers)
    served = Counter(a.deployment for a in answers)
    # the answer header and the instance's own answer agree on who served
    assert all(a.body["name"] == a.deployment for a in answers)
    observed = [served["blue"], served["green"]]
    assert sum(observed) == 1_000
    result = chisquare(observed, [900, 100])
    # the platform's draws are not seeded (other tests share it): at 0.1% this fails once in a thousand runs
    assert result.pvalue > 0.001, f"split {observed} rejects 90/10 (p={result.pvalue:.4g})"


def test_a_request_pinned_with_the_deployment_header_is_recorded_as_pinned(local_backend, gw):
    start = time.time() - 1
    pinned = local_backend.invoke(gw, {"x": 1}, deployment="green")
    routed = local_backend.invoke(gw, {"x": 1})
    samples = {s.request_id: s for s in local_backend.request_samples(gw, start=start, end=time.time() + 1)}
    assert pinned.status == routed.status == 200
    assert samples[pinned.request_id].pinned is True and samples[routed.request_id].pinned is False
    # Azure Monitor counts pinned requests as any other: so do the platform's metrics
    [series] = local_backend.query_metrics(gw, "RequestsPerMinute", aggregation="Total", grain="PT1M", start=start,
                                           end=time.time() + 1, filter="deployment eq 'green'")
    assert sum(p.value or 0 for p in series.points) >= 1


def test_every_request_is_recorded_with_its_deployment_and_status(local_backend, gw, split_run):
    answers, start, end = split_run
    samples = local_backend.request_samples(gw, start=start, end=end)
    ours = {a.request_id for a in answers}
    recorded = [s for s in samples if s.request_id in ours]
    assert len(recorded) == 1_000
    assert Counter(s.deployment for s in recorded) == Counter(a.deployment for a in answers)
    assert {s.status_code for s in recorded} == {200} and not any(s.mirrored or s.pinned for s in recorded)
    [green] = local_backend.query_metrics(gw, "RequestsPerMinute", aggregation="Total", grain="PT1M",
                                          start=start, end=end, filter="deployment eq 'green'")
    assert sum(p.value or 0 for p in green.points) == Counter(a.deployment for a in answers)["green"]


def test_deployment_header_pins_the_deployment_and_the_answer_names_it(local_backend, gw, uri):
    answers = fire(uri, [{"i": i} for i in range(40)], headers=auth(local_backend, gw, **{
        "azureml-model-deployment": "green"}))
    assert {(a.status, a.deployment, a.body["name"]) for a in answers} == {(200, "green", "green")}
    # a deployment without live traffic is reachable through the header too (smoke tests do this)
    resp = post(uri, {"x": 1}, auth(local_backend, gw, **{"azureml-model-deployment": "shadow"}))
    assert resp.status_code == 200 and resp.headers["azureml-model-deployment"] == "shadow"
    assert resp.headers["x-request-id"]


def test_unknown_deployment_header_is_404_and_changes_nothing(local_backend, gw, uri):
    before = local_backend.get_endpoint(gw)
    resp = post(uri, {"x": 1}, auth(local_backend, gw, **{"azureml-model-deployment": "nope"}))
    assert resp.status_code == 404
    assert resp.json()["message"] == f"deployment 'nope' not found on endpoint '{gw}'"
    assert local_backend.get_endpoint(gw) == before


def test_unknown_endpoint_is_404(local_backend, gw, uri):
    resp = post(uri.replace(f"/{gw}/", "/no-such-endpoint/"), {"x": 1}, auth(local_backend, gw))
    assert resp.status_code == 404 and resp.json()["message"] == "endpoint 'no-such-endpoint' not found"


def test_mirror_copies_only_unpinned_requests_and_never_answers_the_client(local_backend, gw, uri):
    local_backend.update_endpoint(gw, mirror_traffic={"shadow": 50})
    try:
        started = time.time()
        unpinned = fire(uri, [{"i": i} for i in range(200)], headers=auth(local_backend, gw), concurrency=2)
        pinned = fire(uri, [{"p": i} for i in range(30)], headers=auth(local_backend, gw, **{
            "azureml-model-deployment": "blue"}))
        time.sleep(0.5)  # mirrored copies finish in the background
        end = time.time()
    finally:
        local_backend.update_endpoint(gw, mirror_traffic={})
    assert all(a.status == 200 and a.deployment in SPLIT and a.body["name"] in SPLIT for a in unpinned + pinned)
    mirrored = [s for s in local_backend.request_samples(gw, deployment="shadow", start=started, end=end,
                                                         include_mirrored=True)]
    shadow = local_backend.get_deployment(gw, "shadow").instances
    assert mirrored and all(s.mirrored and s.status_code == 200 for s in mirrored), (
        Counter((s.status_code, s.model_status_code) for s in mirrored), shadow)
    assert 60 <= len(mirrored) <= 140, f"{len(mirrored)} of 200 mirrored at 50%"
    assert not local_backend.request_samples(gw, deployment="shadow", start=started, end=end)  # not live
    pairs = local_backend.mirrored_pairs(gw, start=started, end=end)
    pinned_ids = {a.request_id for a in pinned}
    by_id = {a.request_id: a for a in unpinned}
    assert {p.request_id for p in pairs} == {s.request_id for s in mirrored}
    assert not pinned_ids & {p.request_id for p in pairs}
    for pair in pairs:
        client = by_id[pair.request_id]
        assert pair.live_deployment == client.deployment and pair.mirror_deployment == "shadow"
        assert b'"name": "shadow"' in pair.mirror_body.replace(b'":"', b'": "')
        assert pair.request_body.replace(b" ", b"") == f'{{"i":{client.body["echo"]["i"]}}}'.encode()


def test_a_mirror_copy_beyond_the_mirror_deployments_limit_is_refused_429_and_the_client_never_sees_it(
        local_backend, gw, uri):
    # slow: limit 4 in flight, each copy held 2 s; forty requests, twelve at a time (within blue's limit of 16),
    # about twenty copies (mirror at most 50%, as on Azure): four taken, the rest refused
    local_backend.update_endpoint(gw, mirror_traffic={"slow": 50})
    try:
        started = time.time()
        answers = fire(uri, [{"m": i} for i in range(40)], headers=auth(local_backend, gw), concurrency=12)
    finally:
        local_backend.update_endpoint(gw, mirror_traffic={})
    assert all(a.status == 200 and a.deployment in SPLIT for a in answers)
    ours = {a.request_id for a in answers}
    deadline, copies = time.monotonic() + 30, Counter()
    while time.monotonic() < deadline and copies[(200, 200, True)] < 4:
        time.sleep(0.2)  # the four taken copies finish 2 s after they started
        copies = Counter((s.status_code, s.model_status_code, s.mirrored) for s in local_backend.request_samples(
            gw, deployment="slow", start=started, end=time.time(), include_mirrored=True) if s.request_id in ours)
    assert set(copies) == {(200, 200, True), (429, None, True)} and copies[(200, 200, True)] == 4, copies


def test_request_over_request_timeout_ms_is_408(local_backend, gw, uri):
    resp = post(uri, {"x": 1}, auth(local_backend, gw, **{"azureml-model-deployment": "late"}))
    assert resp.status_code == 408
    assert resp.json()["message"] == "request timed out after 300 ms (request_timeout_ms)"
    assert resp.headers["azureml-model-deployment"] == "late"


def test_over_twice_the_concurrency_of_all_instances_is_429_and_load_is_balanced(local_backend, gw, uri):
    answers = fire(uri, [{"i": i} for i in range(7)], headers=auth(local_backend, gw, **{
        "azureml-model-deployment": "slow"}), concurrency=7)
    statuses = Counter(a.status for a in answers)
    assert statuses == {200: 4, 429: 3}  # limit: 2 * max_concurrent_requests_per_instance(1) * instances(2)
    refused = next(a for a in answers if a.status == 429)
    assert refused.body["message"] == "too many requests for deployment 'slow': 4 in flight, limit 4"
    served_by = {a.body["pid"] for a in answers if a.status == 200}
    assert len(served_by) == 2  # both instances took requests


def test_model_server_failure_is_424_with_its_status(local_backend, gw, uri):
    resp = post(uri, {"x": 1}, auth(local_backend, gw, **{"azureml-model-deployment": "broken"}))
    assert resp.status_code == 424
    assert resp.json()["message"] == "model server answered 500"
    assert resp.headers["ms-azureml-model-error-statuscode"] == "500"
    # the inference server's own error body is passed on for diagnosis
    assert "error occurred in scoring script" in resp.json()["model_error"]


def test_body_over_the_size_limit_is_413(local_backend, gw, uri):
    big = b'{"data": "' + b"x" * (1536 * 1024) + b'"}'
    resp = post(uri, big, auth(local_backend, gw, **{"Content-Type": "application/json"}))
    assert resp.status_code == 413
    assert resp.json()["message"] == f"request body of {len(big)} bytes is over the limit of {1536 * 1024} bytes"


def test_a_body_just_under_the_limit_goes_through_whole(local_backend, gw, uri):
    text = "x" * (1536 * 1024 - 64)
    resp = post(uri, {"data": text}, auth(local_backend, gw, **{"azureml-model-deployment": "blue"}))
    assert resp.status_code == 200 and resp.json()["echo"] == {"data": text}


def test_malformed_json_is_400_and_not_forwarded(local_backend, gw, uri):
    start = time.time()
    resp = post(uri, b'{"data": [1, 2', auth(local_backend, gw, **{"Content-Type": "application/json"}))
    assert resp.status_code == 400
    assert resp.json()["message"].startswith("malformed JSON in request body: ")
    rid = resp.headers["x-request-id"]
    assert rid not in {s.request_id for s in local_backend.request_samples(gw, start=start, end=time.time() + 1)}


BAD_REQUESTS = {
    "malformed JSON": (b'{"data": [1, 2', {"Content-Type": "application/json"}, 400,
                       "malformed JSON in request body: Expecting ',' delimiter: line 1 column 15 (char 14)"),
    "too large": (b'"' + b"x" * (1536 * 1024) + b'"', {"Content-Type": "application/json"}, 413,
                  f"request body of {1536 * 1024 + 2} bytes is over the limit of {1536 * 1024} bytes"),
    "no credentials": ({"x": 1}, {"Authorization": ""}, 401,
                       "missing credentials: send 'Authorization: Bearer <key or token>'"),
    "wrong key": ({"x": 1}, {"Authorization": "Bearer wrong"}, 401, "invalid key"),
    "unknown deployment": ({"x": 1}, {"azureml-model-deployment": "nope"}, 404, "deployment 'nope' not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_a_bad_request_is_refused_and_changes_nothing(local_backend, gw, uri, case):
    body, headers, status, message = BAD_REQUESTS[case]
    before = local_backend.get_endpoint(gw), local_backend.get_credentials(gw), local_backend.list_deployments(gw)
    start = time.time()
    resp = post(uri, body, {**auth(local_backend, gw), **headers})
    assert resp.status_code == status and resp.json()["message"].startswith(message)
    after = local_backend.get_endpoint(gw), local_backend.get_credentials(gw), local_backend.list_deployments(gw)
    assert after == before
    # nothing was routed, so nothing was recorded against a deployment
    assert resp.headers["x-request-id"] not in {
        s.request_id for s in local_backend.request_samples(gw, start=start, end=time.time() + 1, include_mirrored=True)}
    assert post(uri, {"x": 1}, auth(local_backend, gw)).status_code == 200


@pytest.mark.parametrize("header, message", [
    (None, "missing credentials: send 'Authorization: Bearer <key or token>'"),
    ("Bearer not-the-key", "invalid key"),
    ("Basic abc", "missing credentials: send 'Authorization: Bearer <key or token>'"),
])
def test_missing_or_wrong_key_is_401(local_backend, gw, uri, header, message):
    resp = post(uri, {"x": 1}, {"Authorization": header} if header else {})
    assert resp.status_code == 401 and resp.json()["message"] == message


def test_primary_and_secondary_keys_work_and_regenerating_one_revokes_it(local_backend, gw, uri):
    before = local_backend.get_credentials(gw)
    for key in (before.primary_key, before.secondary_key):
        assert post(uri, {"x": 1}, {"Authorization": f"Bearer {key}"}).status_code == 200
    after = local_backend.regenerate_keys(gw, "secondary")
    assert after.primary_key == before.primary_key and after.secondary_key != before.secondary_key
    old = post(uri, {"x": 1}, {"Authorization": f"Bearer {before.secondary_key}"})
    assert old.status_code == 401 and old.json()["message"] == "invalid key"
    for key in (after.primary_key, after.secondary_key):
        assert post(uri, {"x": 1}, {"Authorization": f"Bearer {key}"}).status_code == 200


def test_aml_token_endpoint_accepts_its_token_and_refuses_others(local_backend, gw):
    first, second = new_endpoint(local_backend, "aml_token"), new_endpoint(local_backend, "aml_token")
    try:
        cred = local_backend.get_credentials(first)
        assert cred.auth_mode == "aml_token" and cred.expiry_time_utc > time.time() + 60
        uri = local_backend.get_endpoint(first).scoring_uri
        ok = post(uri, {"x": 1}, {"Authorization": f"Bearer {cred.access_token}"})
        # past authentication, an endpoint without traffic has nothing to route to
        assert ok.status_code == 404
        assert ok.json()["message"] == f"no deployment to route to: endpoint '{first}' has no traffic set"
        foreign = post(uri, {"x": 1}, auth(local_backend, second))
        assert foreign.status_code == 401 and foreign.json()["message"] == "token was issued for another endpoint"
        key = post(uri, {"x": 1}, auth(local_backend, gw))
        assert key.status_code == 401 and key.json()["message"] == "invalid token"
    finally:
        local_backend.delete_endpoint(first)
        local_backend.delete_endpoint(second)


def test_traffic_flips_under_load_without_a_single_failed_request(local_backend, gw, uri):
    headers = auth(local_backend, gw)
    pids = {d.name: [i["pid"] for i in d.instances] for d in local_backend.list_deployments(gw)}
    answers: list = []
    load = threading.Thread(target=lambda: answers.extend(
        fire(uri, [{"i": i} for i in range(1500)], headers=headers, concurrency=6)))
    load.start()
    flips = 0
    try:
        while load.is_alive() and flips < 40:
            for traffic in ({"blue": 0, "green": 100}, {"blue": 100, "green": 0}, {"blue": 50, "green": 50}):
                local_backend.update_endpoint(gw, traffic=traffic)
                flips += 1
                time.sleep(0.02)
    finally:
        load.join(timeout=120)
        local_backend.update_endpoint(gw, traffic=SPLIT)
    assert flips >= 6, "the load ended before traffic flipped a few times"
    assert len(answers) == 1500
    assert Counter(a.status for a in answers) == {200: 1500}
    assert {a.deployment for a in answers} == {"blue", "green"}
    # nothing restarted: the same processes serve before and after
    assert {d.name: [i["pid"] for i in d.instances] for d in local_backend.list_deployments(gw)} == pids


def test_the_advertised_openapi_uri_answers_with_the_serving_deployments_document(local_backend, gw):
    endpoint = local_backend.get_endpoint(gw)
    headers = auth(local_backend, gw)
    assert requests.get(endpoint.openapi_uri, timeout=30).status_code == 401
    resp = requests.get(endpoint.openapi_uri, headers=headers, timeout=30)
    # the inference server's own answer (echo's score.py declares no schema), from the deployment with most traffic
    [blue] = local_backend.get_deployment(gw, "blue").instances
    direct = requests.get(f"http://127.0.0.1:{blue['port']}/swagger.json", timeout=30)
    assert (resp.status_code, resp.content) == (direct.status_code, direct.content)
    assert resp.headers["azureml-model-deployment"] == "blue"
    pinned = requests.get(endpoint.openapi_uri, headers={**headers, "azureml-model-deployment": "green"}, timeout=30)
    assert pinned.headers["azureml-model-deployment"] == "green"
