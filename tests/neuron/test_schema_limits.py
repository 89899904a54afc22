"""The schema limits, without I/O: what is refused (naming the limit and where) and what
ordinary schemas pass."""

from __future__ import annotations

import json
from typing import Any

import pytest

from helexa.core.errors import ApiError
from helexa.core.wire import ResponseFormat
from helexa.neuron.sampling import output_format
from helexa.neuron.schema_limits import DEFAULT_LIMITS, SchemaLimits, check_schema


def refused(schema: Any, limits: SchemaLimits = DEFAULT_LIMITS) -> str:
    with pytest.raises(ApiError) as info:
        check_schema(json.dumps(schema), limits)
    assert info.value.status == 400 and info.value.code == "schema_too_complex"
    assert info.value.param == "response_format"
    return info.value.message


def test_the_reported_attacks_are_refused_naming_the_limit() -> None:
    huge_array = {"type": "array", "maxItems": 1_000_000_000, "items": {"type": "integer"}}
    assert "maxItems 1000000000 (limit 1000) at schema.maxItems" in refused(huge_array)
    long_string = {"type": "string", "maxLength": 100_000}  # overflowed llama.cpp's stack
    assert "maxLength 100000" in refused(long_string)
    many_values = {"enum": [f"v{i}" for i in range(10_000)]}
    message = refused(many_values)
    assert "10000 alternatives (enum/const values, anyOf/oneOf branches)" in message
    assert "(limit 1000) at schema.enum" in message


def test_counts_add_up_and_nest_through_every_keyword() -> None:
    fields = {f"f{i}": {"type": "string", "maxLength": 1000} for i in range(25)}
    message = refused({"type": "object", "properties": fields})
    assert "repetition counts adding up to 21000 (limit 20000)" in message
    deep = {"type": "array", "items": {"anyOf": [{"type": "string", "minLength": 5000}]}}
    assert "schema.items.anyOf[0].minLength" in refused(deep)


def test_names_are_never_read_as_keywords() -> None:
    """A definition or property named like a keyword is a name: its schema is still walked."""
    sneaky = {
        "$defs": {"maxItems": {"type": "string", "maxLength": 50_000}},
        "$ref": "#/$defs/maxItems",
    }
    assert "schema.$defs.maxItems.maxLength" in refused(sneaky)
    named = {"type": "object", "properties": {"pattern": {"type": "string", "maxLength": 9999}}}
    assert "schema.properties.pattern.maxLength" in refused(named)


def test_pattern_quantifiers_are_counts_and_nested_ones_multiply() -> None:
    assert "pattern quantifier {5000}" in refused({"type": "string", "pattern": "^a{5000}$"})
    message = refused({"type": "string", "pattern": "^((ab){200}c){200}$"})
    assert "a pattern that expands to 80202 repetitions" in message
    # Every spelling llama.cpp's converter reads as a count (these crashed or bloated it).
    for spelled in ("{,100000}", "{ 30000000}", "{0, 5000}", "{2000,}"):
        assert spelled in refused({"type": "string", "pattern": f"^a{spelled}$"}), spelled
    assert "{5000}" in refused({"type": "string", "pattern": "\\\\{5000}"})  # \\ then {5000}
    # In sequence they add up: an ordinary email pattern is fine.
    email = r"^[a-z0-9._%+-]{1,64}@[a-z0-9.-]{1,255}\.[a-z]{2,63}$"
    check_schema(json.dumps({"type": "string", "pattern": email}))
    check_schema(json.dumps({"type": "string", "pattern": r"^\d{3}-\d{4}$"}))
    check_schema(json.dumps({"type": "string", "pattern": r"^\{literal\}[{]{2}$"}))


def test_branches_count_as_alternatives_and_optional_properties_are_bounded() -> None:
    branches = {"anyOf": [{"type": "string", "pattern": f"^w{i}$"} for i in range(1001)]}
    assert "1001 alternatives" in refused(branches)
    optional = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(201)}}
    assert "201 optional properties in one object (limit 200)" in refused(optional)
    required = {**optional, "required": [f"p{i}" for i in range(201)]}
    check_schema(json.dumps(required))


def test_depth_properties_and_size() -> None:
    nested: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        nested = {"type": "array", "items": nested}
    assert "schemas nested 33 deep (limit 32)" in refused(nested)
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5001)}}
    assert "5001 properties (limit 5000)" in refused(wide)
    big = {"type": "string", "description": "x" * 300_000}
    assert "a schema of" in refused(big)
    assert "limit 10" in refused({"enum": list(range(11))}, SchemaLimits(enum_values=10))


def test_ordinary_schemas_pass() -> None:
    schemas: list[dict[str, Any]] = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 200},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 20},
                "kind": {"enum": ["a", "b", "c"]},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
            },
            "required": ["name"],
            "additionalProperties": False,
            "examples": [{"name": "x" * 10}],
        },
        {"type": "array", "maxItems": 1000, "items": {"type": "integer"}},
        {"$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}}},
        {"enum": [f"value-{i}" for i in range(1000)]},
        {"type": "object", "properties": {"maxItems": {"const": 3}}},
        {"type": "string", "maxLength": 1e3},
    ]
    for schema in schemas:
        check_schema(json.dumps(schema))


def test_output_format_applies_the_limits() -> None:
    fmt = ResponseFormat.model_validate(
        {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "string", "maxLength": 10**6}},
        }
    )
    with pytest.raises(ApiError) as info:
        output_format(fmt)
    assert info.value.code == "schema_too_complex"
