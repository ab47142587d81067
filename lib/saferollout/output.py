"""How the `saferollout` command prints results: `--query` (JMESPath) then `-o json|tsv|table|yaml`.

The formats follow `az` (its knack output layer) so scripts that parse `az ml` output parse ours:
`json` is indented with sorted keys; `tsv` prints one line per item, a dict's scalar values sorted by
key and tab-separated, a nested list as its length and a nested dict as an empty field; `table` shows
the scalar fields of each item under capitalized headers; `none`, or a result of `None`, prints nothing.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, TextIO

import jmespath
import jmespath.exceptions
import yaml

from saferollout.errors import UsageError

OUTPUT_FORMATS = ("json", "tsv", "table", "yaml", "none")
TABLE_SKIP_KEYS = ("id", "type", "etag")  # az leaves these out of tables too


def compile_query(text: str | None) -> Any:
    """Compile a JMESPath expression up front, so a bad `--query` fails before anything changes."""
    if not text:
        return None
    try:
        return jmespath.compile(text)
    except jmespath.exceptions.JMESPathError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"invalid --query {text!r}: {detail}") from None


def apply_query(result: Any, query: Any) -> Any:
    """Apply a compiled (or textual) JMESPath query to a JSON-shaped result."""
    if query is None:
        return result
    if isinstance(query, str):
        query = compile_query(query)
    return query.search(result)


def to_plain(result: Any) -> Any:
    """Entities (anything with `to_dict`) and lists of them -> plain JSON-shaped data."""
    if hasattr(result, "to_dict"):
        return result.to_dict()
    if isinstance(result, (list, tuple)):
        return [to_plain(item) for item in result]
    if isinstance(result, dict):
        return {key: to_plain(value) for key, value in result.items()}
    return result


def format_result(result: Any, fmt: str = "json") -> str:
    """Render a JSON-shaped result; '' for None, as az prints nothing then."""
    if result is None or fmt == "none":
        return ""
    if fmt == "json":
        return json.dumps(result, ensure_ascii=False, indent=2, sort_keys=True, default=str) + "\n"
    if fmt == "yaml":
        return yaml.safe_dump(json.loads(json.dumps(result, default=str)), default_flow_style=False,
                              allow_unicode=True, sort_keys=True)
    if fmt == "tsv":
        return "".join(_tsv_row(item) for item in (result if isinstance(result, list) else [result]))
    if fmt == "table":
        return _table(result if isinstance(result, list) else [result])
    raise UsageError(f"unknown output format {fmt!r}: choose one of {', '.join(OUTPUT_FORMATS)}")


def emit(result: Any, fmt: str = "json", query: Any = None, stream: TextIO | None = None) -> None:
    """Query, format and write a command's result to `stream` (stdout by default)."""
    import sys

    text = format_result(apply_query(to_plain(result), query), fmt)
    if text:
        (stream or sys.stdout).write(text)


def _tsv_field(value: Any) -> str:
    if isinstance(value, list):
        return str(len(value))
    if isinstance(value, dict):
        return ""  # keeps the column count stable when the field is sometimes a mapping
    return value if isinstance(value, str) else str(value)


def _tsv_row(item: Any) -> str:
    if isinstance(item, dict):
        values = list(item.values()) if isinstance(item, OrderedDict) else [v for _, v in sorted(item.items())]
        return "\t".join(_tsv_field(v) for v in values) + "\n"
    if isinstance(item, list):
        return "\t".join(_tsv_field(v) for v in item) + "\n"
    if isinstance(item, bool):
        return str(item).lower() + "\n"
    return _tsv_field(item) + "\n"


def _table_row(item: Any) -> dict[str, str]:
    if isinstance(item, dict):
        return {key[:1].upper() + key[1:]: str(value) for key, value in item.items()
                if key not in TABLE_SKIP_KEYS and value is not None and not isinstance(value, (list, dict))}
    if isinstance(item, list):
        return {f"Column{i + 1}": str(value) for i, value in enumerate(item)}
    return {"Result": str(item)}


def _table(items: list[Any]) -> str:
    rows = [_table_row(item) for item in items]
    headers: list[str] = []
    for row in rows:
        headers.extend(key for key in row if key not in headers)
    if not headers:
        return ""
    widths = [max([len(h)] + [len(row.get(h, "")) for row in rows]) for h in headers]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(row.get(h, "").ljust(w) for h, w in zip(headers, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"
