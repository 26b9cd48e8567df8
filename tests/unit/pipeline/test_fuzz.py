"""Hypothesis over the request model and the decoders: any input is an answer or a
client error (a ``ServiceError`` under 500), never another exception."""

from __future__ import annotations

import base64
import io

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.contract.errors import ServiceError
from service.contract.request_parsing import parse_explain_request
from service.contract.settings import Settings
from service.engine.runtime import Runtime
from service.imaging.decoding import decode_image
from service.pipeline.explain import explain
from tests.helpers import as_json, phantom_png, pydicom_file

LIMITS = Settings(max_image_pixels=4_000_000, max_request_pixels=8_000_000)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _admit(width: int, height: int) -> None:
    if width * height > 4_000_000:
        raise ServiceError("too large")  # stands in for the budget (tested on its own)


def _encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _seeds() -> list[bytes]:
    gray = Image.fromarray(np.arange(48 * 40, dtype=np.uint8).reshape(40, 48))
    rgb = Image.merge("RGB", [gray, gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gray])
    deep = Image.fromarray((np.arange(24 * 20, dtype=np.uint16) * 100).reshape(20, 24))
    return [
        phantom_png(1, 40, 32),
        _encoded(rgb, "JPEG"),
        _encoded(gray, "GIF"),
        _encoded(rgb, "WEBP"),
        _encoded(gray, "BMP"),
        _encoded(deep, "TIFF"),
        _encoded(deep, "PNG"),
        pydicom_file("CT_small.dcm").read_bytes(),
        pydicom_file("JPEG2000.dcm").read_bytes(),
        pydicom_file("MR_small_RLE.dcm").read_bytes(),
    ]


SEEDS = _seeds()


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A real image with bytes flipped, cut, or inserted."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, len(data) - 1))
        if action == "flip":
            data[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        if not data:
            data = bytearray(b"\0")
    return bytes(data)


def _decode_or_client_error(data: bytes, frame: int | None) -> None:
    try:
        image = decode_image(data, 0, 1, _admit, frame)
    except ServiceError as error:
        event(f"{error.status} {error.code}")
        assert error.status < 500, error
        return
    event("decoded")
    array = np.asarray(image)
    assert array.size > 0
    if image.mode == "F":
        assert np.isfinite(array).all()


@FUZZ
@given(
    data=st.one_of(damaged(), st.binary(max_size=512)),
    frame=st.one_of(st.none(), st.integers(0, 3)),
)
def test_any_bytes_decode_or_are_a_client_error(data: bytes, frame: int | None) -> None:
    _decode_or_client_error(data, frame)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
GOOD = base64.b64encode(phantom_png(2, 48, 48)).decode()
# Plausible values per field, mostly meant, some mistaken; any field may also be
# any JSON at all (request_bodies).
FIELDS = {
    "images": st.lists(
        st.one_of(st.just(GOOD), st.just(GOOD), st.just(GOOD), st.text(max_size=12)),
        min_size=1,
        max_size=3,
    ),
    "model": st.sampled_from(["phantom", "phantom", "resnet"]),
    "targets": st.lists(
        st.one_of(
            st.none(),
            st.integers(0, 4),
            st.sampled_from(["nodule", "tube", "cat"]),
            st.lists(st.integers(0, 4), min_size=1, max_size=6),
        ),
        min_size=1,
        max_size=1,
    ),
    "method": st.sampled_from(["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"]),
    "layer": st.sampled_from(["features", "features", "head"]),
    "top_k": st.integers(0, 10),
    "heatmap": st.fixed_dictionaries(
        {},
        optional={
            "format": st.sampled_from(["array", "png", "overlay", "gray", "none"]),
            "size": st.sampled_from(["original", "input", "layer"]),
            "encoding": st.sampled_from(["png", "jpeg", "webp"]),
        },
    ),
    "frame": st.sampled_from([None, 0, 1]),
}


@st.composite
def request_bodies(draw: st.DrawFn) -> dict[str, object]:
    """Each field left out, plausible, or (one time in ten) any JSON at all."""
    body: dict[str, object] = {}
    for name, plausible in FIELDS.items():
        roll = draw(st.integers(0, 9))
        if name == "images" or 4 <= roll <= 8:
            body[name] = draw(plausible)
        elif roll == 9:
            body[name] = draw(JSON)
    return body


@FUZZ
@given(body=request_bodies())
def test_any_request_is_answered_or_a_client_error(runtime: Runtime, body: dict) -> None:
    try:
        response = explain(parse_explain_request(orjson.dumps(body)), runtime, LIMITS)
    except ServiceError as error:
        event(f"{error.status} {error.code}")
        assert error.status < 500, error
        return
    event("200")
    assert len(as_json(response)["results"]) == len(body["images"])


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'"x"', b"null", b"\xff", b"[" * 2000])
def test_raw_bodies_that_are_not_requests(raw: bytes) -> None:
    with pytest.raises(ServiceError) as caught:
        parse_explain_request(raw)
    assert caught.value.status in (400, 422)
