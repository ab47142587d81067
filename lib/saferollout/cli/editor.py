"""The `--set KEY=VALUE` / `--remove KEY` editor: az's generic update syntax applied to a plain dict.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from saferollout.errors import UsageError


# `--set` values under these keys stay strings (a tag "007" must not become the number 7).
STRING_MAPS = ("tags", "properties", "environment_variables")


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



