"""The DICOM objects of a volume's map (``volume_dicom_out``): the Parametric Map, the
Segmentation and the TID 1500 report of a CT series and of the same slices as one enhanced
multi-frame image each pass dicom3tools' ``dciodvfy`` with no error, read back with
highdicom, lie slice by slice on their source slices (each frame where its source slice
is, holding that slice of the map, derived from it), share the source's study and Frame
of Reference, and the report's peak is the map's maximum as a 3-D point in LPS+ mm."""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from service.imaging.dicom_codes import Explained
from service.imaging.dicom_out import DerivedFrom, new_uid
from service.imaging.dicom_seg import Segment, mask_of
from service.imaging.dicom_sr import MadeObject
from service.imaging.dicom_volume import (
    multiframe_order,
    read_dicom_series_sources,
    read_multiframe_volume_source,
)
from service.imaging.volume import Volume
from service.imaging.volume_dicom_out import (
    VolumeFinding,
    volume_objects_problem,
    volume_parametric_map,
    volume_peak,
    volume_report,
    volume_segmentation,
)
from tests.dicom_series import oblique, phantom_hu, write_ct_series
from tests.helpers import dciodvfy_errors

SHAPE = (16, 12, 8)
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
HOW = Explained("gradcam", "features", "phantom")


def _any_size(shape: tuple[int, int, int]) -> None:
    """An ``admit`` that accepts every volume."""


def _multiframe(files: Sequence[bytes]) -> bytes:
    """The files of a series as one Legacy Converted Enhanced CT file (highdicom)."""
    made = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(io.BytesIO(data)) for data in files],
        series_instance_uid=hd.UID(),
        series_number=40,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    buffer = io.BytesIO()
    made.save_as(buffer)
    return buffer.getvalue()


@dataclass(frozen=True)
class Case:
    """A volume read from DICOM: its ``sources`` as the objects take them, and for each
    slice ``k`` the instance and (1-based) frame number it comes from and the position
    (LPS+ mm) of its first pixel."""

    volume: Volume
    sources: list[Dataset] | Dataset
    instances: list[tuple[str, int | None]]
    positions: np.ndarray  # (K, 3)
    study: str
    frame_of_reference: str


def _series_case(files: Sequence[bytes]) -> Case:
    volume, headers = read_dicom_series_sources(files, _any_size)
    return Case(
        volume,
        headers,
        [(str(ds.SOPInstanceUID), None) for ds in headers],
        np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers]),
        str(headers[0].StudyInstanceUID),
        str(headers[0].FrameOfReferenceUID),
    )


def _multiframe_case(files: Sequence[bytes]) -> Case:
    volume, header = read_multiframe_volume_source(_multiframe(files), _any_size)
    order = multiframe_order(header)
    groups = header.PerFrameFunctionalGroupsSequence
    return Case(
        volume,
        header,
        [(str(header.SOPInstanceUID), n + 1) for n in order],
        np.array(
            [
                [float(v) for v in groups[n].PlanePositionSequence[0].ImagePositionPatient]
                for n in order
            ]
        ),
        str(header.StudyInstanceUID),
        str(header.FrameOfReferenceUID),
    )


@pytest.fixture(scope="module", params=["series", "oblique-shuffled", "multiframe"])
def case(request: pytest.FixtureRequest) -> Case:
    if request.param == "series":
        return _series_case(write_ct_series(phantom_hu(SHAPE), signed=True))
    files = write_ct_series(
        phantom_hu(SHAPE, seed=3),
        orientation=oblique(25),
        origin=(12.0, -30.5, 100.25),
        signed=True,
        instance_numbers_descend=True,
    )
    if request.param == "multiframe":
        return _multiframe_case(files)
    shuffled = [files[n] for n in (3, 0, 7, 5, 1, 6, 2, 4)]
    return _series_case(shuffled)


def _heat(seed: int = 1) -> np.ndarray:
    """A map in [0, 1] on ``SHAPE`` with one maximum, away from every edge and corner."""
    heat = np.random.default_rng(seed).uniform(0, 0.9, SHAPE).astype(np.float32)
    heat[9, 4, 5] = 1.0
    return heat


def _valid(data: bytes, tmp_path: Path) -> Dataset:
    """``data`` passes dciodvfy without an error; returned as read back by pydicom."""
    path = tmp_path / "object.dcm"
    path.write_bytes(data)
    errors, report = dciodvfy_errors(path)
    assert not errors, report
    return pydicom.dcmread(path)


def _derived(from_uid: str, label: str = "nodule") -> DerivedFrom:
    return DerivedFrom(label, "gradcam", "features", "phantom", 1, new_uid(), from_uid)


def _frame_places(made: Dataset, case: Case) -> list[int]:
    """For each frame of ``made``, the slice ``k`` of the volume it lies on (by its
    position), after checking that it is derived from that slice's instance (and frame)."""
    slices = []
    for item in made.PerFrameFunctionalGroupsSequence:
        position = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        distances = np.linalg.norm(case.positions - position, axis=1)
        k = int(np.argmin(distances))
        assert distances[k] < 1e-6, "a frame lies where no source slice does"
        (source,) = item.DerivationImageSequence[0].SourceImageSequence
        assert (source.ReferencedSOPInstanceUID, source.get("ReferencedFrameNumber")) == (
            case.instances[k]
        )
        slices.append(k)
    return slices


def _same_study_and_frame(made: Dataset, case: Case) -> None:
    assert made.StudyInstanceUID == case.study
    assert made.FrameOfReferenceUID == case.frame_of_reference
    sources = case.sources if isinstance(case.sources, list) else [case.sources]
    assert made.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert made.PatientID == sources[0].PatientID


def _along_the_normal(slices: list[int], ascending: bool = False) -> None:
    """The frames are stored in one direction along the slice normal: a Parametric Map's
    as the series (ascending: OHIF lays them over it in that order), a Segmentation's in
    highdicom's order (from the last slice to the first; OHIF places those by position)."""
    assert slices == sorted(slices, reverse=not ascending)


def test_the_parametric_map_lies_on_its_source_slices(case: Case, tmp_path: Path) -> None:
    heat = _heat()
    made = _derived(new_uid())
    pm = _valid(volume_parametric_map(case.sources, heat, made), tmp_path)
    assert pm.SOPClassUID == PM_CLASS and pm.SeriesNumber == 9902
    assert pm.SOPInstanceUID == made.instance_uid
    _same_study_and_frame(pm, case)
    assert int(pm.NumberOfFrames) == SHAPE[2] and (pm.Rows, pm.Columns) == SHAPE[1::-1]
    read = hd.pm.ParametricMap.from_dataset(pm)
    pixels = read.pixel_array
    assert pixels.dtype == np.float32
    slices = _frame_places(pm, case)
    assert sorted(slices) == list(range(SHAPE[2]))
    _along_the_normal(slices, ascending=True)
    for frame, k in enumerate(slices):
        np.testing.assert_array_equal(pixels[frame], heat[:, :, k].T)
    # The source's plane and pixel measures; the 2-D map's value mapping and window.
    shared = pm.SharedFunctionalGroupsSequence[0]
    sources = case.sources if isinstance(case.sources, list) else [case.sources]
    if "ImageOrientationPatient" in sources[0]:
        cosines = [float(v) for v in sources[0].ImageOrientationPatient]
        np.testing.assert_allclose(
            [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient], cosines
        )
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    np.testing.assert_allclose(spacing, case.volume.spacing[1::-1], atol=1e-6)
    (mapping,) = shared.RealWorldValueMappingSequence
    assert mapping.LUTLabel == "GRADCAM" and mapping.LUTExplanation == "Grad-CAM of nodule"
    assert float(mapping.DoubleFloatRealWorldValueLastValueMapped) == 1.0
    window = shared.FrameVOILUTSequence[0]
    assert (float(window.WindowCenter), float(window.WindowWidth)) == (0.5, 1.0)
    # Derived from every source instance.
    named = {item.ReferencedSOPInstanceUID for item in pm.SourceImageSequence}
    assert named == {uid for uid, _ in case.instances}
    assert pm.SeriesDescription == "Grad-CAM nodule" and pm.ContentLabel == "GRADCAM"


def test_the_segmentation_has_a_frame_where_each_segment_has_pixels(
    case: Case, tmp_path: Path
) -> None:
    nodule = mask_of(_heat())
    mass = np.zeros(SHAPE, dtype=bool)
    mass[2:5, 3:7, 6] = True  # one slice only
    segments = [Segment(0, "nodule", nodule), Segment(3, "mass", mass)]
    uids = new_uid(), new_uid()
    seg = _valid(volume_segmentation(case.sources, segments, HOW, *uids), tmp_path)
    assert seg.SOPClassUID == SEG_CLASS and seg.SeriesNumber == 9903
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == uids
    assert seg.SegmentationType == "BINARY"
    _same_study_and_frame(seg, case)
    read = hd.seg.Segmentation.from_dataset(seg)
    assert [d.segment_label for d in read.SegmentSequence] == ["nodule", "mass"]
    assert [d.segmented_property_type.value for d in read.SegmentSequence] == ["0", "3"]
    assert read.SegmentSequence[0].segmented_property_type.scheme_designator == "99GRADCAM"
    slices = _frame_places(seg, case)
    numbers = [
        int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for item in seg.PerFrameFunctionalGroupsSequence
    ]
    expected = {(k, 1) for k in range(SHAPE[2]) if nodule[:, :, k].any()} | {(6, 2)}
    assert set(zip(slices, numbers, strict=True)) == expected
    assert len(slices) == len(expected)  # no empty frame
    pixels = seg.pixel_array.reshape(len(slices), *SHAPE[1::-1])
    for frame, (k, number) in enumerate(zip(slices, numbers, strict=True)):
        mask = (nodule, mass)[number - 1]
        np.testing.assert_array_equal(pixels[frame].astype(bool), mask[:, :, k].T)


def test_an_empty_segmentation_keeps_one_frame(case: Case, tmp_path: Path) -> None:
    segments = [Segment(0, "nodule", np.zeros(SHAPE, dtype=bool))]
    seg = _valid(volume_segmentation(case.sources, segments, HOW, new_uid(), new_uid()), tmp_path)
    assert int(seg.NumberOfFrames) == 1 and not seg.pixel_array.any()
    assert _frame_places(seg, case) == [0]
    _same_study_and_frame(seg, case)


def _library(made: Dataset) -> list[Dataset]:
    """The IMAGE items of a report's Image Library (TID 1600), in document order."""
    found: list[Dataset] = []

    def walk(items: Sequence[Dataset], inside: bool) -> None:
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            here = inside or (name is not None and name[0].CodeValue == "111028")
            if here and item.ValueType == "IMAGE":
                found.append(item)
            walk(item.get("ContentSequence", []), here)

    walk(made.ContentSequence, False)
    return found


def _lps(case: Case, voxel: tuple[int, int, int]) -> np.ndarray:
    """Where the source headers place a voxel (i column, j row, k slice), in LPS+ mm."""
    i, j, k = voxel
    sources = case.sources if isinstance(case.sources, list) else [case.sources]
    header = sources[0]
    if "ImageOrientationPatient" in header:
        cosines = [float(v) for v in header.ImageOrientationPatient]
        spacing = [float(v) for v in header.PixelSpacing]
    else:
        shared = header.SharedFunctionalGroupsSequence[0]
        cosines = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
        spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    row, column = np.array(cosines[:3]), np.array(cosines[3:])
    return case.positions[k] + i * spacing[1] * row + j * spacing[0] * column


def _groups(made: Dataset) -> Any:
    report = hd.sr.Comprehensive3DSR.from_dataset(made)
    content = report.content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content, report


def test_the_report_points_at_the_peak_in_the_frame_of_reference(
    case: Case, tmp_path: Path
) -> None:
    heat = _heat()
    peak = volume_peak(heat, case.volume.affine)
    assert peak is not None and peak.voxel == (9, 4, 5) and peak.slice == 5
    np.testing.assert_allclose(peak.point, _lps(case, peak.voxel), atol=1e-4)
    findings = [
        VolumeFinding(0, "nodule", 0.875, peak),
        VolumeFinding(1, "mass", 0.125, volume_peak(np.zeros(SHAPE, np.float32), np.eye(4))),
    ]
    pm = MadeObject(PM_CLASS, new_uid(), new_uid())
    seg = MadeObject(SEG_CLASS, new_uid(), new_uid())
    uids = new_uid(), new_uid()
    made = _valid(volume_report(case.sources, findings, HOW, [pm, seg], *uids), tmp_path)
    assert (made.SeriesInstanceUID, made.SOPInstanceUID) == uids and made.SeriesNumber == 9904
    assert made.StudyInstanceUID == case.study and made.PatientID
    assert made.CompletionFlag == "COMPLETE" and made.VerificationFlag == "UNVERIFIED"
    content, report = _groups(made)
    (group,) = content.get_planar_roi_measurement_groups()
    (flat,) = content.get_image_measurement_groups()
    assert group.finding_type.meaning == "nodule" and flat.finding_type.meaning == "mass"
    assert group.tracking_identifier == "Grad-CAM peak: nodule"
    assert group.method.value == "130403"
    (probability,) = group.get_measurements()
    assert probability.name.value == "122157" and probability.value == pytest.approx(0.875)
    region = group.roi
    assert region.ValueType == "SCOORD3D" and region.GraphicType == "POINT"
    assert region.ReferencedFrameOfReferenceUID == case.frame_of_reference
    np.testing.assert_allclose(region.GraphicData, _lps(case, (9, 4, 5)), atol=1e-4)
    # The peak's slice is the one image of the library (a multi-frame: the image).
    (entry,) = _library(made)
    uid, _ = case.instances[5]
    assert entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == uid
    # Evidence: every source instance and the objects made with them.
    evidence = {uids[2] for uids in report.get_evidence()}
    assert evidence == {uid for uid, _ in case.instances} | {pm.instance_uid, seg.instance_uid}
    text = str(made)
    assert "method=gradcam" in text and "layer=features" in text and "model=phantom" in text


def test_a_report_without_a_peak_lists_the_first_slice(case: Case, tmp_path: Path) -> None:
    findings = [VolumeFinding(2, "nodule", 0.5, None)]
    made = _valid(volume_report(case.sources, findings, HOW, [], new_uid(), new_uid()), tmp_path)
    content, _ = _groups(made)
    assert not content.get_planar_roi_measurement_groups()
    (entry,) = _library(made)
    assert entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == case.instances[0][0]


def test_the_peak_is_the_first_maximum_in_c_order() -> None:
    heat = np.zeros(SHAPE, dtype=np.float32)
    assert volume_peak(heat, np.eye(4)) is None
    heat[3, 2, 7] = heat[3, 5, 1] = heat[10, 0, 0] = 0.5
    affine = np.array([[-0.5, 0, 0, 10.0], [0, -0.75, 0, -20.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    peak = volume_peak(heat, affine)
    assert peak is not None and peak.voxel == (3, 2, 7) and peak.slice == 7
    # RAS+ (8.5, -21.5, 47.5) is LPS+ (-8.5, 21.5, 47.5).
    assert peak.point == pytest.approx((-8.5, 21.5, 47.5))


def _series_headers() -> list[Dataset]:
    files = write_ct_series(phantom_hu(SHAPE), signed=True)
    return read_dicom_series_sources(files, _any_size)[1]


def _without(headers: list[Dataset], number: int, keyword: str) -> list[Dataset]:
    changed = copy.deepcopy(headers)
    delattr(changed[number], keyword)
    return changed


def test_what_cannot_carry_a_volumes_objects() -> None:
    headers = _series_headers()
    assert volume_objects_problem(headers) is None
    problem = volume_objects_problem
    assert problem(_without(headers, 3, "FrameOfReferenceUID")) == (
        "a slice of the series has no Frame of Reference UID"
    )
    assert problem(_without(headers, 2, "ImagePositionPatient")) == (
        "slice 2 of the series has no ImagePositionPatient"
    )
    assert problem(_without(headers, 0, "SliceThickness")) == (
        "slice 0 of the series has no SliceThickness"
    )
    assert "no SOPInstanceUID" in str(problem(_without(headers, 1, "SOPInstanceUID")))
    other = copy.deepcopy(headers)
    other[4].FrameOfReferenceUID = new_uid()
    assert problem(other) == "the slices of the series lie in different Frames of Reference"
    assert problem(headers[:1]) == "a volume's objects need the slices of a series, at least 2"
    assert problem([]) == "there is no source image"
    same = copy.deepcopy(headers)
    for ds in same:
        ds.FrameOfReferenceUID = ds.StudyInstanceUID
    assert "Frame of Reference UID is its Study Instance UID" in str(problem(same))
    segmentation = copy.deepcopy(headers)
    for ds in segmentation:
        ds.SOPClassUID = SEG_CLASS
    assert problem(segmentation) == "the source is a Segmentation itself"


def test_what_multiframe_images_cannot_carry_them() -> None:
    files = write_ct_series(phantom_hu(SHAPE), signed=True)
    header = read_multiframe_volume_source(_multiframe(files), _any_size)[1]
    assert volume_objects_problem(header) is None
    without = copy.deepcopy(header)
    del without.FrameOfReferenceUID
    assert volume_objects_problem(without) == "the multi-frame image has no Frame of Reference UID"
    unplaced = copy.deepcopy(header)
    del unplaced.PerFrameFunctionalGroupsSequence
    assert str(volume_objects_problem(unplaced)).startswith(
        "the multi-frame image's frames are not placed as a volume's"
    )


def test_a_map_off_the_sources_grid_is_a_mistake() -> None:
    headers = _series_headers()
    made = _derived(new_uid())
    with pytest.raises(ValueError, match=r"is not on the sources' voxel grid"):
        volume_parametric_map(headers, np.zeros((12, 16, 8), np.float32), made)
    with pytest.raises(ValueError, match=r"is not on the sources' voxel grid"):
        volume_parametric_map(headers[:7], _heat(), made)
    segments = [Segment(0, "nodule", np.ones((16, 12, 9), bool))]
    with pytest.raises(ValueError, match=r"is not on the sources' voxel grid"):
        volume_segmentation(headers, segments, HOW, new_uid(), new_uid())
