"""How a request's problems are told (``invalid_field``): every problem (the first few
whole, then how many more), one per field whichever union member reported it, numbers
out of range with their range, a misspelt field as the misspelling."""

from __future__ import annotations

import pytest

from service.contract.errors import InvalidField
from service.contract.request_parsing import parse_explain_request


def _refused(body: bytes) -> InvalidField:
    with pytest.raises(InvalidField) as refused:
        parse_explain_request(body)
    return refused.value


def test_a_misspelt_required_field_is_one_problem() -> None:
    """{"image": ...} is the missing "images": one problem, not "(and 1 more)"."""
    error = _refused(b'{"image": ["aGk="]}')
    assert error.message == "Field 'image': unknown field. Did you mean 'images'?"
    assert error.field == "image" and error.suggestions == ["images"]


def test_every_problem_is_told_each_whole() -> None:
    error = _refused(b'{"imges": ["aGk="], "top_k": 0, "method": "gradcm"}')
    assert error.message == (
        "Field 'imges': unknown field. Did you mean 'images'? "
        "Also, field 'method': Input should be 'gradcam', 'gradcam++', 'xgradcam', "
        "'layercam' or 'hirescam'. Did you mean 'gradcam', 'xgradcam' or 'gradcam++'? "
        "Also, field 'top_k': 0 is out of range: it must be a whole number of at least 1."
    )
    assert error.field == "imges" and error.suggestions == ["images"]


def test_past_three_problems_the_rest_are_counted() -> None:
    body = b'{"images": ["aGk="], "top_k": 0, "frame": -1, "colour": 1, "method": 3, "layer": 2}'
    error = _refused(body)
    assert error.message.count("Field") + error.message.count("field '") == 3
    assert error.message.endswith(" And 2 more problem(s).")


@pytest.mark.parametrize(
    "body, field, told",
    [
        (
            b'{"images": ["aGk="], "top_k": 1000000000000000000000000000000}',
            "top_k",
            "1e+30 is out of range: it must be a whole number of at least 1.",
        ),
        (
            b'{"images": ["aGk="], "frame": [2, -1]}',
            "frame[1]",
            "-1 is out of range: it must be a whole number of at least 0.",
        ),
        (
            b'{"images": ["aGk="], "frame": 1e25}',
            "frame",
            "1e+25 is out of range: it must be a whole number of at least 0.",
        ),
    ],
)
def test_a_number_out_of_range_says_the_range(body: bytes, field: str, told: str) -> None:
    error = _refused(body)
    assert error.field == field and error.message == f"Field '{field}': {told}"


def test_a_union_is_told_by_the_member_that_got_furthest() -> None:
    """An image is a string or a DICOMweb reference: an object is told as a reference
    (each of its problems), not as "Input should be a valid string"."""
    error = _refused(
        b'{"images": [{"dicomweb": {"url": 3, "study": "1", "series": "1", "instance": 4}}]}'
    )
    assert error.message == (
        "Field 'images[0].dicomweb.url': Input should be a valid string. "
        "Also, field 'images[0].dicomweb.instance': Input should be a valid string."
    )
    assert error.image == 0


def test_a_wrong_method_names_the_valid_ones_and_the_nearest() -> None:
    error = _refused(b'{"images": ["aGk="], "method": "grad-cam"}')
    assert "'gradcam', 'gradcam++', 'xgradcam', 'layercam' or 'hirescam'" in error.message
    assert error.suggestions and error.suggestions[0] == "gradcam"


def test_a_problem_of_the_whole_body_is_told_as_the_body() -> None:
    """A rule across fields (a model validator) reports no place: "body"."""
    error = _refused(b'{"images": ["aGk="], "store": {"url": "http://pacs/"}}')
    assert error.field == "body"
    assert error.message.startswith("Field 'body': Value error, store sends DICOM objects")
