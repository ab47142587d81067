"""Where the clients come from: explicit settings, environment variables, a client factory, config.json."""
import pytest
from azure.core.credentials import AccessToken

from saferollout.backends import get_backend
from saferollout.backends.azure import AzureBackend
from saferollout.backends.azure.settings import (ENV_CLIENT_FACTORY, ENV_RESOURCE_GROUP, ENV_SUBSCRIPTION,
                                                 ENV_WORKSPACE, AzureSettings, build_ml_client, load_factory)
from saferollout.errors import SpecError


class OfflineCredential:
    """A TokenCredential that is never asked for a token: nothing here reaches Azure."""

    def get_token(self, *scopes, **kwargs) -> AccessToken:
        raise AssertionError("no test may request an Azure token")


@pytest.fixture
def clean_env(monkeypatch):
    for name in (ENV_SUBSCRIPTION, ENV_RESOURCE_GROUP, ENV_WORKSPACE, ENV_CLIENT_FACTORY, "AZUREML_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_environment_fills_what_settings_leave_out(clean_env):
    clean_env.setenv(ENV_SUBSCRIPTION, "sub-from-env")
    clean_env.setenv(ENV_RESOURCE_GROUP, "rg-from-env")
    clean_env.setenv(ENV_WORKSPACE, "ws-from-env")
    settings = AzureSettings.resolve(workspace_name="ws-explicit")
    assert (settings.subscription_id, settings.resource_group, settings.workspace_name) == \
        ("sub-from-env", "rg-from-env", "ws-explicit")
    assert settings.names_workspace


def test_ml_client_is_built_for_the_named_workspace(clean_env):
    settings = AzureSettings.resolve("sub-1", "rg-1", "ws-1")
    client = build_ml_client(settings, credential=OfflineCredential())  # no network until a call is made
    assert (client.subscription_id, client.resource_group_name, client.workspace_name) == ("sub-1", "rg-1", "ws-1")


def test_missing_workspace_names_the_variables_to_set(clean_env, tmp_path):
    clean_env.chdir(tmp_path)
    with pytest.raises(SpecError, match="set AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP and AZUREML_WORKSPACE_NAME"):
        AzureBackend(config_path=str(tmp_path / "config.json"), credential=OfflineCredential())


def test_config_json_is_read_when_no_names_are_given(clean_env, tmp_path):
    (tmp_path / "config.json").write_text(
        '{"subscription_id": "sub-c", "resource_group": "rg-c", "workspace_name": "ws-c"}')
    backend = AzureBackend(config_path=str(tmp_path / "config.json"), credential=OfflineCredential())
    assert backend.workspace == "ws-c"
    assert backend.ml_client.subscription_id == "sub-c"


def test_client_factory_from_the_environment_builds_the_clients(clean_env, tmp_path):
    clean_env.setenv(ENV_CLIENT_FACTORY, "fakes.azure_wire:client_factory")
    clean_env.setenv("SAFEROLLOUT_AZURE_FAKE_DIR", str(tmp_path / "ws"))
    backend = get_backend("azure")
    assert backend.workspace == "ws-saferollout-fake"
    assert backend.list_endpoints() == []


@pytest.mark.parametrize("reference, message", [
    ("no_colon", "must look like 'package.module:function'"),
    ("no_such_module_xyz:make", "cannot import the Azure client factory module 'no_such_module_xyz'"),
    ("fakes.azure_wire:NOT_THERE", "is not a function"),
])
def test_bad_client_factory_is_refused_with_its_name(reference, message):
    with pytest.raises(SpecError, match=message):
        load_factory(reference)


def test_an_unknown_setting_is_refused_rather_than_ignored(clean_env):
    with pytest.raises(SpecError, match="unknown azure backend setting\\(s\\) workspace: use subscription_id"):
        get_backend("azure", workspace="ws-typo")
