"""The control API: the platform's authenticated HTTP interface on loopback, what `LocalBackend` calls.

Every route takes the workspace admin token; a `SafeRolloutError` becomes a JSON error with its status
(400 spec, 404 not found, 409 conflict), a malformed request a 400, never a traceback.
"""

import asyncio
import logging
import secrets
from typing import Any, Awaitable, Callable

from aiohttp import web

from saferollout.backends.local.metrics import INSTANCE_METRICS, aggregate, aggregate_instances, validate_query
from saferollout.backends.local.platform import Platform
from saferollout.errors import Conflict, NotFound, SafeRolloutError, SpecError

log = logging.getLogger("saferollout.platform")
ERROR_STATUS = {SpecError: 400, NotFound: 404, Conflict: 409}


def _handler(fn: Callable[[web.Request], Awaitable[Any]]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def wrapped(request: web.Request) -> web.Response:
        try:
            result = await fn(request)
        except SafeRolloutError as exc:
            status = next((code for cls, code in ERROR_STATUS.items() if isinstance(exc, cls)), 500)
            return web.json_response({"error": {"type": type(exc).__name__, "message": str(exc)}}, status=status)
        except (TypeError, ValueError, KeyError) as exc:
            return web.json_response({"error": {"type": "SpecError", "message": f"invalid request: {exc}"}},
                                     status=400)
        except RecursionError:
            return web.json_response({"error": {"type": "SpecError",
                                                "message": "invalid request: its JSON is nested too deeply"}},
                                     status=400)
        return web.json_response(result if result is not None else {"ok": True})
    return wrapped


def control_app(platform: Platform) -> web.Application:
    @web.middleware
    async def authenticate(request: web.Request, handler):
        header = request.headers.get("Authorization", "")
        if not secrets.compare_digest(header.encode("utf-8", "surrogateescape"),
                                      f"Bearer {platform.token}".encode()):
            return web.json_response({"error": {"type": "BackendError", "message": "invalid admin token"}},
                                     status=401)
        response = await handler(request)
        if request.method != "GET":  # one line per change made through the control API
            log.info("%s %s -> %s", request.method, request.path, response.status)
        return response

    p = platform
    m = lambda r: r.match_info  # noqa: E731

    async def body(request: web.Request) -> dict[str, Any]:
        data = await request.json() if request.can_read_body else {}
        if not isinstance(data, dict):
            raise SpecError(f"invalid request: the body must be a JSON object, got {type(data).__name__}")
        return data

    async def metrics(r: web.Request) -> Any:
        q = r.query
        p.store.get_endpoint(m(r)["endpoint"])
        split_by = [s for s in q.get("split_by", "").split(",") if s]
        validate_query(q["metric"], q.get("aggregation", "Average"), split_by)
        start, end = float(q["start"]), float(q["end"])
        instance_metric = q["metric"] in INSTANCE_METRICS
        read, reduce = ((p.request_log.instance_rows, aggregate_instances) if instance_metric
                        else (p.request_log.rows, aggregate))
        rows = await asyncio.to_thread(read, m(r)["endpoint"], start, end)
        return await asyncio.to_thread(reduce, rows, q["metric"], q.get("aggregation", "Average"),
                                       q.get("grain", "PT1M"), start, end, q.get("filter") or None, split_by)

    async def samples(r: web.Request) -> Any:
        q = r.query
        p.store.get_endpoint(m(r)["endpoint"])
        rows = await asyncio.to_thread(p.request_log.rows, m(r)["endpoint"], float(q["start"]), float(q["end"]))
        keep_mirrored = q.get("include_mirrored") == "true"
        return [{"timestamp": row[0], "endpoint": row[1], "deployment": row[2], "status_code": row[3],
                 "latency_ms": row[4], "mirrored": bool(row[5]), "request_id": row[6], "model_status_code": row[7],
                 "pinned": bool(row[8]), "held": bool(row[9])}
                for row in rows if (not q.get("deployment") or row[2] == q["deployment"])
                and (keep_mirrored or not row[5])]

    async def pairs(r: web.Request) -> Any:
        q = r.query
        rows = await asyncio.to_thread(p.request_log.pairs, m(r)["endpoint"], float(q["start"]), float(q["end"]))
        names = ("timestamp", "endpoint", "request_id", "request_body", "live_deployment", "live_status",
                 "live_body", "mirror_deployment", "mirror_status", "mirror_body")
        return [{k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v) for k, v in zip(names, row)}
                for row in rows]

    async def logs(r: web.Request) -> Any:
        lines = int(r.query["lines"]) if r.query.get("lines") else None
        return {"logs": await p.deployment_logs(m(r)["endpoint"], m(r)["name"], lines)}

    async def shutdown(r: web.Request) -> Any:
        p.stopping.set()
        return {"ok": True}

    routes = [
        ("GET", "/api/status", lambda r: _now(p.status())),
        ("POST", "/api/shutdown", shutdown),
        ("POST", "/api/models", lambda r: _then(body(r), p.register_model)),
        ("GET", "/api/models", lambda r: _now(p.store.list_models(r.query.get("name") or None))),
        ("GET", "/api/models/{name}/{version}", lambda r: _now(p.store.get_model(
            m(r)["name"], None if m(r)["version"] == "latest" else _version(m(r)["version"])))),
        ("POST", "/api/endpoints", lambda r: _then(body(r), p.create_endpoint)),
        ("GET", "/api/endpoints", lambda r: _now([p.endpoint_view(e) for e in p.store.list_endpoints()])),
        ("GET", "/api/endpoints/{endpoint}", lambda r: _now(p.endpoint_view(p.store.get_endpoint(m(r)["endpoint"])))),
        ("PATCH", "/api/endpoints/{endpoint}", lambda r: _then(body(r), lambda b: p.update_endpoint(m(r)["endpoint"], b))),
        ("DELETE", "/api/endpoints/{endpoint}", lambda r: p.delete_endpoint(m(r)["endpoint"])),
        ("GET", "/api/endpoints/{endpoint}/credentials", lambda r: _now(p.credentials(m(r)["endpoint"]))),
        ("POST", "/api/endpoints/{endpoint}/regenerate-keys",
         lambda r: _then(body(r), lambda b: p.regenerate_keys(m(r)["endpoint"], b.get("key_type", "primary")))),
        ("GET", "/api/endpoints/{endpoint}/metrics", metrics),
        ("GET", "/api/endpoints/{endpoint}/samples", samples),
        ("GET", "/api/endpoints/{endpoint}/mirrored-pairs", pairs),
        ("POST", "/api/endpoints/{endpoint}/deployments", lambda r: _then(body(r), p.create_deployment)),
        ("GET", "/api/endpoints/{endpoint}/deployments", lambda r: _now(
            [p.deployment_view(d) for d in p.store.list_deployments(_existing(p, m(r)["endpoint"]))])),
        ("GET", "/api/endpoints/{endpoint}/deployments/{name}", lambda r: _now(
            p.deployment_view(p.store.get_deployment(m(r)["endpoint"], m(r)["name"])))),
        ("PUT", "/api/endpoints/{endpoint}/deployments/{name}", lambda r: _then(body(r), p.update_deployment)),
        ("DELETE", "/api/endpoints/{endpoint}/deployments/{name}",
         lambda r: p.delete_deployment(m(r)["endpoint"], m(r)["name"])),
        ("GET", "/api/endpoints/{endpoint}/deployments/{name}/logs", logs),
    ]
    app = web.Application(middlewares=[authenticate], client_max_size=64 * 1024 * 1024)
    for method, path, fn in routes:
        app.router.add_route(method, path, _handler(_coroutine(fn)))
    return app


def _existing(platform: Platform, endpoint: str) -> str:
    platform.store.get_endpoint(endpoint)
    return endpoint


def _version(text: str) -> int:
    if not text.isdigit():
        raise SpecError(f"model version must be a number or 'latest', got {text!r}")
    return int(text)


async def _now(value: Any) -> Any:
    return value


async def _then(awaitable: Awaitable[Any], fn: Callable[[Any], Any]) -> Any:
    result = fn(await awaitable)
    return await result if asyncio.iscoroutine(result) else result


def _coroutine(fn: Callable[[web.Request], Any]) -> Callable[[web.Request], Awaitable[Any]]:
    async def call(request: web.Request) -> Any:
        result = fn(request)
        return await result if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future) else result
    return call
