"""The explain path end to end (request model → response JSON) on the demo model."""

from __future__ import annotations

import base64
import functools
import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.contract.errors import ServiceError
from service.contract.request_parsing import parse_explain_request
from service.contract.requests import ExplainRequest
from service.demo.evaluation import peak_in_boxes
from service.engine.runtime import Runtime
from service.imaging.values import to_uint8
from service.pipeline.explain import explain
from tests.helpers import as_json, bomb_png, encode, phantom, phantom_png, png_bytes, pydicom_file


def _explain(runtime: Runtime, **body: object) -> dict:
    # Whatever the path returns must serialise and match the response model.
    return as_json(explain(ExplainRequest.model_validate(body), runtime, runtime.settings))


def _decode_png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


@pytest.mark.parametrize("size", ["original", "input", "layer"])
@pytest.mark.parametrize("fmt", ["array", "png", "overlay", "gray", "none"])
def test_every_format_and_size(runtime: Runtime, fmt: str, size: str) -> None:
    body = _explain(
        runtime, images=[encode(phantom_png(3, 300, 220))], heatmap={"format": fmt, "size": size}
    )
    result = body["results"][0]
    assert (result["width"], result["height"]) == (300, 220)
    expected = {"original": (300, 220), "input": (128, 128), "layer": (16, 16)}[size]
    heatmap = result["explanations"][0]["heatmap"]
    assert heatmap["format"] == fmt
    assert (heatmap["width"], heatmap["height"]) == expected
    assert heatmap["raw_max"] > 0
    if fmt == "array":
        values = np.array(heatmap["values"])
        assert values.shape == expected[::-1]
        assert values.min() >= 0 and values.max() == pytest.approx(1.0)
    elif fmt == "none":
        assert "values" not in heatmap and "data" not in heatmap
    else:
        image = _decode_png(heatmap["data"])
        assert image.size == expected
        assert image.mode == ("L" if fmt == "gray" else "RGB")


def test_predictions_targets_and_defaults(runtime: Runtime) -> None:
    body = _explain(
        runtime,
        images=[encode(phantom_png(3)), encode(phantom_png(2))],
        targets=[["tube", 1, "nodule"], None],
    )
    assert body["model"] == "phantom" and body["method"] == "gradcam"
    assert body["layer"] == "features"
    first, second = body["results"]
    # top_k defaults to 5: all four classes, best first.
    scores = [p["score"] for p in first["predictions"]]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)
    assert [e["target"]["label"] for e in first["explanations"]] == ["tube", "mass", "nodule"]
    assert second["explanations"][0]["target"] == second["predictions"][0]
    assert second["predictions"][0]["label"] == "nodule"  # seed 2 shows one nodule
    assert first["predictions"][0]["label"] in ("mass", "tube")  # seed 3: mass and tube


def test_multilabel_scores_are_sigmoids(runtime: Runtime) -> None:
    body = _explain(runtime, images=[encode(phantom_png(3))], top_k=4)
    scores = {p["label"]: p["score"] for p in body["results"][0]["predictions"]}
    assert scores["mass"] > 0.5 and scores["tube"] > 0.5 and scores["nodule"] < 0.5
    assert sum(scores.values()) > 1.0  # not a softmax


def test_heatmap_lies_on_an_odd_non_square_image(runtime: Runtime) -> None:
    # The finding's box is known in the image's own pixels; the `original`
    # heatmap's peak must land in it (grown by 8 px) for each finding.
    for seed in (3, 25, 37):
        scene = phantom(seed, 517, 389)
        kinds = sorted({f.kind for f in scene.findings})
        body = _explain(
            runtime,
            images=[encode(png_bytes(to_uint8(scene.image)))],
            targets=[kinds],
            heatmap={"format": "array", "size": "original"},
        )
        for explanation in body["results"][0]["explanations"]:
            values = np.array(explanation["heatmap"]["values"])
            assert values.shape == (389, 517)
            kind = explanation["target"]["label"]
            assert peak_in_boxes(values, scene.boxes(kind), 8.0), (seed, kind)


@functools.cache
def image_variants() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """One phantom in each format a client may send: (its bytes, its size). Made once."""
    gray = to_uint8(phantom(3, 240, 180).image)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    variants: dict[str, tuple[bytes, tuple[int, int]]] = {}

    def save(name: str, image: Image.Image, fmt: str, **kwargs: object) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kwargs)
        variants[name] = (buffer.getvalue(), image.size)

    save("png-gray", Image.fromarray(gray), "PNG")
    save("png-rgb", Image.fromarray(rgb), "PNG")
    save("png-rgba", Image.fromarray(rgb).convert("RGBA"), "PNG")
    save("png-palette", Image.fromarray(gray).convert("P"), "PNG")
    save("png-16bit", Image.fromarray(gray.astype(np.uint16) * 257), "PNG")
    save("jpeg-gray", Image.fromarray(gray), "JPEG", quality=95)
    save("jpeg-rgb", Image.fromarray(rgb), "JPEG", quality=95)
    save("jpeg-cmyk", Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    save("tiff", Image.fromarray(gray), "TIFF")
    save("bmp", Image.fromarray(rgb), "BMP")
    save("webp", Image.fromarray(rgb), "WEBP", lossless=True)
    save("gif", Image.fromarray(gray), "GIF")
    return variants


@pytest.fixture(scope="module")
def png_gray_result(runtime: Runtime) -> dict[str, Any]:
    """The answer every format is compared with: the 8-bit gray PNG's."""
    result: dict[str, Any] = _explain(
        runtime,
        images=[encode(image_variants()["png-gray"][0])],
        top_k=4,
        heatmap={"format": "array", "size": "layer"},
    )["results"][0]
    return result


@pytest.mark.parametrize("name", list(image_variants()))
def test_image_formats_give_the_same_answer(
    runtime: Runtime, png_gray_result: dict[str, Any], name: str
) -> None:
    data, size = image_variants()[name]
    reference = png_gray_result
    result = _explain(
        runtime, images=[encode(data)], top_k=4, heatmap={"format": "array", "size": "layer"}
    )["results"][0]
    assert (result["width"], result["height"]) == size
    ours = {p["label"]: p["score"] for p in result["predictions"]}
    theirs = {p["label"]: p["score"] for p in reference["predictions"]}
    assert all(abs(ours[k] - theirs[k]) < 0.05 for k in ours), (ours, theirs)
    a = np.array(result["explanations"][0]["heatmap"]["values"])
    b = np.array(reference["explanations"][0]["heatmap"]["values"])
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98


def test_exif_orientation_is_applied(runtime: Runtime) -> None:
    # Stored 240 wide × 180 high, displayed rotated (orientation 6): 180 × 240.
    gray = to_uint8(phantom(3, 240, 180).image)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="JPEG", exif=exif.tobytes())
    body = _explain(
        runtime,
        images=[encode(buffer.getvalue())],
        heatmap={"format": "overlay", "size": "original"},
    )
    result = body["results"][0]
    assert (result["width"], result["height"]) == (180, 240)
    assert _decode_png(result["explanations"][0]["heatmap"]["data"]).size == (180, 240)


def test_data_url_and_whitespace(runtime: Runtime) -> None:
    text = encode(phantom_png(2, 64, 64))
    wrapped = "data:image/png;base64," + "\n".join(
        text[i : i + 76] for i in range(0, len(text), 76)
    )
    body = _explain(runtime, images=[wrapped, text.rstrip("=")])
    assert body["results"][0]["predictions"] == body["results"][1]["predictions"]


BAD_REQUESTS: list[tuple[dict, int, str]] = [
    ({"images": ["***not base64***"]}, 422, "invalid_base64"),
    ({"images": [""]}, 422, "empty_image"),
    ({"images": [encode(b"hello, I am a text file\n")]}, 415, "unsupported_image"),
    ({"images": [encode(phantom_png(1, 64, 64)[:200])]}, 422, "invalid_image"),
    ({"images": [encode(phantom_png(1, 64, 64)[:33])]}, 422, "invalid_image"),
    ({"images": [encode(bomb_png(100_000, 100_000))]}, 413, "image_too_large"),
    ({"images": [encode(phantom_png(1, 32, 32))] * 33}, 413, "too_many_images"),
    ({"images": ["aGk="], "model": "nope"}, 404, "unknown_model"),
    ({"images": ["aGk="], "layer": "features.stage9"}, 422, "unknown_layer"),
    ({"images": [encode(phantom_png(1, 32, 32))], "targets": ["pneumonia"]}, 422, "unknown_label"),
    ({"images": [encode(phantom_png(1, 32, 32))], "targets": [4]}, 422, "target_out_of_range"),
    (
        {"images": [encode(phantom_png(1, 32, 32))], "targets": [[0, -1]]},
        422,
        "target_out_of_range",
    ),
    ({"images": ["aGk="], "targets": [None, None]}, 422, "targets_length"),
]


@pytest.mark.parametrize("body,status,code", BAD_REQUESTS, ids=[c for _, _, c in BAD_REQUESTS])
def test_bad_input_is_a_clear_client_error(
    runtime: Runtime, body: dict, status: int, code: str
) -> None:
    with pytest.raises(ServiceError) as info:
        explain(ExplainRequest.model_validate(body), runtime, runtime.settings)
    assert (info.value.status, info.value.code) == (status, code), info.value.message
    assert info.value.message[0].isupper() and info.value.message[-1] in ".?"


BAD_BODIES: list[tuple[bytes, int, str]] = [
    (b"not json", 400, "body"),
    (b"[1, 2]", 422, "body"),
    (b"{}", 422, "images"),
    (b'{"images": []}', 422, "images"),
    (b'{"images": "abc"}', 422, "images"),
    (b'{"images": [1]}', 422, "images[0]"),
    (b'{"images": ["aGk="], "top_k": "5"}', 422, "top_k"),
    (b'{"images": ["aGk="], "top_k": 0}', 422, "top_k"),
    (b'{"images": ["aGk="], "method": "scorecam"}', 422, "method"),
    (b'{"images": ["aGk="], "heatmap": {"format": "jpeg"}}', 422, "heatmap.format"),
    (b'{"images": ["aGk="], "heatmap": {"size": 3}}', 422, "heatmap.size"),
    (b'{"images": ["aGk="], "targets": [1.5]}', 422, "targets[0]"),
    (b'{"images": ["aGk="], "targets": [[]]}', 422, "targets[0]"),
    (b'{"images": ["aGk="], "colour": "red"}', 422, "colour"),
]


@pytest.mark.parametrize("body,status,field", BAD_BODIES, ids=[f for _, _, f in BAD_BODIES])
def test_malformed_bodies_name_the_field(body: bytes, status: int, field: str) -> None:
    with pytest.raises(ServiceError) as info:
        parse_explain_request(body)
    assert info.value.status == status
    assert (info.value.field or "body") == field, info.value.message


def test_an_rgb_upload_keeps_its_colours_under_a_one_channel_models_overlay(
    runtime: Runtime,
) -> None:
    gray = np.asarray(Image.open(io.BytesIO(phantom_png(8, 160, 120))))
    tint = np.stack([gray, (gray * 0.6).astype(np.uint8), (gray * 0.3).astype(np.uint8)], -1)
    rgb = png_bytes(tint)
    as_gray = png_bytes(np.asarray(Image.fromarray(tint).convert("L")))
    coloured = _explain(
        runtime, images=[encode(rgb)], heatmap={"format": "overlay"}, include=["image"]
    )["results"][0]
    plain = _explain(runtime, images=[encode(as_gray)], heatmap={"format": "overlay"})["results"][0]
    # The model saw the same gray image either way...
    assert coloured["predictions"] == plain["predictions"]
    # ...and the overlay and the image are drawn on the colour original.
    shown = np.asarray(_decode_png(coloured["image"]["data"]))
    assert np.array_equal(shown, tint)
    overlay = np.asarray(_decode_png(coloured["explanations"][0]["heatmap"]["data"]))
    levels = np.asarray(
        _decode_png(
            _explain(runtime, images=[encode(rgb)], heatmap={"format": "gray"})["results"][0][
                "explanations"
            ][0]["heatmap"]["data"]
        )
    )
    cold = levels == 0
    assert cold.any() and np.array_equal(overlay[cold], tint[cold])


def test_a_frame_per_image(runtime: Runtime) -> None:

    two = encode(pydicom_file("SC_rgb_rle_2frame.dcm").read_bytes())
    png = encode(phantom_png(3, 64, 64))

    def overlay(images: list[str], frame: object) -> list[np.ndarray]:
        body = _explain(runtime, images=images, frame=frame, heatmap={"format": "overlay"})
        return [
            np.asarray(_decode_png(r["explanations"][0]["heatmap"]["data"]))
            for r in body["results"]
        ]

    first, second = overlay([two], 0)[0], overlay([two], 1)[0]

    def levels_apart(a: np.ndarray, b: np.ndarray) -> int:
        return int(np.abs(a.astype(int) - b.astype(int)).max())

    assert levels_apart(first, second) > 16
    mixed = overlay([two, png, two], [1, None, 0])
    # Each its own frame; a batch of three may round a level differently than one alone.
    assert levels_apart(mixed[0], second) <= 1 and levels_apart(mixed[2], first) <= 1
    with pytest.raises(ServiceError) as refused:
        _explain(runtime, images=[two, png], frame=[1])
    assert refused.value.code == "frames_length"
    with pytest.raises(ServiceError) as refused:
        _explain(runtime, images=[two, png], frame=[None, None])
    assert refused.value.code == "frame_required"
