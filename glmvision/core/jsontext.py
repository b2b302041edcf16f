"""Strict JSON text: no NaN or Infinity, no numbers past a float, and a bounded depth."""

from __future__ import annotations

import json
import math
from typing import Any

# Default of GLMVISION_MAX_JSON_DEPTH: how deeply a body's arrays and objects may nest. Deeper bodies
# exhaust recursion in pydantic, dataclasses.asdict or the chat template; no real request needs it.
MAX_JSON_DEPTH = 64


def _refuse_constant(name: str) -> Any:
    """NaN, Infinity and -Infinity are not JSON: Python's parser takes them unless told not to."""
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    """A JSON number as a float; one too large for a float (1e999) would be infinity, so it is refused."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:32]} is too large a number")
    return value


def strict_loads(text: str | bytes) -> Any:
    """json.loads that refuses NaN, Infinity and numbers past a float's range (ValueError)."""
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)


def json_depth(value: Any, limit: int) -> int:
    """How deeply arrays and objects nest in `value` (a scalar is 0), counted up to `limit` + 1 at most."""
    deepest, pending = 0, [(value, 1)]
    while pending:  # a walk of our own: recursion is what a hostile body would exhaust
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        pending.extend((child, depth + 1) for child in children)
    return deepest


def parse_json_text(text: str | bytes, max_depth: int) -> Any:
    """Strict JSON, nested at most `max_depth` deep; ValueError for anything else (NaN, Infinity too)."""
    try:
        value = strict_loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if json_depth(value, max_depth) > max_depth:
        raise ValueError(f"nested more than {max_depth} deep")
    return value
