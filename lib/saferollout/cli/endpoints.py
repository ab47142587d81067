"""`saferollout online-endpoint create|show|list|update|delete|invoke|get-credentials|regenerate-keys`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from saferollout.errors import (BackendError, SpecError, UsageError)
from saferollout.specs import (endpoint_spec_from_dict, parse_traffic, read_yaml, string_map)
from saferollout.cli.options import (add_group, add_name, add_set_remove, add_verb, add_wait_flags, add_yes,
                                     common_options, confirm, name_type, print_result)
from saferollout.cli.editor import apply_remove, apply_set


ENDPOINT_UPDATABLE = ("traffic", "mirror_traffic", "tags", "description")


def register(commands: Any) -> None:
    common = common_options()
    verbs = add_group(commands, "online-endpoint", "Manage online endpoints.")
    leaf = add_verb(verbs, "create", "Create an endpoint from an endpoint.yml and/or flags.", common, endpoint_create)
    add_name(leaf, "endpoint", required=False)
    leaf.add_argument("-f", "--file", help="endpoint YAML (Azure ML CLI v2 schema)")
    leaf.add_argument("--auth-mode", choices=("key", "aml_token"), help="authentication mode")
    add_set_remove(leaf, remove=False)
    add_wait_flags(leaf)
    leaf = add_verb(verbs, "show", "Show an endpoint.", common, endpoint_show)
    add_name(leaf, "endpoint")
    add_verb(verbs, "list", "List endpoints.", common, endpoint_list)
    leaf = add_verb(verbs, "update", "Update traffic, mirror traffic, tags or description.", common, endpoint_update)
    add_name(leaf, "endpoint", required=False)
    leaf.add_argument("-f", "--file", help="endpoint YAML whose traffic, tags and description to apply")
    leaf.add_argument("--traffic", help='traffic split, e.g. "blue=90 green=10"')
    leaf.add_argument("--mirror-traffic", help='mirrored traffic, e.g. "green=10" ("green=0" turns it off)')
    add_set_remove(leaf)
    add_wait_flags(leaf)
    leaf = add_verb(verbs, "delete", "Delete an endpoint and all its deployments.", common, endpoint_delete)
    add_name(leaf, "endpoint")
    add_yes(leaf)
    add_wait_flags(leaf)
    leaf = add_verb(verbs, "invoke", "Send a request to the endpoint and print the answer body.", common,
                 endpoint_invoke)
    add_name(leaf, "endpoint")
    leaf.add_argument("-r", "--request-file", required=True, help="file holding the request body")
    leaf.add_argument("-d", "--deployment-name", type=name_type("deployment"),
                      help="send to this deployment, bypassing the traffic split")
    leaf = add_verb(verbs, "get-credentials", "Show the endpoint's keys or token.", common, endpoint_credentials)
    add_name(leaf, "endpoint")
    leaf = add_verb(verbs, "regenerate-keys", "Regenerate the primary or secondary key.", common,
                 endpoint_regenerate_keys)
    add_name(leaf, "endpoint")
    leaf.add_argument("--key-type", choices=("primary", "secondary"), default="primary",
                      help="which key to regenerate (default primary)")
    add_wait_flags(leaf)



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
    return print_result(args, backend().create_endpoint(spec))


def endpoint_show(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    return print_result(args, backend().get_endpoint(args.name))


def endpoint_list(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    return print_result(args, backend().list_endpoints())


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
    if "tags" in changes:  # as changes to the tags the endpoint has then, so a concurrent update of others stays
        wanted = changes.pop("tags")
        changes["set_tags"] = {k: v for k, v in wanted.items() if current.tags.get(k) != v} or None
        changes["remove_tags"] = [k for k in current.tags if k not in wanted]
    result = backend().update_endpoint(name, **changes) if changes else current
    return print_result(args, result)


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
    confirm(args, f"endpoint {args.name!r} and all its deployments")
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
        return print_result(args, answer)
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
    return print_result(args, backend().get_credentials(args.name))


def endpoint_regenerate_keys(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    backend().regenerate_keys(args.name, args.key_type)
    return 0  # as az: nothing printed; `get-credentials` shows the new key

