"""DICOM results a PACS stores (``dicom-sc``, ``dicom-pm``): every object passes
dicom3tools' ``dciodvfy`` with no error, reads back with pydicom at the source's
Rows × Columns, belongs to the source's study in a new series, references the
source, and carries what was drawn: the service's own overlay, or its heatmap."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.data import get_testdata_file

from service.contract.errors import InvalidField
from service.contract.requests import ExplainRequest, parse_explain_request
from service.engine.runtime import Runtime
from service.pipeline.explain import explain
from tests.helpers import LiveServer, as_json, dciodvfy_errors, encode

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CR = EXAMPLES / "phantom_nodule.dcm"  # MONOCHROME1, windowed, no Frame of Reference
CT = Path(get_testdata_file("CT_small.dcm"))
MR = Path(get_testdata_file("MR_small.dcm"))
JPEG_RGB = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))  # a lossy-compressed source
MULTIFRAME = Path(get_testdata_file("SC_rgb_rle_2frame.dcm"))  # 2 RGB frames, RLE


def _valid(data: bytes, tmp_path: Path) -> pydicom.Dataset:
    """``data`` passes dciodvfy without an error; returned as read back by pydicom."""
    path = tmp_path / "object.dcm"
    path.write_bytes(data)
    errors, report = dciodvfy_errors(path)
    assert not errors, report
    return pydicom.dcmread(path)


def _request(runtime: Runtime, source: Path, **body: object) -> dict:
    request = ExplainRequest.model_validate({"images": [encode(source.read_bytes())], **body})
    return as_json(explain(request, runtime, runtime.settings))


def _heatmaps(answer: dict) -> list[dict]:
    return [e["heatmap"] for e in answer["results"][0]["explanations"]]


def _same_study_new_series(made: pydicom.Dataset, source: pydicom.Dataset) -> None:
    assert (made.Rows, made.Columns) == (source.Rows, source.Columns)
    assert made.StudyInstanceUID == source.StudyInstanceUID
    assert made.SeriesInstanceUID != source.SeriesInstanceUID
    assert made.SOPInstanceUID != source.SOPInstanceUID
    assert made.PatientID == source.PatientID and made.PatientName == source.PatientName
    reference = made.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID


@pytest.mark.parametrize("source", [CR, CT, MR, JPEG_RGB], ids=["cr", "ct", "mr", "jpeg-rgb"])
def test_secondary_capture_of_the_overlay(runtime: Runtime, tmp_path: Path, source: Path) -> None:
    original = pydicom.dcmread(source)
    targets = [["nodule", "mass"]]
    answer = _request(runtime, source, targets=targets, heatmap={"format": "dicom-sc"})
    overlays = _request(runtime, source, targets=targets, heatmap={"format": "overlay"})
    made = []
    for k, (heatmap, overlay) in enumerate(
        zip(_heatmaps(answer), _heatmaps(overlays), strict=True)
    ):
        sc = _valid(base64.b64decode(heatmap["data"]), tmp_path)
        _same_study_new_series(sc, original)
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
        assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert sc.BurnedInAnnotation == "NO" and sc.InstanceNumber == k + 1
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
        # The pixels are the service's own overlay, drawn on what a viewer shows.
        drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(overlay["data"]))))
        assert np.array_equal(sc.pixel_array, drawn)
        made.append(sc)
    assert made[0].SeriesInstanceUID == made[1].SeriesInstanceUID  # one series per image
    lossy_source = source == JPEG_RGB
    assert made[0].LossyImageCompression == ("01" if lossy_source else "00")
    if lossy_source:
        assert made[0].LossyImageCompressionMethod == "ISO_10918_1"


def test_a_jpeg_secondary_capture_says_it_is_lossy(runtime: Runtime, tmp_path: Path) -> None:
    answer = _request(runtime, CR, heatmap={"format": "dicom-sc", "encoding": "jpeg"})
    sc = _valid(base64.b64decode(_heatmaps(answer)[0]["data"]), tmp_path)
    assert sc.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert sc.LossyImageCompression == "01" and sc.LossyImageCompressionMethod == "ISO_10918_1"
    assert float(sc.LossyImageCompressionRatio) > 1
    overlay = _request(runtime, CR, heatmap={"format": "overlay"})
    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(_heatmaps(overlay)[0]["data"]))))
    assert np.abs(sc.pixel_array.astype(int) - drawn).mean() < 3  # JPEG, quality 90


@pytest.mark.parametrize("source", [CT, MR], ids=["ct", "mr"])
def test_parametric_map_of_the_heatmap(runtime: Runtime, tmp_path: Path, source: Path) -> None:
    original = pydicom.dcmread(source)
    answer = _request(runtime, source, targets=["nodule"], heatmap={"format": "dicom-pm"})
    pm = _valid(base64.b64decode(_heatmaps(answer)[0]["data"]), tmp_path)
    _same_study_new_series(pm, original)
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map
    assert pm.FrameOfReferenceUID == original.FrameOfReferenceUID
    values = _request(runtime, source, targets=["nodule"], heatmap={"format": "array"})
    expected = np.asarray(_heatmaps(values)[0]["values"], dtype=np.float32)
    assert pm.pixel_array.dtype == np.float32
    assert np.allclose(pm.pixel_array, expected, atol=1e-6)


def test_impossible_formats_carry_a_reason(runtime: Runtime) -> None:
    png = EXAMPLES / "phantom_nodule.png"
    for source, fmt, words in [
        (png, "dicom-sc", "not DICOM"),
        (png, "dicom-pm", "not DICOM"),
        (CR, "dicom-pm", "Frame of Reference"),
    ]:
        heatmap = _heatmaps(_request(runtime, source, heatmap={"format": fmt}))[0]
        assert words in heatmap["reason"] and "data" not in heatmap
        assert heatmap["raw_max"] > 0  # the explanation itself is there


def test_a_frame_of_a_multiframe_source(runtime: Runtime, tmp_path: Path) -> None:
    original = pydicom.dcmread(MULTIFRAME)
    answer = _request(runtime, MULTIFRAME, frame=1, heatmap={"format": "dicom-sc"})
    sc = _valid(base64.b64decode(_heatmaps(answer)[0]["data"]), tmp_path)
    # A Secondary Capture class file with 2 frames: no frame number for a single-frame class.
    assert "ReferencedFrameNumber" not in sc.SourceImageSequence[0]
    assert (sc.Rows, sc.Columns) == (original.Rows, original.Columns)
    # The second frame's overlay, not the first's.
    overlays = [
        _heatmaps(_request(runtime, MULTIFRAME, frame=f, heatmap={"format": "overlay"}))[0]
        for f in (0, 1)
    ]
    drawn = [np.asarray(Image.open(io.BytesIO(base64.b64decode(o["data"])))) for o in overlays]
    assert np.array_equal(sc.pixel_array, drawn[1]) and not np.array_equal(drawn[0], drawn[1])
    pm = _heatmaps(_request(runtime, MULTIFRAME, frame=1, heatmap={"format": "dicom-pm"}))[0]
    assert "grayscale" in pm["reason"]
    # A grayscale source with a plane and two frames: one frame cannot carry the map.
    ct = pydicom.dcmread(CT)
    ct.NumberOfFrames = 2
    ct.PixelData = ct.PixelData * 2
    two = tmp_path / "two-frames.dcm"
    ct.save_as(two)
    pm = _heatmaps(_request(runtime, two, frame=1, heatmap={"format": "dicom-pm"}))[0]
    assert "multi-frame" in pm["reason"]


@pytest.mark.parametrize(
    "heatmap",
    [
        {"format": "dicom-sc", "size": "input"},
        {"format": "dicom-pm", "size": "layer"},
        {"format": "dicom-sc", "encoding": "webp"},
        {"format": "dicom-pm", "encoding": "jpeg"},
    ],
)
def test_dicom_formats_take_only_what_dicom_can_hold(heatmap: dict) -> None:
    body = f'{{"images": ["AAAA"], "heatmap": {str(heatmap).replace(chr(39), chr(34))}}}'
    with pytest.raises(InvalidField):
        parse_explain_request(body.encode())


def test_dicom_sc_through_the_server(server: LiveServer, tmp_path: Path) -> None:
    body = {
        "images": [encode(CR.read_bytes())],
        "targets": ["nodule"],
        "heatmap": {"format": "dicom-sc"},
    }
    answer = requests.post(f"{server.url}/v1/explain", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    data = answer.json()["results"][0]["explanations"][0]["heatmap"]["data"]
    sc = _valid(base64.b64decode(data), tmp_path)
    assert sc.StudyInstanceUID == pydicom.dcmread(CR).StudyInstanceUID
