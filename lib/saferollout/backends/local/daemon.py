"""The platform process: reconciles desired state, supervises instances, runs the gateway.

One per workspace (`SAFEROLLOUT_HOME`, default `./.saferollout`). Clients start it on demand through
`ensure_platform`; `saferollout local stop` stops it. It serves two loopback ports: the gateway (stable,
kept in the store so scoring URIs survive restarts) and the control API (authenticated with the workspace
admin token kept in a 0600 file). On start it reads the store and brings every deployment back.
"""
from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import logging
import logging.handlers
import math
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import psutil
import requests
from aiohttp import web

from saferollout.backends.local.gateway import DEFAULT_MAX_BODY_BYTES, DeploymentPool, EndpointRoute, Gateway, \
    issue_token
from saferollout.backends.local.instances import Instance, InstanceConfig, free_port, group_members, tail
from saferollout.backends.local.metrics import INSTANCE_METRICS, RequestLog, aggregate, aggregate_instances, validate_query
from saferollout.backends.local.store import Store, new_key
from saferollout.backends.local.workspace import PRIVATE_UMASK, private_home
from saferollout.errors import BackendError, Conflict, NotFound, SafeRolloutError, SpecError
from saferollout.processes import pid_alive
from saferollout.specs import (DeploymentSpec, ProbeSettings, _probe, _request_settings, deployment_spec_from_dict,
                               endpoint_spec_from_dict, parse_model_ref, validate_mirror, validate_model_name,
                               validate_traffic)

log = logging.getLogger("saferollout.platform")
DEFAULT_HOME = ".saferollout"
TOKEN_TTL_ENV = "SAFEROLLOUT_TOKEN_TTL_S"
ROUTING_SEED_ENV = "SAFEROLLOUT_ROUTING_SEED"
START_TIMEOUT_S = 120.0
INSTANCE_SAMPLE_S = float(os.environ.get("SAFEROLLOUT_INSTANCE_SAMPLE_S", "5"))  # instance CPU and memory
LOG_NAME = "platform.log"
LOG_MAX_BYTES_ENV = "SAFEROLLOUT_LOG_MAX_BYTES"
OUTPUT_NAME = "platform.out"  # the platform process's stdout and stderr, this start's only
ERROR_STATUS = {SpecError: 400, NotFound: 404, Conflict: 409}


def routing_rng() -> random.Random:
    """The gateway's traffic-split draws; SAFEROLLOUT_ROUTING_SEED makes them reproducible (tests, demos)."""
    seed = os.environ.get(ROUTING_SEED_ENV, "").strip()
    if seed and not seed.isdigit():
        raise SpecError(f"{ROUTING_SEED_ENV} must be a whole number, got {seed!r}")
    return random.Random(int(seed)) if seed else random.Random()


def token_ttl_s() -> float:
    """How long an issued aml_token lives: SAFEROLLOUT_TOKEN_TTL_S (a positive, finite number) or an hour."""
    text = os.environ.get(TOKEN_TTL_ENV, "3600")
    try:
        ttl = float(text)
    except ValueError:
        ttl = math.nan
    if not math.isfinite(ttl) or ttl <= 0:
        raise SpecError(f"{TOKEN_TTL_ENV} must be a positive number of seconds, got {text!r}")
    return ttl


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    return Path(home or os.environ.get("SAFEROLLOUT_HOME") or DEFAULT_HOME).expanduser().resolve()


def admin_token(home: Path) -> str:
    """The workspace admin token, created once with mode 0600 (the workspace checked private first)."""
    private_home(home)
    path = home / "admin.token"
    if not path.exists():
        # written whole under a private name, then linked into place: two processes starting a new
        # workspace at once agree on one token, and neither can read a half-written file
        draft = home / f".admin.token.{os.getpid()}"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32))
        try:
            os.link(draft, path)
        except FileExistsError:
            pass  # another process won: use its token
        finally:
            draft.unlink()
    return path.read_text().strip()


class DeploymentRuntime:
    """The running side of one deployment: its instances and its pool in the gateway."""

    def __init__(self, platform: "Platform", record: dict[str, Any]):
        self.platform = platform
        self.endpoint = record["endpoint"]
        self.name = record["name"]
        spec = DeploymentSpec.from_dict(record["spec"])
        self.pool = DeploymentPool(self.endpoint, self.name, spec.request_settings.max_concurrent_requests_per_instance,
                                   spec.request_settings.request_timeout_ms)
        self.instances: list[Instance] = []
        self.task: asyncio.Task | None = None
        self.lock = asyncio.Lock()

    def log_dir(self) -> Path:
        return self.platform.home / "logs" / self.endpoint / self.name

    def _instance(self, record: dict[str, Any], spec: DeploymentSpec, index: int) -> Instance:
        config = InstanceConfig(
            endpoint=self.endpoint, deployment=self.name, index=index, code_dir=record["code_dir"],
            scoring_script=spec.scoring_script, model_dir=record["model_dir"],
            environment_variables=spec.environment_variables, readiness=spec.readiness_probe,
            liveness=spec.liveness_probe, log_path=self.log_dir() / f"instance-{index}.log",
            umask=self.platform.user_umask)
        return Instance(config, self.pool.notify)

    async def start_instances(self, record: dict[str, Any], spec: DeploymentSpec, count: int,
                              first_index: int = 0) -> tuple[list[Instance], str]:
        """Start `count` instances; all of them ready, or none kept and the reason why."""
        fresh = [self._instance(record, spec, first_index + i) for i in range(count)]
        results = await asyncio.gather(*(inst.start() for inst in fresh))
        if all(results):
            return fresh, ""
        reason = next(inst.reason for inst, ok in zip(fresh, results) if not ok)
        await asyncio.gather(*(inst.stop(drain_s=0) for inst in fresh))
        return [], reason

    def apply_settings(self, spec: DeploymentSpec) -> None:
        self.pool.max_concurrent = spec.request_settings.max_concurrent_requests_per_instance
        self.pool.timeout_ms = spec.request_settings.request_timeout_ms

    async def stop(self) -> None:
        self.pool.failed = True
        old, self.instances = self.instances, []
        self.pool.instances = []
        self.pool.notify()  # requests waiting for an instance fail now
        await asyncio.gather(*(inst.stop() for inst in old))


class Platform:
    def __init__(self, home: Path, gateway_port: int | None = None, user_umask: int | None = None):
        self.home = home
        self.user_umask = user_umask  # instances run the scoring script with the user's own umask
        self.store = Store(home)
        self.token = admin_token(home)
        self.request_log = RequestLog(home / "metrics.db")
        self.gateway = Gateway(self.request_log, self.store.signing_key(),
                               max_body_bytes=int(os.environ.get("SAFEROLLOUT_MAX_BODY_BYTES",
                                                                 DEFAULT_MAX_BODY_BYTES)),
                               rng=routing_rng(), metrics_token=self.token)
        stored = self.store.get_meta("gateway_port")
        self.gateway_port = int(stored) if stored else (gateway_port or free_port())
        self.store.set_meta("gateway_port", str(self.gateway_port))
        self.control_port = 0
        self.runtimes: dict[tuple[str, str], DeploymentRuntime] = {}
        self.copying: set[tuple[str, str]] = set()  # deployments whose model or code is being copied
        self.reconciled = False
        self.stopping = asyncio.Event()
        self.started_at = time.time()

    # ---- instance metrics -------------------------------------------------------------------
    async def sample_instances(self) -> None:
        """Every INSTANCE_SAMPLE_S, the CPU and memory of each instance's processes (its gunicorn master and
        workers), served as the deployment metrics Azure names CpuUtilizationPercentage and
        CpuMemoryUtilizationPercentage."""
        processes: dict[int, psutil.Process] = {}  # kept between samples: cpu_percent counts from the last call
        while True:
            await asyncio.sleep(INSTANCE_SAMPLE_S)
            try:
                rows = await asyncio.to_thread(self._instance_samples, processes)
                await asyncio.to_thread(self.request_log.record_instances, rows)
            except Exception as exc:  # a sample lost is no reason to stop measuring
                log.warning("instance metrics: a sample was lost: %s", exc)

    def _instance_samples(self, processes: dict[int, psutil.Process]) -> list[tuple]:
        now, cpus, memory = time.time(), psutil.cpu_count() or 1, psutil.virtual_memory().total
        rows, seen = [], set()
        for (endpoint, name), runtime in list(self.runtimes.items()):
            for inst in list(runtime.instances):
                if inst.process is None or inst.process.returncode is not None:
                    continue
                cpu = rss = 0.0
                for pid in group_members(inst.process.pid):
                    seen.add(pid)
                    try:
                        proc = processes.setdefault(pid, psutil.Process(pid))
                        cpu += proc.cpu_percent(None)
                        rss += proc.memory_info().rss
                    except psutil.Error:
                        continue
                rows.append((now, endpoint, name, inst.name, cpu / cpus, 100.0 * rss / memory))
        for pid in set(processes) - seen:
            del processes[pid]
        return rows

    # ---- routing table ----------------------------------------------------------------------
    def scoring_uri(self, endpoint: str) -> str:
        return f"http://127.0.0.1:{self.gateway_port}/endpoints/{endpoint}/score"

    def refresh_route(self, endpoint: str) -> None:
        record = self.store.get_endpoint(endpoint)
        pools = {name: rt.pool for (ep, name), rt in self.runtimes.items() if ep == endpoint}
        self.gateway.set_route(EndpointRoute(
            name=endpoint, auth_mode=record["auth_mode"], keys=(record["primary_key"], record["secondary_key"]),
            traffic=dict(record["traffic"]), mirror=dict(record["mirror_traffic"]), pools=pools))

    # ---- views ------------------------------------------------------------------------------
    def endpoint_view(self, record: dict[str, Any]) -> dict[str, Any]:
        uri = self.scoring_uri(record["name"])
        return {"name": record["name"], "auth_mode": record["auth_mode"], "scoring_uri": uri,
                "openapi_uri": uri.rsplit("/", 1)[0] + "/swagger.json",
                "traffic": record["traffic"], "mirror_traffic": record["mirror_traffic"], "tags": record["tags"],
                "properties": record["properties"], "description": record["description"],
                "provisioning_state": "Succeeded", "kind": "Managed"}

    def deployment_view(self, record: dict[str, Any]) -> dict[str, Any]:
        spec = record["spec"]
        runtime = self.runtimes.get((record["endpoint"], record["name"]))
        code = None
        if spec.get("code_path"):
            code = {"code": spec["code_path"], "scoring_script": spec["scoring_script"]}
        return {"name": record["name"], "endpoint_name": record["endpoint"], "model": record["model_ref"],
                "provisioning_state": record["state"], "instance_type": spec["instance_type"],
                "instance_count": spec["instance_count"], "tags": spec["tags"], "properties": spec["properties"],
                "description": spec["description"], "environment": spec["environment"],
                "code_configuration": code, "request_settings": spec["request_settings"],
                "liveness_probe": spec["liveness_probe"], "readiness_probe": spec["readiness_probe"],
                "environment_variables": spec["environment_variables"], "reason": record["reason"],
                "instances": [i.describe() for i in runtime.instances] if runtime else []}

    # ---- models -----------------------------------------------------------------------------
    async def register_model(self, body: dict[str, Any]) -> dict[str, Any]:
        name = validate_model_name(body.get("name"))
        string_map(body.get("tags") or {}, "tags"), string_map(body.get("properties") or {}, "properties")
        staged = await asyncio.to_thread(self.store.copy_model, body.get("path") or "")  # off the event loop
        return self.store.add_model(name, staged, str(body.get("description") or ""),
                                    string_map(body.get("tags") or {}, "tags"),
                                    string_map(body.get("properties") or {}, "properties"),
                                    str(body.get("type") or "custom_model"))

    async def resolve_model(self, endpoint: str, deployment: str,
                            model: str | None) -> tuple[str | None, str | None]:
        """-> (model reference, folder to use as AZUREML_MODEL_DIR)."""
        if not model:
            return None, None
        if model.startswith("azureml:"):
            name, version = parse_model_ref(model)
            record = self.store.get_model(name, version)
        else:  # a local path: registered as an anonymous model version, as Azure does
            staged = await asyncio.to_thread(self.store.copy_model, model)
            record = self.store.add_model(f"{endpoint}-{deployment}-anonymous", staged, "", {}, {})
        return f"azureml:{record['name']}:{record['version']}", str(Path(record["path"]).parent)

    # ---- endpoints --------------------------------------------------------------------------
    def create_endpoint(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = endpoint_spec_from_dict(body)
        if any(spec.traffic.values()) or any(spec.mirror_traffic.values()):
            raise SpecError(f"endpoint {spec.name!r} has no deployments yet: create it without traffic, "
                            "then set traffic once a deployment exists")
        record = self.store.create_endpoint({"name": spec.name, "auth_mode": spec.auth_mode,
                                             "description": spec.description, "tags": spec.tags,
                                             "properties": spec.properties})
        self.refresh_route(spec.name)
        return self.endpoint_view(record)

    def update_endpoint(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        current = self.store.get_endpoint(name)
        deployments = {d["name"]: d for d in self.store.list_deployments(name)}
        traffic = current["traffic"] if body.get("traffic") is None else validate_traffic(
            body["traffic"], set(deployments))
        traffic = {k: v for k, v in traffic.items() if v > 0 or k in deployments}
        for dep, percent in traffic.items():
            state = deployments[dep]["state"]
            if percent > current["traffic"].get(dep, 0) and state != "Succeeded":
                raise Conflict(f"cannot give traffic to deployment {dep!r}: its state is {state}"
                               + (f" ({deployments[dep]['reason']})" if deployments[dep]["reason"] else ""))
        mirror_in = current["mirror_traffic"] if body.get("mirror_traffic") is None else body["mirror_traffic"]
        mirror = validate_mirror(mirror_in, traffic, set(deployments))
        for dep in mirror:
            if deployments[dep]["state"] != "Succeeded" and dep not in current["mirror_traffic"]:
                raise Conflict(f"cannot mirror to deployment {dep!r}: its state is {deployments[dep]['state']}")
        fields: dict[str, Any] = {"traffic": traffic, "mirror_traffic": mirror}
        if body.get("tags") is not None:
            fields["tags"] = string_map(body["tags"], "tags")
        if body.get("description") is not None:
            fields["description"] = str(body["description"])
        record = self.store.update_endpoint(name, **fields)
        self.refresh_route(name)
        return self.endpoint_view(record)

    async def delete_endpoint(self, name: str) -> None:
        self.store.get_endpoint(name)
        for key in [k for k in self.runtimes if k[0] == name]:
            await self.runtimes.pop(key).stop()
        self.gateway.remove_route(name)
        self.store.delete_endpoint(name)
        await asyncio.to_thread(self.store.remove_code, name)
        # its metrics go with it, as on Azure: a new endpoint of the same name starts with no history
        await asyncio.to_thread(self.request_log.delete_endpoint, name)

    def credentials(self, name: str) -> dict[str, Any]:
        record = self.store.get_endpoint(name)
        if record["auth_mode"] == "key":
            return {"auth_mode": "key", "primary_key": record["primary_key"],
                    "secondary_key": record["secondary_key"]}
        token, expiry = issue_token(self.store.signing_key(), name, token_ttl_s())
        return {"auth_mode": "aml_token", "access_token": token, "expiry_time_utc": expiry}

    def regenerate_keys(self, name: str, key_type: str) -> dict[str, Any]:
        record = self.store.get_endpoint(name)
        if record["auth_mode"] != "key":
            raise SpecError(f"endpoint {name!r} uses auth_mode {record['auth_mode']}: only key endpoints have keys")
        if key_type not in ("primary", "secondary"):
            raise SpecError(f"key type must be primary or secondary, got {key_type!r}")
        self.store.update_endpoint(name, **{f"{key_type}_key": new_key()})
        self.refresh_route(name)
        return self.credentials(name)

    # ---- deployments ------------------------------------------------------------------------
    def _validated_spec(self, body: dict[str, Any]) -> DeploymentSpec:
        # the YAML loader's own checks of request settings and probes (ranges, known keys), as a client
        # calling the control API directly gets no YAML loader in between
        _request_settings(body.get("request_settings"))
        for probe in ("liveness_probe", "readiness_probe"):
            _probe(body.get(probe), probe, ProbeSettings())
        spec = DeploymentSpec.from_dict(body)
        data = {"name": spec.name, "endpoint_name": spec.endpoint_name, "model": spec.model,
                "instance_count": spec.instance_count}
        deployment_spec_from_dict(data)  # names, model path, instance_count
        if not spec.code_path or not spec.scoring_script:
            raise SpecError(f"deployment {spec.name!r} needs code_configuration (code and scoring_script): "
                            "the local platform runs a scoring script, it does not build no-code deployments")
        code = Path(spec.code_path).resolve()
        script = (code / spec.scoring_script).resolve()
        if Path(spec.scoring_script).is_absolute() or not script.is_relative_to(code):
            # the instance runs the script from the code snapshot: one outside `code` would run live
            raise SpecError(f"scoring_script must be a path inside code ({code}), relative to it; "
                            f"got {spec.scoring_script!r}")
        if not script.is_file():
            raise SpecError(f"scoring script not found: {Path(spec.code_path) / spec.scoring_script}")
        return spec

    async def create_deployment(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = self._validated_spec(body)
        self.store.get_endpoint(spec.endpoint_name)
        key = (spec.endpoint_name, spec.name)
        exists = key in self.copying
        try:
            self.store.get_deployment(*key)
            exists = True
        except NotFound:
            pass
        if exists:
            raise Conflict(f"deployment {spec.name!r} already exists on endpoint {spec.endpoint_name!r}: "
                           "use update")
        self.copying.add(key)  # the copies below run in threads: a second create of this name must wait
        try:
            model_ref, model_dir = await self.resolve_model(spec.endpoint_name, spec.name, spec.model)
            code_dir = await asyncio.to_thread(self.store.snapshot_code, spec.endpoint_name, spec.name, 1,
                                               spec.code_path)
            self.store.get_endpoint(spec.endpoint_name)  # not deleted meanwhile
        finally:
            self.copying.discard(key)
        record = self.store.create_deployment(spec.endpoint_name, spec.name, spec.to_dict(), model_ref,
                                              model_dir, code_dir)
        runtime = DeploymentRuntime(self, record)
        self.runtimes[key] = runtime
        self.refresh_route(spec.endpoint_name)
        runtime.task = asyncio.create_task(self.provision(runtime))
        return self.deployment_view(record)

    async def provision(self, runtime: DeploymentRuntime) -> None:
        """Bring a deployment's instances up; Succeeded only when every one of them is ready."""
        async with runtime.lock:
            record = self.store.get_deployment(runtime.endpoint, runtime.name)
            spec = DeploymentSpec.from_dict(record["spec"])
            runtime.apply_settings(spec)
            runtime.pool.failed = False
            runtime.pool.starting = True
            try:
                instances, reason = await runtime.start_instances(record, spec, spec.instance_count)
            finally:
                runtime.pool.starting = False
            if (runtime.endpoint, runtime.name) not in self.runtimes:  # deleted meanwhile
                await asyncio.gather(*(i.stop(drain_s=0) for i in instances))
                return
            if instances:
                runtime.instances = instances
                runtime.pool.instances = list(instances)
                runtime.pool.notify()
                self.store.update_deployment(runtime.endpoint, runtime.name, state="Succeeded", reason="")
            else:
                runtime.pool.failed = True
                runtime.pool.notify()  # requests waiting for it fail now
                self.store.update_deployment(runtime.endpoint, runtime.name, state="Failed", reason=reason)

    async def update_deployment(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = self._validated_spec(body)
        key = (spec.endpoint_name, spec.name)
        record = self.store.get_deployment(*key)
        runtime = self.runtimes[key]
        if runtime.lock.locked() or key in self.copying:
            raise Conflict(f"deployment {spec.name!r} is being provisioned: wait for it to finish")
        old = DeploymentSpec.from_dict(record["spec"])
        model_ref, model_dir = record["model_ref"], record["model_dir"]
        if spec.model != old.model:
            self.copying.add(key)
            try:
                model_ref, model_dir = await self.resolve_model(spec.endpoint_name, spec.name, spec.model)
            finally:
                self.copying.discard(key)
            if self.runtimes.get(key) is not runtime:  # deleted while we copied
                raise NotFound(f"deployment {spec.name!r} not found on endpoint {spec.endpoint_name!r}")
        self.store.update_deployment(*key, state="Updating", reason="")
        runtime.task = asyncio.create_task(self.roll(runtime, record, old, spec, model_ref, model_dir))
        return self.deployment_view(self.store.get_deployment(*key))

    async def roll(self, runtime: DeploymentRuntime, record: dict, old: DeploymentSpec, spec: DeploymentSpec,
                   model_ref: str | None, model_dir: str | None) -> None:
        """Apply an update without dropping a request: new instances first, then drain the old ones."""
        key = (runtime.endpoint, runtime.name)
        async with runtime.lock:
            same_code = (spec.model, spec.code_path, spec.scoring_script, spec.environment_variables,
                         spec.readiness_probe, spec.liveness_probe) == (
                old.model, old.code_path, old.scoring_script, old.environment_variables,
                old.readiness_probe, old.liveness_probe) and record["state"] != "Failed"
            generation = record["generation"] + (0 if same_code else 1)
            code_dir = record["code_dir"] if same_code else await asyncio.to_thread(
                self.store.snapshot_code, *key, generation, spec.code_path)
            target = dict(record, code_dir=code_dir, model_dir=model_dir)
            if same_code and runtime.instances:
                keep = runtime.instances[:spec.instance_count]
                surplus = runtime.instances[spec.instance_count:]
                need = spec.instance_count - len(keep)
            else:
                keep, surplus, need = [], list(runtime.instances), spec.instance_count
            start_index = max((i.config.index for i in runtime.instances), default=-1) + 1
            fresh, reason = await runtime.start_instances(target, spec, need, start_index) if need else ([], "")
            if need and not fresh:
                self.store.update_deployment(*key, state="Failed",
                                             reason=f"update failed: {reason}"
                                             + ("; the previous version keeps serving" if runtime.instances else ""))
                return
            runtime.apply_settings(spec)
            runtime.instances = keep + fresh
            runtime.pool.instances = list(runtime.instances)
            runtime.pool.failed = False
            runtime.pool.notify()
            self.store.update_deployment(*key, spec=spec.to_dict(), model_ref=model_ref, model_dir=model_dir,
                                         code_dir=code_dir, generation=generation, state="Succeeded", reason="")
        # Drain the surplus outside the lock: the update is done (Succeeded), so the next one must be accepted.
        await asyncio.gather(*(inst.stop() for inst in surplus))

    async def delete_deployment(self, endpoint: str, name: str) -> None:
        record = self.store.get_endpoint(endpoint)
        self.store.get_deployment(endpoint, name)
        if record["traffic"].get(name, 0) > 0:
            raise Conflict(f"cannot delete deployment {name!r}: it has {record['traffic'][name]}% live traffic; "
                           "move its traffic to another deployment first")
        if record["mirror_traffic"].get(name, 0) > 0:
            raise Conflict(f"cannot delete deployment {name!r}: it receives mirror traffic; turn the mirror off first")
        runtime = self.runtimes.pop((endpoint, name), None)
        traffic = {k: v for k, v in record["traffic"].items() if k != name}
        self.store.update_endpoint(endpoint, traffic=traffic)
        self.store.delete_deployment(endpoint, name)
        self.refresh_route(endpoint)
        await asyncio.to_thread(self.store.remove_code, endpoint, name)
        if runtime is not None:
            if runtime.task is not None and not runtime.task.done():
                runtime.task.cancel()
            await runtime.stop()

    async def deployment_logs(self, endpoint: str, name: str, lines: int | None) -> str:
        self.store.get_deployment(endpoint, name)
        return await asyncio.to_thread(_instance_logs, self.home / "logs" / endpoint / name, lines)

    # ---- lifecycle --------------------------------------------------------------------------
    def restore(self) -> None:
        """Routes and deployments as the store keeps them, before the gateway opens: a request that
        arrives while instances come back waits for them (within request_timeout_ms) instead of failing."""
        for endpoint in self.store.list_endpoints():
            self.refresh_route(endpoint["name"])
        for record in self.store.list_deployments():
            runtime = DeploymentRuntime(self, record)
            self.runtimes[(record["endpoint"], record["name"])] = runtime
            if self._serving(record):
                runtime.pool.starting = True
            else:
                runtime.pool.failed = True
            self.refresh_route(record["endpoint"])

    @staticmethod
    def _serving(record: dict[str, Any]) -> bool:
        return record["state"] != "Failed" or record["reason"].startswith("update failed")

    async def reconcile(self) -> None:
        """Bring back what the store says should run (after a stop, a crash or a SIGKILL)."""
        if not self.runtimes:
            self.restore()
        tasks = []
        for (endpoint, name), runtime in list(self.runtimes.items()):
            record = self.store.get_deployment(endpoint, name)
            if self._serving(record):
                if record["state"] in ("Creating", "Updating"):
                    self.store.update_deployment(endpoint, name, state="Creating")
                runtime.task = asyncio.create_task(self.provision_kept_state(runtime, record))
                tasks.append(runtime.task)
        await asyncio.gather(*tasks, return_exceptions=True)
        self.reconciled = True

    async def provision_kept_state(self, runtime: DeploymentRuntime, record: dict[str, Any]) -> None:
        failed_update = record["state"] == "Failed"
        await self.provision(runtime)
        if failed_update:  # keep telling the user that the last update failed
            self.store.update_deployment(runtime.endpoint, runtime.name, state="Failed", reason=record["reason"])

    async def shutdown(self) -> None:
        await asyncio.gather(*(rt.stop() for rt in self.runtimes.values()), return_exceptions=True)
        self.request_log.close()

    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "home": str(self.home), "gateway_port": self.gateway_port,
                "control_port": self.control_port, "reconciled": self.reconciled,
                "uptime_s": round(time.time() - self.started_at, 1),
                "endpoints": len(self.store.list_endpoints()), "metrics_log": self.request_log.health(),
                "deployments": {f"{ep}/{name}": self.store.get_deployment(ep, name)["state"]
                                for (ep, name) in self.runtimes}}


# ---- control API ----------------------------------------------------------------------------

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
                 "pinned": bool(row[8])}
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


def _instance_logs(folder: Path, lines: int | None) -> str:
    return "\n".join(f"---- {path.stem}\n{tail(path, lines)}" for path in sorted(folder.glob("instance-*.log")))


def string_map(value: Any, field: str) -> dict[str, str]:
    """A mapping of names to text values, as tags and properties are; SpecError naming `field` if not."""
    if not isinstance(value, dict) or not all(isinstance(v, (str, int, float, bool)) for v in value.values()):
        raise SpecError(f"invalid {field}: expected a mapping of names to text values, got {json.dumps(value)[:80]}")
    return {str(k): str(v) for k, v in value.items()}


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


# ---- process entry point --------------------------------------------------------------------

async def serve(home: Path, user_umask: int | None = None) -> int:
    platform = Platform(home, user_umask=user_umask)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, platform.stopping.set)
    gateway_runner = web.AppRunner(platform.gateway.app(), access_log=None)
    control_runner = web.AppRunner(control_app(platform), access_log=None)
    await gateway_runner.setup()
    await control_runner.setup()
    platform.restore()
    try:
        await web.TCPSite(gateway_runner, "127.0.0.1", platform.gateway_port, backlog=1024).start()
    except OSError as exc:
        print(f"error: gateway port {platform.gateway_port} is in use ({exc}); scoring URIs are stable, so free "
              "it or remove the workspace", file=sys.stderr)
        return 3
    platform.control_port = free_port()
    await web.TCPSite(control_runner, "127.0.0.1", platform.control_port).start()
    info = {"pid": os.getpid(), "control_port": platform.control_port, "gateway_port": platform.gateway_port,
            "started_at": platform.started_at}
    tmp = home / "platform.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.replace(home / "platform.json")
    reconcile = asyncio.create_task(platform.reconcile())
    sampler = asyncio.create_task(platform.sample_instances())
    await platform.stopping.wait()
    reconcile.cancel()
    sampler.cancel()
    await platform.shutdown()
    await gateway_runner.cleanup()
    await control_runner.cleanup()
    info_path = home / "platform.json"
    if info_path.exists() and json.loads(info_path.read_text()).get("pid") == os.getpid():
        info_path.unlink()
    return 0


def setup_logging(home: Path) -> None:
    """platform.log, rotated (SAFEROLLOUT_LOG_MAX_BYTES, default 10 MB, three old files kept)."""
    handler = logging.handlers.RotatingFileHandler(home / LOG_NAME, maxBytes=_log_max_bytes(), backupCount=3)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)


def _log_max_bytes() -> int:
    text = os.environ.get(LOG_MAX_BYTES_ENV, str(10 * 1024 * 1024))
    if not text.isdigit() or int(text) < 1024:
        raise SpecError(f"{LOG_MAX_BYTES_ENV} must be a whole number of bytes, at least 1024; got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saferollout-platform")
    parser.add_argument("--home", default=None)
    args = parser.parse_args(argv)
    home = resolve_home(args.home)
    user_umask = os.umask(PRIVATE_UMASK)  # every file the platform writes is private from its first byte
    try:
        private_home(home)
        setup_logging(home)
    except SafeRolloutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    lock = open(home / "platform.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"error: a platform is already running for {home}", file=sys.stderr)
        return 3
    try:
        return asyncio.run(serve(home, user_umask))
    except Exception as exc:  # the reason goes to the log, and (one line) to the client waiting for us
        log.exception("the platform stopped: %s", exc)
        print(f"error: the platform stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


# ---- client side: start, stop, status -------------------------------------------------------

def _read_info(home: Path) -> dict[str, Any] | None:
    try:
        return json.loads((home / "platform.json").read_text())
    except (OSError, ValueError):
        return None


def _status(home: Path, info: dict[str, Any], timeout: float = 2.0) -> dict[str, Any] | None:
    try:
        resp = requests.get(f"http://127.0.0.1:{info['control_port']}/api/status",
                            headers={"Authorization": f"Bearer {admin_token(home)}"}, timeout=timeout)
        return resp.json() if resp.status_code == 200 else None
    except requests.RequestException:
        return None


def platform_status(home: str | os.PathLike | None = None) -> dict[str, Any]:
    """{'running': bool, ...status fields} for the workspace at `home`."""
    home = resolve_home(home)
    info = _read_info(home)
    if info and pid_alive(info["pid"]):
        status = _status(home, info)
        if status:
            return {"running": True, **status}
    return {"running": False, "home": str(home)}


def start_platform(home: str | os.PathLike | None = None, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
    """Start the platform for `home` unless it runs; return once every kept deployment is back.

    If the platform process exits while we wait, fail at once with the reason it gave.
    """
    home = resolve_home(home)
    admin_token(home)  # the workspace made (or checked) private, and its token, before any platform
    with open(home / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two clients starting at once start one platform
        status = platform_status(home)
        process = None if status["running"] else _spawn(home)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = platform_status(home)
            if status["running"] and status.get("reconciled"):
                return status
            if process is not None and process.poll() is not None:
                raise BackendError(f"the local platform for {home} did not start: {_exit_reason(home, process)}")
            time.sleep(0.1)
    raise BackendError(f"the local platform did not start within {timeout:.0f} s; see {home / LOG_NAME}")


def _exit_reason(home: Path, process: subprocess.Popen) -> str:
    """The last `error:` line the platform printed, else its last line, else its exit code."""
    try:
        lines = [line.strip() for line in (home / OUTPUT_NAME).read_text(errors="replace").splitlines()]
    except OSError:
        lines = []
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("error:")]
    reason = (errors or lines or [f"it exited with code {process.returncode}"])[-1]
    return reason.removeprefix("error: ") + f" (see {home / LOG_NAME})"


def _spawn(home: Path) -> subprocess.Popen:
    stale = home / "platform.json"
    if stale.exists():
        stale.unlink()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[3]),
                                                      env.get("PYTHONPATH")]))
    fd = os.open(home / OUTPUT_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "saferollout.backends.local.daemon", "--home", str(home)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                env=env, cwd=str(home))


def stop_platform(home: str | os.PathLike | None = None, timeout: float = 30.0) -> bool:
    """Stop the platform gracefully (instances drained and stopped); False if none was running."""
    home = resolve_home(home)
    info = _read_info(home)
    if not info or not pid_alive(info["pid"]):
        return False
    try:
        requests.post(f"http://127.0.0.1:{info['control_port']}/api/shutdown",
                      headers={"Authorization": f"Bearer {admin_token(home)}"}, timeout=5)
    except requests.RequestException:
        os.kill(info["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(info["pid"]):
        time.sleep(0.05)
    if pid_alive(info["pid"]):
        os.kill(info["pid"], signal.SIGKILL)
    return True


if __name__ == "__main__":
    sys.exit(main())
