"""The image doors of ``POST /v1/explain``: an image file as the body, or a form of image
files, answered as the JSON door answers the same images and options; a form that is not
well formed, too large or not what the door takes is a 4xx JSON error naming what is wrong.

In-process, with Flask's client on the demo model's runtime; through the real server, curl
included, in ``tests/process/server/test_image_doors.py``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from flask.testing import FlaskClient

from service.contract.settings import Settings
from service.engine.runtime import Runtime
from service.server.app import create_app
from service.server.image_doors import FIELD_LIMIT_BYTES
from tests.helpers import EXAMPLES, encode, form_body, json_of, phantom_png

MAX_IMAGES = 4


@pytest.fixture(scope="module")
def client(runtime: Runtime) -> FlaskClient:
    settings = Settings(device="cpu", max_images_per_request=MAX_IMAGES)
    return create_app(settings, engine=runtime).test_client()


def _json_door(client: FlaskClient, images: list[bytes], **fields: Any) -> Any:
    answer = client.post("/v1/explain", json={"images": [encode(i) for i in images], **fields})
    assert answer.status_code == 200, answer.data[:300]
    return json_of(answer)


def _form(client: FlaskClient, parts: Sequence[tuple[str, bytes | str]], query: str = "") -> Any:
    body, content_type = form_body(parts)
    return client.post(f"/v1/explain{query}", data=body, content_type=content_type)


def _error(answer: Any, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.data[:300]
    assert answer.content_type == "application/json"
    error: dict[str, Any] = json_of(answer)["error"]
    return error


@pytest.mark.parametrize(
    "file,content_type", [("phantom_odd_size.png", "image/png"), ("phantom_nodule.dcm", "")]
)
def test_a_raw_body_is_answered_as_the_json_door_answers(
    client: FlaskClient, file: str, content_type: str
) -> None:
    data = (EXAMPLES / file).read_bytes()
    content_type = content_type or "application/dicom"
    raw = client.post(
        "/v1/explain?target=mass&top_k=2&format=gray&size=input",
        data=data,
        content_type=content_type,
        headers={"Accept": "application/json"},
    )
    assert raw.status_code == 200 and raw.content_type == "application/json"
    assert "Accept" in raw.vary  # the same URL may answer with the picture
    same = _json_door(
        client, [data], targets=["mass"], top_k=2, heatmap={"format": "gray", "size": "input"}
    )
    assert json_of(raw) == same


def test_a_forms_images_keep_their_order_whatever_their_part_names(client: FlaskClient) -> None:
    images = [phantom_png(1, 40, 30), phantom_png(2, 50, 30), phantom_png(3, 60, 30)]
    options = {"targets": ["tube", None, ["nodule", 2]], "heatmap": {"format": "none"}}
    answer = _form(
        client,
        [
            ("image", images[0]),
            ("options", json.dumps(options)),
            ("images", images[1]),
            ("image", images[2]),
        ],
    )
    assert answer.status_code == 200, answer.data[:300]
    assert json_of(answer) == _json_door(client, images, **options)
    # The options as a file part (curl -F options=@options.json) are the same options.
    as_file = _form(
        client,
        [("options", json.dumps(options).encode())] + [("images", image) for image in images],
    )
    assert json_of(as_file) == json_of(answer)


def test_a_forms_query_options_apply_to_every_image(client: FlaskClient) -> None:
    images = [phantom_png(4, 40, 40), phantom_png(5, 40, 40)]
    answer = _form(client, [("image", i) for i in images], "?target=opacity&format=array")
    assert answer.status_code == 200, answer.data[:300]
    same = _json_door(client, images, targets=["opacity"] * 2, heatmap={"format": "array"})
    assert json_of(answer) == same


@pytest.mark.parametrize(
    "parts,query,field,words",
    [
        ([("image", "not a file")], "", "image", "text, not a file"),
        ([("options", "{}")], "", "images", "no image"),
        ([("imgae", b"x")], "", "imgae", "Did you mean 'image' or 'images'?"),
        ([("image", b"x"), ("options", "{}"), ("options", "{}")], "", "options", "one"),
        ([("image", b"x"), ("options", '{"top_k": 2}')], "?top_k=1", "options", "not both"),
        ([("image", b"x"), ("options", '{"images": ["aGk="]}')], "", "images", "files"),
        ([("image", b"x"), ("options", '["top_k"]')], "", "options", "JSON object"),
        ([("image", b"x"), ("options", '{"top_k": "2"}')], "", "top_k", "valid integer"),
    ],
)
def test_a_form_not_as_the_door_takes_it_is_a_422(
    client: FlaskClient, parts: list[tuple[str, bytes | str]], query: str, field: str, words: str
) -> None:
    error = _error(_form(client, parts, query), 422)
    assert error["field"] == field and words in error["message"], error


def test_options_that_are_not_json_are_a_400_naming_the_field(client: FlaskClient) -> None:
    error = _error(_form(client, [("image", b"x"), ("options", "{top_k: 2")]), 400)
    assert error["code"] == "invalid_json" and error["field"] == "options"
    assert error["message"].startswith("Form field 'options': ")


@pytest.mark.parametrize(
    "body,content_type",
    [
        (b"--x\r\nContent-Disposition: form-data; name=image\r\n\r\nno end", "boundary=x"),
        (b"--x\r\nno headers, no blank line", "boundary=x"),
        (b"--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--\r\n", "boundary=x"),
        (b"anything", ""),
    ],
)
def test_a_form_that_is_not_well_formed_is_a_400(
    client: FlaskClient, body: bytes, content_type: str
) -> None:
    answer = client.post(
        "/v1/explain", data=body, content_type=f"multipart/form-data; {content_type}"
    )
    assert _error(answer, 400)["code"] == "bad_request"


def test_a_form_past_its_parts_or_a_field_past_its_size_is_a_413(client: FlaskClient) -> None:
    many = [("image", b"x")] * (MAX_IMAGES + 11)
    error = _error(_form(client, many), 413)
    assert error["code"] == "request_too_large" and "parts" in error["message"]
    big: list[tuple[str, bytes | str]] = [
        ("image", b"x"),
        ("options", " " * (FIELD_LIMIT_BYTES + 1) + "{}"),
    ]
    assert _error(_form(client, big), 413)["code"] == "request_too_large"
    # Within both bounds: the images are counted as the JSON door counts them.
    error = _error(_form(client, [("image", b"x")] * (MAX_IMAGES + 1)), 413)
    assert error["code"] == "too_many_images"


def test_a_large_image_part_is_read_whole(client: FlaskClient) -> None:
    """A file part far larger than Werkzeug's pieces and the field limit is one image."""
    image = phantom_png(6, 1400, 1200)
    assert len(image) > 2 * FIELD_LIMIT_BYTES
    answer = _form(client, [("image", image)], "?format=none")
    assert answer.status_code == 200, answer.data[:300]
    assert json_of(answer)["results"][0]["width"] == 1400


def test_other_bodies_are_a_415_naming_the_doors(client: FlaskClient) -> None:
    answer = client.post("/v1/explain", data=b"hello", content_type="text/plain")
    message = _error(answer, 415)["message"]
    assert "application/json" in message and "image/png" in message
    assert "multipart/form-data" in message and "application/dicom" in message


def test_a_json_body_takes_no_query(client: FlaskClient) -> None:
    """The query is the image doors' options: beside a JSON body it would be ignored."""
    answer = client.post(
        "/v1/explain?format=overlay", json={"images": [encode(phantom_png(1, 32, 32))]}
    )
    assert _error(answer, 422)["field"] == "format"
