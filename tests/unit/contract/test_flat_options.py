"""The image doors' options: query parameters (or a form's options object) make the
request a JSON body with the same options makes, and bad ones meet the JSON door's errors."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from service.contract.errors import InvalidField
from service.contract.flat_options import (
    QUERY_FIELDS,
    QUERY_NAMES,
    flat_request,
    query_fields,
    refuse_query_beside_json,
)
from service.contract.request_parsing import parse_explain_request
from service.contract.requests import ExplainRequest, HeatmapOptions

IMAGE = b"\x89PNG not really"


def _same_as_json(made: ExplainRequest, fields: dict[str, Any], images: list[bytes]) -> None:
    """``made`` equals the JSON door's request of ``fields``, its images aside."""
    body = {**fields, "images": [base64.b64encode(i).decode() for i in images]}
    parsed = parse_explain_request(orjson.dumps(body))
    assert made.model_dump(exclude={"images"}) == parsed.model_dump(exclude={"images"})
    assert made.images == images


def test_every_parameter_lands_on_its_field() -> None:
    query = {
        "model": ["phantom"],
        "method": ["layercam"],
        "layer": ["features.3"],
        "top_k": ["2"],
        "frame": ["4"],
        "format": ["overlay"],
        "size": ["input"],
        "encoding": ["webp"],
        "target": ["tube"],
    }
    assert set(query) == set(QUERY_NAMES)
    made = flat_request([IMAGE], query)
    _same_as_json(
        made,
        {
            "model": "phantom",
            "method": "layercam",
            "layer": "features.3",
            "top_k": 2,
            "frame": 4,
            "heatmap": {"format": "overlay", "size": "input", "encoding": "webp"},
            "targets": ["tube"],
        },
        [IMAGE],
    )
    # Only what the query names is set: defaults stay defaults, and the picture rule can
    # tell a named format from the default one.
    assert flat_request([IMAGE], {"size": ["layer"]}).heatmap.model_fields_set == {"size"}


def test_each_mapped_field_exists_in_the_request() -> None:
    fields = {
        "": set(ExplainRequest.model_fields),
        "heatmap": set(HeatmapOptions.model_fields),
    }
    for path in QUERY_FIELDS.values():
        parent = path[0] if len(path) > 1 else ""
        assert path[-1] in fields[parent], path


@pytest.mark.parametrize(
    "values,target",
    [(["3"], 3), (["tube"], "tube"), (["nodule", "0"], ["nodule", 0]), (["-1"], -1)],
)
def test_a_target_is_every_images_class_or_classes(values: list[str], target: Any) -> None:
    made = flat_request([IMAGE, IMAGE], {"target": values})
    assert made.targets == [target, target]
    assert query_fields({}, 2) == {}


def test_an_unknown_parameter_is_named_with_its_close_matches() -> None:
    with pytest.raises(InvalidField) as raised:
        flat_request([IMAGE], {"topk": ["3"]})
    error = raised.value
    assert error.field == "topk" and error.suggestions == ["top_k"]
    assert "Did you mean 'top_k'?" in error.message and "target" in error.message


def test_a_parameter_given_twice_is_refused() -> None:
    with pytest.raises(InvalidField) as raised:
        flat_request([IMAGE], {"method": ["gradcam", "layercam"]})
    assert raised.value.field == "method" and "2 times" in raised.value.message


@pytest.mark.parametrize(
    "query,field,told",
    [
        ({"top_k": ["abc"]}, "top_k", "Query parameter 'top_k': Input should be a valid integer"),
        (
            {"top_k": ["0"]},
            "top_k",
            "Query parameter 'top_k': 0 is out of range: it must be a whole number of at least 1",
        ),
        ({"format": ["ovrlay"]}, "heatmap.format", "Query parameter 'format' (heatmap.format)"),
        ({"size": ["big"]}, "heatmap.size", "Query parameter 'size' (heatmap.size)"),
        ({"model": [""]}, "model", "Query parameter 'model': String should have at least"),
        ({"frame": ["1.5"]}, "frame", "Query parameter 'frame'"),
    ],
)
def test_bad_values_meet_the_json_doors_errors(
    query: dict[str, list[str]], field: str, told: str
) -> None:
    with pytest.raises(InvalidField) as raised:
        flat_request([IMAGE], query)
    assert raised.value.field == field
    assert raised.value.message.startswith(told), raised.value.message
    # The same field, and the same sentence after the name, as the JSON door's.
    fields = query_fields(query, 1)
    with pytest.raises(InvalidField) as json_door:
        parse_explain_request(orjson.dumps({**fields, "images": ["aGk="]}))
    assert json_door.value.field == field
    assert raised.value.message.split(": ", 1)[1] == json_door.value.message.split(": ", 1)[1]


def test_a_forms_options_object_is_the_json_bodys_fields() -> None:
    options = {"targets": ["tube", ["nodule", 2]], "top_k": 1, "heatmap": {"format": "gray"}}
    made = flat_request([IMAGE, b"second"], {}, options)
    _same_as_json(made, options, [IMAGE, b"second"])
    with pytest.raises(InvalidField) as raised:
        flat_request([IMAGE], {}, {"target": "tube"})
    assert raised.value.field == "target" and raised.value.suggestions == ["targets"]


def test_options_come_from_one_place_and_hold_no_images() -> None:
    with pytest.raises(InvalidField) as raised:
        flat_request([IMAGE], {"top_k": ["1"]}, {"top_k": 2})
    assert raised.value.field == "options" and "top_k" in raised.value.message
    with pytest.raises(InvalidField) as raised:
        flat_request([IMAGE], {}, {"images": ["aGk="]})
    assert raised.value.field == "images"


def test_a_query_beside_a_json_body_is_refused_not_ignored() -> None:
    refuse_query_beside_json({})
    with pytest.raises(InvalidField) as raised:
        refuse_query_beside_json({"format": ["overlay"]})
    assert raised.value.field == "format" and "JSON body" in raised.value.message
