"""The smoke test for any model: 200s from the RC, and answers shaped like PROD's answers to the same requests."""
from __future__ import annotations

import json

import pytest

from saferollout import rollout
from saferollout.backends.base import InvokeResult
from saferollout.errors import GateFailed


class Servers:
    """Model servers answering per deployment: `answers[deployment](request) -> (status, JSON answer)`."""

    def __init__(self, **answers):
        self.answers, self.sent = answers, []

    def invoke(self, endpoint, body, *, deployment=None, timeout_s=60.0):
        self.sent.append(deployment)
        status, answer = self.answers[deployment](json.loads(body))
        raw = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        return InvokeResult(status, raw, deployment, "r1", 2.0)


BODIES = [json.dumps({"data": [[1.0, 2.0], [3.0, 4.0]]}).encode(), json.dumps({"data": [[5.0, 6.0]]}).encode()]
bare = lambda request: (200, [sum(row) for row in request["data"]])  # noqa: E731


def test_an_rc_answering_like_prod_passes_though_its_values_differ():
    servers = Servers(green=lambda r: (200, [sum(row) * 2 for row in r["data"]]), blue=bare)
    smoke = rollout.smoke_test(servers, "ep", "green", BODIES, reference="blue")
    assert smoke.ok and smoke.failures == [] and servers.sent == ["green", "blue", "green", "blue"]


@pytest.mark.parametrize("rc, difference", [
    (lambda r: (200, {"predictions": [sum(x) for x in r["data"]]}), "$ is an object, PROD's a list"),
    (lambda r: (200, [sum(x) for x in r["data"]][:1]), "$ has 1 items, PROD's 2"),
    (lambda r: (200, [str(sum(x)) for x in r["data"]]), "$[0] is a string, PROD's a number"),
])
def test_an_rc_answering_in_another_structure_fails_showing_both_answers(rc, difference):
    smoke = rollout.smoke_test(Servers(green=rc, blue=bare), "ep", "green", BODIES[:1], reference="blue")
    assert not smoke.ok
    assert smoke.failures[0].startswith(f"request 0: the answer's structure differs from PROD's ({difference}): "
                                        "RC answered ")
    assert "PROD 'blue' answered [3.0, 7.0]" in smoke.failures[0]
    with pytest.raises(GateFailed, match="smoke test of 'green' failed: 1 of 1 requests"):
        smoke.raise_if_failed()


def test_object_keys_are_part_of_the_structure():
    prod = lambda r: (200, {"predictions": [1], "model": "m:1"})  # noqa: E731
    rc = lambda r: (200, {"predictions": [1], "version": 2})  # noqa: E731
    smoke = rollout.smoke_test(Servers(green=rc, blue=prod), "ep", "green", BODIES[1:], reference="blue")
    assert "($ has extra key(s) version and missing key(s) model)" in smoke.failures[0]


def test_an_rc_that_fails_or_answers_no_json_fails_the_smoke_test():
    for rc, message in ((lambda r: (500, {"error": "boom"}), "request 0: status 500: "),
                        (lambda r: (200, b"not json"), "request 0: answer is not JSON: not json")):
        smoke = rollout.smoke_test(Servers(green=rc, blue=bare), "ep", "green", BODIES[:1], reference="blue")
        assert not smoke.ok and smoke.failures[0].startswith(message)


def test_prod_failing_to_answer_is_never_a_pass():
    smoke = rollout.smoke_test(Servers(green=bare, blue=lambda r: (424, {"error": "down"})), "ep", "green",
                               BODIES[:1], reference="blue")
    assert not smoke.ok
    assert smoke.failures == ["request 0: PROD 'blue' answered status 424, so the answer's structure cannot be compared"]


def test_a_first_release_needs_only_a_200_with_json():
    servers = Servers(blue=lambda r: (200, {"anything": ["goes"]}))
    assert rollout.smoke_test(servers, "ep", "blue", BODIES).ok and servers.sent == ["blue", "blue"]


def test_structure_difference_treats_ints_and_floats_as_numbers_and_finds_nested_differences():
    assert rollout.structure_difference({"p": [[0.1, 0.9]]}, {"p": [[1, 0]]}) is None
    assert rollout.structure_difference({"p": [[0.1, 0.9]]}, {"p": [[0.2, 0.3, 0.5]]}) == "$.p[0] has 2 items, PROD's 3"
    assert rollout.structure_difference(True, 1) == "$ is a boolean, PROD's a number"
