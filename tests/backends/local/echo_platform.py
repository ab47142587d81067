"""Echo deployments, bounded concurrent loads and waits, for the local platform's tests.

Tests that only read and write their own endpoints use the session platform (`local_backend`) and
delete what they create; tests that stop or kill the platform use `private_platform` (conftest.py).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import aiohttp

from saferollout.backends.local.backend import LocalBackend
from saferollout.specs import DeploymentSpec, EndpointSpec, ProbeSettings, RequestSettings

ECHO_DIR = Path(__file__).resolve().parents[3] / "bench" / "echo"
# Probes tuned for tests: readiness is polled at once, liveness notices a dead process within a second.
FAST_READINESS = ProbeSettings(initial_delay=0, period=1, timeout=2, failure_threshold=30)
FAST_LIVENESS = ProbeSettings(initial_delay=0, period=1, timeout=2, failure_threshold=2)
# Liveness for modules that never kill an instance: a probe queued behind requests on a loaded CI machine must
# not restart it (an exit is still noticed at once; the supervisor waits on the process).
PATIENT_LIVENESS = ProbeSettings(initial_delay=0, period=1, timeout=10, failure_threshold=10)


def echo_spec(endpoint: str, name: str, *, instance_count: int = 1, max_concurrent: int = 8,
              timeout_ms: int = 5000, env: dict[str, str] | None = None, code: Path = ECHO_DIR,
              liveness: ProbeSettings = FAST_LIVENESS) -> DeploymentSpec:
    """A deployment of the echo scoring script that answers with its own name (ECHO_NAME) and pid."""
    return DeploymentSpec(
        name=name, endpoint_name=endpoint, code_path=str(code), scoring_script="score.py",
        instance_count=instance_count,
        request_settings=RequestSettings(request_timeout_ms=timeout_ms,
                                         max_concurrent_requests_per_instance=max_concurrent),
        readiness_probe=FAST_READINESS, liveness_probe=liveness,
        environment_variables={"ECHO_NAME": name, **(env or {})})


def deploy_all(backend: LocalBackend, specs: Iterable[DeploymentSpec], timeout_s: float = 90.0) -> dict[str, Any]:
    """Create deployments side by side (instances start in parallel) and wait until each one settles."""
    specs = list(specs)
    for spec in specs:
        backend.create_deployment(spec, wait=False)
    deadline = time.monotonic() + timeout_s
    states: dict[str, Any] = {}
    while time.monotonic() < deadline:
        states = {s.name: backend.get_deployment(s.endpoint_name, s.name) for s in specs}
        if all(d.provisioning_state in ("Succeeded", "Failed") for d in states.values()):
            return states
        time.sleep(0.1)
    raise AssertionError(f"deployments did not settle: {[(n, d.provisioning_state) for n, d in states.items()]}")


def new_endpoint(backend: LocalBackend, auth_mode: str = "key", tags: dict[str, str] | None = None) -> str:
    name = f"ep-{uuid.uuid4().hex[:8]}"
    backend.create_endpoint(EndpointSpec(name=name, auth_mode=auth_mode, tags=tags or {}))
    return name


@dataclass
class Answer:
    status: int
    deployment: str | None
    body: Any
    request_id: str | None


def fire(url: str, bodies: list[Any], *, headers: dict[str, str], concurrency: int = 8,
         timeout_s: float = 60.0) -> list[Answer]:
    """Send every body to `url` with at most `concurrency` requests in flight; answers in order."""
    return asyncio.run(_fire(url, bodies, headers, concurrency, timeout_s))


async def _fire(url: str, bodies: list[Any], headers: dict[str, str], concurrency: int,
                timeout_s: float) -> list[Answer]:
    answers: list[Answer | None] = [None] * len(bodies)
    queue: asyncio.Queue = asyncio.Queue()
    for item in enumerate(bodies):
        queue.put_nowait(item)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async def worker() -> None:
            while not queue.empty():
                index, body = queue.get_nowait()
                data = body if isinstance(body, bytes) else None
                async with session.post(url, json=None if data is not None else body, data=data,
                                        headers=headers) as resp:
                    payload = await resp.read()
                    try:
                        parsed = await resp.json(content_type=None)
                    except ValueError:
                        parsed = payload
                    answers[index] = Answer(resp.status, resp.headers.get("azureml-model-deployment"), parsed,
                                            resp.headers.get("x-request-id"))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers  # type: ignore[return-value]


def auth(backend: LocalBackend, endpoint: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {backend.get_credentials(endpoint).bearer}", **extra}


def wait_for(predicate, timeout_s: float = 30.0, interval_s: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
