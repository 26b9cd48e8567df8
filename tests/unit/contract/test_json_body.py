"""A body's JSON within bounds (``contract/json_body.py``): the value count never
undercounts, a body over the bounds is refused before it is parsed, and validation stops
at the first bad item of a list, so its error report is small whatever the body holds."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.contract.errors import ErrorCode, InvalidField, PayloadTooLarge
from service.contract.inference_protocol import InferRequest
from service.contract.json_body import (
    JSON_BYTES_PER_VALUE,
    JSON_MAX_KEYS,
    JSON_MAX_VALUES,
    json_object,
)
from service.contract.request_parsing import parse_explain_request
from service.contract.requests import ExplainRequest
from service.pipeline.protocol import parse_infer_request

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=60,
)


def _values(data: Any) -> int:
    if isinstance(data, dict):
        return 1 + sum(_values(v) for v in data.values())
    if isinstance(data, list):
        return 1 + sum(_values(v) for v in data)
    return 1


@pytest.mark.slow  # 300 hypothesis examples: seconds
@settings(max_examples=300, deadline=None)
@given(JSON)
def test_the_count_on_the_bytes_is_never_below_the_values_parsed(data: Any) -> None:
    for body in (orjson.dumps({"x": data}), json.dumps({"x": data}, indent=1).encode()):
        reserved: list[int] = []
        json_object(body, reserved.append)
        assert reserved[0] >= _values(orjson.loads(body)) * JSON_BYTES_PER_VALUE


def _items(count: int, item: bytes = b"0") -> bytes:
    return b'{"images": ["AAAA",' + b",".join([item] * count) + b"]}"


def test_a_million_items_are_refused_before_parsing() -> None:
    reserved: list[int] = []
    with pytest.raises(PayloadTooLarge) as refused:
        json_object(_items(10**6), reserved.append)
    assert refused.value.code == ErrorCode.JSON_TOO_COMPLEX
    assert "1000003" in refused.value.message and str(JSON_MAX_VALUES) in refused.value.message
    assert reserved == []  # nothing reserved, nothing parsed


def test_the_parse_is_reserved_first_and_a_refusal_stops_it() -> None:
    def refuse(bytes_: int) -> None:
        raise PayloadTooLarge("no room", code=ErrorCode.OVER_MEMORY_BUDGET)

    # Not JSON at all: had it been parsed, this would be a 400.
    with pytest.raises(PayloadTooLarge):
        json_object(b"[" * 10 + b"{nope", refuse)


def test_an_object_of_too_many_keys_is_refused_at_any_depth() -> None:
    keys = {f"k{i}": 0 for i in range(JSON_MAX_KEYS + 1)}
    for body in ({"images": ["A"], **keys}, {"images": [{"dicomweb": keys}]}):
        with pytest.raises(PayloadTooLarge) as refused:
            json_object(orjson.dumps(body))
        assert refused.value.code == ErrorCode.JSON_TOO_COMPLEX
    assert json_object(orjson.dumps({f"k{i}": 0 for i in range(JSON_MAX_KEYS)}))


@pytest.mark.parametrize(
    "body",
    [
        _items(JSON_MAX_VALUES // 2),  # images[1] on: numbers, not strings
        _items(JSON_MAX_VALUES // 3, b"{}"),
        b'{"images": ["A"], "targets": [' + b",".join([b"[1.5]"] * 30_000) + b"]}",
        b'{"images": ["A"], "targets": [[' + b",".join([b'"x"', b"1.5"] * 30_000) + b"]]}",
        b'{"images": ["A"], "frame": [' + b",".join([b"-1"] * 60_000) + b"]}",
        b'{"images": ["A"], "include": [' + b",".join([b'"nope"'] * 60_000) + b"]}",
    ],
    ids=["numbers", "objects", "float targets", "float labels", "frames", "include"],
)
def test_a_list_of_bad_items_reports_a_few_problems_not_one_each(body: bytes) -> None:
    with pytest.raises(ValidationError) as refused:
        ExplainRequest.model_validate(json_object(body))
    assert refused.value.error_count() < 10
    with pytest.raises(InvalidField, match=r"^Field '(images|targets|frame|include)"):
        parse_explain_request(body)


_IMAGE = {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["A"]}


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": [{"name": 1}] * 20_000},
        {"inputs": [{**_IMAGE, "shape": [-1] * 20_000}]},
        {"inputs": [_IMAGE], "outputs": [{"nom": 1}] * 20_000},
        {"inputs": [_IMAGE], "parameters": {f"p{i}": [i] for i in range(JSON_MAX_KEYS)}},
    ],
    ids=["inputs", "shape", "outputs", "parameters"],
)
def test_protocol_lists_and_parameters_stop_at_their_first_problem(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as refused:
        InferRequest.model_validate(json_object(orjson.dumps(body)))
    assert refused.value.error_count() < 10
    with pytest.raises(InvalidField):
        parse_infer_request(orjson.dumps(body))


def test_many_valid_values_still_parse() -> None:
    # Thousands of repeated targets are a valid request: each class is explained once.
    body = {"images": ["A"], "targets": [[0, 1, 2, 3] * 5000]}
    assert parse_explain_request(orjson.dumps(body)).targets == [[0, 1, 2, 3] * 5000]
