"""Work and memory per request are bounded by construction, not by luck."""

from __future__ import annotations

import io
import struct
import tracemalloc

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, JPEGBaseline8Bit, generate_uid

from service.contract.errors import InvalidField, PayloadTooLarge, UnsupportedMediaType
from service.contract.requests import ExplainRequest
from service.contract.settings import Settings
from service.engine.runtime import Runtime
from service.imaging.codestream import declared_size
from service.imaging.decoding import decode_image
from service.imaging.geometry import fit_geometry, to_model_pixels
from service.imaging.render import resample
from service.pipeline.explain import explain
from service.pipeline.images import resolve_targets
from tests.helpers import as_json, encode, phantom_png


def _any_size(width: int, height: int) -> None:
    pass


def test_resampling_a_wide_image_needs_no_more_than_its_output() -> None:
    # The old dense (output × layer) float64 matrices needed ~8 GB for a 64 M-wide map.
    geometry = fit_geometry(16384, 1024, (224, 224), "stretch")
    cam = np.random.default_rng(0).random((56, 56)).astype(np.float32)
    tracemalloc.start()
    heat = resample(cam, geometry, "original")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert heat.shape == (1024, 16384)
    assert peak < heat.nbytes * 1.2 + 4 * 2**20, peak


def test_crop_resizes_only_what_it_keeps() -> None:
    # 16000 × 100 for a crop model: resize-then-crop would scale it to 35840 × 224 first.
    array = np.random.default_rng(1).integers(0, 256, (100, 16000), dtype=np.uint8)
    image = Image.fromarray(array)
    pixels, box, geometry = to_model_pixels(image, (224, 224), "crop")
    assert pixels.shape == (224, 224, 1) and box is None
    expected = np.asarray(image.resize(geometry.resized_size, Image.Resampling.BILINEAR))
    u0 = (geometry.resized_size[0] - 224) // 2
    reference = expected[:, u0 : u0 + 224]
    assert np.abs(pixels[:, :, 0].astype(int) - reference.astype(int)).max() <= 1


def test_targets_are_deduplicated_in_order(runtime: Runtime) -> None:
    model = runtime.catalog().get(None)
    assert resolve_targets([2, "nodule", 2, 0, "opacity"], model, 0) == [2, 0]


def _explain(runtime: Runtime, settings: Settings, **body: object) -> dict:
    return as_json(explain(ExplainRequest.model_validate(body), runtime, settings))


@pytest.mark.parametrize(
    "settings,body,code",
    [
        (
            Settings(max_explanations_per_request=3),
            {"images": ["A"] * 2, "targets": [[0, 1], [2, 3]]},
            "too_many_targets",
        ),
        (
            Settings(max_image_side=200),
            {"images": [encode(phantom_png(1, 201, 50))]},
            "image_too_large",
        ),
        (
            Settings(max_request_pixels=150 * 150),
            {"images": [encode(phantom_png(1, 100, 100))] * 3},
            "too_many_pixels",
        ),
        (
            Settings(max_output_pixels=3 * 100 * 100),
            {"images": [encode(phantom_png(1, 100, 100))], "targets": [[0, 1, 2, 3]]},
            "output_too_large",
        ),
        (
            Settings(max_array_values=128 * 128),
            {
                "images": [encode(phantom_png(1, 64, 64))] * 2,
                "heatmap": {"format": "array", "size": "input"},
            },
            "array_too_large",
        ),
    ],
)
def test_budgets_refuse_before_any_work(
    runtime: Runtime, settings: Settings, body: dict, code: str
) -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        _explain(runtime, settings, **body)
    assert caught.value.code == code and caught.value.status == 413


def test_budgets_are_not_charged_for_what_is_not_drawn(runtime: Runtime) -> None:
    settings = Settings(max_output_pixels=100, max_array_values=100)
    body = _explain(
        runtime, settings, images=[encode(phantom_png(1, 100, 100))], heatmap={"format": "none"}
    )
    assert body["results"][0]["explanations"][0]["heatmap"]["format"] == "none"
    layer = _explain(
        runtime,
        Settings(max_array_values=16 * 16),
        images=[encode(phantom_png(1, 100, 100))],
        heatmap={"format": "array", "size": "layer"},
    )
    assert len(layer["results"][0]["explanations"][0]["heatmap"]["values"]) == 16


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="JPEG")
    return buffer.getvalue()


def _with_sof_size(jpeg: bytes, width: int, height: int) -> bytes:
    at = jpeg.index(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def test_codestream_sizes_are_read_from_the_headers() -> None:
    assert declared_size(_jpeg(40, 30)) == (40, 30)
    assert declared_size(_with_sof_size(_jpeg(40, 30), 65535, 65535)) == (65535, 65535)
    j2k = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + struct.pack(">IIII", 300, 200, 10, 20)
    assert declared_size(j2k + b"\x00" * 32) == (290, 180)
    assert declared_size(b"\x00" * 64) is None


def _jpeg_dicom(frame: bytes, rows: int, columns: int) -> bytes:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_dicom_codestream_bomb_is_refused_before_decoding() -> None:
    honest = decode_image(_jpeg_dicom(_jpeg(32, 24), 24, 32), 0, 1, _any_size)
    assert honest.size == (32, 24)
    bomb = _jpeg_dicom(_with_sof_size(_jpeg(32, 24), 65535, 65535), 24, 32)
    with pytest.raises(InvalidField, match="declares 65535×65535"):
        decode_image(bomb, 0, 1, _any_size)


def test_a_deflated_dicom_is_refused_unread() -> None:
    data = _jpeg_dicom(_jpeg(8, 8), 8, 8).replace(
        JPEGBaseline8Bit.encode(), b"1.2.840.10008.1.2.1.99"
    )
    with pytest.raises(UnsupportedMediaType, match="deflated"):
        decode_image(data, 0, 1, _any_size)


def _float_tiff(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.float32), mode="F").save(buffer, format="TIFF")
    return buffer.getvalue()


def test_nan_and_infinity_never_reach_the_model() -> None:
    values = np.linspace(0, 10, 64 * 64, dtype=np.float32).reshape(64, 64)
    values[0, :8] = np.nan
    values[1, :8] = np.inf
    values[2, :8] = -np.inf
    image = np.asarray(decode_image(_float_tiff(values), 0, 1, _any_size))
    assert np.isfinite(image).all() and image.min() == 0 and image.max() == 1
    assert (image[0, :8] == 0).all() and (image[1, :8] == 1).all()
    with pytest.raises(InvalidField, match="no finite"):
        decode_image(_float_tiff(np.full((8, 8), np.nan)), 0, 1, _any_size)


def test_only_the_listed_formats_are_opened() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(UnsupportedMediaType):
        decode_image(eps, 0, 1, _any_size)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PCX")
    with pytest.raises(UnsupportedMediaType):
        decode_image(buffer.getvalue(), 0, 1, _any_size)


def test_frame_picks_a_frame_of_a_gif() -> None:
    frames = [Image.fromarray(np.full((16, 16), v, dtype=np.uint8)) for v in (10, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    data = buffer.getvalue()
    assert np.asarray(decode_image(data, 0, 1, _any_size)).mean() < 50
    assert np.asarray(decode_image(data, 0, 1, _any_size, frame=1)).mean() > 150
    with pytest.raises(InvalidField, match="2 frame"):
        decode_image(data, 0, 1, _any_size, frame=2)


def test_explaining_stops_between_target_rounds_when_nobody_waits() -> None:
    import torch
    from torch import nn

    from service.engine.gradcam import GradCAM
    from service.engine.work_items import Abandoned

    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 6),
        )
        .eval()
        .requires_grad_(False)
    )
    cam = GradCAM(model)
    inputs = torch.rand(2, 1, 16, 16)
    asked: list[int] = []

    def stop_at_third_round() -> bool:
        asked.append(1)
        return len(asked) >= 2

    with pytest.raises(Abandoned, match="after 2 of 6"):
        cam(inputs, "0", [list(range(6)), [0]], ["gradcam", "gradcam"], stop_at_third_round)
    full = cam(inputs, "0", [list(range(6)), [0]], ["gradcam", "gradcam"], lambda: False)
    assert len(full.cams[0]) == 6
