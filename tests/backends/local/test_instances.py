"""Instance.score against small loopback servers; real instances: what they listen on, what a kill leaves."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from saferollout.backends.local.instances import Instance, InstanceConfig, free_port, group_members, tail
from saferollout.processes import pid_alive
from saferollout.specs import ProbeSettings

from echo_platform import ECHO_DIR, FAST_LIVENESS, FAST_READINESS


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


# ---- a real instance: what it listens on, and what a kill -9 leaves behind ---------------------------

def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net shows them) of every listening TCP socket on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def echo_instance(tmp_path: Path) -> Instance:
    config = InstanceConfig(endpoint="ep", deployment="blue", index=0, code_dir=str(ECHO_DIR),
                            scoring_script="score.py", model_dir=None, environment_variables={},
                            readiness=FAST_READINESS, liveness=FAST_LIVENESS, log_path=tmp_path / "instance.log")
    return Instance(config, on_change=lambda: None)


async def until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return predicate()


def test_an_instance_listens_on_loopback_only(tmp_path):
    async def scenario() -> set[str]:
        inst = echo_instance(tmp_path)
        try:
            assert await inst.start(), inst.reason + tail(tmp_path / "instance.log")
            status, _ = await inst.score(b'{"x": 1}', "application/json")
            assert status == 200
            return listening_addresses(inst.port)
        finally:
            await inst.stop(drain_s=0)
    assert asyncio.run(scenario()) == {"0100007F"}  # 127.0.0.1, and nothing on 0.0.0.0 or ::


def test_a_killed_instance_leaves_no_worker_serving_its_old_port(tmp_path):
    async def scenario() -> None:
        inst = echo_instance(tmp_path)
        try:
            assert await inst.start(), inst.reason + tail(tmp_path / "instance.log")
            master, old_port = inst.process.pid, inst.port
            workers = children(master)
            assert workers, "the inference server should run at least one worker"
            os.kill(master, signal.SIGKILL)
            assert await until(lambda: not any(pid_alive(w) for w in workers), 5), \
                f"workers {workers} outlived their master"
            assert refuses(old_port)
        finally:
            await inst.stop(drain_s=0)
        assert not group_members(inst.process.pid)
    asyncio.run(scenario())
