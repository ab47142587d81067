"""The floor for a Python hop: the thinnest proxy on uvloop and httptools, beside direct and the gateway.

Forty lines of proxy with no auth, routing, recording or timeouts, in front of the credit model's instance,
measured by `gateway.measure` interleaved with direct and the gateway (it takes nginx's slot in the output).
What it showed is in `FINDINGS` of bench/gateway.py; it is an experiment, not published by `make bench`.

    .venv/bin/python bench/thin_proxy.py [--runs 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httptools
import uvloop

import gateway as gw
from saferollout import data, training
from saferollout.backends.local.backend import LocalBackend
from saferollout.backends.local.client import stop_platform
from saferollout.backends.local.instances import free_port


class _Upstream(asyncio.Protocol):
    def __init__(self, request: bytes, answer: asyncio.Future):
        self.request, self.answer, self.data = request, answer, bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:  # the sync worker closes after its answer
        if not self.answer.done():
            self.answer.set_result(bytes(self.data))


class _Front(asyncio.Protocol):
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        asyncio.get_running_loop().create_task(self.forward(body))

    async def forward(self, body: bytes) -> None:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future = loop.create_future()
        request = b"POST /score HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body), body)
        await loop.create_connection(lambda: _Upstream(request, answer), "127.0.0.1", self.upstream_port)
        payload = (await answer).partition(b"\r\n\r\n")[2]
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"  # type: ignore[attr-defined]
                             % (len(payload), payload))


def serve(upstream_port: int, port: int) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(lambda: _Front(upstream_port), "127.0.0.1", port)
        await server.serve_forever()
    uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs, each on a new platform (default 3)")
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args(argv)
    split = data.split(seed=42)
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="saferollout-thin-") as tmp:
            home, model_dir = Path(tmp) / "home", Path(tmp) / "model"
            training.train("logistic_regression", split).save(model_dir)
            backend = LocalBackend(home)
            proxy = 0
            try:
                target = gw.deploy(backend, model_dir)["credit"]
                upstream = int(target["direct"][0].split(":")[2].split("/")[0])
                port = free_port()
                proxy = os.fork()
                if proxy == 0:
                    serve(upstream, port)
                    os._exit(0)
                time.sleep(1)
                target["nginx"] = (f"http://127.0.0.1:{port}/score", {})  # measure() knows the slot as nginx
                pids = {"nginx": proxy, "gateway": json.loads((home / "platform.json").read_text())["pid"]}
                result = gw.measure(target, gw.bodies_for("credit", split), args.concurrency, 2000, 8, pids)
                print(f"run {run + 1} (load average {os.getloadavg()[0]:.2f}): " + " | ".join(
                    f"{'thin proxy' if path == 'nginx' else path} p50 {row['p50_ms']:.2f} ms"
                    + (f" ratio {row['ratios']['p50']:.3f}, CPU {row['cpu_ms_per_request']:.2f} ms/req"
                       if "ratios" in row else "")
                    for path, row in result.items()), flush=True)
            finally:
                if proxy:
                    os.kill(proxy, signal.SIGKILL)
                    os.waitpid(proxy, 0)
                stop_platform(home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
