"""`saferollout model create|show|list`: register and look up model versions.
"""
from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any, Callable

from saferollout.errors import (Conflict, SpecError, UsageError)
from saferollout.specs import (load_model_spec, read_yaml, string_map, validate_model_name)
from saferollout.cli.options import (add_group, add_name, add_set_remove, add_verb, common_options, print_result)
from saferollout.cli.editor import apply_set, parse_assignment


MODEL_TYPES = ("custom_model", "mlflow_model", "triton_model")


def register(commands: Any) -> None:
    common = common_options()
    verbs = add_group(commands, "model", "Register and look up model versions.")
    leaf = add_verb(verbs, "create", "Register a model file or folder as a new version.", common, model_create)
    add_name(leaf, "model", required=False)
    leaf.add_argument("-v", "--version", help="version to create (versions auto-increment without it)")
    leaf.add_argument("-p", "--path", help="model file or folder")
    leaf.add_argument("-t", "--type", choices=MODEL_TYPES, help="model type (default custom_model)")
    leaf.add_argument("-f", "--file", help="model YAML (Azure ML CLI v2 schema)")
    leaf.add_argument("-d", "--description", help="description")
    leaf.add_argument("--tags", nargs="+", default=[], metavar="KEY=VALUE", help="tags, space-separated")
    add_set_remove(leaf, remove=False)
    leaf = add_verb(verbs, "show", "Show a model version (the latest without --version).", common, model_show)
    add_name(leaf, "model")
    which = leaf.add_mutually_exclusive_group()
    which.add_argument("-v", "--version", help="model version")
    which.add_argument("-l", "--label", choices=("latest",), help="model label")
    leaf = add_verb(verbs, "list", "List model versions.", common, model_list)
    add_name(leaf, "model", required=False)



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
    return print_result(args, model)


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
    return print_result(args, backend().get_model(args.name, _model_version(args.version)))


def model_list(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    return print_result(args, backend().list_models(args.name))

