"""An azure-core HTTP transport that answers as Azure does: the real SDK clients run over it, end to end.

`FakeAzureTransport` is what `MLClient(..., transport=...)` and `MetricsQueryClient(..., transport=...)`
send their HTTP requests to. Everything above the wire is the SDK's own code: its REST models and their
(de)serialization, its long-running-operation pollers, its error types, its asset uploads. The answers are
in the service's wire shapes, taken from the REST API specification examples (Azure/azure-rest-api-specs,
`specification/machinelearningservices/` and `specification/monitor/`):

- ARM (`management.azure.com`): online endpoints, deployments, models, code and environment assets,
  the default datastore, pending uploads, keys and tokens, logs: see `azure_arm`;
- long-running operations: `201`/`202` with `Azure-AsyncOperation` (and `Location`), polled to `Succeeded`
  or `Failed` with the ARM error body;
- Azure Monitor metrics (`.../providers/Microsoft.Insights/metrics`): see `azure_monitor`;
- blob storage (`<account>.blob.core.windows.net`), where the SDK uploads models and code: see `azure_blob`.

The SDK builds its blob client without passing our transport on (azure-ai-ml offers no hook for it), so
`route_blob_uploads` gives that client the same transport: the SDK's upload code still runs, only the HTTP
is answered here. State is on disk (`azure_state`), so notebook kernels and traffic processes started by a
runbook reach the same fake workspace through `client_factory`.
"""
from __future__ import annotations

import io
import json
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlparse

import requests
import urllib3
from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.core.pipeline.transport import HttpTransport
from azure.core.pipeline.transport._base import HttpRequest as LegacyHttpRequest
from azure.core.pipeline.transport._requests_basic import RequestsTransportResponse
from azure.core.rest._requests_basic import RestRequestsTransportResponse

from fakes.azure_state import FakeWorkspaceState

ENV_FAKE_DIR = "SAFEROLLOUT_AZURE_FAKE_DIR"
ARM_HOST = "management.azure.com"


@dataclass
class WireRequest:
    """One HTTP request as the service sees it."""

    method: str
    url: str
    host: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


@dataclass
class WireResponse:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, payload: Any, **headers: str) -> WireResponse:
    return WireResponse(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers})


def arm_error(status: int, code: str, message: str, **headers: str) -> WireResponse:
    """ARM's error body (the common `ErrorResponse` of every resource provider)."""
    return json_response(status, {"error": {"code": code, "message": message, "details": [],
                                            "additionalInfo": []}}, **headers)


class ServiceRefusal(Exception):
    """Raised by a handler to answer with an ARM error."""

    def __init__(self, status: int, code: str, message: str, **headers: str):
        super().__init__(message)
        self.response = arm_error(status, code, message, **headers)


Handler = Callable[[WireRequest, re.Match], WireResponse]


class FakeAzureTransport(HttpTransport):
    """Answers ARM, Azure Monitor and blob storage requests from one fake workspace's state.

    `requests` records every request (method, url) for tests that check what the SDK sent; `inject`
    queues a canned answer for the next request whose method and URL match, to play the service's
    refusals (401, 403, 409, 429...) without a special mode in the handlers."""

    def __init__(self, state: FakeWorkspaceState):
        from fakes import azure_arm, azure_blob, azure_monitor

        self.state = state
        self.requests: list[WireRequest] = []
        self._injected: list[tuple[str, re.Pattern, WireResponse]] = []
        self._lock = threading.Lock()
        self._routes: list[tuple[str | None, re.Pattern, Handler]] = [
            *azure_monitor.routes(state), *azure_arm.routes(state), *azure_blob.routes(state)]

    # ---- HttpTransport -------------------------------------------------------------------------
    def __enter__(self) -> "FakeAzureTransport":
        return self

    def __exit__(self, *args: Any) -> None:
        pass

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def sleep(self, duration: float) -> None:
        """Pollers sleep through the transport: the fake's operations need no waiting between polls."""

    def send(self, request: Any, **kwargs: Any) -> Any:
        wire = self._wire_request(request)
        with self._lock:
            self.requests.append(wire)
        answer = self._take_injected(wire) or self._dispatch(wire)
        return self._azure_response(request, wire, answer)

    # ---- test hooks ----------------------------------------------------------------------------
    def inject(self, method: str, url_pattern: str, response: WireResponse) -> None:
        """Answer the next `method` request whose URL matches `url_pattern` (a regex) with `response`."""
        self._injected.append((method.upper(), re.compile(url_pattern, re.IGNORECASE), response))

    def sent(self, method: str, pattern: str) -> list[WireRequest]:
        found = re.compile(pattern, re.IGNORECASE)
        return [r for r in self.requests if r.method == method.upper() and found.search(r.url)]

    # ---- internals -----------------------------------------------------------------------------
    def _take_injected(self, wire: WireRequest) -> WireResponse | None:
        with self._lock:
            for i, (method, pattern, response) in enumerate(self._injected):
                if method == wire.method and pattern.search(wire.url):
                    del self._injected[i]
                    return response
        return None

    def _dispatch(self, wire: WireRequest) -> WireResponse:
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(f"{wire.host}{wire.path}")
            if match and (method is None or method == wire.method):
                try:
                    return handler(wire, match)
                except ServiceRefusal as refusal:
                    return refusal.response
        # the real service would answer 404 for a path it has no route for; say so loudly in the message
        return arm_error(404, "NoRegisteredProviderFound",
                         f"fake Azure has no route for {wire.method} {wire.host}{wire.path}")

    @staticmethod
    def _wire_request(request: Any) -> WireRequest:
        parsed = urlparse(request.url)
        if isinstance(request, LegacyHttpRequest):
            body = request.body
        else:
            body = request.content
        if body is None:
            data = b""
        elif isinstance(body, (bytes, bytearray)):
            data = bytes(body)
        elif isinstance(body, str):
            data = body.encode()
        elif hasattr(body, "read"):
            data = body.read()
        else:  # an iterable of chunks (the blob client streams uploads)
            data = b"".join(chunk if isinstance(chunk, bytes) else chunk.encode() for chunk in body)
        query = {k.lower(): v[0] for k, v in parse_qs(parsed.query, keep_blank_values=True).items()}
        return WireRequest(method=request.method.upper(), url=request.url, host=(parsed.hostname or "").lower(),
                           path=unquote(parsed.path), query=query,
                           headers={k.lower(): v for k, v in request.headers.items()}, body=data)

    @staticmethod
    def _azure_response(request: Any, wire: WireRequest, answer: WireResponse) -> Any:
        """azure-core's own response classes over a `requests.Response`, as RequestsTransport builds them."""
        headers = {"x-ms-request-id": "fake-" + os.urandom(8).hex(), **answer.headers}
        body = b"" if wire.method == "HEAD" or answer.status in (204, 304) else answer.body  # HTTP: no body there
        raw = urllib3.response.HTTPResponse(body=io.BytesIO(body), headers=headers, status=answer.status,
                                            preload_content=False, decode_content=False,
                                            request_method=wire.method)  # a HEAD has no body to read
        response = requests.adapters.HTTPAdapter().build_response(requests.PreparedRequest(), raw)
        response.url = wire.url
        if isinstance(request, LegacyHttpRequest):
            return RequestsTransportResponse(request, response)
        rest = RestRequestsTransportResponse(request=request, internal_response=response)
        rest.read()
        return rest


class FakeCredential:
    """A TokenCredential whose tokens the fake service accepts (it checks that one was sent)."""

    TOKEN = "fake-aad-token"

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self.TOKEN, 4102444800)

    def get_token_info(self, *scopes: str, options: Any = None) -> AccessTokenInfo:
        return AccessTokenInfo(self.TOKEN, 4102444800)


# ---- building the real clients over the fake wire ---------------------------------------------

_BLOB_ROUTED = threading.Lock()
_blob_transports: dict[str, FakeAzureTransport] = {}  # storage account -> the fake workspace that owns it


def _transport_for(account_url: str) -> FakeAzureTransport:
    account = (urlparse(account_url if "//" in account_url else f"https://{account_url}").hostname or "").split(".")[0]
    try:
        return _blob_transports[account]
    except KeyError:
        raise RuntimeError(f"no fake workspace owns the storage account {account!r} ({account_url})") from None


def route_blob_uploads(transport: FakeAzureTransport) -> None:
    """Make the blob clients azure-ai-ml builds for uploads send through `transport`.

    azure-ai-ml constructs `BlobServiceClient(account_url, credential)` itself and passes no transport on;
    the storage SDK takes one as a keyword. Only that keyword is added: the SDK's upload code runs as is.
    Each fake workspace has its own storage account, and a client goes to the workspace whose account its
    URL names (several fakes live in one test process)."""
    from azure.ai.ml._artifacts import _blob_storage_helper
    from azure.storage.blob import BlobServiceClient, ContainerClient

    with _BLOB_ROUTED:
        _blob_transports[transport.state.storage_account] = transport
        if getattr(_blob_storage_helper.BlobServiceClient, "_fake_wire", False):
            return

        class RoutedBlobServiceClient(BlobServiceClient):
            _fake_wire = True

            def __init__(self, account_url: str, credential: Any = None, **kwargs: Any):
                kwargs.setdefault("transport", _transport_for(account_url))
                super().__init__(account_url, credential=credential, **kwargs)

        class RoutedContainerClient(ContainerClient):  # SAS uploads: `ContainerClient.from_container_url`
            _fake_wire = True

            def __init__(self, account_url: str, container_name: str, credential: Any = None, **kwargs: Any):
                kwargs.setdefault("transport", _transport_for(account_url))
                super().__init__(account_url, container_name, credential=credential, **kwargs)

        _blob_storage_helper.BlobServiceClient = RoutedBlobServiceClient
        _blob_storage_helper.ContainerClient = RoutedContainerClient


@dataclass
class FakeAzure:
    """The fake workspace and the real clients wired to it."""

    state: FakeWorkspaceState
    transport: FakeAzureTransport
    ml_client: Any
    metrics_client: Any
    http_session: Any


def fake_azure(state_dir: str | os.PathLike) -> FakeAzure:
    from azure.ai.ml import MLClient
    from azure.monitor.query import MetricsQueryClient

    from fakes.azure_scoring import FakeScoringSession, ScoringRuntime
    from fakes.azure_state import RESOURCE_GROUP, SUBSCRIPTION, WORKSPACE

    state = FakeWorkspaceState(state_dir)
    transport = FakeAzureTransport(state)
    route_blob_uploads(transport)
    credential = FakeCredential()
    ml_client = MLClient(credential, SUBSCRIPTION, RESOURCE_GROUP, WORKSPACE, transport=transport,
                         show_progress=False)
    metrics_client = MetricsQueryClient(credential, transport=transport)
    session = FakeScoringSession(state, ScoringRuntime(state))
    return FakeAzure(state, transport, ml_client, metrics_client, session)


def fake_clients(state_dir: str | os.PathLike) -> tuple[Any, Any, Any]:
    made = fake_azure(state_dir)
    return made.ml_client, made.metrics_client, made.http_session


def client_factory(settings: Any = None) -> tuple[Any, Any, Any]:
    """SAFEROLLOUT_AZURE_CLIENT_FACTORY=fakes.azure_wire:client_factory, state in env SAFEROLLOUT_AZURE_FAKE_DIR."""
    state_dir = os.environ.get(ENV_FAKE_DIR)
    if not state_dir:
        raise RuntimeError(f"set {ENV_FAKE_DIR} to the fake workspace's state directory")
    return fake_clients(state_dir)
