"""The DICOM objects of a volume's map, on the voxel grid of the DICOM volume it explains:
a Parametric Map, a Segmentation and a TID 1500 report, as ``dicom_out``, ``dicom_seg``
and ``dicom_sr`` make them for one image (the same series numbers, codes, labels,
algorithm identification and header rules), built from the sources' headers only.

The sources are the series' single-frame slices in the volume's slice order (``k``, as
``dicom_volume.read_dicom_series_sources`` gives them) or one enhanced multi-frame image
(``read_multiframe_volume_source``), whose stored frames ``dicom_volume.multiframe_order``
maps to the volume's slices. Slice ``k`` of a map ``(I, J, K)`` is the frame
``map[:, :, k].T`` (rows × columns) of the source slice ``k``:

- ``volume_parametric_map``: one float Parametric Map with a frame per source slice, each
  on its slice's plane (highdicom takes each frame's position, orientation and pixel
  measures from its source and derives it from that source) in the series' Frame of
  Reference; highdicom stores the frames in its own order along the normal, each frame
  placed by its own position.
- ``volume_segmentation``: one BINARY Segmentation, a frame per slice and segment where
  the segment has pixels (an all-empty Segmentation keeps one all-zero frame, on slice 0,
  as the 2-D one keeps its only frame).
- ``volume_report``: one measurement group per explained class, its peak a 3-D point
  (SCOORD3D POINT, DICOM's LPS+ patient coordinates in mm) in the Frame of Reference;
  the Image Library lists the slice of each peak (the peak's instance, placed there by its
  position), and the evidence the whole series and the objects made with it.

``volume_objects_problem`` says why a series cannot carry them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service.imaging import dicom_seg
from service.imaging.dicom_codes import MANUFACTURER, Explained, version
from service.imaging.dicom_out import (
    DerivedFrom,
    frame_of_reference_problem,
    parametric_map_frames,
    to_bytes,
)
from service.imaging.dicom_seg import (
    LEVEL,
    Segment,
    _complete_header,
    _frame_position,
    _plane_positions,
    _segment_descriptions,
)
from service.imaging.dicom_sr import MadeObject, evidence_of, report_of
from service.imaging.dicom_volume import multiframe_order
from service.imaging.source_header import (
    conformant_header,
    instance_reference,
    missing_uids,
    source_reference,
    with_type_2_patient_study,
)
from service.imaging.volume import peak_at

if TYPE_CHECKING:
    import highdicom as hd
    from pydicom.dataset import Dataset

# A series' slices each need these to lie in its Frame of Reference; the slice thickness
# is what the objects' Pixel Measures carry beside the spacing (dciodvfy wants both).
_PLANE_COUNTS = {
    "ImagePositionPatient": 3,
    "ImageOrientationPatient": 6,
    "PixelSpacing": 2,
    "SliceThickness": 1,
}


@dataclass(frozen=True)
class VolumePeak:
    """Where a volume's map is highest: ``voxel`` (i, j, k), ``point`` the voxel's centre
    in DICOM's patient coordinates (LPS+ mm)."""

    voxel: tuple[int, int, int]
    point: tuple[float, float, float]

    @property
    def slice(self) -> int:
        """The slice (``k``) the peak lies in: its source is ``sources[k]``."""
        return self.voxel[2]


@dataclass(frozen=True)
class VolumeFinding:
    """One explained class of a volume, as the report states it."""

    index: int  # the class's index among the model's outputs
    label: str
    probability: float
    peak: VolumePeak | None  # None: the map is all zero


def volume_peak(heat: np.ndarray, affine: np.ndarray) -> VolumePeak | None:
    """``heat`` ``(I, J, K)`` in [0, 1] on a volume whose ``affine`` maps voxels to RAS+
    mm: its first maximum in C order (as ``dicom_sr.peak_of``), or None for a map that is
    all zero (it points nowhere)."""
    if heat.size == 0 or not float(heat.max()) > 0:
        return None
    voxel, (x, y, z) = peak_at(heat, affine)
    # DICOM's patient axes are LPS+: RAS+ negated in x and y.
    return VolumePeak(voxel, (-x, -y, z))


def _slices(sources: Sequence[Dataset] | Dataset) -> list[Dataset]:
    """The sources as a list: the series' slices, or the one multi-frame image."""
    from pydicom.dataset import Dataset

    return [sources] if isinstance(sources, Dataset) else list(sources)


def _multi_frame(slices: Sequence[Dataset]) -> bool:
    return len(slices) == 1 and int(slices[0].get("NumberOfFrames", 1) or 1) > 1


def _series_problem(slices: Sequence[Dataset]) -> str | None:
    """Why a series' slices do not lie in one Frame of Reference completely, or None."""
    frames = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in slices}
    if "" in frames:
        return "a slice of the series has no Frame of Reference UID"
    if len(frames) > 1:
        return "the slices of the series lie in different Frames of Reference"
    if len({str(ds.get("StudyInstanceUID", "")) for ds in slices}) > 1:
        return "the slices of the series belong to different studies"
    for number, ds in enumerate(slices):
        for keyword, count in _PLANE_COUNTS.items():
            value = ds.get(keyword)
            values = value if count > 1 and value is not None else [value]
            if value in (None, "") or len(values) != count:
                return f"slice {number} of the series has no {keyword}"
    return None


def volume_objects_problem(sources: Sequence[Dataset] | Dataset) -> str | None:
    """Why ``sources`` (a series' slices in slice order, or one multi-frame image) cannot
    carry a volume's Parametric Map, Segmentation and report, or None."""
    from service.contract.errors import InvalidField

    slices = _slices(sources)
    if not slices:
        return "there is no source image"
    for ds in slices:
        if (missing := missing_uids(ds)) is not None:
            return missing
    if str(slices[0].get("SOPClassUID", "")) == dicom_seg.SOP_CLASS_UID:
        return "the source is a Segmentation itself"
    if _multi_frame(slices):
        if not str(slices[0].get("FrameOfReferenceUID", "") or ""):
            return "the multi-frame image has no Frame of Reference UID"
        try:
            multiframe_order(slices[0])
        except InvalidField as refused:
            return f"the multi-frame image's frames are not placed as a volume's ({refused})"
    else:
        if len(slices) < 2:
            return "a volume's objects need the slices of a series, at least 2"
        if (problem := _series_problem(slices)) is not None:
            return problem
    return frame_of_reference_problem(slices[0], "a volume's objects")


def _as_stored(slices: Sequence[Dataset], frames: np.ndarray) -> np.ndarray:
    """``frames`` ``(K, ...)`` in the volume's slice order, in the order of the sources'
    frames: unchanged for a series (its slices are in slice order), the stored order of
    a multi-frame image's frames."""
    if not _multi_frame(slices):
        return frames
    stored = np.empty_like(frames)
    stored[list(multiframe_order(slices[0]))] = frames
    return stored


def _frames(slices: Sequence[Dataset], volume_map: np.ndarray) -> np.ndarray:
    """A map ``(I, J, K)`` as frames ``(K, rows J, columns I)``; a ``ValueError`` where it
    is not on the sources' grid (the caller's mistake: it comes from their volume)."""
    frames = np.ascontiguousarray(np.transpose(volume_map, (2, 1, 0)))
    first = slices[0]
    count = int(first.get("NumberOfFrames", 1) or 1) if _multi_frame(slices) else len(slices)
    grid = (count, int(first.Rows), int(first.Columns))
    if frames.shape[:3] != grid:
        raise ValueError(
            f"a map of shape {volume_map.shape[:3]} is not on the sources' voxel grid "
            f"(columns, rows, slices) {grid[2], grid[1], grid[0]}"
        )
    return frames


def volume_parametric_map(
    sources: Sequence[Dataset] | Dataset, heat: np.ndarray, made: DerivedFrom
) -> bytes:
    """``heat`` ``(I, J, K) float32`` in [0, 1] on the volume's voxel grid as one float
    Parametric Map with a frame per source slice; the caller checks
    ``volume_objects_problem`` first."""
    slices = [conformant_header(ds) for ds in _slices(sources)]
    frames = _as_stored(slices, _frames(slices, heat.astype(np.float32, copy=False)))
    if _multi_frame(slices):
        references = [instance_reference(slices[0])]  # all its frames
    else:
        references = [source_reference(ds, None) for ds in slices]
    return parametric_map_frames(slices, frames, made, references)


def _segmentation_pixels(
    slices: Sequence[Dataset], segments: Sequence[Segment]
) -> tuple[list[Dataset], np.ndarray, list[hd.PlanePositionSequence] | None]:
    """The sources, frames ``(frames, rows, columns, segments) uint8`` and plane positions
    highdicom builds the Segmentation from: every slice; or, where every segment is
    empty, slice 0 alone (one all-zero frame, not one per slice and segment)."""
    masks = np.stack([_frames(slices, segment.mask) for segment in segments], axis=-1)
    pixels = masks.astype(np.uint8)
    if pixels.any():
        return list(slices), _as_stored(slices, pixels), None
    if not _multi_frame(slices):
        return [slices[0]], pixels[:1], None
    first = multiframe_order(slices[0])[0]
    return list(slices), pixels[:1], _plane_positions(_frame_position(slices[0], first))


def volume_segmentation(
    sources: Sequence[Dataset] | Dataset,
    segments: Sequence[Segment],
    how: Explained,
    series_uid: str,
    instance_uid: str,
) -> bytes:
    """``segments`` (one per explained class, each ``mask`` ``(I, J, K) bool`` on the
    volume's voxel grid) as one BINARY Segmentation with a frame per source slice and
    segment where the segment has pixels; the caller checks ``volume_objects_problem``
    first."""
    import highdicom as hd

    slices = [with_type_2_patient_study(conformant_header(ds)) for ds in _slices(sources)]
    used, pixels, positions = _segmentation_pixels(slices, segments)
    result = hd.seg.Segmentation(
        source_images=used,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(segments, how),
        series_instance_uid=series_uid,
        series_number=dicom_seg.SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=version(),
        device_serial_number="0",
        content_label="GRADCAM",
        content_description=f"Grad-CAM >= {LEVEL} ({how.method}, layer {how.layer})"[:64],
        # Where every segment is empty its one frame is kept (all zero), as highdicom
        # would keep them all, without its warning in the log.
        omit_empty_frames=bool(pixels.any()),
        plane_positions=positions,
    )
    _complete_header(result, slices[0], segments, how, None)
    return to_bytes(result)


def _peak_point(peak: VolumePeak | None, frame_of_reference: str) -> hd.sr.ImageRegion3D | None:
    """A peak as a 3-D POINT in the Frame of Reference; None without a peak."""
    import highdicom as hd

    if peak is None:
        return None
    return hd.sr.ImageRegion3D(
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=np.array([peak.point]),
        frame_of_reference_uid=frame_of_reference,
    )


def _library(slices: Sequence[Dataset], findings: Sequence[VolumeFinding]) -> list[Dataset]:
    """The images a report's Image Library lists: the multi-frame image; or the slices
    the peaks lie in, each once, in the findings' order (slice 0 where no map has a peak:
    a viewer needs one image to open the report on)."""
    if _multi_frame(slices):
        return list(slices)
    peaks = [finding.peak.slice for finding in findings if finding.peak is not None]
    return [slices[k] for k in dict.fromkeys(peaks or [0])]


def volume_report(
    sources: Sequence[Dataset] | Dataset,
    findings: Sequence[VolumeFinding],
    how: Explained,
    made: Sequence[MadeObject],
    series_uid: str,
    instance_uid: str,
) -> bytes:
    """The TID 1500 report of ``findings`` on a volume (module text), naming the objects
    ``made`` with it; the caller checks ``volume_objects_problem`` first."""
    slices = [with_type_2_patient_study(conformant_header(ds)) for ds in _slices(sources)]
    frame_of_reference = str(slices[0].FrameOfReferenceUID)
    located = [(finding, _peak_point(finding.peak, frame_of_reference)) for finding in findings]
    return report_of(
        evidence_of(slices, made),
        _library(slices, findings),
        located,
        how,
        series_uid,
        instance_uid,
    )
