"""`saferollout online-deployment create|show|list|update|delete|get-logs`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from saferollout.errors import (DeploymentFailed, SpecError, UsageError)
from saferollout.specs import (deployment_spec_from_dict, read_yaml)
from saferollout.cli.options import (ProgressLine, add_endpoint_name, add_group, add_name, add_set_remove, add_verb,
                                     add_wait_flags, add_yes, common_options, confirm, note, print_result)
from saferollout.cli.editor import apply_remove, apply_set


def register(commands: Any) -> None:
    common = common_options()
    verbs = add_group(commands, "online-deployment", "Manage deployments of an online endpoint.")
    leaf = add_verb(verbs, "create", "Create a deployment from a deployment.yml.", common, deployment_create)
    add_name(leaf, "deployment", required=False)
    add_endpoint_name(leaf, required=False)
    leaf.add_argument("-f", "--file", required=True, help="deployment YAML (Azure ML CLI v2 schema)")
    leaf.add_argument("--all-traffic", action="store_true", help="give this deployment 100%% of the traffic")
    leaf.add_argument("--skip-script-validation", action="store_true", help=argparse.SUPPRESS)
    add_set_remove(leaf, remove=False)
    add_wait_flags(leaf)
    leaf = add_verb(verbs, "show", "Show a deployment.", common, deployment_show)
    add_name(leaf, "deployment")
    add_endpoint_name(leaf)
    leaf = add_verb(verbs, "list", "List the deployments of an endpoint.", common, deployment_list)
    add_endpoint_name(leaf)
    leaf = add_verb(verbs, "update", "Update a deployment (e.g. --set instance_count=2).", common, deployment_update)
    add_name(leaf, "deployment", required=False)
    add_endpoint_name(leaf, required=False)
    leaf.add_argument("-f", "--file", help="deployment YAML to apply")
    add_set_remove(leaf)
    add_wait_flags(leaf)
    leaf = add_verb(verbs, "delete", "Delete a deployment (it must have no live traffic).", common, deployment_delete)
    add_name(leaf, "deployment")
    add_endpoint_name(leaf)
    add_yes(leaf)
    add_wait_flags(leaf)
    leaf = add_verb(verbs, "get-logs", "Print a deployment's instance logs.", common, deployment_logs)
    add_name(leaf, "deployment")
    add_endpoint_name(leaf)
    leaf.add_argument("-l", "--lines", type=int, help="the last N lines of each instance log")
    leaf.add_argument("-c", "--container", choices=("inference-server", "storage-initializer"),
                      help=argparse.SUPPRESS)



# ---- online-deployment ----------------------------------------------------------------------

def _deployment_data_from_file(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    path = Path(args.file)
    data = read_yaml(args.file)
    if args.name:
        data["name"] = args.name
    if args.endpoint_name:
        data["endpoint_name"] = args.endpoint_name
    return data, path.parent


def deployment_create(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    if args.all_traffic and args.no_wait:
        raise UsageError("--all-traffic needs the deployment ready before traffic moves: drop --no-wait")
    data, base_dir = _deployment_data_from_file(args)
    apply_set(data, args.set)
    spec = deployment_spec_from_dict(data, base_dir, f"deployment file {args.file}")
    platform = backend()
    platform.get_endpoint(spec.endpoint_name)  # a missing endpoint fails before anything is created
    if args.no_wait:
        dep = platform.create_deployment(spec, wait=False)
        note(f"deployment {spec.name!r} on {spec.endpoint_name!r} is {dep.provisioning_state}; follow it with "
              f"`saferollout online-deployment show -e {spec.endpoint_name} -n {spec.name}`")
        return 0
    with ProgressLine(f"creating deployment {spec.name!r} on endpoint {spec.endpoint_name!r}") as progress, \
            _logs_hint(spec.endpoint_name, spec.name):
        dep = platform.create_deployment(spec, wait=True, progress=progress)
    if args.all_traffic:
        platform.update_endpoint(spec.endpoint_name, traffic={spec.name: 100})
        note(f"endpoint {spec.endpoint_name!r}: {spec.name}=100")
    return print_result(args, dep)


@contextlib.contextmanager
def _logs_hint(endpoint: str, name: str) -> Iterator[None]:
    """A deployment that failed to start says where its logs are, still in one line."""
    try:
        yield
    except DeploymentFailed as exc:
        exc.args = (f"{exc}; see `saferollout online-deployment get-logs -e {endpoint} -n {name}`",)
        raise


def _deployment_as_yaml(dep: Any) -> dict[str, Any]:
    """A deployment as its YAML would describe it, so --set/--remove edit what the user wrote."""
    data: dict[str, Any] = {
        "name": dep.name, "endpoint_name": dep.endpoint_name, "model": dep.model,
        "code_configuration": dep.code_configuration, "environment": dep.environment,
        "instance_type": dep.instance_type, "instance_count": dep.instance_count,
        "request_settings": dep.request_settings, "liveness_probe": dep.liveness_probe,
        "readiness_probe": dep.readiness_probe, "environment_variables": dep.environment_variables,
        "tags": dep.tags, "properties": dep.properties, "description": dep.description,
    }
    return json.loads(json.dumps({k: v for k, v in data.items() if v not in (None, {}, "")}, default=str))


def deployment_update(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    if args.file:
        data, base_dir = _deployment_data_from_file(args)
    else:
        if not args.name or not args.endpoint_name:
            raise UsageError("online-deployment update needs --name and --endpoint-name, or a --file")
        data = _deployment_as_yaml(backend().get_deployment(args.endpoint_name, args.name))
        base_dir = Path(".")
    apply_set(data, args.set)
    apply_remove(data, args.remove)
    for key in ("name", "endpoint_name"):
        if args.file is None and data.get(key) != getattr(args, key):
            raise SpecError(f"cannot change a deployment's {key} with --set or --remove")
    spec = deployment_spec_from_dict(data, base_dir, f"deployment file {args.file}" if args.file else
                                     f"deployment {args.name!r}")
    platform = backend()
    if args.no_wait:
        dep = platform.update_deployment(spec, wait=False)
        note(f"deployment {spec.name!r} on {spec.endpoint_name!r} is {dep.provisioning_state}")
        return 0
    with ProgressLine(f"updating deployment {spec.name!r} on endpoint {spec.endpoint_name!r}") as progress, \
            _logs_hint(spec.endpoint_name, spec.name):
        dep = platform.update_deployment(spec, wait=True, progress=progress)
    return print_result(args, dep)


def deployment_show(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    return print_result(args, backend().get_deployment(args.endpoint_name, args.name))


def deployment_list(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    return print_result(args, backend().list_deployments(args.endpoint_name))


def deployment_delete(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    confirm(args, f"deployment {args.name!r} of endpoint {args.endpoint_name!r}")
    backend().delete_deployment(args.endpoint_name, args.name)
    return 0


def deployment_logs(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    if args.lines is not None and args.lines < 1:
        raise UsageError(f"--lines must be at least 1, got {args.lines}")
    logs = backend().get_deployment_logs(args.endpoint_name, args.name, lines=args.lines)
    sys.stdout.write(logs if logs.endswith("\n") or not logs else logs + "\n")
    return 0

