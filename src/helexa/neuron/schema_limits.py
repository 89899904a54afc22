"""What one ``response_format`` schema may ask of the grammar builders (pure, no I/O).

Both engines turn counts into grammar: llama.cpp's GBNF writes ``maxItems: n`` out as ``n``
nested optional items (≈21 bytes each; ``maxLength``: 8) and parses them recursively, so a
count of 10⁵ overflows its stack and 10⁹ exhausts memory; llguidance builds lexer states per
count and per enum value. So the schema is measured before anything is built, on the JSON
tree as sent (``$ref`` targets are counted where they are defined, never expanded, so a
chain of references cannot multiply the walk), and refused with a 400 naming the limit.

The figures follow OpenAI's structured-output limits where it has them (5 000 properties,
1 000 enum values) and otherwise keep the worst accepted schema compiling in well under a
second on one core: each count ≤ 1 000 (llama.cpp itself refuses deeper repetition), all
counts together ≤ 20 000.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from helexa.core.errors import ApiError, bad_request

# Keywords whose value becomes a repetition count in the grammar.
COUNT_KEYWORDS = (
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "minProperties",
    "maxProperties",
    "minContains",
    "maxContains",
)
# Keywords holding a map of name → schema.
_NAMED_SCHEMAS = (
    "properties",
    "patternProperties",
    "$defs",
    "definitions",
    "dependentSchemas",
)
# A regex quantifier {n}, {n,} or {n,m} (its counts are repetitions too).
_QUANTIFIER = re.compile(r"(?<!\\)\{(\d+)(?:,(\d*))?\}")


@dataclass(frozen=True)
class SchemaLimits:
    schema_bytes: int = 256 * 1024  # the schema as compact JSON
    depth: int = 32  # nested schema objects
    count: int = 1_000  # any one repetition count (maxItems, maxLength, {n} in a pattern, …)
    total_count: int = 20_000  # all repetition counts together
    enum_values: int = 1_000  # enum / const values in the whole schema
    enum_bytes: int = 64 * 1024  # those values as JSON text
    properties: int = 5_000  # property names in the whole schema
    pattern_bytes: int = 4 * 1024  # one regex pattern


DEFAULT_LIMITS = SchemaLimits()


def _too_big(what: str, limit: int, where: str) -> ApiError:
    return bad_request(
        f"response_format schema is too large to enforce: {what} (limit {limit}) at {where}",
        param="response_format",
        code="schema_too_complex",
    )


class _Walk:
    def __init__(self, limits: SchemaLimits) -> None:
        self.limits = limits
        self.total_count = 0
        self.enum_values = 0
        self.enum_bytes = 0
        self.properties = 0

    def count(self, value: Any, keyword: str, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return  # not a count: the grammar builder reports it
        if value > self.limits.count:
            shown = int(value) if float(value).is_integer() else value
            raise _too_big(f"{keyword} {shown}", self.limits.count, where)
        self.total_count += max(int(value), 0)
        if self.total_count > self.limits.total_count:
            raise _too_big(
                f"repetition counts adding up to {self.total_count}",
                self.limits.total_count,
                where,
            )

    def pattern(self, pattern: Any, where: str) -> None:
        if not isinstance(pattern, str):
            return
        if len(pattern.encode()) > self.limits.pattern_bytes:
            raise _too_big(
                f"a pattern of {len(pattern.encode())} bytes", self.limits.pattern_bytes, where
            )
        # Nested quantifiers multiply: (a{100}){100} is 10 000 repetitions.
        product = 1
        for match in _QUANTIFIER.finditer(pattern):
            low, high = match.group(1), match.group(2)
            bound = int(high) if high else int(low)
            self.count(bound, f"pattern quantifier {match.group(0)}", where)
            product *= max(bound, 1)
            if product > self.limits.total_count:
                raise _too_big(
                    f"pattern quantifiers multiplying to {product}",
                    self.limits.total_count,
                    where,
                )

    def values(self, values: list[Any], where: str, text_bytes: int) -> None:
        self.enum_values += len(values)
        if self.enum_values > self.limits.enum_values:
            raise _too_big(f"{self.enum_values} enum/const values", self.limits.enum_values, where)
        self.enum_bytes += text_bytes
        if self.enum_bytes > self.limits.enum_bytes:
            raise _too_big(
                f"enum/const values of {self.enum_bytes} bytes", self.limits.enum_bytes, where
            )

    def node(self, node: Any, where: str, depth: int) -> None:
        if isinstance(node, list):
            for index, item in enumerate(node):
                self.node(item, f"{where}[{index}]", depth)
            return
        if not isinstance(node, dict):
            return
        if depth > self.limits.depth:
            raise _too_big(f"schemas nested {depth} deep", self.limits.depth, where)
        for keyword, value in node.items():
            at = f"{where}.{keyword}"
            if keyword in COUNT_KEYWORDS:
                self.count(value, keyword, at)
            elif keyword == "pattern":
                self.pattern(value, at)
            elif keyword == "enum" and isinstance(value, list):
                self.values(value, at, _json_size(value))
            elif keyword == "const":
                self.values([value], at, _json_size(value))
            elif keyword in _NAMED_SCHEMAS and isinstance(value, dict):
                if keyword in ("properties", "patternProperties"):
                    self.properties += len(value)
                    if self.properties > self.limits.properties:
                        raise _too_big(f"{self.properties} properties", self.limits.properties, at)
                if keyword == "patternProperties":
                    for pattern in value:
                        self.pattern(pattern, at)
                # Names are names, even one spelled "maxItems": only their schemas are walked.
                for name, sub in value.items():
                    self.node(sub, f"{at}.{name}", depth + 1)
            elif keyword in ("default", "examples", "description", "title", "$comment"):
                continue  # annotations: never part of the grammar
            else:
                # $defs, items, anyOf, … : every nested schema, one level deeper.
                self.node(value, at, depth + 1)


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def check_schema(schema_json: str, limits: SchemaLimits = DEFAULT_LIMITS) -> None:
    """Raise a 400 ``schema_too_complex`` naming the first limit ``schema_json`` exceeds."""
    size = len(schema_json.encode())
    if size > limits.schema_bytes:
        raise _too_big(f"a schema of {size} bytes", limits.schema_bytes, "schema")
    _Walk(limits).node(json.loads(schema_json), "schema", 1)
