"""Traffic and mirror rules: the same refusals with the same messages, and nothing changed afterwards."""
import pytest

from saferollout.errors import SpecError


def live(endpoint) -> dict[str, int]:
    return {k: v for k, v in endpoint.traffic.items() if v}


@pytest.mark.parametrize("traffic, message", [
    ({"blue": 90, "green": 20}, "traffic must sum to 0 or 100, got 110"),
    ({"blue": 50}, "traffic must sum to 0 or 100, got 50"),
    ({"blue": 90, "purple": 10}, "unknown deployment.*purple"),
    ({"blue": 101}, "must be at most 100"),
])
def test_bad_traffic_is_refused_and_nothing_changes(backend, live_endpoint, traffic, message):
    with pytest.raises(SpecError, match=message):
        backend.update_endpoint(live_endpoint, traffic=traffic)
    endpoint = backend.get_endpoint(live_endpoint)
    assert live(endpoint) == {"blue": 100} and not any(endpoint.mirror_traffic.values())


@pytest.mark.parametrize("mirror, message", [
    ({"green": 60}, "at most 50 is allowed"),
    ({"blue": 10}, "cannot mirror to 'blue': it has 100% live traffic"),
    ({"green": 10, "red": 10}, "at most one deployment"),
    ({"purple": 10}, "unknown deployment 'purple'"),
])
def test_bad_mirror_is_refused_and_nothing_changes(backend, live_endpoint, mirror, message):
    with pytest.raises(SpecError, match=message):
        backend.update_endpoint(live_endpoint, mirror_traffic=mirror)
    endpoint = backend.get_endpoint(live_endpoint)
    assert live(endpoint) == {"blue": 100} and not any(endpoint.mirror_traffic.values())


def test_shift_traffic_then_back(backend, live_endpoint):
    try:
        assert live(backend.update_endpoint(live_endpoint, traffic={"blue": 90, "green": 10})) == \
            {"blue": 90, "green": 10}
        assert live(backend.get_endpoint(live_endpoint)) == {"blue": 90, "green": 10}
    finally:
        backend.update_endpoint(live_endpoint, traffic={"blue": 100, "green": 0})
    assert live(backend.get_endpoint(live_endpoint)) == {"blue": 100}


def test_mirror_on_and_off(backend, live_endpoint):
    try:
        endpoint = backend.update_endpoint(live_endpoint, mirror_traffic={"green": 20})
        assert {k: v for k, v in endpoint.mirror_traffic.items() if v} == {"green": 20}
        assert live(endpoint) == {"blue": 100}  # mirroring leaves live traffic alone
    finally:
        backend.update_endpoint(live_endpoint, mirror_traffic={})
    assert not any(backend.get_endpoint(live_endpoint).mirror_traffic.values())


def test_a_mirrored_deployment_cannot_get_live_traffic_in_the_same_change(backend, live_endpoint):
    with pytest.raises(SpecError, match="cannot mirror to 'green'"):
        backend.update_endpoint(live_endpoint, traffic={"blue": 50, "green": 50}, mirror_traffic={"green": 10})
    assert live(backend.get_endpoint(live_endpoint)) == {"blue": 100}
