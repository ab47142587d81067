"""Instance.score: the gateway's one HTTP exchange with an instance, against small loopback servers."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from saferollout.backends.local.instances import Instance, InstanceConfig, free_port
from saferollout.specs import ProbeSettings


def instance(port: int) -> Instance:
    config = InstanceConfig(endpoint="ep", deployment="blue", index=0, code_dir=".", scoring_script="score.py",
                            model_dir=None, environment_variables={}, readiness=ProbeSettings(),
                            liveness=ProbeSettings(), log_path=Path("unused.log"))
    inst = Instance(config, on_change=lambda: None)
    inst.port = port
    return inst


async def exchange(answer: bytes, body: bytes = b'{"x": 1}') -> tuple[tuple[int, bytes], bytes]:
    """Serve one connection that replies `answer`; return what score() got and what the server received."""
    received = bytearray()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.readuntil(b"\r\n\r\n"))
        received.extend(await reader.readexactly(len(body)))
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        result = await instance(server.sockets[0].getsockname()[1]).score(body, "application/json")
    return result, bytes(received)


def test_score_sends_the_body_and_reads_the_answer_by_its_length():
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
    (status, payload), received = asyncio.run(exchange(answer))
    assert (status, payload) == (200, b'{"a":1}')
    assert received.startswith(b"POST /score HTTP/1.0\r\n")
    assert b"Content-Type: application/json\r\n" in received and received.endswith(b'\r\n\r\n{"x": 1}')


def test_score_reads_to_the_end_when_there_is_no_length():
    (status, payload), _ = asyncio.run(exchange(b"HTTP/1.0 500 INTERNAL SERVER ERROR\r\n\r\nboom"))
    assert (status, payload) == (500, b"boom")


@pytest.mark.parametrize("answer", [b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
                                    b"HTTP/1.1 200 OK\r\n"])
def test_a_malformed_or_cut_answer_is_a_connection_error(answer):
    with pytest.raises(ConnectionError, match="blue-0 sent an incomplete or malformed answer"):
        asyncio.run(exchange(answer))


def test_nothing_listening_is_an_os_error():
    with pytest.raises(OSError):
        asyncio.run(instance(free_port()).score(b"{}", "application/json"))
