"""The `saferollout` command: the `az ml` verbs, so scripts written for `az ml` run on any backend.

Replace `az ml` by `saferollout` in a script and it runs against the local platform (or, with
`--backend azure`, against Azure ML):

    saferollout online-endpoint create|show|list|update|delete|invoke|get-credentials|regenerate-keys
    saferollout online-deployment create|show|list|update|delete|get-logs
    saferollout model create|show|list
    saferollout local start|stop|status
    saferollout metrics -e ENDPOINT --metric RequestsPerMinute ... | --samples

Flags follow `az ml` (`-n`, `-e`, `-f`, `--set`, `--remove`, `--traffic`, `--query`, `-o`...), and
argparse's prefix matching gives az's abbreviations (`--endpoint` for `--endpoint-name`). az's
workspace flags (`-g`, `-w`, `--subscription`) are accepted so scripts run unchanged: the Azure backend
takes them as its settings (else its environment variables), the local backend ignores them (its one
workspace is `SAFEROLLOUT_HOME`, default `./.saferollout`).

Exit codes: 0 success, 2 usage or spec errors (`UsageError`, `SpecError`), 1 every other failure
(including an unreachable platform), 130 when interrupted. Failures print exactly one line,
`error: <message>`, on stderr; `--debug` adds the traceback. Progress of long operations goes to
stderr too, so stdout stays parseable.

Extending the command (the contract for `saferollout traffic`, `saferollout run` and later ones)
-----------------------------------------------------------------------------------------------
`EXTRA_COMMAND_MODULES` lists modules that add a subcommand. Each exposes

    def register(subparsers) -> None

which calls `subparsers.add_parser(...)` (pass `parents=[saferollout.cli.common_options()]` to get the
leaf flags `-o`, `--query`, `--backend`, `--debug`) and `set_defaults(handler=handler)`, where

    def handler(args: argparse.Namespace, backend_factory: Callable[[], Backend]) -> int

returns the exit code. `backend_factory()` returns the backend chosen by `--backend` (made on the first
call and reused), so a command that never needs one never starts a platform. A handler reports failures
by raising `SafeRolloutError` (or a subclass); `main` alone turns it into the one-line error and the exit
code, for every command. Results are printed with `saferollout.output.emit(result, args.output,
args.query)`. Keep heavy imports inside the handler: every `saferollout` invocation imports the
registered modules.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
import os
import sys
import traceback
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from saferollout.backends.base import AGGREGATIONS, DEPLOYMENT_METRIC_DIMENSIONS, METRIC_NAMES
from saferollout.errors import (BackendError, Conflict, DeploymentFailed, SafeRolloutError, SpecError,
                                UsageError)
from saferollout.output import OUTPUT_FORMATS, compile_query, emit
from saferollout.specs import (deployment_spec_from_dict, endpoint_spec_from_dict, load_model_spec, parse_traffic,
                               read_yaml, validate_model_name, validate_name)

EXTRA_COMMAND_MODULES: list[str] = ["saferollout.traffic", "saferollout.runbook", "saferollout.rollout"]
BACKEND_ENV = "SAFEROLLOUT_BACKEND"
MODEL_TYPES = ("custom_model", "mlflow_model", "triton_model")
DEFAULT_METRICS_WINDOW = timedelta(hours=1)
# `--set` values under these keys stay strings (a tag "007" must not become the number 7).
STRING_MAPS = ("tags", "properties", "environment_variables")
ENDPOINT_UPDATABLE = ("traffic", "mirror_traffic", "tags", "description")

Handler = Callable[[argparse.Namespace, Callable[[], Any]], int]


# ---- parser ---------------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def common_options() -> ArgumentParser:
    """Leaf-level options every subcommand accepts, as `az` accepts them after the verb."""
    parent = ArgumentParser(add_help=False)
    parent.add_argument("-o", "--output", choices=OUTPUT_FORMATS, type=str.lower,
                        default=argparse.SUPPRESS, help="output format (default json)")
    parent.add_argument("--query", default=argparse.SUPPRESS, help="JMESPath query applied to the result")
    parent.add_argument("--backend", choices=("local", "azure"), default=argparse.SUPPRESS,
                        help=f"backend (default ${BACKEND_ENV}, else local)")
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of a failure")
    # az's workspace flags: accepted so az scripts run unchanged; the backend reads its environment
    parent.add_argument("-g", "--resource-group", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parent.add_argument("-w", "--workspace-name", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parent.add_argument("--subscription", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parent


def build_parser(extra_modules: Sequence[str] | None = None) -> ArgumentParser:
    """The whole command tree: the az ml verbs, local, metrics, and the registered extra commands."""
    parser = ArgumentParser(prog="saferollout", description="Safe rollouts of ML models: the az ml verbs "
                            "on the local platform or Azure ML.")
    parser.add_argument("--version", action="version", version=f"saferollout {_version()}")
    parser.add_argument("--backend", choices=("local", "azure"),
                        default=os.environ.get(BACKEND_ENV) or "local",
                        help=f"backend (default ${BACKEND_ENV}, else local)")
    parser.add_argument("-o", "--output", choices=OUTPUT_FORMATS, type=str.lower, default="json")
    parser.add_argument("--query", default=None, help="JMESPath query applied to the result")
    parser.add_argument("--debug", action="store_true", help="print the traceback of a failure")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_options()
    _endpoint_commands(commands, common)
    _deployment_commands(commands, common)
    _model_commands(commands, common)
    _local_commands(commands, common)
    _metrics_command(commands, common)
    for module_name in EXTRA_COMMAND_MODULES if extra_modules is None else extra_modules:
        importlib.import_module(module_name).register(commands)
    return parser


def _group(commands: Any, name: str, help_text: str) -> Any:
    group = commands.add_parser(name, help=help_text, description=help_text)
    return group.add_subparsers(dest="verb", metavar="VERB", required=True)


def _verb(verbs: Any, name: str, help_text: str, common: ArgumentParser, handler: Handler) -> ArgumentParser:
    leaf = verbs.add_parser(name, help=help_text, description=help_text, parents=[common])
    leaf.set_defaults(handler=handler)
    return leaf


def name_type(what: str) -> Callable[[str], str]:
    """An argparse `type` that checks a name by Azure's rules, so `-n a/b` is a usage error naming the flag."""
    def check(value: str) -> str:
        try:
            return validate_model_name(value) if what == "model" else validate_name(value, what)
        except SpecError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    check.__name__ = f"{what} name"
    return check


def _name(leaf: ArgumentParser, what: str, required: bool = True) -> None:
    leaf.add_argument("-n", "--name", required=required, type=name_type(what), help=f"{what} name")


def _endpoint_name(leaf: ArgumentParser, required: bool = True) -> None:
    leaf.add_argument("-e", "--endpoint-name", required=required, type=name_type("endpoint"), help="endpoint name")


def _set_remove(leaf: ArgumentParser, remove: bool = True) -> None:
    leaf.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                      help="set properties, e.g. tags.owner=me traffic.blue=100 instance_count=2")
    if remove:
        leaf.add_argument("--remove", action="append", default=[], metavar="KEY",
                          help="remove a property, e.g. tags.owner")


def _wait_flags(leaf: ArgumentParser) -> None:
    leaf.add_argument("--no-wait", action="store_true", help="return at once, without waiting")


def _yes(leaf: ArgumentParser) -> None:
    leaf.add_argument("-y", "--yes", action="store_true", help="do not prompt for confirmation")


def _endpoint_commands(commands: Any, common: ArgumentParser) -> None:
    verbs = _group(commands, "online-endpoint", "Manage online endpoints.")
    leaf = _verb(verbs, "create", "Create an endpoint from an endpoint.yml and/or flags.", common, endpoint_create)
    _name(leaf, "endpoint", required=False)
    leaf.add_argument("-f", "--file", help="endpoint YAML (Azure ML CLI v2 schema)")
    leaf.add_argument("--auth-mode", choices=("key", "aml_token"), help="authentication mode")
    _set_remove(leaf, remove=False)
    _wait_flags(leaf)
    leaf = _verb(verbs, "show", "Show an endpoint.", common, endpoint_show)
    _name(leaf, "endpoint")
    _verb(verbs, "list", "List endpoints.", common, endpoint_list)
    leaf = _verb(verbs, "update", "Update traffic, mirror traffic, tags or description.", common, endpoint_update)
    _name(leaf, "endpoint", required=False)
    leaf.add_argument("-f", "--file", help="endpoint YAML whose traffic, tags and description to apply")
    leaf.add_argument("--traffic", help='traffic split, e.g. "blue=90 green=10"')
    leaf.add_argument("--mirror-traffic", help='mirrored traffic, e.g. "green=10" ("green=0" turns it off)')
    _set_remove(leaf)
    _wait_flags(leaf)
    leaf = _verb(verbs, "delete", "Delete an endpoint and all its deployments.", common, endpoint_delete)
    _name(leaf, "endpoint")
    _yes(leaf)
    _wait_flags(leaf)
    leaf = _verb(verbs, "invoke", "Send a request to the endpoint and print the answer body.", common,
                 endpoint_invoke)
    _name(leaf, "endpoint")
    leaf.add_argument("-r", "--request-file", required=True, help="file holding the request body")
    leaf.add_argument("-d", "--deployment-name", type=name_type("deployment"),
                      help="send to this deployment, bypassing the traffic split")
    leaf = _verb(verbs, "get-credentials", "Show the endpoint's keys or token.", common, endpoint_credentials)
    _name(leaf, "endpoint")
    leaf = _verb(verbs, "regenerate-keys", "Regenerate the primary or secondary key.", common,
                 endpoint_regenerate_keys)
    _name(leaf, "endpoint")
    leaf.add_argument("--key-type", choices=("primary", "secondary"), default="primary",
                      help="which key to regenerate (default primary)")
    _wait_flags(leaf)


def _deployment_commands(commands: Any, common: ArgumentParser) -> None:
    verbs = _group(commands, "online-deployment", "Manage deployments of an online endpoint.")
    leaf = _verb(verbs, "create", "Create a deployment from a deployment.yml.", common, deployment_create)
    _name(leaf, "deployment", required=False)
    _endpoint_name(leaf, required=False)
    leaf.add_argument("-f", "--file", required=True, help="deployment YAML (Azure ML CLI v2 schema)")
    leaf.add_argument("--all-traffic", action="store_true", help="give this deployment 100%% of the traffic")
    leaf.add_argument("--skip-script-validation", action="store_true", help=argparse.SUPPRESS)
    _set_remove(leaf, remove=False)
    _wait_flags(leaf)
    leaf = _verb(verbs, "show", "Show a deployment.", common, deployment_show)
    _name(leaf, "deployment")
    _endpoint_name(leaf)
    leaf = _verb(verbs, "list", "List the deployments of an endpoint.", common, deployment_list)
    _endpoint_name(leaf)
    leaf = _verb(verbs, "update", "Update a deployment (e.g. --set instance_count=2).", common, deployment_update)
    _name(leaf, "deployment", required=False)
    _endpoint_name(leaf, required=False)
    leaf.add_argument("-f", "--file", help="deployment YAML to apply")
    _set_remove(leaf)
    _wait_flags(leaf)
    leaf = _verb(verbs, "delete", "Delete a deployment (it must have no live traffic).", common, deployment_delete)
    _name(leaf, "deployment")
    _endpoint_name(leaf)
    _yes(leaf)
    _wait_flags(leaf)
    leaf = _verb(verbs, "get-logs", "Print a deployment's instance logs.", common, deployment_logs)
    _name(leaf, "deployment")
    _endpoint_name(leaf)
    leaf.add_argument("-l", "--lines", type=int, help="the last N lines of each instance log")
    leaf.add_argument("-c", "--container", choices=("inference-server", "storage-initializer"),
                      help=argparse.SUPPRESS)


def _model_commands(commands: Any, common: ArgumentParser) -> None:
    verbs = _group(commands, "model", "Register and look up model versions.")
    leaf = _verb(verbs, "create", "Register a model file or folder as a new version.", common, model_create)
    _name(leaf, "model", required=False)
    leaf.add_argument("-v", "--version", help="version to create (versions auto-increment without it)")
    leaf.add_argument("-p", "--path", help="model file or folder")
    leaf.add_argument("-t", "--type", choices=MODEL_TYPES, help="model type (default custom_model)")
    leaf.add_argument("-f", "--file", help="model YAML (Azure ML CLI v2 schema)")
    leaf.add_argument("-d", "--description", help="description")
    leaf.add_argument("--tags", nargs="+", default=[], metavar="KEY=VALUE", help="tags, space-separated")
    _set_remove(leaf, remove=False)
    leaf = _verb(verbs, "show", "Show a model version (the latest without --version).", common, model_show)
    _name(leaf, "model")
    which = leaf.add_mutually_exclusive_group()
    which.add_argument("-v", "--version", help="model version")
    which.add_argument("-l", "--label", choices=("latest",), help="model label")
    leaf = _verb(verbs, "list", "List model versions.", common, model_list)
    _name(leaf, "model", required=False)


def _local_commands(commands: Any, common: ArgumentParser) -> None:
    verbs = _group(commands, "local", "Start, stop or inspect the local platform of this workspace.")
    _verb(verbs, "start", "Start the local platform (and everything it keeps) unless it runs.", common, local_start)
    _verb(verbs, "stop", "Stop the local platform and its instances.", common, local_stop)
    _verb(verbs, "status", "Show whether the local platform runs, its ports and deployments.", common,
          local_status)


def _metrics_command(commands: Any, common: ArgumentParser) -> None:
    help_text = ("Query an endpoint's metrics by Azure Monitor name, or its raw request samples "
                 "(--samples).")
    leaf = commands.add_parser("metrics", help=help_text, description=help_text, parents=[common])
    leaf.set_defaults(handler=metrics_query)
    _endpoint_name(leaf)
    leaf.add_argument("--metrics", "--metric", dest="metrics", nargs="+", default=["RequestsPerMinute"],
                      metavar="NAME", help="RequestsPerMinute, RequestLatency, RequestLatency_P50/_P90/_P95/_P99")
    leaf.add_argument("--aggregation", default="Average", help="Average, Minimum, Maximum, Total or Count")
    leaf.add_argument("--interval", "--grain", dest="grain", default="PT1M", help="time grain (ISO 8601, e.g. PT1M)")
    leaf.add_argument("--timespan", help="ISO 8601 duration back from the end (PT15M) or START/END")
    leaf.add_argument("--start-time", help="window start (ISO 8601; default one hour before the end)")
    leaf.add_argument("--end-time", help="window end (ISO 8601; default now)")
    leaf.add_argument("--filter", help="e.g. \"deployment eq 'green' and statusCodeClass ne '2xx'\"")
    leaf.add_argument("--split-by", nargs="+", default=[], metavar="DIMENSION", help="e.g. deployment")
    leaf.add_argument("--samples", action="store_true", help="print raw per-request samples instead")
    leaf.add_argument("-d", "--deployment-name", type=name_type("deployment"), help="samples of this deployment only")
    leaf.add_argument("--include-mirrored", action="store_true", help="samples: include mirrored requests")


def _version() -> str:
    from saferollout import __version__

    return __version__


# ---- shared pieces --------------------------------------------------------------------------

def _print(args: argparse.Namespace, result: Any) -> int:
    emit(result, args.output, args.query)
    return 0


def _note(message: str) -> None:
    """A progress or status line on stderr (stdout stays parseable)."""
    _console().print(message, highlight=False, markup=False, soft_wrap=True)


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


class _Progress:
    """Progress of a long operation on stderr: a live spinner on a terminal, plain lines otherwise."""

    def __init__(self, title: str):
        self.console = _console()
        self.title = title
        self.status: Any = None

    def __enter__(self) -> "_Progress":
        if self.console.is_terminal:
            self.status = self.console.status(self.title)
            self.status.__enter__()
        else:
            self.console.print(self.title, highlight=False, markup=False, soft_wrap=True)
        return self

    def __call__(self, line: str) -> None:
        if self.status is not None:
            self.status.update(line)
        else:
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def __exit__(self, *exc: Any) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)


def parse_assignment(text: str, flag: str = "--set") -> tuple[list[str], str]:
    """`tags.owner=me` -> (["tags", "owner"], "me")."""
    path, sep, value = text.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(keys):
        raise UsageError(f"{flag} expects KEY=VALUE (e.g. tags.owner=me), got {text!r}")
    return keys, value


def _typed(keys: list[str], raw: str) -> Any:
    if keys[0] in STRING_MAPS and len(keys) > 1:
        return raw
    try:  # as az: a JSON literal when it is one (2, true, {"a": 1}), else the string itself
        return json.loads(raw)
    except ValueError:
        return raw


def apply_set(data: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """Apply `--set a.b=v` assignments to a YAML-shaped mapping, in place."""
    for text in assignments:
        keys, raw = parse_assignment(text)
        target = data
        for depth, key in enumerate(keys[:-1]):
            child = target.get(key)
            if child is None:
                child = target[key] = {}
            if not isinstance(child, dict):
                raise UsageError(f"--set {text!r}: {'.'.join(keys[:depth + 1])} is not a mapping")
            target = child
        target[keys[-1]] = _typed(keys, raw)
    return data


def apply_remove(data: dict[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    """Apply `--remove a.b` to a YAML-shaped mapping, in place."""
    for path in paths:
        keys = path.strip().split(".")
        target: Any = data
        for key in keys[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
        if not isinstance(target, dict) or keys[-1] not in target:
            raise UsageError(f"--remove {path!r}: there is no such property")
        del target[keys[-1]]
    return data


def string_map(value: Any, what: str) -> dict[str, str]:
    """Tags and properties: a mapping of names to string values (None becomes '')."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{what} must be a mapping of names to values, got {json.dumps(value)}")
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def _confirm(args: argparse.Namespace, what: str) -> None:
    if args.yes:
        return
    if sys.stdin is not None and sys.stdin.isatty():
        answer = input(f"Are you sure you want to delete {what}? (y/n): ")
        if answer.strip().lower() in ("y", "yes"):
            return
        raise SafeRolloutError(f"not deleting {what}")
    raise UsageError(f"deleting {what} needs confirmation and no terminal is attached: pass --yes")


# ---- online-endpoint ------------------------------------------------------------------------

def endpoint_create(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    data = read_yaml(args.file) if args.file else {}
    if args.name:
        data["name"] = args.name
    if args.auth_mode:
        data["auth_mode"] = args.auth_mode
    apply_set(data, args.set)
    if not data.get("name"):
        raise UsageError("online-endpoint create needs --name or a --file that names the endpoint")
    spec = endpoint_spec_from_dict(data, f"endpoint file {args.file}" if args.file else "endpoint")
    return _print(args, backend().create_endpoint(spec))


def endpoint_show(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    return _print(args, backend().get_endpoint(args.name))


def endpoint_list(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    return _print(args, backend().list_endpoints())


def endpoint_update(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    from_file: dict[str, Any] = {}
    name = args.name
    if args.file:
        raw = read_yaml(args.file)
        if name:
            raw["name"] = name
        spec = endpoint_spec_from_dict(raw, f"endpoint file {args.file}")
        name = spec.name
        from_file = {key: getattr(spec, key) for key in ENDPOINT_UPDATABLE if key in raw}
    if not name:
        raise UsageError("online-endpoint update needs --name or a --file that names the endpoint")
    # parse the flags before reading any state, so bad input fails without a round trip
    flags: dict[str, Any] = {}
    if args.traffic is not None:
        flags["traffic"] = parse_traffic(args.traffic)
    if args.mirror_traffic is not None:
        flags["mirror_traffic"] = parse_traffic(args.mirror_traffic, "mirror_traffic")
    for text in args.set + args.remove:
        key = text.split("=", 1)[0].split(".", 1)[0].strip()
        if key not in ENDPOINT_UPDATABLE:
            raise SpecError(f"cannot update {key!r} of an endpoint: only {', '.join(ENDPOINT_UPDATABLE)} "
                            "can change")
    current = backend().get_endpoint(name)
    changes = endpoint_changes(current, {**from_file, **flags}, args.set, args.remove)
    result = backend().update_endpoint(name, **changes) if changes else current
    return _print(args, result)


def endpoint_changes(current: Any, overrides: dict[str, Any], sets: Sequence[str],
                     removes: Sequence[str]) -> dict[str, Any]:
    """What `update` must change on an endpoint: the file's and flags' values, then --set, then --remove."""
    before = {"traffic": dict(current.traffic), "mirror_traffic": dict(current.mirror_traffic),
              "tags": dict(current.tags), "description": current.description}
    wanted = {**json.loads(json.dumps(before)), **overrides}
    apply_set(wanted, sets)
    apply_remove(wanted, removes)
    for key, empty in (("traffic", {}), ("mirror_traffic", {}), ("tags", {}), ("description", "")):
        wanted.setdefault(key, empty)  # `--remove tags` clears them
    changes = {key: wanted[key] for key in ENDPOINT_UPDATABLE if wanted[key] != before[key]}
    if "traffic" in changes:
        changes["traffic"] = parse_traffic(changes["traffic"])
    if "mirror_traffic" in changes:
        changes["mirror_traffic"] = parse_traffic(changes["mirror_traffic"], "mirror_traffic")
    if "tags" in changes:
        changes["tags"] = string_map(changes["tags"], "tags")
    if "description" in changes:
        changes["description"] = "" if changes["description"] is None else str(changes["description"])
    return changes


def endpoint_delete(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    _confirm(args, f"endpoint {args.name!r} and all its deployments")
    backend().delete_endpoint(args.name)
    return 0


def endpoint_invoke(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    try:
        body = Path(args.request_file).read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read request file {args.request_file}: {exc.strerror or exc}") from None
    result = backend().invoke(args.name, body, deployment=args.deployment_name)
    if not result.ok:
        raise BackendError(f"endpoint {args.name!r} answered {result.status}: {_answer_message(result)}")
    if args.query:
        try:
            answer = result.json()
        except ValueError:
            raise SpecError("--query needs a JSON answer, and the endpoint's answer is not JSON") from None
        return _print(args, answer)
    if args.output != "none":
        text = result.text
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _answer_message(result: Any) -> str:
    try:
        data = result.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return data["message"]
    text = " ".join(result.text.split())
    return text[:300] or "(empty answer)"


def endpoint_credentials(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    return _print(args, backend().get_credentials(args.name))


def endpoint_regenerate_keys(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    backend().regenerate_keys(args.name, args.key_type)
    return 0  # as az: nothing printed; `get-credentials` shows the new key


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
        _note(f"deployment {spec.name!r} on {spec.endpoint_name!r} is {dep.provisioning_state}; follow it with "
              f"`saferollout online-deployment show -e {spec.endpoint_name} -n {spec.name}`")
        return 0
    with _Progress(f"creating deployment {spec.name!r} on endpoint {spec.endpoint_name!r}") as progress, \
            _logs_hint(spec.endpoint_name, spec.name):
        dep = platform.create_deployment(spec, wait=True, progress=progress)
    if args.all_traffic:
        platform.update_endpoint(spec.endpoint_name, traffic={spec.name: 100})
        _note(f"endpoint {spec.endpoint_name!r}: {spec.name}=100")
    return _print(args, dep)


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
        _note(f"deployment {spec.name!r} on {spec.endpoint_name!r} is {dep.provisioning_state}")
        return 0
    with _Progress(f"updating deployment {spec.name!r} on endpoint {spec.endpoint_name!r}") as progress, \
            _logs_hint(spec.endpoint_name, spec.name):
        dep = platform.update_deployment(spec, wait=True, progress=progress)
    return _print(args, dep)


def deployment_show(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    return _print(args, backend().get_deployment(args.endpoint_name, args.name))


def deployment_list(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    return _print(args, backend().list_deployments(args.endpoint_name))


def deployment_delete(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    _confirm(args, f"deployment {args.name!r} of endpoint {args.endpoint_name!r}")
    backend().delete_deployment(args.endpoint_name, args.name)
    return 0


def deployment_logs(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    if args.lines is not None and args.lines < 1:
        raise UsageError(f"--lines must be at least 1, got {args.lines}")
    logs = backend().get_deployment_logs(args.endpoint_name, args.name, lines=args.lines)
    sys.stdout.write(logs if logs.endswith("\n") or not logs else logs + "\n")
    return 0


# ---- model ----------------------------------------------------------------------------------

def _model_version(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or int(text) < 1:
        raise SpecError(f"model version must be a positive integer, got {text!r}")
    return int(text)


# the fields of a model an `az ml model create` YAML or --set may give
MODEL_KEYS = {"name", "path", "version", "description", "tags", "properties", "type"}


def _model_data(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if args.file:
        raw = read_yaml(args.file)
        spec = load_model_spec(args.file)
        data = {"name": spec.name, "path": spec.path, "description": spec.description, "tags": spec.tags,
                "properties": spec.properties, "type": spec.type}
        if raw.get("version") is not None:
            data["version"] = str(raw["version"])
    for key in ("name", "path", "description", "type", "version"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    for text in args.tags:
        keys, value = parse_assignment(text, "--tags")
        data.setdefault("tags", {})[".".join(keys)] = value
    data = apply_set(data, args.set)
    unknown = sorted(set(data) - MODEL_KEYS)
    if unknown:  # `--set versoin=7` must not register version 1 quietly
        hints = [f"{key} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(key, MODEL_KEYS, 1))
                 else key for key in unknown]
        raise UsageError(f"model create: unknown field(s) {', '.join(hints)}; known: {', '.join(sorted(MODEL_KEYS))}")
    return data


def model_create(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    data = _model_data(args)
    if not data.get("name") or not data.get("path"):
        raise UsageError("model create needs --name and --path (or a --file holding both)")
    name = validate_model_name(data["name"])
    path = Path(str(data["path"])).expanduser()
    if not path.exists():
        raise SpecError(f"model path does not exist: {path}")
    model_type = str(data.get("type") or "custom_model")
    if model_type not in MODEL_TYPES:
        raise SpecError(f"model type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    version = _model_version(None if data.get("version") is None else str(data["version"]))
    platform = backend()
    extra = _supported_model_options(platform, name, version, model_type)
    model = platform.register_model(name, str(path.resolve()), description=str(data.get("description") or ""),
                                    tags=string_map(data.get("tags"), "tags"),
                                    properties=string_map(data.get("properties"), "properties"),
                                    **extra)
    return _print(args, model)


def _supported_model_options(platform: Any, name: str, version: int | None, model_type: str) -> dict[str, Any]:
    """Pass `version`/`type` when the backend takes them; otherwise check what it will do anyway."""
    import inspect

    accepted = inspect.signature(platform.register_model).parameters
    extra: dict[str, Any] = {}
    if "type" in accepted:
        extra["type"] = model_type
    elif model_type != "custom_model":
        raise SpecError(f"the {platform.name} backend registers custom_model models only, got {model_type!r}")
    if version is not None:
        if "version" in accepted:
            extra["version"] = version
        else:
            existing = [m.version for m in platform.list_models(name)]
            if version in existing:
                raise Conflict(f"model {name!r} version {version} already exists")
            following = max(existing, default=0) + 1
            if version != following:
                raise SpecError(f"the {platform.name} backend numbers model versions itself: the next version "
                                f"of {name!r} is {following}, not {version}")
    return extra


def model_show(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    return _print(args, backend().get_model(args.name, _model_version(args.version)))


def model_list(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    return _print(args, backend().list_models(args.name))


# ---- local ----------------------------------------------------------------------------------

def local_start(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    from saferollout.backends.local.daemon import platform_status, resolve_home, start_platform

    home = resolve_home()
    if not platform_status(home)["running"]:
        _note(f"starting the local platform for {home}")
    return _print(args, start_platform(home))


def local_stop(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    from saferollout.backends.local.daemon import resolve_home, stop_platform

    home = resolve_home()
    stopped = stop_platform(home)
    _note(f"stopped the local platform for {home}" if stopped else f"no local platform was running for {home}")
    return 0


def local_status(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    from saferollout.backends.local.daemon import platform_status

    return _print(args, platform_status())


# ---- metrics --------------------------------------------------------------------------------

def _parse_time(text: str, flag: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise SpecError(f"invalid {flag} {text!r}: use ISO 8601, e.g. 2026-11-27T08:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _parse_duration(text: str, flag: str) -> timedelta:
    from saferollout.backends.local.metrics import grain_seconds  # the one ISO 8601 duration parser

    try:
        return timedelta(seconds=grain_seconds(text.strip()))
    except SpecError:
        raise SpecError(f"invalid {flag} {text!r}: use an ISO 8601 duration such as PT15M or PT1H") from None


def metrics_window(timespan: str | None, start_time: str | None, end_time: str | None,
                   now: datetime | None = None) -> tuple[datetime, datetime]:
    """The query window from az-style flags: --timespan (duration or START/END), --start-time, --end-time."""
    end = _parse_time(end_time, "--end-time") if end_time else (now or datetime.now(timezone.utc))
    if timespan and start_time:
        raise UsageError("give --timespan or --start-time, not both")
    if timespan and "/" in timespan:
        first, _, second = timespan.partition("/")
        start = _parse_time(first, "--timespan")
        end = (start + _parse_duration(second, "--timespan")) if second.strip().upper().startswith("P") \
            else _parse_time(second, "--timespan")
    elif timespan:
        start = end - _parse_duration(timespan, "--timespan")
    elif start_time:
        start = _parse_time(start_time, "--start-time")
    else:
        start = end - DEFAULT_METRICS_WINDOW
    if start >= end:
        raise SpecError(f"the metrics window is empty: start {start.isoformat()} is not before end {end.isoformat()}")
    return start, end


def _canonical(name: str, known: Sequence[str]) -> str:
    """Azure Monitor reads metric and aggregation names case-insensitively; so do we."""
    return next((item for item in known if item.lower() == name.lower()), name)


def metrics_query(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    start, end = metrics_window(args.timespan, args.start_time, args.end_time)
    platform = backend()
    if args.samples:
        if not getattr(platform, "supports_raw_samples", False):
            raise BackendError(f"the {platform.name} backend has no raw request samples: query metrics instead")
        return _print(args, platform.request_samples(args.endpoint_name, deployment=args.deployment_name,
                                                     start=start, end=end, include_mirrored=args.include_mirrored))
    series: list[Any] = []
    aggregation = _canonical(args.aggregation, AGGREGATIONS)
    for metric in args.metrics:
        series.extend(platform.query_metrics(args.endpoint_name, _canonical(metric, (*METRIC_NAMES, *DEPLOYMENT_METRIC_DIMENSIONS)),
                                             aggregation=aggregation,
                                             grain=args.grain, start=start, end=end, filter=args.filter,
                                             split_by=args.split_by))
    return _print(args, series)


# ---- entry point ----------------------------------------------------------------------------

# az's workspace flags -> the Azure backend's settings (the local backend has one workspace: SAFEROLLOUT_HOME)
AZURE_SETTINGS_FLAGS = {"subscription": "subscription_id", "resource_group": "resource_group",
                        "workspace_name": "workspace_name"}


class BackendFactory:
    """Makes the chosen backend on first use and hands the same one out afterwards."""

    def __init__(self, name: str, settings: dict[str, Any] | None = None):
        self.name = name
        self.settings = dict(settings or {})
        self._backend: Any = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BackendFactory":
        settings = {}
        if args.backend == "azure":
            settings = {key: getattr(args, flag) for flag, key in AZURE_SETTINGS_FLAGS.items()
                        if getattr(args, flag, None)}
        return cls(args.backend, settings)

    def __call__(self) -> Any:
        if self._backend is None:
            from saferollout.backends import get_backend

            self._backend = get_backend(self.name, **self.settings)
        return self._backend


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "failed"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `saferollout` command; returns the exit code (0 ok, 2 usage/spec error, 1 other failure)."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        compile_query(args.query)  # a bad --query fails before anything changes
        return int(args.handler(args, BackendFactory.from_args(args)) or 0)
    except SafeRolloutError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the platform or a file could not be reached; requests' errors are OSErrors too
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(str(exc) or type(exc).__name__)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else 0
