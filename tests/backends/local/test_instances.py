"""Instance.score against small loopback servers; real instances: what they listen on, what a kill leaves."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from saferollout.backends.local import instances
from saferollout.backends.local.instances import (Instance, InstanceConfig, free_port, group_members, rotate_log,
                                                  tail)
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


# ---- connections opened ahead, against a server that works as gunicorn's sync worker -----------------------

class SyncWorker:
    """gunicorn's sync worker in miniature: one connection at a time, accepted in order, a blocking read of its
    request, one answer, close. `connections` holds, per accepted connection in accept order, the request line
    (b"" while it waits for one, None when it closed without one); those in `close_unread` are closed at once."""

    ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"

    def __init__(self, close_unread: frozenset[int] = frozenset()):
        self.close_unread = close_unread
        self.connections: list[bytes | None] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "SyncWorker":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            index = len(self.connections)
            self.connections.append(b"")
            with conn:
                conn.settimeout(None)  # blocking, as the sync worker reads
                request = b"" if index in self.close_unread else self._read(conn)
                if not request:
                    self.connections[index] = None
                    continue
                self.connections[index] = request.split(b"\r\n", 1)[0]
                conn.sendall(self.ANSWER)

    def _read(self, conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += conn.recv(65536)
        return data


POST = b"POST /score HTTP/1.0"


@pytest.fixture
def patient_spares(monkeypatch):
    """Connections opened ahead wait 30 s for a request, so a test sees them before they are closed."""
    monkeypatch.setattr(instances, "SPARE_IDLE_S", 30.0)


def after_one_request(scenario, close_unread: frozenset[int] = frozenset()) -> None:
    """Run `scenario(inst, worker)` once an instance pointed at a SyncWorker has scored one request."""
    async def main(worker: SyncWorker) -> None:
        inst = instance(worker.port)
        assert await inst.score(b"{}", "application/json") == (200, b"{}")
        try:
            await scenario(inst, worker)
        finally:
            inst.close_connections()

    with SyncWorker(close_unread) as worker:
        asyncio.run(main(worker))


def test_the_next_request_finds_its_connection_already_open(patient_spares):
    async def scenario(inst: Instance, worker: SyncWorker) -> None:
        # the next request's connection is open, and the worker waits on it, before that request exists
        assert await until(lambda: worker.connections == [POST, b""], 5), worker.connections
        assert await inst.score(b"{}", "application/json") == (200, b"{}")
        assert await until(lambda: worker.connections == [POST, POST, b""], 5), worker.connections
        inst.close_connections()
        assert await until(lambda: worker.connections == [POST, POST, None], 5), worker.connections

    after_one_request(scenario)


def test_probes_and_swagger_take_the_open_connection_instead_of_queueing_behind_it(patient_spares):
    """A probe on a connection of its own would wait behind the one the sync worker holds, and fail."""
    async def scenario(inst: Instance, worker: SyncWorker) -> None:
        assert await until(lambda: worker.connections == [POST, b""], 5)
        assert await inst._probe(2.0)
        assert await inst.get("/swagger.json?version=2") == (200, b"{}")
        assert worker.connections[:3] == [POST, b"GET / HTTP/1.0", b"GET /swagger.json?version=2 HTTP/1.0"]

    after_one_request(scenario)


def test_an_unused_connection_is_closed_soon_freeing_the_worker(monkeypatch):
    monkeypatch.setattr(instances, "SPARE_IDLE_S", 0.05)

    async def scenario(inst: Instance, worker: SyncWorker) -> None:
        assert await until(lambda: worker.connections == [POST, None], 5), worker.connections
        assert await inst.score(b"{}", "application/json") == (200, b"{}")  # a new one, as there is none open
        assert await until(lambda: worker.connections == [POST, None, POST, None], 5), worker.connections

    after_one_request(scenario)


def test_a_connection_the_instance_closed_before_its_request_is_skipped(patient_spares):
    async def scenario(inst: Instance, worker: SyncWorker) -> None:
        assert await until(lambda: worker.connections == [POST, None], 5)
        opened = inst._opened[0].task
        assert await until(lambda: opened.done() and opened.result()[1].closed, 5)  # and we saw it close
        assert await inst.score(b"{}", "application/json") == (200, b"{}")
        assert worker.connections[:3] == [POST, None, POST]

    after_one_request(scenario, close_unread=frozenset({1}))


def test_a_request_that_times_out_closes_its_connection(patient_spares):
    """The worker holds a request it never answers; the caller's timeout closes the connection (EOF)."""
    async def scenario(port: int, accepted: list) -> None:
        inst = instance(port)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(inst.score(b"{}", "application/json"), 0.3)
        inst.close_connections()
        assert await until(lambda: len(accepted) == 2 and all(a.done() for a in accepted), 5)
        assert [a.result() for a in accepted] == [b"{}", b""]  # the rest of each, to EOF: closed by us

    async def main() -> None:
        accepted: list[asyncio.Future] = []

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            done = asyncio.get_running_loop().create_future()
            accepted.append(done)
            await reader.readuntil(b"\r\n\r\n") if len(accepted) == 1 else None
            done.set_result(await reader.read())  # b"" at EOF
            writer.close()

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        async with server:
            await scenario(server.sockets[0].getsockname()[1], accepted)

    asyncio.run(main())


def test_a_path_that_cannot_go_on_a_request_line_is_refused():
    with pytest.raises(ValueError, match="not a path"):
        asyncio.run(instance(free_port()).get("/swagger.json?a b\r\nX: y"))


# ---- a real instance: what it listens on, and what a kill -9 leaves behind ---------------------------

def listening_sockets(port: int) -> list[tuple[str, str]]:
    """(local address in hex as /proc/net shows it, socket inode) of every listening TCP socket on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].rpartition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.append((address, fields[9]))
    return found


def listening_addresses(port: int) -> set[str]:
    return {address for address, _ in listening_sockets(port)}


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def listeners(port: int) -> dict[int, str]:
    """{pid: command line} of every process holding a listening TCP socket on `port` (from /proc, Linux)."""
    inodes = {f"socket:[{inode}]" for _, inode in listening_sockets(port)}
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


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


def unix_listeners(pids: list[int]) -> list[str]:
    """Paths of the listening unix sockets any of `pids` holds (/proc/net/unix: flag 00010000 is listening)."""
    listening = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[3], 16) & 0x10000:
            listening[f"socket:[{fields[6]}]"] = fields[7] if len(fields) > 7 else "(unnamed)"
    held = []
    for pid in pids:
        try:
            held += [listening[link] for fd in Path(f"/proc/{pid}/fd").iterdir()
                     if (link := os.readlink(fd)) in listening]
        except OSError:
            continue
    return held


def test_an_instance_opens_no_control_socket(tmp_path):
    """gunicorn 25+ opens a control socket (`gunicornc` can resize or stop it) at $XDG_RUNTIME_DIR/gunicorn.ctl
    or ~/.gunicorn/gunicorn.ctl, one path for every instance: the platform alone manages its instances."""
    home = tmp_path / "home"
    home.mkdir()

    async def scenario() -> list[str]:
        inst = echo_instance(tmp_path)
        inst.config.environment_variables = {"HOME": str(home), "XDG_RUNTIME_DIR": ""}
        try:
            assert await inst.start(), inst.reason + tail(tmp_path / "instance.log")
            return unix_listeners(group_members(inst.process.pid))
        finally:
            await inst.stop(drain_s=0)
    assert asyncio.run(scenario()) == []
    assert not (home / ".gunicorn").exists()


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
            assert not group_members(master), "a process of the killed instance's group is still running"
            # The supervisor restarts the instance at once, on a new port; on a busy machine another test's
            # server may since have been given the old one. What must not hold it is the killed instance.
            # A process started as the killed instance (workers share the master's command line) must not.
            current = set(group_members(inst.process.pid)) if inst.process.pid != master else set()
            stale = {pid: cmd for pid, cmd in listeners(old_port).items()
                     if pid not in current and f"--port {old_port} " in cmd + " "}
            assert not stale, f"the killed instance still listens on {old_port}: {stale}"
        finally:
            await inst.stop(drain_s=0)
        assert not group_members(inst.process.pid)
    asyncio.run(scenario())


# ---- instance logs: size-bounded, a few old files kept, recent lines still shown ----------------------

def test_rotate_log_keeps_a_few_old_files_and_empties_the_current_one(tmp_path):
    log = tmp_path / "instance-0.log"
    for generation in range(5):
        log.write_text(f"generation {generation}\n" * 100)
        assert rotate_log(log, max_bytes=1024, backups=2)
    assert log.read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instance-0.log", "instance-0.log.1", "instance-0.log.2"]
    assert (tmp_path / "instance-0.log.1").read_text().startswith("generation 4")
    assert (tmp_path / "instance-0.log.2").read_text().startswith("generation 3")


def test_a_log_under_its_limit_is_left_alone(tmp_path):
    log = tmp_path / "instance-0.log"
    log.write_text("small\n")
    assert not rotate_log(log, max_bytes=1024, backups=2)
    assert log.read_text() == "small\n" and not (tmp_path / "instance-0.log.1").exists()


def test_tail_reads_on_into_the_rotated_files(tmp_path):
    log = tmp_path / "instance-0.log"
    (tmp_path / "instance-0.log.2").write_text("".join(f"old {i}\n" for i in range(3)))
    (tmp_path / "instance-0.log.1").write_text("".join(f"older {i}\n" for i in range(3)))
    log.write_text("new 0\nnew 1\n")
    assert tail(log, 4) == "older 1\nolder 2\nnew 0\nnew 1\n"
    assert tail(log) == "old 0\nold 1\nold 2\nolder 0\nolder 1\nolder 2\nnew 0\nnew 1\n"


def test_a_chatty_instance_log_stays_bounded(tmp_path, monkeypatch):
    """ECHO_FAIL: every request writes a traceback; the log rotates while the instance runs."""
    monkeypatch.setattr("saferollout.backends.local.instances.LOG_CHECK_S", 0.2)
    log = tmp_path / "instance.log"
    config = InstanceConfig(endpoint="ep", deployment="blue", index=0, code_dir=str(ECHO_DIR),
                            scoring_script="score.py", model_dir=None, environment_variables={"ECHO_FAIL": "1"},
                            readiness=FAST_READINESS, liveness=FAST_LIVENESS, log_path=log,
                            log_max_bytes=4096, log_backups=2)

    async def scenario() -> None:
        inst = Instance(config, on_change=lambda: None)
        try:
            assert await inst.start(), inst.reason + tail(log)
            # until two old files exist (how many requests that takes depends on the machine's speed), then five
            # more rounds: a third old file must never appear
            deadline, rounds_after = time.monotonic() + 60, None
            while rounds_after != 0 and time.monotonic() < deadline:
                for _ in range(20):
                    status, _ = await inst.score(b'{"x": 1}', "application/json")
                    assert status == 500
                await asyncio.sleep(0.3)  # at least one rotation check
                if rounds_after is None and (tmp_path / "instance.log.2").exists():
                    rounds_after = 5
                elif rounds_after:
                    rounds_after -= 1
            assert rounds_after == 0, f"the log was not rotated twice within 60 s: {sorted(os.listdir(tmp_path))}"
            assert await until(lambda: log.stat().st_size < 4096, 5), "the log was not rotated"
        finally:
            await inst.stop(drain_s=0)
    asyncio.run(scenario())
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["instance.log", "instance.log.1", "instance.log.2"]
    assert "echo run failed on purpose" in tail(log, 50)
