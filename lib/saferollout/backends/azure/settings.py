"""Where the Azure backend's clients come from: settings, environment variables, config.json or a factory.

Resolution order (first that applies):
1. clients passed in (`ml_client=`, `metrics_client=`, `http_session=`): tests and advanced users;
2. a client factory named by `client_factory=` or env `SAFEROLLOUT_AZURE_CLIENT_FACTORY` ("module:function"),
   called with the resolved settings and returning `(ml_client, metrics_client, http_session)`; this is how
   notebook kernels started by the runbook are pointed at a fake workspace in tests;
3. `MLClient(DefaultAzureCredential(), subscription, resource group, workspace)` when all three are given
   as settings or env `AZURE_SUBSCRIPTION_ID`, `AZURE_RESOURCE_GROUP`, `AZUREML_WORKSPACE_NAME`;
4. `MLClient.from_config(...)` reading `config.json` (`config_path=` or env `AZUREML_CONFIG`, else the
   current folder and its parents, as the SDK does).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

from saferollout.errors import SpecError

ENV_SUBSCRIPTION = "AZURE_SUBSCRIPTION_ID"
ENV_RESOURCE_GROUP = "AZURE_RESOURCE_GROUP"
ENV_WORKSPACE = "AZUREML_WORKSPACE_NAME"
ENV_CONFIG = "AZUREML_CONFIG"
ENV_CLIENT_FACTORY = "SAFEROLLOUT_AZURE_CLIENT_FACTORY"


@dataclass
class AzureSettings:
    """What identifies the workspace. Never holds a secret: credentials come from DefaultAzureCredential."""

    subscription_id: str | None = None
    resource_group: str | None = None
    workspace_name: str | None = None
    config_path: str | None = None
    client_factory: str | None = None

    @classmethod
    def resolve(cls, subscription_id: str | None = None, resource_group: str | None = None,
                workspace_name: str | None = None, config_path: str | None = None,
                client_factory: str | None = None) -> "AzureSettings":
        """Explicit settings win; the environment fills the gaps."""
        env = os.environ
        return cls(subscription_id=subscription_id or env.get(ENV_SUBSCRIPTION) or None,
                   resource_group=resource_group or env.get(ENV_RESOURCE_GROUP) or None,
                   workspace_name=workspace_name or env.get(ENV_WORKSPACE) or None,
                   config_path=config_path or env.get(ENV_CONFIG) or None,
                   client_factory=client_factory or env.get(ENV_CLIENT_FACTORY) or None)

    @property
    def names_workspace(self) -> bool:
        return bool(self.subscription_id and self.resource_group and self.workspace_name)


@dataclass
class AzureClients:
    ml_client: Any
    metrics_client: Any
    http_session: Any


def load_factory(reference: str) -> Callable[[AzureSettings], Any]:
    """Import "package.module:function"."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise SpecError(f"{ENV_CLIENT_FACTORY} must look like 'package.module:function', got {reference!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"cannot import the Azure client factory module {module_name!r} ({exc}); "
                        "is it on PYTHONPATH?") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SpecError(f"the Azure client factory {reference!r} is not a function")
    return factory


def build_clients(settings: AzureSettings, credential: Any = None) -> AzureClients:
    """Build the SDK clients the settings describe (see the module docstring for the order)."""
    if settings.client_factory:
        made = load_factory(settings.client_factory)(settings)
        try:
            ml_client, metrics_client, http_session = made
        except (TypeError, ValueError):
            raise SpecError(f"the Azure client factory {settings.client_factory!r} must return "
                            "(ml_client, metrics_client, http_session)") from None
        return AzureClients(ml_client, metrics_client, http_session)
    import requests
    from azure.identity import DefaultAzureCredential

    credential = credential or DefaultAzureCredential()  # one credential, shared by both clients
    return AzureClients(build_ml_client(settings, credential), build_metrics_client(credential),
                        requests.Session())


def build_ml_client(settings: AzureSettings, credential: Any = None) -> Any:
    from azure.ai.ml import MLClient
    from azure.identity import DefaultAzureCredential

    credential = credential or DefaultAzureCredential()
    if settings.names_workspace:
        return MLClient(credential, subscription_id=settings.subscription_id,
                        resource_group_name=settings.resource_group, workspace_name=settings.workspace_name)
    try:
        return MLClient.from_config(credential, path=settings.config_path)
    except Exception as exc:  # noqa: BLE001 - the SDK raises several types for a missing or bad config
        raise SpecError(
            "no Azure ML workspace configured: set AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP and "
            "AZUREML_WORKSPACE_NAME, or put the workspace's config.json in the current folder (or name it "
            f"with AZUREML_CONFIG); the SDK said: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc


def build_metrics_client(credential: Any = None) -> Any:
    from azure.identity import DefaultAzureCredential
    from azure.monitor.query import MetricsQueryClient

    return MetricsQueryClient(credential or DefaultAzureCredential())
