"""The gateway's HTTP/1.1 server, spoken to over raw loopback sockets: framing, keep-alive, limits, refusals."""
from __future__ import annotations

import asyncio
import json

import pytest

from saferollout.backends.local import http_server
from saferollout.backends.local.http_server import HttpServer, Request, Response, json_response
from saferollout.backends.local.instances import free_port

LIMIT = 1000


class Recorder:
    """A handler that answers what it was sent, after the delay the request's path names (/wait/<ms>)."""

    def __init__(self) -> None:
        self.seen: list[Request] = []

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request)
        if request.path.startswith("/wait/"):
            await asyncio.sleep(int(request.path.rsplit("/", 1)[1]) / 1000)
        if request.path == "/boom":
            raise RuntimeError("a bug")
        return json_response({"path": request.path, "query": request.query_string, "body": request.body.decode(),
                              "auth": request.headers.get("authorization", "")}, headers={"x-seen": "1"})


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), 5)
    return status, headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(1), 5) == b""


def serve(scenario, handler=None):
    """Run `scenario(reader, writer, handler)` against a server on a free loopback port; always close both."""
    handler = handler or Recorder()

    async def main():
        server = HttpServer(handler, LIMIT)
        port = free_port()
        await server.start("127.0.0.1", port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await scenario(reader, writer, handler)
        finally:
            writer.close()
            await server.close(grace_s=1)
    return asyncio.run(main())


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def test_keep_alive_answers_several_requests_on_one_connection():
    async def scenario(reader, writer, handler):
        answers = []
        for i in range(3):
            writer.write(post(f"/n/{i}?q={i}", f'{{"i": {i}}}'.encode()))
            answers.append(await read_answer(reader))
        return answers
    answers = serve(scenario)
    assert [json.loads(body) for _, _, body in answers] == [
        {"path": f"/n/{i}", "query": f"q={i}", "body": f'{{"i": {i}}}', "auth": ""} for i in range(3)]
    assert all(status == 200 and headers["x-seen"] == "1" and "connection" not in headers
               for status, headers, _ in answers)


def test_pipelined_requests_are_answered_in_the_order_they_came():
    async def scenario(reader, writer, handler):
        writer.write(post("/wait/300", b"a") + post("/wait/0", b"b") + post("/wait/100", b"c"))
        return [json.loads((await read_answer(reader))[2])["body"] for _ in range(3)]
    assert serve(scenario) == ["a", "b", "c"]


@pytest.mark.parametrize("request_bytes", [
    b"POST /x HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /x HTTP/1.1\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
], ids=["http/1.0", "connection: close"])
def test_a_client_that_does_not_keep_alive_is_answered_then_closed(request_bytes):
    async def scenario(reader, writer, handler):
        writer.write(request_bytes)
        status, headers, _ = await read_answer(reader)
        return status, headers["connection"], await closed(reader)
    assert serve(scenario) == (200, "close", True)


def test_http_1_0_keep_alive_is_kept_and_said():
    async def scenario(reader, writer, handler):
        writer.write(b"POST /x HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}")
        first = await read_answer(reader)
        writer.write(b"POST /y HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
        return first[1]["connection"], (await read_answer(reader))[0], await closed(reader)
    assert serve(scenario) == ("keep-alive", 200, True)


def test_a_client_that_half_closes_after_sending_gets_its_answers():
    async def scenario(reader, writer, handler):
        writer.write(post("/wait/200", b"a") + post("/b", b"b"))
        writer.write_eof()  # as `nc -N` or a shell script's client does
        first, second = await read_answer(reader), await read_answer(reader)
        return json.loads(first[2])["body"], json.loads(second[2])["body"], await closed(reader)
    assert serve(scenario) == ("a", "b", True)


def test_a_chunked_body_arrives_whole():
    async def scenario(reader, writer, handler):
        writer.write(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"4\r\n{\"a\"\r\n5\r\n: 12}\r\n0\r\n\r\n")
        return json.loads((await read_answer(reader))[2])["body"]
    assert serve(scenario) == '{"a": 12}'


def test_expect_100_continue_is_answered_before_the_body_is_sent():
    async def scenario(reader, writer, handler):
        writer.write(b"POST /e HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(b"{}")
        return interim, (await read_answer(reader))[0]
    assert serve(scenario) == (b"HTTP/1.1 100 Continue\r\n\r\n", 200)


@pytest.mark.parametrize("request_bytes, message", [
    (post("/big", b"x" * (LIMIT + 1)), f"request body of {LIMIT + 1} bytes is over the limit of {LIMIT} bytes"),
    (b"POST /big HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (LIMIT + 1, b"x" * (LIMIT + 1)),
     f"request body is over the limit of {LIMIT} bytes"),
], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_413_and_never_reaches_the_handler(request_bytes, message):
    async def scenario(reader, writer, handler):
        writer.write(request_bytes)
        status, headers, body = await read_answer(reader)
        return status, headers["connection"], json.loads(body)["message"], await closed(reader), handler.seen
    assert serve(scenario) == (413, "close", message, True, [])


@pytest.mark.parametrize("request_bytes, status, message", [
    (b"this is not http\r\n\r\n", 400, "malformed HTTP request"),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"y" * (http_server.MAX_HEADER_BYTES + 1) + b"\r\n\r\n", 431,
     "request line and headers are over"),
    (b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 400, "protocol upgrades"),
], ids=["garbage", "headers too large", "upgrade"])
def test_a_request_the_server_cannot_take_is_refused_with_a_message(request_bytes, status, message):
    async def scenario(reader, writer, handler):
        writer.write(request_bytes)
        answer = await read_answer(reader)
        return answer, await closed(reader), handler.seen
    (got, headers, body), was_closed, seen = serve(scenario)
    assert got == status and headers["content-type"] == "application/json"
    assert json.loads(body)["message"].startswith(message)
    assert was_closed and seen == []


def test_the_answer_before_a_malformed_pipelined_request_is_still_sent():
    async def scenario(reader, writer, handler):
        writer.write(post("/wait/100", b"first") + b"garbage\r\n\r\n")
        return (await read_answer(reader))[0], (await read_answer(reader))[0], await closed(reader)
    assert serve(scenario) == (200, 400, True)


def test_a_handler_that_raises_is_500_and_the_connection_serves_on():
    async def scenario(reader, writer, handler):
        writer.write(post("/boom", b"{}"))
        failed = await read_answer(reader)
        writer.write(post("/after", b"{}"))
        return failed[0], json.loads(failed[2])["message"], (await read_answer(reader))[0]
    assert serve(scenario) == (500, "internal error: RuntimeError", 200)


def test_head_is_answered_without_the_body():
    async def scenario(reader, writer, handler):
        writer.write(b"HEAD /h HTTP/1.1\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(post("/next", b"{}"))  # had the HEAD answer carried a body, this would read it instead
        return b"Content-Length: " in head, (await read_answer(reader))[0]
    assert serve(scenario) == (True, 200)


def test_header_bytes_arrive_as_latin_1_and_an_answer_header_cannot_be_split():
    async def handler(request: Request) -> Response:
        return Response(200, request.headers["authorization"].encode("latin-1"), "text/plain",
                        {"x-echo": "a\r\nInjected: yes"})

    async def scenario(reader, writer, _):
        writer.write(b"GET / HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\r\n\r\n")
        return await read_answer(reader)
    status, headers, body = serve(scenario, handler)
    assert (status, body) == (200, b"Bearer \xff\xfe")
    assert "injected" not in headers and headers["x-echo"] == "a  Injected: yes"


def test_an_idle_connection_is_closed_and_a_slow_request_is_408(monkeypatch):
    monkeypatch.setattr(http_server, "SWEEP_S", 0.05)
    monkeypatch.setattr(http_server, "KEEPALIVE_S", 0.2)
    monkeypatch.setattr(http_server, "REQUEST_READ_S", 0.2)

    async def idle(reader, writer, handler):
        writer.write(post("/x", b"{}"))
        await read_answer(reader)
        return await closed(reader)

    async def slow(reader, writer, handler):
        writer.write(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")  # nine bytes never come
        status, _, body = await read_answer(reader)
        return status, json.loads(body)["message"], await closed(reader)
    assert serve(idle) is True
    assert serve(slow) == (408, "the request did not arrive within 0.2 s", True)


def test_close_lets_an_answer_under_way_finish():
    async def main():
        server = HttpServer(Recorder(), LIMIT)
        port = free_port()
        await server.start("127.0.0.1", port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/wait/300", b"late"))
        await asyncio.sleep(0.1)
        await server.close(grace_s=2)
        answer = await read_answer(reader)
        writer.close()
        return answer[0], answer[1].get("connection"), json.loads(answer[2])["body"]
    assert asyncio.run(main()) == (200, "close", "late")
