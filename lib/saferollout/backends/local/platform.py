"""The platform: desired state from the store, reconciled with running instances, served through the gateway.

`Platform` holds the store, the request log and the gateway's routes; it creates, updates and deletes
endpoints and deployments (rolling updates, instances started niced until ready), brings every kept
deployment back on start (`restore`, `reconcile`), and samples each instance's CPU and memory.
"""

import asyncio
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import psutil

from saferollout.backends.local.gateway import DEFAULT_MAX_BODY_BYTES, DeploymentPool, EndpointRoute, Gateway, \
    issue_token
from saferollout.backends.local.instances import Instance, InstanceConfig, free_port, group_members, tail
from saferollout.backends.local.metrics import RequestLog
from saferollout.backends.local.store import Store, new_key
from saferollout.backends.local.workspace import admin_token, log_max_bytes
from saferollout.errors import Conflict, NotFound, SpecError
from saferollout.specs import (DeploymentSpec, ProbeSettings, _probe, _request_settings, check_model_type,
                               check_no_code_model, deployment_spec_from_dict, endpoint_spec_from_dict, model_type_of,
                               parse_model_ref, validate_mirror, validate_model_name, validate_traffic)

log = logging.getLogger("saferollout.platform")
TOKEN_TTL_ENV = "SAFEROLLOUT_TOKEN_TTL_S"
ROUTING_SEED_ENV = "SAFEROLLOUT_ROUTING_SEED"
INSTANCE_SAMPLE_S = float(os.environ.get("SAFEROLLOUT_INSTANCE_SAMPLE_S", "5"))  # instance CPU and memory
RESTORE_ATTEMPTS = 3  # starts of a deployment that was Succeeded before the platform restarted
RESTORE_RETRY_PAUSE_S = 2.0


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


def code_configuration(spec: DeploymentSpec) -> tuple[str, str] | None:
    """(code folder, scoring script) of a deployment the platform accepted, or None for a no-code MLflow
    deployment (`_validated_spec` accepts one without code only for an MLflow model)."""
    if not spec.code_path and not spec.scoring_script:
        return None
    if not spec.code_path or not spec.scoring_script:
        raise SpecError(f"deployment {spec.name!r} needs code_configuration (code and scoring_script)")
    return spec.code_path, spec.scoring_script


def _snapshot_source(spec: DeploymentSpec) -> str | None:
    code = code_configuration(spec)
    return code[0] if code else None


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
            umask=self.platform.user_umask, log_max_bytes=log_max_bytes())  # rotates as platform.log
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
        """Checked here whoever calls (the CLI and LocalBackend check first too), before anything is copied."""
        name = validate_model_name(body.get("name"))
        tags = string_map(body.get("tags") or {}, "tags")
        properties = string_map(body.get("properties") or {}, "properties")
        path = body.get("path") or ""
        model_type = check_model_type(path, str(body.get("type") or "custom_model"))
        staged = await asyncio.to_thread(self.store.copy_model, path)  # off the event loop
        return self.store.add_model(name, staged, str(body.get("description") or ""), tags, properties, model_type)

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
            record = self.store.add_model(f"{endpoint}-{deployment}-anonymous", staged, "", {}, {},
                                          model_type_of(staged))
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
        tags = merged_tags(current["tags"], body)
        if tags is not None:
            fields["tags"] = tags
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
        data: dict[str, Any] = {"name": spec.name, "endpoint_name": spec.endpoint_name, "model": spec.model,
                "instance_count": spec.instance_count}
        if spec.code_path or spec.scoring_script:
            data["code_configuration"] = {"code": spec.code_path, "scoring_script": spec.scoring_script}
        what = f"deployment {spec.name!r}"
        deployment_spec_from_dict(data, what=what)  # names, model path, instance_count, a script or MLflow
        if not spec.code_path or not spec.scoring_script:  # no-code: an MLflow model, served by mlflow_scoring
            if spec.model and spec.model.startswith("azureml:"):
                name, version = parse_model_ref(spec.model)
                check_no_code_model(spec, spec.model, self.store.get_model(name, version)["type"], what)
            return spec
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
            source = _snapshot_source(spec)
            code_dir = await asyncio.to_thread(self.store.snapshot_code, spec.endpoint_name, spec.name, 1,
                                               source) if source else None
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

    async def provision(self, runtime: DeploymentRuntime, attempts: int = 1) -> None:
        """Bring a deployment's instances up; Succeeded only when every one of them is ready.

        `attempts` > 1 (a deployment that was serving before the platform restarted): an attempt whose
        instances do not get ready (a machine too busy for the readiness budget) is retried, the stored state
        left as it was and the gateway holding requests meanwhile; Failed only when every attempt failed."""
        async with runtime.lock:
            record = self.store.get_deployment(runtime.endpoint, runtime.name)
            spec = DeploymentSpec.from_dict(record["spec"])
            runtime.apply_settings(spec)
            runtime.pool.failed = False
            runtime.pool.starting = True
            try:
                for attempt in range(1, attempts + 1):
                    instances, reason = await runtime.start_instances(record, spec, spec.instance_count)
                    if instances or attempt == attempts or (runtime.endpoint, runtime.name) not in self.runtimes:
                        break
                    log.warning("%s/%s: restoring after a restart, attempt %d of %d failed (%s); trying again",
                                runtime.endpoint, runtime.name, attempt, attempts, reason)
                    await asyncio.sleep(RESTORE_RETRY_PAUSE_S)
                if not instances and attempts > 1:
                    reason = f"{reason} ({attempts} attempts to restore it after the platform restarted)"
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
            source = _snapshot_source(spec)
            code_dir = None if source is None else record["code_dir"] if same_code else await asyncio.to_thread(
                self.store.snapshot_code, *key, generation, source)
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
        # what served before the restart is brought back with retries: a slow start must not turn PROD Failed
        await self.provision(runtime, attempts=RESTORE_ATTEMPTS if record["state"] == "Succeeded" else 1)
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


def _instance_logs(folder: Path, lines: int | None) -> str:
    return "\n".join(f"---- {path.stem}\n{tail(path, lines)}" for path in sorted(folder.glob("instance-*.log")))


def merged_tags(current: dict[str, str], body: dict[str, Any]) -> dict[str, str] | None:
    """The endpoint's tags after an update: `tags` replaces them all; `set_tags` / `remove_tags` change those
    keys of the tags it has now (one step: a concurrent update of other keys is kept). None: unchanged."""
    whole, set_tags, remove_tags = body.get("tags"), body.get("set_tags"), body.get("remove_tags")
    if whole is not None and (set_tags is not None or remove_tags is not None):
        raise SpecError("give tags (the whole map) or set_tags / remove_tags (changes), not both")
    if whole is not None:
        return string_map(whole, "tags")
    if set_tags is None and remove_tags is None:
        return None
    if remove_tags is not None and (not isinstance(remove_tags, list)
                                    or not all(isinstance(k, str) for k in remove_tags)):
        raise SpecError(f"remove_tags must be a list of tag names, not {remove_tags!r}")
    merged = dict(current)
    for key in remove_tags or []:
        merged.pop(key, None)
    merged.update(string_map(set_tags or {}, "set_tags"))
    return merged


def string_map(value: Any, field: str) -> dict[str, str]:
    """A mapping of names to text values, as tags and properties are; SpecError naming `field` if not."""
    if not isinstance(value, dict) or not all(isinstance(v, (str, int, float, bool)) for v in value.values()):
        raise SpecError(f"invalid {field}: expected a mapping of names to text values, got {json.dumps(value)[:80]}")
    return {str(k): str(v) for k, v in value.items()}
