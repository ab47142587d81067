"""Endpoints: create, show, list, update tags and description, delete; keys, tokens and regeneration."""
import pytest

from saferollout.errors import Conflict, NotFound, SpecError
from saferollout.specs import EndpointSpec


def test_create_show_list_delete(backend, make_endpoint):
    name = make_endpoint()
    endpoint = backend.get_endpoint(name)
    assert endpoint.auth_mode == "key"
    assert endpoint.scoring_uri.endswith("/score")
    assert endpoint.tags == {"project": "saferollout"}
    assert endpoint.provisioning_state == "Succeeded"
    assert name in [e.name for e in backend.list_endpoints()]
    backend.delete_endpoint(name)
    with pytest.raises(NotFound, match=name):
        backend.get_endpoint(name)
    assert name not in [e.name for e in backend.list_endpoints()]


def test_creating_an_existing_endpoint_conflicts_and_keeps_it(backend, make_endpoint):
    name = make_endpoint()
    with pytest.raises(Conflict, match="already exists"):
        backend.create_endpoint(EndpointSpec(name=name, description="replaced?"))
    assert backend.get_endpoint(name).description == "German credit risk scoring"


def test_invalid_name_is_refused(backend):
    with pytest.raises(SpecError, match="invalid endpoint name"):
        backend.create_endpoint(EndpointSpec(name="1-starts-with-a-digit"))


def test_traffic_at_creation_is_refused(backend, unique_name):
    name = unique_name("ct")
    with pytest.raises(SpecError, match="has no deployments yet"):
        backend.create_endpoint(EndpointSpec(name=name, traffic={"blue": 100}))
    with pytest.raises(NotFound):
        backend.get_endpoint(name)


def test_update_replaces_tags_and_description(backend, make_endpoint):
    name = make_endpoint()
    backend.update_endpoint(name, tags={"PROD_DEPLOYMENT": "blue", "owner": "risk"}, description="v2")
    endpoint = backend.get_endpoint(name)
    assert endpoint.tags == {"PROD_DEPLOYMENT": "blue", "owner": "risk"}
    assert endpoint.description == "v2"
    backend.update_endpoint(name, tags={"owner": "risk"})
    assert backend.get_endpoint(name).tags == {"owner": "risk"}


def test_unknown_endpoint_is_not_found(backend, unique_name):
    name = unique_name("missing")
    for call in (backend.get_endpoint, backend.delete_endpoint, backend.get_credentials):
        with pytest.raises(NotFound, match=name):
            call(name)
    with pytest.raises(NotFound, match=name):
        backend.update_endpoint(name, tags={"a": "b"})


def test_regenerating_a_key_changes_only_that_key(backend, make_endpoint):
    name = make_endpoint()
    before = backend.get_credentials(name)
    assert before.auth_mode == "key" and before.primary_key and before.secondary_key
    assert before.primary_key != before.secondary_key
    after = backend.regenerate_keys(name, "secondary")
    assert after.primary_key == before.primary_key
    assert after.secondary_key != before.secondary_key
    assert backend.get_credentials(name).secondary_key == after.secondary_key


def test_bad_key_type_is_refused_and_keys_unchanged(backend, make_endpoint):
    name = make_endpoint()
    before = backend.get_credentials(name)
    with pytest.raises(SpecError, match="key type must be primary or secondary"):
        backend.regenerate_keys(name, "tertiary")
    assert backend.get_credentials(name) == before


def test_token_endpoint_gives_an_expiring_token_and_has_no_keys(backend, make_endpoint):
    name = make_endpoint(auth_mode="aml_token")
    credentials = backend.get_credentials(name)
    assert credentials.auth_mode == "aml_token"
    assert credentials.access_token and credentials.primary_key is None
    assert credentials.expiry_time_utc is not None
    with pytest.raises(SpecError, match="only key endpoints have keys"):
        backend.regenerate_keys(name)


def test_tag_changes_apply_to_the_tags_the_endpoint_has(backend, make_endpoint):
    name = make_endpoint("tg")
    backend.update_endpoint(name, tags={"team": "risk", "stage": "dev"})
    updated = backend.update_endpoint(name, set_tags={"owner": "me", "stage": "prod"}, remove_tags=["team", "absent"])
    assert updated.tags == {"owner": "me", "stage": "prod"} == backend.get_endpoint(name).tags
    with pytest.raises(SpecError, match="not both"):
        backend.update_endpoint(name, tags={}, set_tags={"a": "1"})
