"""`adapters.schema_instance`: the echo model's structured output validates against the schema
it was asked for (checked by the `jsonschema` validator, over schemas hypothesis generates
and over the schemas pydantic emits), the same every time, and bounded on hostile schemas."""

from __future__ import annotations

import enum
import time
from typing import Any, Literal

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from adapters.schema_instance import pattern_string, schema_instance

VALIDATOR = jsonschema.Draft202012Validator
FORMATS = ["date-time", "date", "time", "email", "hostname", "ipv4", "ipv6", "uri", "uuid"]
PATTERNS = [
    r"^[A-Z]{2}-\d{3}$",
    r"^(foo|bar)+$",
    r"\w+@\w+\.com",
    r"^[a-f0-9]{8}$",
    r"^\+?[0-9 ]{7,15}$",
    r"^(?:https?)://[^ ]+$",
]
NAMES = st.text("abcdefgh_", min_size=1, max_size=6)
SCALARS = st.none() | st.booleans() | st.integers(-100, 100) | st.text(max_size=5)


def assert_valid(schema: Any, instance: Any) -> None:
    VALIDATOR(schema, format_checker=VALIDATOR.FORMAT_CHECKER).validate(instance)


@st.composite
def integers(draw: st.DrawFn) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    step = draw(st.none() | st.integers(1, 7))
    low = draw(st.none() | st.integers(-1000, 1000))
    width = draw(st.integers(step or 1, 2000))
    if step:
        schema["multipleOf"] = step
    if low is not None:
        schema[draw(st.sampled_from(["minimum", "exclusiveMinimum"]))] = low
    if draw(st.booleans()):
        top = (low if low is not None else draw(st.integers(-1000, 1000))) + width + 1
        schema[draw(st.sampled_from(["maximum", "exclusiveMaximum"]))] = top
    return schema


@st.composite
def numbers(draw: st.DrawFn) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "number"}
    low = draw(st.floats(-1e6, 1e6))
    width = draw(st.floats(0.01, 1e3))
    if draw(st.booleans()):
        schema[draw(st.sampled_from(["minimum", "exclusiveMinimum"]))] = low
    if draw(st.booleans()):
        schema[draw(st.sampled_from(["maximum", "exclusiveMaximum"]))] = low + width
    return schema


@st.composite
def strings(draw: st.DrawFn) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    shape = draw(st.sampled_from(["lengths", "format", "pattern"]))
    if shape == "format":
        schema["format"] = draw(st.sampled_from(FORMATS))
    elif shape == "pattern":
        schema["pattern"] = draw(st.sampled_from(PATTERNS))
    else:
        least = draw(st.integers(0, 30))
        if draw(st.booleans()):
            schema["minLength"] = least
        if draw(st.booleans()):
            schema["maxLength"] = least + draw(st.integers(0, 10))
    return schema


LEAVES = (
    st.sampled_from([{"type": "null"}, {"type": "boolean"}, {}, True])
    | integers()
    | numbers()
    | strings()
    | st.lists(SCALARS, min_size=1, max_size=4).map(lambda values: {"enum": values})
    | SCALARS.map(lambda value: {"const": value})
    | strings().map(lambda schema: {**schema, "type": ["string", "null"]})
)


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.builds(
            _object,
            st.dictionaries(NAMES, children, max_size=4),
            st.data(),
            st.booleans(),
        )
        | st.builds(_array, children, st.integers(0, 3), st.integers(0, 3))
        | children.map(lambda child: {"anyOf": [child, {"type": "null"}]})
        | st.builds(
            lambda child: {"oneOf": [child, {"type": "string"}]},
            st.builds(
                _object, st.dictionaries(NAMES, children, max_size=3), st.data(), st.just(False)
            ),
        )
        | st.tuples(children, children).map(lambda pair: {"allOf": [pair[0]], "anyOf": [pair[0]]})
    )


def _object(properties: dict[str, Any], data: st.DataObject, closed: bool) -> dict[str, Any]:
    required = (
        data.draw(st.lists(st.sampled_from(sorted(properties)), unique=True)) if properties else []
    )
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    if closed:
        schema["additionalProperties"] = False
    return schema


def _array(items: Any, least: int, extra: int) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": least, "maxItems": least + extra}


SCHEMAS = st.recursive(LEAVES, containers, max_leaves=12)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """A schema whose parts may be `$ref`s to `$defs`, as pydantic writes nested models."""
    defs = draw(st.dictionaries(NAMES, SCHEMAS, max_size=3))
    refs = [{"$ref": f"#/$defs/{name}"} for name in defs]
    leaves = LEAVES | st.sampled_from(refs) if refs else LEAVES
    body = draw(st.recursive(leaves, containers, max_leaves=12))
    return {"$defs": defs, **body} if isinstance(body, dict) else body


@settings(max_examples=400, deadline=None)
@given(schema=documents(), text=st.text(max_size=20))
def test_instances_validate_against_generated_schemas(schema, text):
    instance = schema_instance(schema, text)
    assert_valid(schema, instance)
    assert schema_instance(schema, text) == instance


@given(pattern=st.sampled_from(PATTERNS))
def test_simple_patterns_are_matched(pattern):
    assert pattern_string(pattern) is not None


def test_unique_items_differ():
    for items in ({"type": "string"}, {"type": "integer", "maximum": 3}, {"enum": ["a", "b", "c"]}):
        schema = {"type": "array", "items": items, "minItems": 3, "uniqueItems": True}
        assert_valid(schema, schema_instance(schema, "word"))


# --- the schemas pydantic emits -----------------------------------------------------------


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    street: str
    city: str = Field(min_length=2, max_length=40)
    postcode: str = Field(pattern=r"^\d{5}$")


class Person(BaseModel):
    name: str
    age: int = Field(ge=18, le=130)
    height: float = Field(gt=0.5, lt=2.5)
    email: str | None = None
    favourite: Colour
    role: Literal["admin", "user"]
    tags: list[str] = Field(min_length=2)
    address: Address
    previous: list[Address] = []
    scores: dict[str, int] = {}


class Tree(BaseModel):
    label: str
    children: list[Tree] = []


@pytest.mark.parametrize("model", [Person, Address, Tree])
def test_pydantic_models_accept_the_instance(model):
    schema = model.model_json_schema()
    instance = schema_instance(schema, "Ada")
    assert_valid(schema, instance)
    model.model_validate(instance)


def test_strings_echo_the_text():
    instance = schema_instance(Person.model_json_schema(), "Ada")
    assert instance["name"] == "Ada" and instance["address"]["postcode"] == "00000"


# --- bounded: the schema is the client's ----------------------------------------------------


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "items": {"type": "string"}, "minItems": 10**9},
        {
            "$defs": {
                "a": {
                    "type": "object",
                    "properties": {"a": {"$ref": "#/$defs/a"}},
                    "required": ["a"],
                }
            },
            "$ref": "#/$defs/a",
        },
        {"$ref": "#"},
        {"type": "string", "minLength": 10**9},
        {"type": "string", "pattern": "a{1000000000}"},
        {"type": "object", "minProperties": 10**9},
        {
            "type": "array",
            "items": {"type": "array", "items": {"type": "array", "minItems": 64}, "minItems": 64},
            "minItems": 64,
        },
    ],
)
def test_hostile_schemas_end_quickly(schema):
    started = time.perf_counter()
    schema_instance(schema, "x" * 10_000)
    assert time.perf_counter() - started < 1


JSON = st.recursive(
    SCALARS | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "properties",
                    "required",
                    "items",
                    "prefixItems",
                    "enum",
                    "const",
                    "anyOf",
                    "oneOf",
                    "allOf",
                    "$ref",
                    "format",
                    "pattern",
                    "minItems",
                    "maxItems",
                    "minimum",
                    "maximum",
                    "multipleOf",
                    "minLength",
                    "maxLength",
                    "additionalProperties",
                    "minProperties",
                    "exclusiveMinimum",
                    "uniqueItems",
                    "x",
                ]
            )
            | st.text(max_size=3),
            inner,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(schema=JSON)
def test_any_json_as_a_schema_gives_an_instance(schema):
    # The client's schema may be nonsense: the walk still ends with a value, never raises.
    schema_instance(schema, "text")
