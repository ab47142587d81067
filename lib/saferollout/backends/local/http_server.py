"""The gateway's HTTP/1.1 server: requests parsed by httptools on a bare asyncio protocol, one handler call each.

The scoring path is the platform's hot path. aiohttp's web server builds a request object, a response object,
a payload stream and a task per request, and writes its answer in several pieces; on the credit model at
concurrency 1 that made the gateway cost ~0.9 ms of CPU per request against nginx's 0.25 ms, while a bare
protocol with httptools proxying the same requests cost 0.4 ms (bench/gateway.py, docs/benchmarks.md). This
server keeps what a client relies on and nothing else:

- keep-alive (HTTP/1.1 by default, HTTP/1.0 when asked), pipelined requests answered in order;
- bodies by Content-Length or chunked, `Expect: 100-continue`, a body limit (413) checked before the body is read;
- header bytes bounded (431), malformed requests and protocol upgrades refused (400), always with a JSON message;
- idle keep-alive connections closed after `KEEPALIVE_S`, a request still unread after `REQUEST_READ_S` (408);
- HEAD answered as GET without the body; a handler's exception logged and answered 500.

Header names are lowercased; header bytes are decoded as latin-1 (HTTP's own charset: every byte survives, and
a non-ASCII credential stays non-ASCII for the caller to refuse).
"""
from __future__ import annotations

import asyncio
import functools
import http
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import unquote

import httptools

log = logging.getLogger(__name__)

KEEPALIVE_S = 75.0  # as aiohttp's server and nginx's keepalive_timeout
REQUEST_READ_S = 60.0  # a request's headers and body must arrive within this (nginx: client_header/body_timeout)
SWEEP_S = 5.0
MAX_HEADER_BYTES = 64 * 1024
MAX_PIPELINED = 32  # complete requests queued on one connection before it stops reading


@dataclass
class Request:
    method: str
    path: str  # percent-decoded, without the query
    query_string: str
    headers: dict[str, str]  # lowercase names; a repeated header's values joined with ", "
    body: bytes
    keep_alive: bool = True
    version: str = "1.1"

    @property
    def content_type(self) -> str:
        """The media type, lowercased, without parameters ("" when there is no Content-Type)."""
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(obj).encode(), "application/json", headers or {})


Handler = Callable[[Request], Awaitable[Response]]
# How the server words a request it refuses itself (status, message, the headers read so far): the gateway adds
# its request id, as for its own answers.
Refuser = Callable[[int, str, dict[str, str]], Response]


def plain_refusal(status: int, message: str, headers: dict[str, str]) -> Response:
    return json_response({"message": message}, status)


@functools.lru_cache(maxsize=64)
def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _safe(value: str) -> str:
    """A header value as sent: no CR or LF can split it into another header."""
    return value.replace("\r", " ").replace("\n", " ") if ("\r" in value or "\n" in value) else value


_CLOSE = Response(0)  # queued after the last request of a client that half-closed: close, writing nothing


class _Refuse(Exception):
    """Raised from a parser callback to stop reading the connection and answer `response`."""

    def __init__(self, response: Response):
        super().__init__(response.status)
        self.response = response


class _Connection(asyncio.Protocol):
    """One client connection: parse, queue complete requests, answer them one at a time, in order."""

    def __init__(self, server: HttpServer):
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: deque[Request | Response] = deque()  # a Response here: a refusal, then the connection closes
        self.busy = False
        self.reading = True
        self.writable = True
        self.last_active = time.monotonic()
        self.request_started: float | None = None
        self._url = bytearray()
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0

    # ---- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pending.clear()
        self.server.connections.discard(self)

    def eof_received(self) -> bool:
        """The client closed its side after sending (a half-close): answer what it sent, then close."""
        self.reading = False
        if self.busy or self.pending:
            self.pending.append(_CLOSE)
            return True  # keep the transport open to write the answers
        return False  # nothing owed: asyncio closes the connection

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        self._next()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            self._stop_reading(refused.response if isinstance(refused, _Refuse)
                               else self._refusal(400, f"malformed HTTP request: {exc}"))
        except httptools.HttpParserUpgrade:
            self._stop_reading(self._refusal(400, "protocol upgrades are not supported here"))
        except httptools.HttpParserError as exc:
            self._stop_reading(self._refusal(400, f"malformed HTTP request: {exc}"))

    # ---- httptools callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.request_started = time.monotonic()
        self._url.clear()
        self._headers = {}
        self._header_bytes = 0
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value))
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _Refuse(self._refusal(431, f"request line and headers are over {MAX_HEADER_BYTES} bytes"))

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade():
            raise _Refuse(self._refusal(400, "protocol upgrades are not supported here"))
        limit = self.server.max_body_bytes
        length = self._headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise _Refuse(self._refusal(413, f"request body of {int(length)} bytes is over the limit of "
                                             f"{limit} bytes"))
        if self._headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.server.max_body_bytes:
            raise _Refuse(self._refusal(413, f"request body is over the limit of {self.server.max_body_bytes} bytes"))
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.request_started = None
        url = httptools.parse_url(bytes(self._url))
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = Request(method=self.parser.get_method().decode("latin-1"),
                          path=unquote((url.path or b"/").decode("latin-1")),
                          query_string=(url.query or b"").decode("latin-1"), headers=self._headers, body=body,
                          keep_alive=self.parser.should_keep_alive(), version=self.parser.get_http_version())
        self._body = []
        self._enqueue(request)

    # ---- answering ----------------------------------------------------------------------------
    def _refusal(self, status: int, message: str) -> Response:
        return self.server.refuse(status, message, self._headers)

    def _stop_reading(self, refusal: Response) -> None:
        """Answer what is queued, then `refusal`, then close: nothing more is read from this client."""
        if self.transport is None:
            return
        self.transport.pause_reading()
        self.reading = False
        self._enqueue(refusal)

    def _enqueue(self, item: Request | Response) -> None:
        self.pending.append(item)
        if len(self.pending) >= MAX_PIPELINED and self.reading and self.transport is not None:
            self.transport.pause_reading()
            self.reading = False
        self._next()

    def _next(self) -> None:
        if self.busy or not self.writable or self.transport is None or not self.pending:
            return
        item = self.pending.popleft()
        if item is _CLOSE:
            self.transport.close()
            return
        if isinstance(item, Response):
            self._write(item, "GET", "1.1", close=True)
            return
        self.busy = True
        task = asyncio.get_running_loop().create_task(self._serve(item))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _serve(self, request: Request) -> None:
        try:
            response = await self.server.handler(request)
        except Exception as exc:  # noqa: BLE001 - a bug in a handler answers 500 and is logged, never kills the server
            log.exception("%s %s failed", request.method, request.path)
            response = self._refusal(500, f"internal error: {type(exc).__name__}")
        self.busy = False
        close = not request.keep_alive or self.server.closing
        self._write(response, request.method, request.version, close=close)
        if close:
            return
        if not self.reading and self.transport is not None and len(self.pending) < MAX_PIPELINED \
                and not any(isinstance(p, Response) for p in self.pending):
            self.transport.resume_reading()
            self.reading = True
        self._next()

    def _write(self, response: Response, method: str, version: str, *, close: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = response.body
        head = [f"HTTP/1.1 {response.status} {_reason(response.status)}\r\n"
                f"Content-Type: {response.content_type}\r\nContent-Length: {len(body)}\r\n"]
        for name, value in response.headers.items():
            head.append(f"{name}: {_safe(value)}\r\n")
        if close:
            head.append("Connection: close\r\n")
        elif version == "1.0":
            head.append("Connection: keep-alive\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1", "replace")
        transport.write(data + body if method != "HEAD" else data)
        self.last_active = time.monotonic()
        if close:
            transport.close()

    def expire(self, now: float) -> None:
        """Close an idle keep-alive connection; answer 408 to a request that is taking too long to arrive."""
        if self.transport is None or self.busy or self.pending:
            return
        if self.request_started is not None:
            if now - self.request_started > REQUEST_READ_S:
                self._stop_reading(self._refusal(408, f"the request did not arrive within {REQUEST_READ_S:g} s"))
        elif now - self.last_active > KEEPALIVE_S:
            self.transport.close()


class HttpServer:
    """Serve `handler` on a loopback port (`start`), close every connection on `close`."""

    def __init__(self, handler: Handler, max_body_bytes: int, refuse: Refuser = plain_refusal):
        self.handler = handler
        self.refuse = refuse
        self.max_body_bytes = max_body_bytes
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task] = set()
        self.closing = False
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task | None = None

    async def start(self, host: str, port: int, backlog: int = 1024) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, backlog=backlog)
        self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.expire(now)

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let answers in progress finish (up to `grace_s`), then close every connection."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=grace_s)
        for task in list(self.tasks):
            task.cancel()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
