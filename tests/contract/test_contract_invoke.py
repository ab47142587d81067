"""The data plane through the protocol: routing by traffic, the deployment header, who answered, errors."""
import json
import time
from datetime import datetime, timedelta, timezone

import pytest

from saferollout.data import to_request


@pytest.fixture(scope="module")
def request_body(credit_split) -> dict:
    return to_request(credit_split.X_test.head(3))


def test_unpinned_request_goes_where_the_traffic_is(backend, live_endpoint, request_body):
    result = backend.invoke(live_endpoint, request_body)
    assert result.status == 200, result.text
    assert result.deployment == "blue"
    assert result.request_id
    answer = result.json()
    assert len(answer["predictions"]) == 3 and all(0 <= p <= 1 for p in answer["probabilities"])


def test_header_pins_the_deployment_and_does_not_stick(backend, live_endpoint, request_body):
    pinned = backend.invoke(live_endpoint, request_body, deployment="green")
    assert (pinned.status, pinned.deployment) == (200, "green")
    # the next call without the header follows the traffic again (the SDK's invoke would keep the header)
    assert backend.invoke(live_endpoint, request_body).deployment == "blue"


def test_pinned_and_routed_answers_agree_for_the_same_model(backend, live_endpoint, request_body):
    blue = backend.invoke(live_endpoint, json.dumps(request_body), deployment="blue").json()
    green = backend.invoke(live_endpoint, json.dumps(request_body).encode(), deployment="green").json()
    assert blue["probabilities"] == green["probabilities"]


def test_split_traffic_reaches_both_deployments(backend, live_endpoint, request_body):
    try:
        backend.update_endpoint(live_endpoint, traffic={"blue": 50, "green": 50})
        served = {backend.invoke(live_endpoint, request_body).deployment for _ in range(40)}
    finally:
        backend.update_endpoint(live_endpoint, traffic={"blue": 100, "green": 0})
    assert served == {"blue", "green"}  # each missed with probability 2 * 0.5**40


def test_unknown_deployment_header_is_404_with_message(backend, live_endpoint, request_body):
    result = backend.invoke(live_endpoint, request_body, deployment="purple")
    assert result.status == 404
    assert "purple" in result.text


def test_malformed_json_is_400(backend, live_endpoint):
    result = backend.invoke(live_endpoint, b'{"data": [')
    assert result.status == 400
    assert "malformed JSON" in result.text


def test_model_error_is_424_and_names_the_deployment(backend, live_endpoint, request_body):
    result = backend.invoke(live_endpoint, request_body, deployment="red")
    assert result.status == 424
    assert result.deployment == "red"


def test_endpoint_without_traffic_answers_404(backend, make_endpoint, request_body):
    name = make_endpoint()
    result = backend.invoke(name, request_body)
    assert result.status == 404


def test_regenerated_key_is_picked_up_by_the_same_client(backend, live_endpoint, request_body):
    backend.regenerate_keys(live_endpoint, "primary")
    assert backend.invoke(live_endpoint, request_body).status == 200


def test_mirrored_requests_reach_the_mirror_but_never_answer_the_client(backend, live_endpoint, request_body):
    start = datetime.now(timezone.utc)
    try:
        backend.update_endpoint(live_endpoint, mirror_traffic={"green": 50})
        served = {backend.invoke(live_endpoint, request_body).deployment for _ in range(30)}
    finally:
        backend.update_endpoint(live_endpoint, mirror_traffic={})
    assert served == {"blue"}
    mirrored = 0.0
    for _ in range(50):  # the mirror answers in the background: wait for it, boundedly (at most ~10 s)
        series = backend.query_metrics(live_endpoint, "RequestsPerMinute", aggregation="Total", start=start,
                                       end=datetime.now(timezone.utc) + timedelta(seconds=1),
                                       filter="deployment eq 'green'")
        mirrored = sum(p.value or 0 for s in series for p in s.points)
        if mirrored:
            break
        time.sleep(0.2)
    assert mirrored > 0  # 30 requests at 50%: none mirrored with probability 0.5**30
