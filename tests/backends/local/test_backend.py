"""Bad input on the control plane: a clear error naming the problem, and nothing changed afterwards."""
from __future__ import annotations

import pytest
import requests

from saferollout.errors import Conflict, NotFound, SpecError
from saferollout.specs import EndpointSpec

from echo_platform import deploy_all, echo_spec, new_endpoint

NAME_RULE = "use 3-32 letters, digits and '-', starting with a letter and not ending with '-'"


@pytest.fixture(scope="module")
def live(local_backend):
    """blue serves 100%, green is ready with no traffic."""
    endpoint = new_endpoint(local_backend, tags={"PROD_DEPLOYMENT": "blue"})
    deploy_all(local_backend, [echo_spec(endpoint, "blue"), echo_spec(endpoint, "green")])
    local_backend.update_endpoint(endpoint, traffic={"blue": 100})
    yield endpoint
    local_backend.delete_endpoint(endpoint)


def state(backend, endpoint):
    return backend.get_endpoint(endpoint), backend.list_deployments(endpoint), backend.get_credentials(endpoint)


@pytest.mark.parametrize("name", ["ab", "1abc", "bad_name", "ends-", "a" * 33])
def test_invalid_endpoint_names_are_refused(local_backend, name):
    before = {e.name for e in local_backend.list_endpoints()}
    with pytest.raises(SpecError, match=f"invalid endpoint name '{name}': {NAME_RULE}"):
        local_backend.create_endpoint(EndpointSpec(name=name))
    assert {e.name for e in local_backend.list_endpoints()} == before


def test_invalid_deployment_name_is_refused(local_backend, live):
    before = state(local_backend, live)
    with pytest.raises(SpecError, match=f"invalid deployment name 'x_y': {NAME_RULE}"):
        local_backend.create_deployment(echo_spec(live, "x_y"))
    assert state(local_backend, live) == before


def test_an_endpoint_name_is_taken_once(local_backend, live):
    with pytest.raises(Conflict, match=f"endpoint '{live}' already exists"):
        local_backend.create_endpoint(EndpointSpec(name=live))
    assert local_backend.get_endpoint(live).tags == {"PROD_DEPLOYMENT": "blue"}


def test_a_deployment_name_is_taken_once(local_backend, live):
    before = state(local_backend, live)
    with pytest.raises(Conflict, match=f"deployment 'green' already exists on endpoint '{live}': use update"):
        local_backend.create_deployment(echo_spec(live, "green", env={"ECHO_DELAY_MS": "5"}))
    assert state(local_backend, live) == before


@pytest.mark.parametrize("traffic, error, message", [
    ({"blue": 60, "green": 30}, SpecError, r"traffic must sum to 0 or 100, got 90 \(blue=60 green=30\)"),
    ({"blue": 90, "green": 20}, SpecError, r"traffic must sum to 0 or 100, got 110 \(blue=90 green=20\)"),
    ({"blue": 50, "nope": 50}, SpecError, "traffic names unknown deployment\\(s\\): nope"),
    ({"blue": 101}, SpecError, "traffic for 'blue' must be"),
])
def test_bad_traffic_is_refused(local_backend, live, traffic, error, message):
    before = state(local_backend, live)
    with pytest.raises(error, match=message):
        local_backend.update_endpoint(live, traffic=traffic)
    assert state(local_backend, live) == before


@pytest.mark.parametrize("mirror, message", [
    ({"green": 60}, "mirror_traffic for 'green' is 60: at most 50 is allowed"),
    ({"blue": 10}, "cannot mirror to 'blue': it has 100% live traffic"),
    ({"nope": 10}, "mirror_traffic names unknown deployment 'nope'"),
    ({"green": 10, "blue": 10}, "mirror_traffic may name at most one deployment, got green, blue"),
])
def test_bad_mirror_is_refused(local_backend, live, mirror, message):
    before = state(local_backend, live)
    with pytest.raises(SpecError, match=message):
        local_backend.update_endpoint(live, mirror_traffic=mirror)
    assert state(local_backend, live) == before


def test_live_traffic_to_the_mirrored_deployment_is_refused(local_backend, live):
    local_backend.update_endpoint(live, mirror_traffic={"green": 10})
    try:
        before = state(local_backend, live)
        with pytest.raises(SpecError, match="cannot mirror to 'green': it has 50% live traffic"):
            local_backend.update_endpoint(live, traffic={"blue": 50, "green": 50})
        assert state(local_backend, live) == before
    finally:
        local_backend.update_endpoint(live, mirror_traffic={})


def test_an_endpoint_cannot_be_created_with_traffic(local_backend):
    name = "ep-traffic-first"
    with pytest.raises(SpecError, match=f"endpoint '{name}' has no deployments yet: create it without traffic"):
        local_backend.create_endpoint(EndpointSpec(name=name, traffic={"blue": 100}))
    with pytest.raises(NotFound, match=f"endpoint '{name}' not found"):
        local_backend.get_endpoint(name)


def test_unknown_endpoint_and_deployment_are_not_found(local_backend, live):
    with pytest.raises(NotFound, match="endpoint 'no-such-endpoint' not found"):
        local_backend.update_endpoint("no-such-endpoint", traffic={"blue": 100})
    with pytest.raises(NotFound, match=f"deployment 'nope' not found on endpoint '{live}'"):
        local_backend.delete_deployment(live, "nope")
    with pytest.raises(NotFound, match="endpoint 'no-such-endpoint' not found"):
        local_backend.create_deployment(echo_spec("no-such-endpoint", "blue"))


def test_regenerating_an_unknown_key_type_is_refused(local_backend, live):
    before = state(local_backend, live)
    with pytest.raises(SpecError, match="key type must be primary or secondary, got 'tertiary'"):
        local_backend.regenerate_keys(live, "tertiary")
    assert state(local_backend, live) == before


def test_the_control_api_refuses_calls_without_the_admin_token(local_backend, live):
    url = f"http://127.0.0.1:{local_backend._platform()['control_port']}/api/endpoints/{live}"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = requests.patch(url, json={"traffic": {"green": 100}}, headers=headers, timeout=10)
        assert resp.status_code == 401 and resp.json()["error"]["message"] == "invalid admin token"
    assert local_backend.get_endpoint(live).traffic == {"blue": 100}


def test_tags_update_keeps_traffic(local_backend, live):
    before = local_backend.get_endpoint(live)
    after = local_backend.update_endpoint(live, tags={**before.tags, "RC_DEPLOYMENT": "green"})
    assert after.tags == {"PROD_DEPLOYMENT": "blue", "RC_DEPLOYMENT": "green"}
    assert after.traffic == before.traffic and after.scoring_uri == before.scoring_uri
    local_backend.update_endpoint(live, tags=before.tags)


def test_processes_creating_a_workspace_at_once_agree_on_one_private_admin_token(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    from saferollout.backends.local.workspace import admin_token

    with ProcessPoolExecutor(4) as pool:
        tokens = set(pool.map(admin_token, [tmp_path] * 16))
    assert len(tokens) == 1 and len(tokens.pop()) >= 40
    assert (tmp_path / "admin.token").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["admin.token"]  # no drafts left behind
