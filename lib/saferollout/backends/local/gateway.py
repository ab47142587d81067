"""Data plane: auth, weighted routing, the deployment header, mirror traffic, timeouts, queueing.

The gateway is built from a routing table (endpoint -> `EndpointRoute`) and a request log. A traffic
change swaps one `EndpointRoute` for another in a single assignment: requests already in flight keep
the deployment and instance they were given, so nothing restarts and nothing in flight fails.
Status codes follow Azure ML managed online endpoints (see DESIGN.md, "Azure parity").
"""
from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, CONTENT_TYPE_LATEST

from saferollout.backends.local.instances import Instance
from saferollout.backends.local.metrics import PAIR_BODY_LIMIT, RequestLog

DEPLOYMENT_HEADER = "azureml-model-deployment"
DEFAULT_MAX_BODY_BYTES = 1536 * 1024  # Azure's managed online endpoints accept payloads up to 1.5 MB
JSON_TYPES = ("application/json", "text/json", "")


# ---- tokens ---------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_token(signing_key: bytes, endpoint: str, ttl_s: float, now: float | None = None) -> tuple[str, float]:
    """A signed, expiring `aml_token` for one endpoint: (token, expiry as unix seconds)."""
    expiry = (now if now is not None else time.time()) + ttl_s
    payload = _b64(json.dumps({"endpoint": endpoint, "exp": expiry, "nonce": uuid.uuid4().hex}).encode())
    signature = _b64(hmac.new(signing_key, payload.encode(), hashlib.sha256).digest())
    return f"{payload}.{signature}", expiry


def check_token(signing_key: bytes, endpoint: str, token: str, now: float | None = None) -> str | None:
    """None if the token is valid for `endpoint`, else why not."""
    payload, _, signature = token.partition(".")
    expected = _b64(hmac.new(signing_key, payload.encode(), hashlib.sha256).digest())
    if not signature or not hmac.compare_digest(expected, signature):
        return "invalid token"
    try:
        claims = json.loads(_unb64(payload))
    except ValueError:
        return "invalid token"
    if not isinstance(claims, dict):
        return "invalid token"
    if claims.get("endpoint") != endpoint:
        return "token was issued for another endpoint"
    expiry = claims.get("exp")
    # JSON allows NaN and Infinity: a token must name a real moment, or it would never expire
    if isinstance(expiry, bool) or not isinstance(expiry, (int, float)) or not math.isfinite(expiry):
        return "invalid token: its expiry is not a finite number"
    if expiry <= (now if now is not None else time.time()):
        return "token expired: get a new one with get-credentials"
    return None


# ---- routing --------------------------------------------------------------------------------

class NoInstance(Exception):
    """The deployment has no instance that is running or coming up."""


class DeploymentPool:
    """The instances of one deployment as the gateway sees them: least-busy choice, bounded queue."""

    def __init__(self, endpoint: str, name: str, max_concurrent: int, timeout_ms: int):
        self.endpoint = endpoint
        self.name = name
        self.max_concurrent = max_concurrent
        self.timeout_ms = timeout_ms
        self.instances: list[Instance] = []
        self.in_flight = 0
        self.failed = False  # a Failed deployment is never routed to
        # Instances being started (creation, or every deployment after a platform restart): requests wait for
        # them, within request_timeout_ms, instead of failing while the platform comes back.
        self.starting = False
        self._changed = asyncio.Condition()
        self._waiting = 0
        self._turn = 0

    @property
    def admission_limit(self) -> int:
        """Azure's 429 rule: more than 2 * max_concurrent_requests_per_instance * instance_count in flight."""
        return 2 * self.max_concurrent * max(1, len(self.instances))

    def servable(self) -> bool:
        return not self.failed and (self.starting or any(i.state in ("ready", "starting", "restarting")
                                                         for i in self.instances))

    def _pick(self) -> Instance | None:
        """The least busy ready instance with a free slot; ties go round-robin, so idle instances share work."""
        count, best = len(self.instances), None
        for offset in range(count):
            inst = self.instances[(self._turn + offset) % count]
            if inst.ready and inst.in_flight < self.max_concurrent:
                if best is None or inst.in_flight < best.in_flight:
                    best = inst
        self._turn += 1
        return best

    async def acquire(self) -> Instance:
        """Wait for a ready instance with a free slot (the caller bounds the wait with its timeout).

        NoInstance if the deployment stops being servable while we wait (it failed, or nothing runs).
        """
        inst = self._pick()
        if inst is None:
            self._waiting += 1
            try:
                async with self._changed:
                    while (inst := self._pick()) is None:
                        if not self.servable():
                            raise NoInstance(f"deployment {self.name!r} has no running instance")
                        await self._changed.wait()
            finally:
                self._waiting -= 1
        inst.in_flight += 1
        return inst

    def release(self, inst: Instance) -> None:
        inst.in_flight -= 1
        self.notify()

    def notify(self) -> None:
        """Wake waiters (a slot freed, or an instance became ready); free when nobody waits."""
        if self._waiting:
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


@dataclass
class EndpointRoute:
    name: str
    auth_mode: str
    keys: tuple[str, ...]
    traffic: dict[str, int]
    mirror: dict[str, int]
    pools: dict[str, DeploymentPool] = field(default_factory=dict)

    def choose(self, rng: random.Random) -> DeploymentPool | None:
        """A deployment drawn with probability proportional to its traffic share, among servable ones."""
        names = [n for n, w in self.traffic.items() if w > 0 and n in self.pools and not self.pools[n].failed]
        if not names:
            return None
        weights = [self.traffic[n] for n in names]
        return self.pools[rng.choices(names, weights)[0]]


def _reply(status: int, message: str, request_id: str, deployment: str | None = None,
           extra: dict | None = None) -> web.Response:
    headers = {"x-request-id": request_id, "x-ms-request-id": request_id}
    if deployment:
        headers[DEPLOYMENT_HEADER] = deployment
    if extra:
        headers.update(extra)
    return web.json_response({"message": message}, status=status, headers=headers)


class Gateway:
    """The aiohttp application serving every endpoint's scoring URI on one loopback port."""

    def __init__(self, request_log: RequestLog, signing_key: bytes,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, metrics_token: str | None = None):
        self.routes: dict[str, EndpointRoute] = {}
        # /metrics tells who calls which endpoint how often: it takes the workspace admin token
        # (Prometheus: `authorization: {credentials_file: <workspace>/admin.token}`)
        self.metrics_token = metrics_token
        self.request_log = request_log
        self.signing_key = signing_key
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        self.rng = rng or random.Random()
        self._background: set[asyncio.Task] = set()
        self.registry = CollectorRegistry()
        labels = ("endpoint", "deployment", "status_class", "mirrored")
        self.requests_total = Counter("saferollout_requests", "Requests answered by the gateway",
                                      labels, registry=self.registry)
        self.latency = Histogram("saferollout_request_latency_seconds", "Gateway request latency",
                                 ("endpoint", "deployment"), registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_post("/endpoints/{endpoint}/score", self.score)
        app.router.add_get("/endpoints/{endpoint}/swagger.json", self.swagger)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/", self.health)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, _app: web.Application) -> None:
        for task in list(self._background):
            task.cancel()

    def set_route(self, route: EndpointRoute) -> None:
        self.routes[route.name] = route  # one assignment: in-flight requests keep what they hold

    def remove_route(self, name: str) -> None:
        self.routes.pop(name, None)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "Healthy"})

    async def swagger(self, request: web.Request) -> web.Response:
        """The endpoint's OpenAPI document (its `openapi_uri`), as the serving deployment's inference server
        builds it from the scoring script's schema decorators: the deployment the header names, else the one
        with the most traffic. Authenticated as scoring is."""
        request_id = request.headers.get("x-ms-client-request-id") or str(uuid.uuid4())
        route = self._authorized_route(request, request_id)
        if isinstance(route, web.Response):
            return route
        name = request.headers.get(DEPLOYMENT_HEADER) or max(
            (n for n, w in route.traffic.items() if w > 0 and n in route.pools), key=route.traffic.get, default=None)
        pool = route.pools.get(name) if name else None
        if pool is None:
            return _reply(404, f"no deployment to describe: endpoint {route.name!r} has no traffic set and the "
                               f"request names no deployment" if not name else
                               f"deployment {name!r} not found on endpoint {route.name!r}", request_id)
        inst = next((i for i in pool.instances if i.ready), None)
        if inst is None:
            return _reply(424, f"deployment {pool.name!r} has no running instance", request_id, pool.name)
        query = f"?{request.query_string}" if request.query_string else ""
        try:
            status, payload = await inst.get(f"/swagger.json{query}")
        except (OSError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return _reply(424, f"model server is unavailable: {exc}", request_id, pool.name)
        return web.Response(body=payload, status=status, content_type="application/json",
                            headers={DEPLOYMENT_HEADER: pool.name, "x-request-id": request_id,
                                     "x-ms-request-id": request_id})

    async def prometheus(self, request: web.Request) -> web.Response:
        if self.metrics_token is not None:
            header = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(header, f"Bearer {self.metrics_token}".encode()):
                return web.json_response({"message": "missing or invalid credentials: /metrics takes the "
                                                     "workspace admin token (Authorization: Bearer <admin.token>)"},
                                         status=401)
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---- the scoring path -------------------------------------------------------------------
    async def score(self, request: web.Request) -> web.StreamResponse:
        started, arrival = time.perf_counter(), self.clock()
        request_id = request.headers.get("x-ms-client-request-id") or str(uuid.uuid4())
        route = self._authorized_route(request, request_id)
        if isinstance(route, web.Response):
            return route
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return _reply(413, f"request body of {request.content_length} bytes is over the limit of "
                               f"{self.max_body_bytes} bytes", request_id)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _reply(413, f"request body is over the limit of {self.max_body_bytes} bytes", request_id)
        content_type = request.content_type if request.headers.get("Content-Type") else ""
        if content_type in JSON_TYPES:
            try:
                json.loads(body)
            except ValueError as exc:
                return _reply(400, f"malformed JSON in request body: {exc}", request_id)
            except RecursionError:
                return _reply(400, "malformed JSON in request body: it is nested too deeply", request_id)
        pinned = request.headers.get(DEPLOYMENT_HEADER)
        if pinned:
            pool = route.pools.get(pinned)
            if pool is None:
                return _reply(404, f"deployment {pinned!r} not found on endpoint {route.name!r}", request_id)
            if pool.failed:
                return self._finish(route, pool, 424, started, arrival, request_id, None, pinned=True,
                                    message=f"deployment {pinned!r} failed and cannot serve requests")
        else:
            pool = route.choose(self.rng)
            if pool is None:
                return _reply(404, f"no deployment to route to: endpoint {route.name!r} has no traffic set",
                              request_id)
        response = await self._forward(route, pool, body, content_type or "application/json",
                                       started, arrival, request_id, pinned=bool(pinned))
        if not pinned and route.mirror:
            self._maybe_mirror(route, body, content_type or "application/json", request_id, pool.name,
                               response)
        return response

    def _authorized_route(self, request: web.Request, request_id: str) -> EndpointRoute | web.Response:
        """The endpoint the request names, or the 404 or 401 answer to give instead."""
        route = self.routes.get(request.match_info["endpoint"])
        if route is None:
            return _reply(404, f"endpoint {request.match_info['endpoint']!r} not found", request_id)
        refusal = self._authorize(route, request.headers.get("Authorization", ""))
        if refusal:
            return _reply(401, refusal, request_id)
        return route

    def _authorize(self, route: EndpointRoute, header: str) -> str | None:
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            return "missing credentials: send 'Authorization: Bearer <key or token>'"
        credential = credential.strip()
        if not credential.isascii():  # keys and tokens are ASCII; aiohttp hands other bytes over as surrogates
            return "invalid credentials: the Authorization header holds bytes that are not ASCII"
        if route.auth_mode == "key":
            matched = False
            for key in route.keys:  # compare against every key, in constant time each
                matched |= hmac.compare_digest(key.encode(), credential.encode())
            return None if matched else "invalid key"
        return check_token(self.signing_key, route.name, credential, self.clock())

    async def _forward(self, route: EndpointRoute, pool: DeploymentPool, body: bytes, content_type: str,
                       started: float, arrival: float, request_id: str, *, pinned: bool = False) -> web.Response:
        finish = functools.partial(self._finish, pinned=pinned)
        if pool.in_flight >= pool.admission_limit:
            return finish(route, pool, 429, started, arrival, request_id, None,
                                message=f"too many requests for deployment {pool.name!r}: "
                                        f"{pool.in_flight} in flight, limit {pool.admission_limit}")
        if not pool.servable():
            return finish(route, pool, 424, started, arrival, request_id, None,
                                message=f"deployment {pool.name!r} has no running instance")
        pool.in_flight += 1
        try:
            status, payload, model_status = await asyncio.wait_for(
                self._call_instance(pool, body, content_type), pool.timeout_ms / 1000.0)
        except asyncio.TimeoutError:
            return finish(route, pool, 408, started, arrival, request_id, None,
                                message=f"request timed out after {pool.timeout_ms} ms (request_timeout_ms)")
        finally:
            pool.in_flight -= 1
        if status == 200:
            return finish(route, pool, 200, started, arrival, request_id, model_status, payload=payload)
        return finish(route, pool, 424, started, arrival, request_id, model_status,
                            message=f"model server answered {model_status}" if model_status
                            else "model server is unavailable", detail=payload)

    async def _call_instance(self, pool: DeploymentPool, body: bytes,
                             content_type: str) -> tuple[int, bytes, int | None]:
        try:
            inst = await pool.acquire()
        except NoInstance as exc:
            return 424, str(exc).encode(), None
        try:
            status, payload = await inst.score(body, content_type)
            return (200 if status == 200 else 424), payload, status
        except OSError as exc:
            return 424, str(exc).encode(), None
        finally:
            pool.release(inst)

    def _finish(self, route: EndpointRoute, pool: DeploymentPool, status: int, started: float, arrival: float,
                request_id: str, model_status: int | None, payload: bytes | None = None,
                message: str = "", detail: bytes | None = None, mirrored: bool = False,
                pinned: bool = False) -> web.Response:
        latency_ms = (time.perf_counter() - started) * 1000.0
        self.request_log.record((arrival, route.name, pool.name, status, latency_ms, int(mirrored),
                                 request_id, model_status, int(pinned)))
        status_class = f"{status // 100}xx"
        self.requests_total.labels(route.name, pool.name, status_class, str(mirrored).lower()).inc()
        self.latency.labels(route.name, pool.name).observe(latency_ms / 1000.0)
        headers = {DEPLOYMENT_HEADER: pool.name, "x-request-id": request_id, "x-ms-request-id": request_id}
        if payload is not None:
            return web.Response(body=payload, status=status, content_type="application/json", headers=headers)
        if model_status is not None:
            headers["ms-azureml-model-error-statuscode"] = str(model_status)
        body = {"message": message}
        if detail:
            body["model_error"] = detail[:4096].decode("utf-8", "replace")
        return web.json_response(body, status=status, headers=headers)

    # ---- mirror traffic ---------------------------------------------------------------------
    def _maybe_mirror(self, route: EndpointRoute, body: bytes, content_type: str, request_id: str,
                      live_deployment: str, live: web.Response) -> None:
        for name, percent in route.mirror.items():
            pool = route.pools.get(name)
            if pool is None or self.rng.random() * 100 >= percent:
                continue
            task = asyncio.create_task(self._mirror(route, pool, body, content_type, request_id,
                                                    live_deployment, live.status, live.body or b""))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _mirror(self, route: EndpointRoute, pool: DeploymentPool, body: bytes, content_type: str,
                      request_id: str, live_deployment: str, live_status: int, live_body: bytes) -> None:
        """Send a copy to the mirror deployment; its answer is recorded, never shown to the client."""
        started, arrival = time.perf_counter(), self.clock()
        if pool.in_flight >= pool.admission_limit or not pool.servable():
            status, payload, model_status = 429 if pool.servable() else 424, b"", None
        else:
            pool.in_flight += 1
            try:
                status, payload, model_status = await asyncio.wait_for(
                    self._call_instance(pool, body, content_type), pool.timeout_ms / 1000.0)
            except asyncio.TimeoutError:
                status, payload, model_status = 408, b"", None
            finally:
                pool.in_flight -= 1
        latency_ms = (time.perf_counter() - started) * 1000.0
        self.request_log.record((arrival, route.name, pool.name, status, latency_ms, 1, request_id, model_status, 0))
        self.requests_total.labels(route.name, pool.name, f"{status // 100}xx", "true").inc()
        self.request_log.record_pair((arrival, route.name, request_id, body[:PAIR_BODY_LIMIT], live_deployment,
                                      live_status, bytes(live_body[:PAIR_BODY_LIMIT]), pool.name, status,
                                      payload[:PAIR_BODY_LIMIT]))
