"""Runbook references and conditions: `${parameters.x}`, `${steps.<id>.<name>}`, `a ?? b`, and `when`.

`resolve` substitutes references in a value (a string that is exactly one reference takes the referenced
value with its type; otherwise references are interpolated as text); `evaluate` decides a `when`
expression, which may use only references, literals, and/or/not and comparisons (checked on its AST).
"""
from __future__ import annotations

import ast
import json
import re
from typing import Any, Mapping

from saferollout.errors import SpecError

REFERENCE = re.compile(r"\$\{([^}]*)\}")
_NOT_LITERAL = object()


def split_alternatives(ref: str) -> list[str]:
    """`steps.train.model_dir ?? ''` -> ['steps.train.model_dir', "''"]: the first that has a value wins."""
    return [part.strip() for part in ref.split("??")]


def _literal(text: str) -> Any:
    """A quoted string or a number written after `??`; _NOT_LITERAL for a reference."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    try:
        return json.loads(text) if text and (text[0].isdigit() or text[0] == "-") else _NOT_LITERAL
    except ValueError:
        return _NOT_LITERAL


def is_literal(text: str) -> bool:
    """Whether `text`, written after `??`, is a literal (a quoted string or a number) rather than a reference."""
    return _literal(text) is not _NOT_LITERAL


def lookup(ref: str, context: Mapping[str, Any]) -> Any:
    """The value `ref` (e.g. 'steps.register.model_ref') names in `context`; SpecError if there is none.

    `a ?? b` is `a`, or `b` when `a` has no value (a step that was skipped, say); `b` may be a quoted string.
    """
    alternatives = split_alternatives(ref)
    if len(alternatives) > 1:
        for alternative in alternatives[:-1]:
            try:
                return lookup(alternative, context)
            except SpecError:
                continue
        last = _literal(alternatives[-1])
        return lookup(alternatives[-1], context) if last is _NOT_LITERAL else last
    root, _, rest = ref.strip().partition(".")
    if root not in context:
        raise SpecError(f"${{{ref}}}: nothing called {root!r} is known here")
    value: Any = context[root]
    if root == "steps":
        step_id, _, name = rest.partition(".")
        if step_id not in value:
            raise SpecError(f"${{{ref}}}: step {step_id!r} has not run (skipped or later)")
        if name not in value[step_id]:
            recorded = ", ".join(sorted(value[step_id])) or "nothing"
            raise SpecError(f"${{{ref}}}: step {step_id!r} recorded no {name!r} (it recorded {recorded})")
        return value[step_id][name]
    for part in [p for p in rest.split(".") if p]:
        if not isinstance(value, Mapping) or part not in value:
            raise SpecError(f"${{{ref}}}: no value {part!r}")
        value = value[part]
    return value


def resolve(value: Any, context: Mapping[str, Any]) -> Any:
    """Substitute references in a value (recursively through lists and mappings)."""
    if isinstance(value, Mapping):
        return {k: resolve(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, context) for v in value]
    if not isinstance(value, str):
        return value
    whole = REFERENCE.fullmatch(value.strip())
    if whole:
        return lookup(whole.group(1), context)
    return REFERENCE.sub(lambda m: as_text(lookup(m.group(1), context)), value)


def as_text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return json.dumps(value) if isinstance(value, (dict, bool)) or value is None else str(value)


_ALLOWED = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.Compare, ast.Eq, ast.NotEq,
            ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn, ast.Name, ast.Load, ast.Constant, ast.List,
            ast.Tuple)


def evaluate(expression: str, context: Mapping[str, Any]) -> bool:
    """Evaluate a `when` expression: references, literals, and/or/not and comparisons only."""
    names: dict[str, Any] = {"true": True, "false": False, "null": None}

    def bind(match: re.Match) -> str:
        key = f"_ref{len(names)}"
        names[key] = lookup(match.group(1), context)
        return key

    text = REFERENCE.sub(bind, expression)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise SpecError(f"when: cannot parse {expression!r}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED) or (isinstance(node, ast.Name) and node.id not in names):
            raise SpecError(f"when: {expression!r} may use only references, literals, and/or/not and comparisons")
    return bool(eval(compile(tree, "<when>", "eval"), {"__builtins__": {}}, dict(names)))  # noqa: S307 (checked AST)
