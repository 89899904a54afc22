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
# A regex quantifier as llama.cpp's converter reads it: {n}, {n,}, {,m}, {n,m}, spaces allowed.
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:(,)\s*(\d*)\s*)?\}")
_HUGE = 10**12  # counts beyond any limit: kept small so the arithmetic stays cheap


def pattern_expansion(pattern: str) -> tuple[tuple[int, str], int]:
    """((the largest quantifier count, its text), the pattern's size once every quantifier
    is written out). Quantifiers in sequence add up and nested ones multiply, as the GBNF
    converter expands them: ``\\d{3}-\\d{4}`` is 8, ``((ab){100}c){100}`` 20 100."""
    groups = [[0, 0]]  # per open group: [size so far, size of its last atom]
    largest = (0, "")
    i = 0
    while i < len(pattern):
        char = pattern[i]
        atom = 1
        if char == "\\":
            i += 2
        elif char == "[":  # a class is one atom, whatever braces it holds
            j = i + 1
            j += pattern.startswith("^", j)
            j += pattern.startswith("]", j)
            while j < len(pattern) and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i = j + 1
        elif char == "(":
            groups.append([0, 0])
            i += 1
            continue
        elif char == ")" and len(groups) > 1:
            atom = max(groups.pop()[0], 1)
            i += 1
        elif char == "|":  # alternatives: their sizes add up (an upper bound)
            groups[-1][1] = 0
            i += 1
            continue
        elif (
            char == "{"
            and (match := _QUANTIFIER.match(pattern, i))
            and (match.group(1) or match.group(3))
        ):
            low = int(match.group(1) or 0)
            high = match.group(3)
            bound = min(int(high) if high else low, _HUGE)
            largest = max(largest, (bound, match.group(0)))
            top = groups[-1]
            top[0] = min(top[0] + top[1] * (max(bound, 1) - 1), _HUGE)
            top[1] = min(top[1] * max(bound, 1), _HUGE)
            i = match.end()
            continue
        else:
            i += 1
        top = groups[-1]
        top[0] = min(top[0] + atom, _HUGE)
        top[1] = atom
    while len(groups) > 1:  # unbalanced: fold what is open into its parent
        size = groups.pop()[0]
        groups[-1][0] = min(groups[-1][0] + size, _HUGE)
    return largest, groups[0][0]


@dataclass(frozen=True)
class SchemaLimits:
    schema_bytes: int = 256 * 1024  # the schema as compact JSON
    depth: int = 32  # nested schema objects
    count: int = 1_000  # any one repetition count (maxItems, maxLength, {n} in a pattern, …)
    total_count: int = 20_000  # all repetition counts together
    # enum / const values and anyOf / oneOf branches in the whole schema: every decoding step
    # tests the vocabulary against each live alternative (≈0.4 s a step at 1 000 on a CPU)
    enum_values: int = 1_000
    # properties an object may leave out: the GBNF converter's rules for them grow with the
    # square of their number (980 took 1.5 s of Python)
    optional_properties: int = 200
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
        (bound, quantifier), size = pattern_expansion(pattern)
        if bound > self.limits.count:
            raise _too_big(f"pattern quantifier {quantifier}", self.limits.count, where)
        if size > self.limits.total_count:
            raise _too_big(
                f"a pattern that expands to {size} repetitions", self.limits.total_count, where
            )
        self.count(max(size - len(pattern), 0), "pattern", where)

    def alternatives(self, count: int, where: str, text_bytes: int = 0) -> None:
        """``count`` more ways the document may go here; ``text_bytes`` of literal values."""
        self.enum_values += count
        if self.enum_values > self.limits.enum_values:
            raise _too_big(
                f"{self.enum_values} alternatives (enum/const values, anyOf/oneOf branches)",
                self.limits.enum_values,
                where,
            )
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
                self.alternatives(len(value), at, _json_size(value))
            elif keyword == "const":
                self.alternatives(1, at, _json_size(value))
            elif keyword in ("anyOf", "oneOf") and isinstance(value, list):
                self.alternatives(len(value), at)
                self.node(value, at, depth + 1)
            elif keyword in _NAMED_SCHEMAS and isinstance(value, dict):
                if keyword in ("properties", "patternProperties"):
                    self.properties += len(value)
                    if self.properties > self.limits.properties:
                        raise _too_big(f"{self.properties} properties", self.limits.properties, at)
                if keyword == "properties":
                    required = node.get("required")
                    required = set(required) if isinstance(required, list) else set()
                    optional = sum(1 for name in value if name not in required)
                    if optional > self.limits.optional_properties:
                        raise _too_big(
                            f"{optional} optional properties in one object",
                            self.limits.optional_properties,
                            at,
                        )
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
