"""The metrics query language both backends speak: Azure Monitor's filters, grains and query checks.

A query names a metric (`METRIC_NAMES`, or a deployment metric), an aggregation, an ISO 8601 grain and an
OData-like filter such as `deployment eq 'green' and statusCodeClass ne '2xx'`. This module parses and
checks them; each backend answers them its own way (the local platform from its request log, Azure from
Azure Monitor), and the gates and the CLI use the same parser. No backend lives here, and this module
imports none.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from saferollout.backends.base import AGGREGATIONS, DEPLOYMENT_METRIC_DIMENSIONS, METRIC_DIMENSIONS, METRIC_NAMES
from saferollout.errors import SpecError

# ---- filters ---------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(\()|(\))|'((?:[^']|'')*)'|([A-Za-z_][A-Za-z0-9_]*))")


@dataclass
class Comparison:
    dimension: str
    op: str  # eq | ne
    value: str

    def matches(self, dims: dict[str, str]) -> bool:
        if self.value == "*":
            return self.op == "eq"
        hit = dims.get(self.dimension, "").lower() == self.value.lower()
        return hit if self.op == "eq" else not hit


@dataclass
class BoolOp:
    op: str  # and | or
    left: Any
    right: Any

    def matches(self, dims: dict[str, str]) -> bool:
        if self.op == "and":
            return self.left.matches(dims) and self.right.matches(dims)
        return self.left.matches(dims) or self.right.matches(dims)


class _Always:
    def matches(self, dims: dict[str, str]) -> bool:
        return True


class _Never:
    def matches(self, dims: dict[str, str]) -> bool:
        return False


ALWAYS = _Always()  # no filter: every request matches
NEVER = _Never()  # a filter nothing can match (e.g. `deployment eq 'blue'` asked of green's own resource)


def parse_filter(text: str | None, dimensions: Sequence[str]) -> Any:
    """Parse `deployment eq 'green' and statusCodeClass ne '2xx'` (and/or, parentheses, eq/ne)."""
    if not text or not text.strip():
        return ALWAYS
    tokens = _tokenize(text)
    node, pos = _parse_or(tokens, 0, text, dimensions)
    if pos != len(tokens):
        raise SpecError(f"invalid metric filter {text!r}: unexpected {tokens[pos][1]!r}")
    return node


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match:
            raise SpecError(f"invalid metric filter {text!r} near {text[pos:pos + 12]!r}")
        lpar, rpar, quoted, word = match.groups()
        if lpar:
            tokens.append(("(", "("))
        elif rpar:
            tokens.append((")", ")"))
        elif quoted is not None:
            tokens.append(("str", quoted.replace("''", "'")))
        else:
            tokens.append(("word", word))
        pos = match.end()
    return tokens


def _parse_chain(op, operand, tokens, pos, text, dims):
    """`operand (op operand)*`, joined from the left: `or` over `and` chains, `and` over terms."""
    left, pos = operand(tokens, pos, text, dims)
    while pos < len(tokens) and tokens[pos] == ("word", op):
        right, pos = operand(tokens, pos + 1, text, dims)
        left = BoolOp(op, left, right)
    return left, pos


def _parse_or(tokens, pos, text, dims):
    return _parse_chain("or", _parse_and, tokens, pos, text, dims)


def _parse_and(tokens, pos, text, dims):
    return _parse_chain("and", _parse_term, tokens, pos, text, dims)


def _parse_term(tokens, pos, text, dims):
    if pos >= len(tokens):
        raise SpecError(f"invalid metric filter {text!r}: it ends too early")
    if tokens[pos][0] == "(":
        node, pos = _parse_or(tokens, pos + 1, text, dims)
        if pos >= len(tokens) or tokens[pos][0] != ")":
            raise SpecError(f"invalid metric filter {text!r}: missing ')'")
        return node, pos + 1
    if pos + 3 > len(tokens):
        raise SpecError(f"invalid metric filter {text!r}: expected <dimension> eq|ne '<value>'")
    (kind_d, dim), (kind_o, op), (kind_v, value) = tokens[pos:pos + 3]
    if kind_d != "word" or kind_o != "word" or op.lower() not in ("eq", "ne") or kind_v != "str":
        raise SpecError(f"invalid metric filter {text!r}: expected <dimension> eq|ne '<value>'")
    canonical = {d.lower(): d for d in dims}
    if dim.lower() not in canonical:
        raise SpecError(f"unknown dimension {dim!r} in metric filter: this metric has {', '.join(dims)}")
    return Comparison(canonical[dim.lower()], op.lower(), value), pos + 3


def scope_of(node: Any) -> Any:
    """The filter with every non-deployment comparison dropped: which requests are 'in scope'.

    A bucket where the scope saw requests but the filter matched none holds 0 (e.g. zero errors out of
    120 requests); a bucket where the scope saw no request at all holds None: no data is never zero errors.
    """
    if isinstance(node, Comparison):
        return node if node.dimension == "deployment" else ALWAYS
    if isinstance(node, BoolOp):
        return join(node.op, scope_of(node.left), scope_of(node.right))
    return ALWAYS


def join(op: str, left: Any, right: Any) -> Any:
    """`left op right` with ALWAYS (true) and NEVER (false) folded away: `x and ALWAYS` is x, `x or ALWAYS`
    is ALWAYS, `x and NEVER` is NEVER, `x or NEVER` is x."""
    absorbing, neutral = (NEVER, ALWAYS) if op == "and" else (ALWAYS, NEVER)
    if left is absorbing or right is absorbing:
        return absorbing
    if left is neutral:
        return right
    if right is neutral:
        return left
    return BoolOp(op, left, right)



# ---- grains and queries ---------------------------------------------------------------------

_GRAIN = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$")


def grain_seconds(grain: str) -> int:
    match = _GRAIN.match((grain or "").upper())
    if not match or not any(match.groups()):
        raise SpecError(f"invalid grain {grain!r}: use an ISO 8601 duration such as PT1M, PT5S or PT1H")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    total = days * 86400 + hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise SpecError(f"invalid grain {grain!r}: it must be longer than zero")
    return total


def validate_query(metric: str, aggregation: str, split_by: Iterable[str], *,
                   deployment_metrics: Iterable[str] = tuple(DEPLOYMENT_METRIC_DIMENSIONS)) -> tuple[str, ...]:
    """Check a query's metric, aggregation and split-by dimensions; -> the split-by names, canonically spelled.

    `deployment_metrics` are the deployment metrics the asking backend serves besides `METRIC_NAMES`.
    """
    served = tuple(deployment_metrics)
    if metric not in METRIC_NAMES and metric not in served:
        raise SpecError(f"unknown metric {metric!r}: choose one of {', '.join((*METRIC_NAMES, *served))}")
    if aggregation not in AGGREGATIONS:
        raise SpecError(f"unknown aggregation {aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")
    return split_dimensions(metric, METRIC_DIMENSIONS.get(metric) or DEPLOYMENT_METRIC_DIMENSIONS[metric], split_by)


def split_dimensions(metric: str, dims: Sequence[str], split_by: Iterable[str]) -> tuple[str, ...]:
    """The split-by names as `metric`'s dimensions `dims` spell them (matched without case), or SpecError."""
    canonical = {d.lower(): d for d in dims}
    split = []
    for name in split_by:
        if name.lower() not in canonical:
            raise SpecError(f"cannot split {metric} by {name!r}: its dimensions are {', '.join(dims)}")
        split.append(canonical[name.lower()])
    return tuple(split)
