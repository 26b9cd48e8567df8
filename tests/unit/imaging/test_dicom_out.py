"""DICOM results a PACS stores (``dicom-sc``, ``dicom-pm``, ``dicom-seg`` and the
``dicom-sr`` report): every object passes dicom3tools' ``dciodvfy`` with no error, reads
back with pydicom (and highdicom) at the source's Rows × Columns, belongs to the source's
study in a new series, references the source, and carries what was drawn: the service's
own overlay, its heatmap, the heatmap's pixels at or above 0.5, or its peak and score."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import orjson
import pydicom
import pytest
from PIL import Image

from service.contract.errors import InvalidField
from service.contract.request_parsing import parse_explain_request
from service.contract.requests import ExplainRequest
from service.engine.runtime import Runtime
from service.pipeline.explain import explain
from tests.helpers import REPO, as_json, dciodvfy_errors, encode, pydicom_file

EXAMPLES = REPO / "examples"
CR = EXAMPLES / "phantom_nodule.dcm"  # MONOCHROME1, windowed, no Frame of Reference
CT = pydicom_file("CT_small.dcm")
MR = pydicom_file("MR_small.dcm")
JPEG_RGB = pydicom_file("SC_rgb_jpeg_dcmtk.dcm")  # a lossy-compressed source
MULTIFRAME = pydicom_file("SC_rgb_rle_2frame.dcm")  # 2 RGB frames, RLE
ENHANCED_CT = pydicom_file("eCT_Supplemental.dcm")  # 2 frames, each placed
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


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


def _values(runtime: Runtime, source: Path, targets: list, **body: object) -> list[np.ndarray]:
    """The ``array`` heatmaps (at the source's size) of ``targets`` in ``source``."""
    answer = _request(runtime, source, targets=[targets], heatmap={"format": "array"}, **body)
    return [np.asarray(h["values"], dtype=np.float32) for h in _heatmaps(answer)]


@pytest.mark.parametrize("source", [CR, CT, MR, JPEG_RGB], ids=["cr", "ct", "mr", "jpeg-rgb"])
def test_segmentation_of_the_heatmap(runtime: Runtime, tmp_path: Path, source: Path) -> None:
    """One BINARY Segmentation per image, one segment per explained class: the pixels
    where the normalised map is at least 0.5, labelled and coded by the class, made by
    an AUTOMATIC algorithm that names the service, method, layer and model."""
    original = pydicom.dcmread(source)
    targets = ["nodule", "mass"]
    answer = _request(
        runtime, source, targets=[targets], heatmap={"format": "dicom-seg"}, method="gradcam++"
    )
    result = answer["results"][0]
    assert [h["segment"] for h in _heatmaps(answer)] == [1, 2]
    assert all("data" not in h and "reason" not in h for h in _heatmaps(answer))
    data = base64.b64decode(result["segmentation"]["data"])
    made = _valid(data, tmp_path)
    assert made.SOPClassUID == SEG_CLASS and made.SegmentationType == "BINARY"
    assert (
        made.StudyInstanceUID
        == original.StudyInstanceUID
        == result["segmentation"]["uids"]["study"]
    )
    assert made.SeriesInstanceUID != original.SeriesInstanceUID and made.SeriesNumber == 9903
    assert made.SOPInstanceUID == result["segmentation"]["uids"]["instance"]
    assert made.PatientID == original.PatientID
    seg = hd.seg.Segmentation.from_dataset(made)
    assert [uids[2] for uids in seg.get_source_image_uids()] == [original.SOPInstanceUID]
    for number, label in enumerate(targets, start=1):
        described = seg.get_segment_description(number)
        assert described.segment_label == label
        assert described.segmented_property_type.scheme_designator == "99GRADCAM"
        assert described.segmented_property_type.meaning == label
        assert described.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        assert described.algorithm_identification is not None
        (algorithm,) = described.algorithm_identification
        assert algorithm.AlgorithmName == "gradcam-service"
        assert algorithm.AlgorithmParameters == (
            "method=gradcam++,layer=features,model=phantom,level=0.5"
        )
        # A colour of its own for a viewer to draw it in: red, then green.
        colour = hd.color.CIELabColor.from_dicom_value(described.RecommendedDisplayCIELabValue)
        (red, green, blue) = colour.to_rgb()
        assert (red > 200 > green and red > 200 > blue) if number == 1 else green > 150 > red
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[original.SOPInstanceUID], segment_numbers=[1, 2]
    )[0]
    expected = _values(runtime, source, targets, method="gradcam++")
    for k, values in enumerate(expected):
        assert np.array_equal(pixels[..., k] > 0, values >= 0.5)
    assert pixels[..., 0].any()  # the class the model sees has a region


def test_an_all_zero_map_is_an_empty_segment(runtime: Runtime, tmp_path: Path) -> None:
    """The phantom CR has no mass: its map is all zero (raw_max 0), its segment is
    described and empty, in an object that is still valid; alone, the object holds one
    empty frame."""
    answer = _request(runtime, CR, targets=[["nodule", "mass"]], heatmap={"format": "dicom-seg"})
    assert [h["raw_max"] > 0 for h in _heatmaps(answer)] == [True, False]
    made = _valid(base64.b64decode(answer["results"][0]["segmentation"]["data"]), tmp_path)
    seg = hd.seg.Segmentation.from_dataset(made)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[seg.get_source_image_uids()[0][2]], segment_numbers=[1, 2]
    )[0]
    assert pixels[..., 0].any() and not pixels[..., 1].any()
    alone = _request(runtime, CR, targets=["mass"], heatmap={"format": "dicom-seg"})
    empty = _valid(base64.b64decode(alone["results"][0]["segmentation"]["data"]), tmp_path)
    assert empty.NumberOfFrames == 1 and not empty.pixel_array.any()


def test_a_segmentation_of_one_frame(runtime: Runtime, tmp_path: Path) -> None:
    """An enhanced CT's second frame: the segment lies on that frame (its plane, the
    reference to frame 2). A multi-frame image whose frames have no position: a reason."""
    answer = _request(runtime, ENHANCED_CT, frame=1, heatmap={"format": "dicom-seg"})
    made = _valid(base64.b64decode(answer["results"][0]["segmentation"]["data"]), tmp_path)
    derived = made.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert derived.SourceImageSequence[0].ReferencedFrameNumber == 2
    source = pydicom.dcmread(ENHANCED_CT, stop_before_pixels=True)
    position = made.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    expected = source.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0]
    assert list(position.ImagePositionPatient) == list(expected.ImagePositionPatient)
    reason = _request(runtime, MULTIFRAME, frame=1, heatmap={"format": "dicom-seg"})
    result = reason["results"][0]
    assert "Plane Position" in result["segmentation"]["reason"]
    assert "data" not in result["segmentation"]
    assert all(h["reason"] == result["segmentation"]["reason"] for h in _heatmaps(reason))
    png = _request(runtime, EXAMPLES / "phantom_nodule.png", heatmap={"format": "dicom-seg"})
    assert "not DICOM" in png["results"][0]["segmentation"]["reason"]
    assert "not DICOM" in _heatmaps(png)[0]["reason"]


def _report(made: pydicom.Dataset) -> hd.sr.Comprehensive3DSR:
    assert made.SOPClassUID == SR_CLASS and made.SeriesNumber == 9904
    return hd.sr.Comprehensive3DSR.from_dataset(made)


def measurements(report: hd.sr.Comprehensive3DSR) -> Any:
    """The report's content: a TID 1500 Measurement Report, its groups one per finding
    (typed Any: what highdicom's types say of the groups is less than what they hold)."""
    content = report.content
    assert isinstance(content, hd.sr.MeasurementReport), type(content)
    return content


@pytest.mark.parametrize(
    "source, fmt",
    [(CR, "dicom-sc"), (CT, "dicom-pm"), (MR, "dicom-seg"), (JPEG_RGB, "png")],
    ids=["cr-sc", "ct-pm", "mr-seg", "jpeg-rgb-png"],
)
def test_a_report_of_each_class(runtime: Runtime, tmp_path: Path, source: Path, fmt: str) -> None:
    """TID 1500: per class its probability, the method, layer and model, and a point at
    the map's peak on the source (none for an all-zero map); the source and the objects
    of the same answer as evidence."""
    original = pydicom.dcmread(source, stop_before_pixels=True)
    targets = ["nodule", "mass"]
    answer = _request(
        runtime, source, targets=[targets], heatmap={"format": fmt}, report="dicom-sr"
    )
    result = answer["results"][0]
    made = _valid(base64.b64decode(result["report"]["data"]), tmp_path)
    assert made.StudyInstanceUID == original.StudyInstanceUID == result["report"]["uids"]["study"]
    assert made.SOPInstanceUID == result["report"]["uids"]["instance"]
    assert made.PatientID == original.PatientID
    assert made.CompletionFlag == "COMPLETE" and made.VerificationFlag == "UNVERIFIED"
    report = _report(made)
    peaks = measurements(report).get_planar_roi_measurement_groups()
    flat = measurements(report).get_image_measurement_groups()
    values = _values(runtime, source, targets)
    scores = {e["target"]["label"]: e["target"]["score"] for e in result["explanations"]}
    assert len(peaks) + len(flat) == len(targets)
    for label, heat in zip(targets, values, strict=True):
        groups = [g for g in (*peaks, *flat) if g.finding_type.meaning == label]
        (group,) = groups
        assert group.finding_type.scheme_designator == "99GRADCAM"
        assert group.method.value == "130403"  # Gradient-weighted class activation
        (probability,) = group.get_measurements()
        assert probability.name.value == "122157" and probability.unit.value == "1"
        assert abs(probability.value - scores[label]) < 1e-5
        if heat.max() == 0:
            assert group in flat  # nothing to point at
            continue
        assert group in peaks and group.tracking_identifier == f"Grad-CAM peak: {label}"
        row, column = np.unravel_index(int(np.argmax(heat)), heat.shape)
        assert group.roi.GraphicType == "POINT"
        assert list(group.roi.GraphicData) == [column + 0.5, row + 0.5]
        assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            original.SOPInstanceUID
        )
    # The service as the observing device; the algorithm with its parameters.
    text = str(made)
    assert "method=gradcam" in text and "layer=features" in text and "model=phantom" in text
    assert "gradcam-service" in text
    # Evidence: the source and every object made with it in this answer.
    evidence = {uids[2] for uids in report.get_evidence()}
    derived = [h["uids"]["instance"] for h in _heatmaps(answer) if "uids" in h]
    if "segmentation" in result:
        derived.append(result["segmentation"]["uids"]["instance"])
    assert evidence == {original.SOPInstanceUID, *derived}
    assert len(derived) == {"dicom-sc": 2, "dicom-pm": 2, "dicom-seg": 1, "png": 0}[fmt]


def test_reports_of_frames_and_of_images_that_are_not_dicom(
    runtime: Runtime, tmp_path: Path
) -> None:
    """The point names the frame of a multi-frame class (the enhanced CT's second), and
    none for a single-frame class with two frames in its file; a PNG has no report."""
    for source, frame_number in ((ENHANCED_CT, [2]), (MULTIFRAME, None)):
        answer = _request(runtime, source, frame=1, heatmap={"format": "none"}, report="dicom-sr")
        made = _valid(base64.b64decode(answer["results"][0]["report"]["data"]), tmp_path)
        group = measurements(_report(made)).get_planar_roi_measurement_groups()[0]
        reference = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert reference.get("ReferencedFrameNumber") == (frame_number[0] if frame_number else None)
    png = _request(runtime, EXAMPLES / "phantom_nodule.png", report="dicom-sr")
    assert "not DICOM" in png["results"][0]["report"]["reason"]
    assert "data" in _heatmaps(png)[0]  # the png heatmap is there all the same


@pytest.mark.parametrize(
    "body",
    [
        {"heatmap": {"format": "dicom-seg", "size": "input"}},
        {"heatmap": {"format": "dicom-seg", "encoding": "png"}},
        {"report": "dicom-seg"},
        {"report": "sr"},
    ],
)
def test_segmentations_and_reports_take_only_what_they_can_hold(body: dict) -> None:
    with pytest.raises(InvalidField):
        parse_explain_request(orjson.dumps({"images": ["AAAA"], **body}))
    # A report alone may be stored (the SR is a DICOM object).
    stored = {"images": ["AAAA"], "report": "dicom-sr", "store": {"url": "http://pacs/x"}}
    assert parse_explain_request(orjson.dumps(stored)).report == "dicom-sr"


def test_what_the_sweep_found_for_segmentations_and_reports(
    runtime: Runtime, tmp_path: Path
) -> None:
    """Real files (``test_dicom_sweep.py``): a CT without its slice thickness gets a 2D
    Segmentation (no plane, Patient Orientation instead); a CT without the Frame of
    Reference its IOD requires gets a reason; a source whose identity was removed without
    saying how gets a report that says the method is not stated."""
    thin = pydicom_file("explicit_VR-UN.dcm")
    answer = _request(runtime, thin, heatmap={"format": "dicom-seg"})
    made = _valid(base64.b64decode(answer["results"][0]["segmentation"]["data"]), tmp_path)
    assert "PlaneOrientationSequence" not in made.SharedFunctionalGroupsSequence[0]
    assert list(made.PatientOrientation) == ["L", "A"]  # from its direction cosines
    no_frame = pydicom_file("693_J2KR.dcm")
    answer = _request(runtime, no_frame, heatmap={"format": "dicom-seg"}, report="dicom-sr")
    result = answer["results"][0]
    assert "Frame of Reference" in result["segmentation"]["reason"]
    report = _valid(base64.b64decode(result["report"]["data"]), tmp_path)
    assert report.PatientIdentityRemoved == "YES"
    assert report.DeidentificationMethod == "not stated by the source image"
