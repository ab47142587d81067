"""The deployment and endpoint YAML's Azure settings reach Azure: on the SDK entity and in the PUT body.

`egress_public_network_access`, `app_insights_enabled`, `scale_settings`, `data_collector` (deployment) and
`public_network_access`, `identity` (endpoint) are kept in the spec's `extra` (the local platform records
them); the Azure backend hands them to the SDK's own YAML schema, so what is sent is what `az ml` would
send, and what the schema refuses is refused before anything reaches Azure (finding 6).
"""
from pathlib import Path

import pytest
import yaml

from saferollout.errors import SpecError
from saferollout.specs import load_deployment_spec, load_endpoint_spec

IDENTITY = ("/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-saferollout-fake/providers/"
            "Microsoft.ManagedIdentity/userAssignedIdentities/credit-risk-id")
DEPLOYMENT_SETTINGS = {
    "egress_public_network_access": "disabled",
    "app_insights_enabled": True,
    "scale_settings": {"type": "default"},  # managed endpoints scale by Azure Monitor autoscale rules
    "data_collector": {"collections": {"model_inputs": {"enabled": "True"}, "model_outputs": {"enabled": "True"}},
                       "sampling_rate": 0.5},
}


def yaml_with(source: Path, folder: Path, **changes) -> Path:
    """`source` (an example YAML) with `changes`, written beside copies of the example's other files."""
    folder.mkdir(exist_ok=True)
    for sibling in source.parent.iterdir():
        if sibling.is_file():
            (folder / sibling.name).write_text(sibling.read_text())
    data = yaml.safe_load(source.read_text())
    data.update(changes)
    (folder / source.name).write_text(yaml.safe_dump(data))
    return folder / source.name


def put_body(fake, pattern: str) -> dict:
    return fake.transport.sent("PUT", pattern)[-1].json()


def test_deployment_settings_reach_the_wire(azure, fake, served, example_dir, tmp_path):
    path = yaml_with(example_dir / "deployment.yml", tmp_path / "release", name="green", endpoint_name=served,
                     **DEPLOYMENT_SETTINGS)
    azure.create_deployment(load_deployment_spec(path))

    props = put_body(fake, r"/onlineEndpoints/ep-served/deployments/green\?")["properties"]
    assert props["egressPublicNetworkAccess"].lower() == "disabled"  # was left out (Azure: Enabled): finding 6
    assert props["appInsightsEnabled"] is True
    assert props["scaleSettings"] == {"scaleType": "Default"}
    collections = props["dataCollector"]["collections"]
    assert set(collections) == {"model_inputs", "model_outputs"}
    assert collections["model_inputs"]["dataCollectionMode"].lower() == "enabled"
    assert collections["model_inputs"]["dataId"].endswith("/data/ep-served-green-model_inputs/versions/1")
    assert {c["samplingRate"] for c in collections.values()} == {0.5}  # the SDK puts it on each collection
    # the SDK registered a data asset per collection, where the collector writes
    data_put = put_body(fake, r"/data/ep-served-green-model_inputs/versions/1\?")["properties"]
    assert data_put["dataUri"].endswith("/paths/modelDataCollector/ep-served/green/model_inputs")

    shown = fake.ml_client.online_deployments.get(name="green", endpoint_name=served)  # Azure's answer, read back
    assert str(shown.egress_public_network_access).lower() == "disabled"
    assert shown.app_insights_enabled is True and set(shown.data_collector.collections) == {"model_inputs",
                                                                                             "model_outputs"}


def test_deployment_settings_survive_an_update(azure, fake, served, example_dir, tmp_path):
    path = yaml_with(example_dir / "deployment.yml", tmp_path / "release", name="blue", endpoint_name=served,
                     egress_public_network_access="disabled")
    azure.update_deployment(load_deployment_spec(path))
    assert put_body(fake, r"/deployments/blue\?")["properties"]["egressPublicNetworkAccess"].lower() == "disabled"


def test_a_deployment_without_these_settings_sends_the_sdk_defaults(azure, fake, served, example_dir):
    props = put_body(fake, r"/deployments/blue\?")["properties"]
    assert "dataCollector" not in props and props["appInsightsEnabled"] is False
    assert "egressPublicNetworkAccess" not in props  # left to Azure's default, Enabled
    assert props.get("scaleSettings", {"scaleType": "Default"}) == {"scaleType": "Default"}


def test_endpoint_settings_reach_the_wire_and_survive_a_traffic_update(azure, fake, example_dir, tmp_path,
                                                                        credit_model_dir):
    path = yaml_with(example_dir / "endpoint.yml", tmp_path / "endpoint", name="ep-private",
                     public_network_access="disabled",
                     identity={"type": "user_assigned", "user_assigned_identities": [{"resource_id": IDENTITY}]})
    azure.create_endpoint(load_endpoint_spec(path))

    body = put_body(fake, r"/onlineEndpoints/ep-private\?")
    assert body["properties"]["publicNetworkAccess"].lower() == "disabled"  # was left out (Enabled): finding 6
    assert body["identity"]["type"] == "UserAssigned"
    assert list(body["identity"]["userAssignedIdentities"]) == [IDENTITY]

    azure.register_model("credit-model", str(credit_model_dir))
    azure.create_deployment(load_deployment_spec(example_dir / "deployment.yml", endpoint_name="ep-private"))
    azure.update_endpoint("ep-private", traffic={"blue": 100})  # a GET-modify-PUT: nothing may fall out
    body = put_body(fake, r"/onlineEndpoints/ep-private\?")
    assert body["properties"]["traffic"] == {"blue": 100}
    assert body["properties"]["publicNetworkAccess"].lower() == "disabled"
    assert body["identity"]["type"] == "UserAssigned"


def test_a_setting_azure_refuses_is_refused_before_anything_is_sent(azure, fake, served, example_dir, tmp_path):
    path = yaml_with(example_dir / "deployment.yml", tmp_path / "release", name="green", endpoint_name=served,
                     scale_settings={"type": "target_utilization", "max_instance": 3})
    before = len(fake.transport.requests)
    with pytest.raises(SpecError, match=r"deployment 'green': Azure's schema refuses scale_settings: .*"
                                        r"max_instance.*Unknown field"):
        azure.create_deployment(load_deployment_spec(path))
    assert not fake.transport.sent("PUT", r"/deployments/green")
    assert not [r for r in fake.transport.requests[before:] if ".blob." in r.host]  # no code was uploaded


def test_a_kubernetes_scale_type_is_refused_on_a_managed_endpoint_with_the_sdk_rule(azure, fake, served,
                                                                                      example_dir, tmp_path):
    path = yaml_with(example_dir / "deployment.yml", tmp_path / "release", name="green", endpoint_name=served,
                     scale_settings={"type": "target_utilization", "min_instances": 1, "max_instances": 3})
    with pytest.raises(SpecError, match=r"deployment 'green': Azure's schema refuses scale_settings: "
                                        r"ManagedOnlineEndpoint supports DefaultScaleSettings only"):
        azure.create_deployment(load_deployment_spec(path))
    assert not fake.transport.sent("PUT", r"/deployments/green")


def test_an_unknown_identity_type_is_refused_with_the_types_azure_knows(azure, example_dir, tmp_path):
    path = yaml_with(example_dir / "endpoint.yml", tmp_path / "endpoint", name="ep-bad-id",
                     identity={"type": "everyone"})
    with pytest.raises(SpecError, match=r"endpoint 'ep-bad-id': Azure's schema refuses identity: .*'everyone'.*"
                                        r"system_assigned"):
        azure.create_endpoint(load_endpoint_spec(path))
