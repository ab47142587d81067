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
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

import uvloop
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, CONTENT_TYPE_LATEST

from saferollout.backends.local.http_server import HttpServer, Request, Response, json_response
from saferollout.backends.local.instances import GET_TIMEOUT_S, Instance
from saferollout.backends.local.metrics import PAIR_BODY_LIMIT, RequestLog

T = TypeVar("T")

DEPLOYMENT_HEADER = "azureml-model-deployment"
DEFAULT_MAX_BODY_BYTES = 1536 * 1024  # Azure's managed online endpoints accept payloads up to 1.5 MB
JSON_TYPES = ("application/json", "text/json", "")
# Requests one deployment holds while its instances come up (after a platform restart): beyond, 429.
HOLD_LIMIT = 1024


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run the platform's event loop on uvloop (libuv), where the loop's own per-request work (accept, connect,
    read, write, callbacks) costs the gateway much less than on asyncio's pure-Python selector loop
    (bench/gateway.py, docs/benchmarks.md)."""
    return uvloop.run(main)


if sys.version_info >= (3, 11):
    async def _within(timeout_s: float, call: Awaitable[T]) -> T:
        """`call`, cancelled after `timeout_s` (asyncio.TimeoutError); without the task wait_for adds in 3.11."""
        async with asyncio.timeout(timeout_s):
            return await call
else:  # pragma: no cover - Python 3.10
    async def _within(timeout_s: float, call: Awaitable[T]) -> T:
        return await asyncio.wait_for(call, timeout_s)


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
        self.held = 0  # requests waiting for instances that are coming up, none ready yet
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

    def holding(self) -> bool:
        """Instances are coming up and none is ready yet (creation, or after a platform restart)."""
        return self.starting and not any(i.ready for i in self.instances)

    def refusal(self, held: bool) -> str | None:
        """Why a request is refused 429 now, or None. A request held for instances coming up is not counted
        against Azure's limit, which is about requests at instances (there are none yet), only against
        HOLD_LIMIT; held requests time out within request_timeout_ms, as any other."""
        if held:
            return None if self.held < HOLD_LIMIT else (
                f"too many requests for deployment {self.name!r}: {self.held} held while its instances start, "
                f"limit {HOLD_LIMIT}")
        if self.in_flight >= self.admission_limit:
            return (f"too many requests for deployment {self.name!r}: {self.in_flight} in flight, "
                    f"limit {self.admission_limit}")
        return None

    def count(self, held: bool, change: int) -> None:
        if held:
            self.held += change
        else:
            self.in_flight += change

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


def _request_id(headers: dict[str, str]) -> str:
    """The client's own request id (`x-ms-client-request-id`), else a new one."""
    return headers.get("x-ms-client-request-id") or str(uuid.uuid4())


def _reply(status: int, message: str, request_id: str, deployment: str | None = None,
           extra: dict | None = None) -> Response:
    headers = {"x-request-id": request_id, "x-ms-request-id": request_id}
    if deployment:
        headers[DEPLOYMENT_HEADER] = deployment
    if extra:
        headers.update(extra)
    return json_response({"message": message}, status=status, headers=headers)


class Gateway:
    """Every endpoint's scoring URI on one loopback port (`serve`), answered by `handle`."""

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
        self._counters: dict[tuple, Any] = {}
        self._histograms: dict[tuple, Any] = {}

    def _count(self, endpoint: str, deployment: str, status: int, mirrored: bool) -> None:
        """Count one answer; each label set's counter is looked up once (`labels()` costs a lock and a tuple)."""
        key = (endpoint, deployment, status // 100, mirrored)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.requests_total.labels(
                endpoint, deployment, f"{status // 100}xx", str(mirrored).lower())
        counter.inc()

    def _latency_of(self, endpoint: str, deployment: str) -> Any:
        histogram = self._histograms.get((endpoint, deployment))
        if histogram is None:
            histogram = self._histograms[(endpoint, deployment)] = self.latency.labels(endpoint, deployment)
        return histogram

    async def serve(self, host: str, port: int, backlog: int = 1024) -> HttpServer:
        """Start serving on `host:port`; `close()` the server it returns, then `close()` the gateway."""
        server = HttpServer(self.handle, self.max_body_bytes, refuse=self._refuse)
        await server.start(host, port, backlog)
        return server

    async def handle(self, request: Request) -> Response:
        """Route a request: the scoring URI, the endpoint's OpenAPI document, /metrics and / (health)."""
        path, method = request.path, request.method
        if path.startswith("/endpoints/"):
            endpoint, _, rest = path[len("/endpoints/"):].partition("/")
            if rest == "score":
                return await self.score(request, endpoint) if method == "POST" else _not_allowed(method, "POST")
            if rest == "swagger.json":
                return await self.swagger(request, endpoint) if method in ("GET", "HEAD") \
                    else _not_allowed(method, "GET, HEAD")
        elif path in ("/metrics", "/"):
            if method not in ("GET", "HEAD"):
                return _not_allowed(method, "GET, HEAD")
            return self.prometheus(request) if path == "/metrics" else json_response({"status": "Healthy"})
        return json_response({"message": f"no such path: {path} (scoring URIs are /endpoints/<name>/score)"}, 404)

    @staticmethod
    def _refuse(status: int, message: str, headers: dict[str, str]) -> Response:
        """A request the HTTP server refuses before it is read (413, 431, 400), answered as the gateway's own."""
        return _reply(status, message, _request_id(headers))

    async def close(self) -> None:
        """Cancel the mirror requests still under way."""
        for task in list(self._background):
            task.cancel()

    def set_route(self, route: EndpointRoute) -> None:
        self.routes[route.name] = route  # one assignment: in-flight requests keep what they hold

    def remove_route(self, name: str) -> None:
        self.routes.pop(name, None)

    async def swagger(self, request: Request, endpoint: str) -> Response:
        """The endpoint's OpenAPI document (its `openapi_uri`), as the serving deployment's inference server
        builds it from the scoring script's schema decorators: the deployment the header names, else the one
        with the most traffic. Authenticated as scoring is."""
        request_id = _request_id(request.headers)
        route = self._authorized_route(request, endpoint, request_id)
        if isinstance(route, Response):
            return route
        name = request.headers.get(DEPLOYMENT_HEADER) or max(
            (n for n, w in route.traffic.items() if w > 0 and n in route.pools), key=lambda n: route.traffic[n], default=None)
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
        except ValueError as exc:
            return _reply(400, f"{exc}", request_id, pool.name)
        except (OSError, asyncio.TimeoutError) as exc:
            return _reply(424, f"model server is unavailable: {str(exc) or f'no answer within {GET_TIMEOUT_S:g} s'}",
                          request_id, pool.name)
        return Response(status, payload, "application/json",
                        {DEPLOYMENT_HEADER: pool.name, "x-request-id": request_id, "x-ms-request-id": request_id})

    def prometheus(self, request: Request) -> Response:
        if self.metrics_token is not None:
            header = request.headers.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(header, f"Bearer {self.metrics_token}".encode()):
                return json_response({"message": "missing or invalid credentials: /metrics takes the "
                                                 "workspace admin token (Authorization: Bearer <admin.token>)"}, 401)
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    # ---- the scoring path -------------------------------------------------------------------
    async def score(self, request: Request, endpoint: str) -> Response:
        """Score one request (its body already read, within `max_body_bytes`, by the HTTP server)."""
        started, arrival = time.perf_counter(), self.clock()
        request_id = _request_id(request.headers)
        route = self._authorized_route(request, endpoint, request_id)
        if isinstance(route, Response):
            return route
        body = request.body
        content_type = request.content_type
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

    def _authorized_route(self, request: Request, endpoint: str, request_id: str) -> EndpointRoute | Response:
        """The endpoint the request names, or the 404 or 401 answer to give instead."""
        route = self.routes.get(endpoint)
        if route is None:
            return _reply(404, f"endpoint {endpoint!r} not found", request_id)
        refusal = self._authorize(route, request.headers.get("authorization", ""))
        if refusal:
            return _reply(401, refusal, request_id)
        return route

    def _authorize(self, route: EndpointRoute, header: str) -> str | None:
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            return "missing credentials: send 'Authorization: Bearer <key or token>'"
        credential = credential.strip()
        if not credential.isascii():  # keys and tokens are ASCII; header bytes arrive decoded as latin-1
            return "invalid credentials: the Authorization header holds bytes that are not ASCII"
        if route.auth_mode == "key":
            matched = False
            for key in route.keys:  # compare against every key, in constant time each
                matched |= hmac.compare_digest(key.encode(), credential.encode())
            return None if matched else "invalid key"
        return check_token(self.signing_key, route.name, credential, self.clock())

    async def _forward(self, route: EndpointRoute, pool: DeploymentPool, body: bytes, content_type: str,
                       started: float, arrival: float, request_id: str, *, pinned: bool = False) -> Response:
        held = pool.holding()
        finish = functools.partial(self._finish, pinned=pinned, held=held)
        refusal = pool.refusal(held)
        if refusal:
            return finish(route, pool, 429, started, arrival, request_id, None, message=refusal)
        if not pool.servable():
            return finish(route, pool, 424, started, arrival, request_id, None,
                                message=f"deployment {pool.name!r} has no running instance")
        pool.count(held, +1)
        try:
            status, payload, model_status = await _within(
                pool.timeout_ms / 1000.0, self._call_instance(pool, body, content_type))
        except asyncio.TimeoutError:
            return finish(route, pool, 408, started, arrival, request_id, None,
                                message=f"request timed out after {pool.timeout_ms} ms (request_timeout_ms)")
        finally:
            pool.count(held, -1)
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
                pinned: bool = False, held: bool = False) -> Response:
        latency_ms = (time.perf_counter() - started) * 1000.0
        self.request_log.record((arrival, route.name, pool.name, status, latency_ms, int(mirrored),
                                 request_id, model_status, int(pinned), int(held)))
        self._count(route.name, pool.name, status, mirrored)
        self._latency_of(route.name, pool.name).observe(latency_ms / 1000.0)
        headers = {DEPLOYMENT_HEADER: pool.name, "x-request-id": request_id, "x-ms-request-id": request_id}
        if payload is not None:
            return Response(status, payload, "application/json", headers)
        if model_status is not None:
            headers["ms-azureml-model-error-statuscode"] = str(model_status)
        body = {"message": message}
        if detail:
            body["model_error"] = detail[:4096].decode("utf-8", "replace")
        return json_response(body, status=status, headers=headers)

    # ---- mirror traffic ---------------------------------------------------------------------
    def _maybe_mirror(self, route: EndpointRoute, body: bytes, content_type: str, request_id: str,
                      live_deployment: str, live: Response) -> None:
        for name, percent in route.mirror.items():
            pool = route.pools.get(name)
            if pool is None or self.rng.random() * 100 >= percent:
                continue
            task = asyncio.create_task(self._mirror(route, pool, body, content_type, request_id,
                                                    live_deployment, live.status, live.body))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _mirror(self, route: EndpointRoute, pool: DeploymentPool, body: bytes, content_type: str,
                      request_id: str, live_deployment: str, live_status: int, live_body: bytes) -> None:
        """Send a copy to the mirror deployment; its answer is recorded, never shown to the client."""
        started, arrival = time.perf_counter(), self.clock()
        held = pool.holding()
        if pool.refusal(held) or not pool.servable():
            status, payload, model_status = 429 if pool.servable() else 424, b"", None
        else:
            pool.count(held, +1)
            try:
                status, payload, model_status = await _within(
                    pool.timeout_ms / 1000.0, self._call_instance(pool, body, content_type))
            except asyncio.TimeoutError:
                status, payload, model_status = 408, b"", None
            finally:
                pool.count(held, -1)
        latency_ms = (time.perf_counter() - started) * 1000.0
        self.request_log.record((arrival, route.name, pool.name, status, latency_ms, 1, request_id, model_status, 0,
                                 int(held)))
        self._count(route.name, pool.name, status, True)
        self.request_log.record_pair((arrival, route.name, request_id, body[:PAIR_BODY_LIMIT], live_deployment,
                                      live_status, bytes(live_body[:PAIR_BODY_LIMIT]), pool.name, status,
                                      payload[:PAIR_BODY_LIMIT]))



def _not_allowed(method: str, allowed: str) -> Response:
    return json_response({"message": f"method {method} is not allowed here (allowed: {allowed})"}, 405,
                         {"Allow": allowed})
