"""Vetting a JSON schema before its grammar is compiled: bounded work on the request's thread.

xgrammar (0.2.9) compiles what it understands and silently drops the rest, and some schemas cost it
(or a row's closing walk) without bound. So a schema is checked here first, in time linear in its
size, and refused with a reason rather than half-enforced:

- limits (`SchemaLimits`, each a setting): nesting depth, repetition counts (a pattern's `{n,m}`,
  nested ones multiplied; min/max Length, Items and Properties), properties, `$ref` expansion, and
  the shortest document of any part of the schema. Over one: `schema_too_complex`.
- keywords: each is one xgrammar enforces where it stands, an annotation, or `schema_unsupported`
  naming it and its place. xgrammar reads a node by its first keyword of `$ref`, `const`, `enum`,
  `anyOf`, `oneOf`, `allOf`, `type` (so what stands beside those is dropped), a known string
  `format` before a `pattern`, and a `pattern` before string lengths: such neighbours are refused.
- schemas no finite document satisfies (recursion with no way out, contradictions): refused too, or
  a row's closing walk could follow them forever.

Some keywords are rewritten for the grammar: `format` date, time, date-time and ipv4 become patterns
that admit only real values (xgrammar's allow February 30, second 60 and leading zeros), and an
`enum` loses values its `type` excludes.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# Keywords without any effect on what validates.
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$comment",
        "$schema",
        "contentEncoding",
        "contentMediaType",
        "contentSchema",
    }
)
# Where referenced schemas live: not read themselves, only through a $ref.
CONTAINERS = frozenset({"$defs", "definitions"})
# Keywords JSON Schema gives meaning to that the grammar does not enforce (unknown ones are
# annotations to JSON Schema and xgrammar alike).
UNSUPPORTED = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "patternProperties",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
        "additionalItems",
        "contains",
        "minContains",
        "maxContains",
        "$anchor",
        "$dynamicRef",
        "$dynamicAnchor",
        "$recursiveRef",
        "$recursiveAnchor",
        "$vocabulary",
    }
)
TYPES = ("null", "boolean", "object", "array", "number", "integer", "string")
STRING_KEYWORDS = ("format", "pattern", "minLength", "maxLength")
NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
ARRAY_KEYWORDS = ("items", "prefixItems", "minItems", "maxItems", "uniqueItems")
OBJECT_KEYWORDS = ("properties", "required", "additionalProperties", "minProperties", "maxProperties")
COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
# A node is read by the first of these it has (xgrammar's order); what stands beside it is dropped.
APPLICATORS = ("$ref", "const", "enum", "anyOf", "oneOf", "allOf")
# xgrammar's integer multipleOf holds without bounds, or within a range this wide and a step this big.
MULTIPLE_OF_RANGE = 10_000
MULTIPLE_OF_STEP = 1024
# A oneOf's schemas are compared pairwise for overlap: this many at most (const/enum ones aside).
ONE_OF_BRANCHES = 64

_YEAR = r"(000[1-9]|00[1-9]\d|0[1-9]\d{2}|[1-9]\d{3})"
_LEAP_YEAR = r"(\d{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_DATE = (
    rf"({_YEAR}-((0[13578]|1[02])-(0[1-9]|[12]\d|3[01])|(0[469]|11)-(0[1-9]|[12]\d|30)"
    rf"|02-(0[1-9]|1\d|2[0-8]))|{_LEAP_YEAR}-02-29)"
)
# A fraction has at most 9 digits (nanoseconds): a row's closing walk ends it then.
_TIME = r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,9}){0,1}(Z|[+-]([01]\d|2[0-3]):[0-5]\d)"
_OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Formats whose values the grammar checks: these as exact patterns, the rest by xgrammar's own.
FORMAT_PATTERNS = {
    "date": f"^{_DATE}$",
    "time": f"^{_TIME}$",
    "date-time": f"^{_DATE}T{_TIME}$",
    "ipv4": rf"^({_OCTET}\.){{3}}{_OCTET}$",
}
XGRAMMAR_FORMATS = frozenset(
    {
        "email",
        "uuid",
        "ipv6",
        "hostname",
        "uri",
        "uri-reference",
        "uri-template",
        "duration",
        "json-pointer",
        "relative-json-pointer",
    }
)
FORMATS = frozenset(FORMAT_PATTERNS) | XGRAMMAR_FORMATS

# A quantifier's counts in a pattern: {n}, {n,} or {n,m}.
_QUANTIFIER = re.compile(r"\{(\d+)(,(\d*))?\}")


@dataclass(frozen=True)
class SchemaLimits:
    """How big a schema may be, in the ways that cost compiling or decoding."""

    max_depth: int = 32  # subschemas nested in each other
    max_repeat: int = 1000  # any repetition count, nested pattern counts multiplied
    max_properties: int = 500  # properties named, all objects together
    max_refs: int = 1000  # $refs met when the schema is expanded (each recursion once)
    max_shortest: int = 10_000  # JSON values in the shortest document of any part


class SchemaRefused(Exception):
    """A schema the grammar cannot take: the error code and the client's message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


Path = tuple[str | int, ...]


def pointer(path: Path) -> str:
    """A path inside the schema as a JSON pointer fragment, the way a $ref spells it."""
    return "#" + "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def unsupported(message: str) -> SchemaRefused:
    """A schema_unsupported refusal."""
    return SchemaRefused("schema_unsupported", message)


def invalid(message: str) -> SchemaRefused:
    """An invalid_schema refusal: the schema is not well-formed."""
    return SchemaRefused("invalid_schema", message)


def too_complex(what: str, value: int | str, limit: int, setting: str) -> SchemaRefused:
    """A schema_too_complex refusal naming the limit, the schema's value and the setting."""
    return SchemaRefused(
        "schema_too_complex", f"The JSON schema's {what} is {value}; at most {limit} ({setting})."
    )


def pattern_repeat(pattern: str) -> int:
    """The largest repetition count in a regex, counts of nested groups multiplied."""
    return _scan(pattern)[0]


def grammar_pattern(pattern: str) -> str:
    """A regex as xgrammar 0.2.9 reads it right: an optional group `(...)?` spelled `(...){0,1}`
    (it takes `(ab+)?` as `a?b*`, but `(ab+){0,1}` as written)."""
    return _scan(pattern)[1]


def _scan(pattern: str) -> tuple[int, str]:
    largest = 0
    groups: list[int] = [0]  # per open group, the largest count seen inside it
    last = 0  # the count the atom just ended carries (a group's inner count, else 0)
    optional: list[int] = []  # where a group's `?` is
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i, last = i + 2, 0
            continue
        if char == "[":
            i = _class_end(pattern, i)
            last = 0
            continue
        if char == "(":
            groups.append(0)
            i += 1
            continue
        if char == ")" and len(groups) > 1:
            last = groups.pop()
            groups[-1] = max(groups[-1], last)
            if pattern.startswith("?", i + 1):
                optional.append(i + 1)
            i += 1
            continue
        quantifier = _QUANTIFIER.match(pattern, i) if char == "{" else None
        if quantifier is not None:
            least, comma, most = quantifier.groups()
            count = int(most) if comma and most else int(least)
            total = count * max(last, 1)
            groups[-1] = max(groups[-1], total)
            largest = max(largest, total)
            i, last = quantifier.end(), total
            continue
        i, last = i + 1, 0
    text = pattern
    for at in reversed(optional):
        lazy = 2 if text.startswith("??", at) else 1
        text = text[:at] + "{0,1}" + text[at + lazy :]
    return max(largest, *groups), text


def _class_end(pattern: str, start: int) -> int:
    i = start + 1
    if i < len(pattern) and pattern[i] == "^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


def _is_integer(value: Any) -> bool:
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def _bound(bounds: dict[str, float], closed: str, opened: str, stricter: Any) -> tuple[float, bool]:
    """A side's strictest bound and whether it is exclusive (±inf when there is none)."""
    unbounded = math.inf if stricter is min else -math.inf
    candidates = [(bounds[closed], False)] if closed in bounds else []
    candidates += [(bounds[opened], True)] if opened in bounds else []
    if not candidates:
        return unbounded, False
    value = stricter(value for value, _ in candidates)
    return value, any(is_open and bound == value for bound, is_open in candidates)


def _canonical_value(value: Any) -> str:
    """A JSON value as text that is equal for values JSON Schema holds equal (1 and 1.0)."""
    if _is_number(value) and _is_integer(value):
        value = int(value)
    return json.dumps(value, sort_keys=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def of_type(value: Any, kind: str) -> bool:
    """Whether a JSON value is of a JSON Schema type."""
    checks = {
        "null": lambda: value is None,
        "boolean": lambda: isinstance(value, bool),
        "object": lambda: isinstance(value, dict),
        "array": lambda: isinstance(value, list),
        "number": lambda: _is_number(value),
        "integer": lambda: _is_integer(value),
        "string": lambda: isinstance(value, str),
    }
    return checks[kind]()


@dataclass
class _Node:
    """One subschema as the grammar reads it, and how its shortest document is made."""

    schema: Any
    children: list[Path] = field(default_factory=list)  # subschemas read from it ($ref: the target)
    # Ways to make its shortest document: values of its own plus (subschema, times) terms.
    rules: list[tuple[int, list[tuple[Path, int]]]] = field(default_factory=list)


# Keywords a path passes through to a subschema without a nesting level of its own.
_HOPS = frozenset({"properties", "$defs", "definitions", "anyOf", "oneOf", "allOf", "prefixItems"})
# The keywords that narrow one type's values.
TYPE_KEYWORDS = frozenset({*STRING_KEYWORDS, *NUMBER_KEYWORDS, *ARRAY_KEYWORDS, *OBJECT_KEYWORDS})
ALL_TYPES = frozenset(TYPES)


def _depth(path: Path) -> int:
    """A subschema's nesting level, from its path."""
    return sum(1 for index, part in enumerate(path) if part not in _HOPS or path[index - 1] in _HOPS)


class _Vetting:
    """One schema's vetting: a walk over the subschemas xgrammar reads, then two bounded passes."""

    def __init__(self, root: Any, limits: SchemaLimits) -> None:
        self.root = root
        self.limits = limits
        self.nodes: dict[Path, _Node] = {}
        self.refs: dict[Path, Path] = {}  # a $ref node -> its target
        self.one_of: list[Path] = []
        self.properties = 0
        # Rewrites for the grammar: a node's path, keys it loses, and keys it gets.
        self.rewrites: list[tuple[Path, tuple[str, ...], dict[str, Any]]] = []

    def run(self) -> Any:
        pending: list[Path] = [()]
        while pending:
            path = pending.pop()
            if path in self.nodes:
                continue
            depth = _depth(path)
            if depth > self.limits.max_depth:
                raise too_complex(
                    "nesting depth", f"at least {depth}", self.limits.max_depth, "GLMVISION_SCHEMA_MAX_DEPTH"
                )
            node = _Node(self.at(path))
            self.nodes[path] = node
            node.children = list(self.vet(path, node))
            pending.extend(reversed(node.children))
        self.guarded()
        for path in self.one_of:
            self.disjoint(path)
        self.expand()
        self.shortest()
        schema = self.root
        for path, dropped, added in self.rewrites:
            node = {key: value for key, value in self.at(path, schema).items() if key not in dropped}
            schema = _replaced(schema, path, {**node, **added})
        return schema

    def at(self, path: Path, root: Any = None) -> Any:
        value = self.root if root is None else root
        for part in path:
            value = value[part]
        return value

    def vet(self, path: Path, node: _Node) -> Iterator[Path]:
        """Check one node's keywords and limits; yield the subschemas the grammar reads from it."""
        schema = node.schema
        if isinstance(schema, bool):
            if schema:
                node.rules.append((1, []))
            return
        if not isinstance(schema, dict):
            raise invalid(f"The JSON schema at {pointer(path)} is neither an object nor a boolean.")
        for keyword in schema:
            if keyword in UNSUPPORTED or (keyword == "uniqueItems" and schema[keyword] is not False):
                raise unsupported(
                    f"The JSON schema keyword {keyword!r} at {pointer(path)} is not supported: the "
                    "grammar could not enforce it."
                )
        if "$id" in schema and path:
            raise unsupported(f"'$id' at {pointer(path)} is not supported: $refs resolve from the root.")
        head = next((keyword for keyword in APPLICATORS if keyword in schema), None)
        if head is not None:
            yield from self.applicator(path, node, head)
            return
        kinds = self.kinds(schema, path)
        if kinds is None:  # no type: xgrammar takes any JSON value, so nothing may narrow it
            for keyword in schema:
                if keyword in TYPE_KEYWORDS and keyword != "uniqueItems":
                    raise unsupported(
                        f"{keyword!r} at {pointer(path)} needs a 'type' beside it: without one the "
                        "grammar would not enforce it."
                    )
            node.rules.append((1, []))
            return
        if "string" in kinds:
            self.string(schema, path)
        if "integer" in kinds or "number" in kinds:
            self.number(schema, path, kinds)
        if "array" in kinds:
            yield from self.array(schema, path, node)
        if "object" in kinds:
            yield from self.object(schema, path, node)
        if set(kinds) - {"array", "object"}:
            node.rules.append((1, []))

    def kinds(self, schema: dict[str, Any], path: Path) -> list[str] | None:
        """The types a node without an applicator takes, as xgrammar reads them (None: any)."""
        if "type" not in schema:
            if {"properties", "additionalProperties"} & schema.keys():
                return ["object"]
            if {"items", "prefixItems"} & schema.keys():
                return ["array"]
            return None
        kinds = schema["type"]
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not isinstance(kinds, list) or any(kind not in TYPES for kind in kinds):
            raise invalid(f"'type' at {pointer(path)} must be one of {', '.join(TYPES)}, or a list of them.")
        if not kinds:
            raise unsupported(f"'type' at {pointer(path)} is empty: no document satisfies the schema.")
        return list(dict.fromkeys(kinds))

    def applicator(self, path: Path, node: _Node, head: str) -> Iterator[Path]:
        schema = node.schema
        kept = {head, "type"} if head in ("const", "enum") else {head}
        for keyword in schema:
            if keyword not in kept and (
                keyword in TYPE_KEYWORDS or keyword in APPLICATORS or keyword == "type"
            ):
                raise unsupported(
                    f"{keyword!r} beside {head!r} at {pointer(path)} is not supported: the grammar reads "
                    f"only {head!r} there."
                )
        value = schema[head]
        if head == "$ref":
            target = self.resolve(value, path)
            self.refs[path] = target
            node.rules.append((0, [(target, 1)]))
            yield target
        elif head in ("const", "enum"):
            if head == "enum" and not isinstance(value, list):
                raise invalid(f"'enum' at {pointer(path)} must be a list.")
            values = [value] if head == "const" else value
            kinds = self.kinds(schema, path) if "type" in schema else None
            fitting = [one for one in values if kinds is None or any(of_type(one, kind) for kind in kinds)]
            if not fitting:
                raise unsupported(
                    f"No {head!r} value at {pointer(path)} is of its 'type': no document satisfies the "
                    "schema."
                )
            if len(fitting) < len(values):  # the grammar offers only the values that can validate
                self.rewrites.append((path, ("const",), {"enum": fitting}))
            node.rules.append((1, []))
        else:
            if not isinstance(value, list) or not value:
                raise invalid(f"{head!r} at {pointer(path)} must be a non-empty list of schemas.")
            if head == "allOf" and len(value) > 1:
                raise unsupported(
                    f"'allOf' with more than one schema (at {pointer(path)}) is not supported: the "
                    "grammar could not enforce it."
                )
            if head == "oneOf" and len(value) > 1:
                self.one_of.append(path)
            branches = [(*path, head, index) for index in range(len(value))]
            node.rules.extend((0, [(branch, 1)]) for branch in branches)
            yield from branches

    def resolve(self, ref: Any, path: Path) -> Path:
        where = pointer(path)
        if not isinstance(ref, str):
            raise invalid(f"'$ref' at {where} must be a string.")
        if (ref != "#" and not ref.startswith("#/")) or "~" in ref or "%" in ref:
            raise unsupported(f"'$ref' {ref!r} at {where} is not supported: only '#' and '#/...' paths are.")
        value = self.root
        target: list[str | int] = []
        for part in (part for part in ref[2:].split("/") if part):
            if isinstance(value, dict) and part in value:
                value = value[part]
                target.append(part)
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
                target.append(int(part))
            else:
                raise invalid(f"'$ref' {ref!r} at {where} points nowhere in the schema.")
        if not isinstance(value, dict | bool):
            raise invalid(f"'$ref' {ref!r} at {where} does not point to a schema.")
        return tuple(target)

    def count(self, schema: dict[str, Any], path: Path, keyword: str) -> int | None:
        if keyword not in schema:
            return None
        value = schema[keyword]
        if not _is_integer(value) or value < 0:
            raise invalid(f"{keyword!r} at {pointer(path)} must be a non-negative integer.")
        if value > self.limits.max_repeat:
            what = f"{keyword} at {pointer(path)}"
            raise too_complex(what, int(value), self.limits.max_repeat, "GLMVISION_SCHEMA_MAX_REPEAT")
        return int(value)

    def string(self, schema: dict[str, Any], path: Path) -> None:
        least, most = self.count(schema, path, "minLength"), self.count(schema, path, "maxLength")
        if least is not None and most is not None and least > most:
            raise unsupported(f"minLength > maxLength at {pointer(path)}: no string satisfies the schema.")
        lengths = [keyword for keyword in ("minLength", "maxLength") if keyword in schema]
        form = schema.get("format")
        if "format" in schema:
            if not isinstance(form, str) or form not in FORMATS:
                raise unsupported(
                    f"'format' {form!r} at {pointer(path)} is not supported; these are: "
                    f"{', '.join(sorted(FORMATS))}."
                )
            beside = [keyword for keyword in ("pattern", *lengths) if keyword in schema]
            if beside:
                raise unsupported(
                    f"{beside[0]!r} beside 'format' at {pointer(path)} is not supported: the grammar "
                    "enforces only the format."
                )
            if form in FORMAT_PATTERNS:
                self.rewrites.append((path, ("format",), {"pattern": FORMAT_PATTERNS[form]}))
        pattern = schema.get("pattern")
        if "pattern" not in schema:
            return
        if not isinstance(pattern, str):
            raise invalid(f"'pattern' at {pointer(path)} must be a string.")
        if lengths:
            raise unsupported(
                f"{lengths[0]!r} beside 'pattern' at {pointer(path)} is not supported: the grammar "
                "enforces only the pattern (put the length in it)."
            )
        repeat, rewritten = _scan(pattern)
        if rewritten != pattern:
            self.rewrites.append((path, (), {"pattern": rewritten}))
        if repeat > self.limits.max_repeat:
            what = f"largest repetition count in the pattern at {pointer(path)}"
            raise too_complex(what, repeat, self.limits.max_repeat, "GLMVISION_SCHEMA_MAX_REPEAT")

    def number(self, schema: dict[str, Any], path: Path, kinds: list[str]) -> None:
        bounds = {keyword: schema[keyword] for keyword in NUMBER_KEYWORDS[:4] if keyword in schema}
        for keyword, value in bounds.items():
            if not _is_number(value) or not math.isfinite(value):
                raise invalid(f"{keyword!r} at {pointer(path)} must be a number.")
        low, open_low = _bound(bounds, "minimum", "exclusiveMinimum", max)
        high, open_high = _bound(bounds, "maximum", "exclusiveMaximum", min)
        empty = low > high or (low == high and (open_low or open_high))
        if not empty and kinds == ["integer"] and math.isfinite(low) and math.isfinite(high):
            first = math.floor(low) + 1 if open_low else math.ceil(low)
            last = math.ceil(high) - 1 if open_high else math.floor(high)
            empty = first > last
        if empty:
            raise unsupported(
                f"The bounds at {pointer(path)} hold no number: no document satisfies the schema."
            )
        step = schema.get("multipleOf")
        if "multipleOf" not in schema:
            return
        if not _is_number(step) or step <= 0:
            raise invalid(f"'multipleOf' at {pointer(path)} must be a number above 0.")
        fits = kinds == ["integer"] and _is_integer(step) and step <= MULTIPLE_OF_STEP
        if bounds:
            fits = fits and math.isfinite(low) and math.isfinite(high) and high - low <= MULTIPLE_OF_RANGE
        if not fits:
            raise unsupported(
                f"'multipleOf' at {pointer(path)} is supported only for integers, a whole step up to "
                f"{MULTIPLE_OF_STEP}, with no bounds or both at most {MULTIPLE_OF_RANGE} apart."
            )

    def array(self, schema: dict[str, Any], path: Path, node: _Node) -> Iterator[Path]:
        least = self.count(schema, path, "minItems") or 0
        most = self.count(schema, path, "maxItems")
        if most is not None and least > most:
            raise unsupported(f"minItems > maxItems at {pointer(path)}: no array satisfies the schema.")
        prefix = schema.get("prefixItems", [])
        if not isinstance(prefix, list):
            raise invalid(f"'prefixItems' at {pointer(path)} must be a list of schemas.")
        if "items" in schema and not isinstance(schema["items"], dict | bool):
            raise invalid(f"'items' at {pointer(path)} must be a schema (a list of them is 'prefixItems').")
        terms = [((*path, "prefixItems", index), 1) for index in range(len(prefix))]
        yield from (term for term, _ in terms)
        more = max(least - len(prefix), 0)
        if "items" in schema:
            yield (*path, "items")
            if more:
                terms.append(((*path, "items"), more))
            node.rules.append((1, terms))
        else:  # any JSON values: one each
            node.rules.append((1 + more, terms))

    def object(self, schema: dict[str, Any], path: Path, node: _Node) -> Iterator[Path]:
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise invalid(f"'properties' at {pointer(path)} must be an object.")
        self.properties += len(properties)
        if self.properties > self.limits.max_properties:
            what, limit = "number of properties", self.limits.max_properties
            raise too_complex(what, self.properties, limit, "GLMVISION_SCHEMA_MAX_PROPERTIES")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            raise invalid(f"'required' at {pointer(path)} must be a list of property names.")
        required = list(dict.fromkeys(required))
        for name in required:
            if name not in properties:
                raise unsupported(
                    f"Required property {name!r} at {pointer(path)} is not among its 'properties': the "
                    "grammar would not produce it."
                )
        least = self.count(schema, path, "minProperties")
        most = self.count(schema, path, "maxProperties")
        if least is not None and most is not None and least > most:
            raise unsupported(
                f"minProperties > maxProperties at {pointer(path)}: no object satisfies the schema."
            )
        if most is not None and len(required) > most:
            raise unsupported(
                f"More properties are required at {pointer(path)} than maxProperties allows: no "
                "object satisfies the schema."
            )
        extra = schema.get("additionalProperties", True)
        if not isinstance(extra, dict | bool):
            raise invalid(f"'additionalProperties' at {pointer(path)} must be a schema.")
        yield from ((*path, "properties", name) for name in properties)
        if isinstance(extra, dict):
            yield (*path, "additionalProperties")
        node.rules.append((1, [((*path, "properties", name), 1) for name in required]))

    def types(self, path: Path, seen: dict[Path, frozenset[str]], hops: int = 0) -> frozenset[str]:
        """The JSON types a subschema's values can have (an integer is a number too)."""
        if path in seen:
            return seen[path]
        if hops > self.limits.max_depth:
            return ALL_TYPES
        seen[path] = ALL_TYPES  # while a recursion is open, assume anything
        schema = self.nodes[path].schema
        found: frozenset[str] = ALL_TYPES
        if schema is False:
            found = frozenset()
        elif isinstance(schema, dict):
            head = next((keyword for keyword in APPLICATORS if keyword in schema), None)
            if head in ("$ref", "anyOf", "oneOf", "allOf"):
                children = self.nodes[path].children
                found = frozenset().union(*(self.types(child, seen, hops + 1) for child in children))
            elif head in ("const", "enum"):
                values = [schema["const"]] if head == "const" else schema["enum"]
                found = frozenset(kind for kind in TYPES for one in values if of_type(one, kind))
            else:
                kinds = self.kinds(schema, path)
                found = ALL_TYPES if kinds is None else frozenset(kinds)
        if "number" in found:
            found |= {"integer"}
        seen[path] = found
        return found

    def values(self, path: Path, hops: int = 0) -> set[str] | None:
        """A subschema's values when they are a finite set (as canonical JSON), else None."""
        schema = self.nodes[path].schema
        if not isinstance(schema, dict) or hops > self.limits.max_depth:
            return None
        if "$ref" in schema:
            return self.values(self.refs[path], hops + 1)
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            return {_canonical_value(one) for one in values}
        return None

    def tags(self, path: Path) -> dict[str, set[str]]:
        """An object-only subschema's required properties that have a finite set of values."""
        for _ in range(self.limits.max_depth):  # through $refs to the object
            if path not in self.refs:
                break
            path = self.refs[path]
        schema = self.nodes[path].schema
        if not isinstance(schema, dict) or any(keyword in schema for keyword in APPLICATORS):
            return {}
        if self.kinds(schema, path) != ["object"]:
            return {}
        found = {}
        for name in schema.get("required", []):
            values = self.values((*path, "properties", name))
            if values is not None:
                found[name] = values
        return found

    def disjoint(self, path: Path) -> None:
        """A oneOf the grammar can take: no value can match two of its branches (xgrammar reads it
        as anyOf), by their types, their values, or a required property with distinct values."""
        branches = self.nodes[path].children
        values = [self.values(branch) for branch in branches]
        finite = [found for found in values if found is not None]
        if len(finite) == len(values) and sum(map(len, finite)) == len(set().union(*finite)):
            return  # values only, none repeated
        if len(branches) > ONE_OF_BRANCHES:
            raise unsupported(
                f"'oneOf' at {pointer(path)} has {len(branches)} schemas: at most {ONE_OF_BRANCHES} "
                "unless they are distinct const/enum values (or use 'anyOf')."
            )
        seen: dict[Path, frozenset[str]] = {}
        types = [self.types(branch, seen) for branch in branches]
        tags = [self.tags(branch) for branch in branches]
        for one in range(len(branches)):
            for other in range(one):
                if not types[one] & types[other]:
                    continue
                first, second = values[one], values[other]
                if first is not None and second is not None and not first & second:
                    continue
                shared = tags[one].keys() & tags[other].keys()
                if any(not tags[one][name] & tags[other][name] for name in shared):
                    continue
                raise unsupported(
                    f"'oneOf' at {pointer(path)} is supported only when no value can match two of "
                    f"its schemas; branches {other} and {one} may overlap (use 'anyOf')."
                )

    def guarded(self) -> None:
        """Refuse a recursion that reaches itself without entering an object or array (`{"anyOf":
        [{"$ref": "#"}, ...]}`): validators (jsonschema's too) loop on it forever."""
        within: dict[Path, list[Path]] = {}  # a node -> the nodes it is read as, value unchanged
        for path, node in self.nodes.items():
            schema = node.schema
            if isinstance(schema, dict) and any(key in schema for key in ("$ref", "anyOf", "oneOf", "allOf")):
                within[path] = node.children
        entering = {path: 0 for path in within}
        for children in within.values():
            for child in children:
                if child in entering:
                    entering[child] += 1
        free = [path for path, count in entering.items() if count == 0]
        while free:  # peel off nodes no unguarded edge enters: what stays is on a cycle
            path = free.pop()
            del entering[path]
            for child in within[path]:
                if child in entering:
                    entering[child] -= 1
                    if entering[child] == 0:
                        free.append(child)
        if entering:
            raise unsupported(
                f"The schema at {pointer(min(entering, key=len))} refers to itself without an object or "
                "array in between (validators would loop on it)."
            )

    def expand(self) -> None:
        """Count the $refs met expanding the schema inline, each recursion followed once."""
        below: dict[Path, list[Path]] = {}  # from a node, the $refs met before any other $ref

        def refs_below(start: Path) -> list[Path]:
            if start not in below:
                found, stack = [], [start]
                while stack:
                    path = stack.pop()
                    if path in self.refs:
                        found.append(path)
                    else:
                        stack.extend(self.nodes[path].children)
                below[start] = found
            return below[start]

        met = 0
        stack: list[tuple[Path, frozenset[Path]]] = [((), frozenset({()}))]
        while stack:
            start, open_ = stack.pop()
            for ref in refs_below(start):
                met += 1
                if met > self.limits.max_refs:
                    what, limit = "$ref expansion", self.limits.max_refs
                    raise too_complex(what, met, limit, "GLMVISION_SCHEMA_MAX_REFS")
                target = self.refs[ref]
                if target not in open_:
                    stack.append((target, open_ | {target}))

    def shortest(self) -> None:
        """Every subschema's shortest document, in JSON values (Knuth's generalisation of
        Dijkstra's algorithm to grammars); none that is finite, or one too long, is refused."""
        users: dict[Path, list[tuple[int, int]]] = {}
        waiting: list[int] = []
        values: list[int] = []
        owners: list[Path] = []
        for path, node in self.nodes.items():
            for base, terms in node.rules:
                for child, times in terms:
                    users.setdefault(child, []).append((len(values), times))
                owners.append(path)
                values.append(base)
                waiting.append(len(terms))
        cap = self.limits.max_shortest + 1
        heap = [(values[rule], rule) for rule in range(len(values)) if waiting[rule] == 0]
        heapq.heapify(heap)
        sizes: dict[Path, int] = {}
        while heap:
            size, rule = heapq.heappop(heap)
            path = owners[rule]
            if path in sizes:
                continue
            sizes[path] = size
            for user, times in users.get(path, []):
                values[user] = min(values[user] + times * size, cap)
                waiting[user] -= 1
                if waiting[user] == 0:
                    heapq.heappush(heap, (values[user], user))
        # `false` is no document: xgrammar refuses it where it is optional, and it cannot be the root.
        endless = [
            path
            for path, node in self.nodes.items()
            if path not in sizes and (node.schema is not False or not path)
        ]
        if endless:  # the deepest names the recursion or the part best
            raise unsupported(
                f"No finite document satisfies the schema at {pointer(max(endless, key=len))}: a "
                "recursion with no way out, or a required part nothing satisfies."
            )
        where = max(sizes, key=sizes.__getitem__)
        if sizes[where] > self.limits.max_shortest:
            what = f"shortest document at {pointer(where)}, in JSON values,"
            limit = self.limits.max_shortest
            raise too_complex(what, f"over {limit}", limit, "GLMVISION_SCHEMA_MAX_SHORTEST")


def _replaced(schema: Any, path: Path, replacement: Any) -> Any:
    """`schema` with the node at `path` replaced, copying only the containers on the way."""
    if not path:
        return replacement
    head, rest = path[0], path[1:]
    if isinstance(schema, list):
        assert isinstance(head, int)
        return [*schema[:head], _replaced(schema[head], rest, replacement), *schema[head + 1 :]]
    return {**schema, head: _replaced(schema[head], rest, replacement)}


def vet_schema(schema: Any, limits: SchemaLimits) -> Any:
    """The schema as the grammar should compile it; SchemaRefused when it cannot be used."""
    return _Vetting(schema, limits).run()
