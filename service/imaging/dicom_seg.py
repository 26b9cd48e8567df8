"""``dicom-seg``: a DICOM Segmentation of where each explained class's heatmap is high.

The "cheap segmentation" use of Grad-CAM: the normalised map at the source's pixel grid,
at least ``LEVEL`` (0.5), is a segment. One BINARY Segmentation per source image, one
segment per explained class (its label the class label, its type the class's code,
``dicom_codes``), algorithm type AUTOMATIC with an Algorithm Identification naming the
service, method, layer, model and level, and a recommended display colour
(``DISPLAY_COLOURS``). A new series (``SERIES_NUMBER``) in the
source's study, derived from the source image (and its frame), so viewers such as OHIF
overlay it on the source.

A class whose map stays below the level everywhere (an all-zero map above all) has an
empty segment: it is described, with no frame (highdicom omits empty frames; when every
segment is empty the frame is kept, all zero, so the object still holds one).

Sources: single-frame images, on their plane where they give it completely (CT, MR:
Frame of Reference, position, orientation, spacing and slice thickness), else as a 2D
object on their pixel grid (CR, DX, Secondary Captures: no plane, Patient Orientation as
for a Secondary Capture); one frame of a multi-frame image where that frame has a
position in a Frame of Reference (enhanced CT, MR: the segment lies on that frame's
plane). Multi-frame images without one, a CT or MR without the Frame of Reference its
IOD requires, and Segmentations themselves get a reason (``segmentation_problem``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from service.imaging.dicom_codes import (
    MANUFACTURER,
    Explained,
    coding_scheme_identification,
    label_text,
    version,
)
from service.imaging.dicom_out import body_part, frame_of_reference_problem, to_bytes
from service.imaging.source_header import (
    DicomSource,
    patient_orientation,
    state_deidentification,
)

if TYPE_CHECKING:
    import highdicom as hd
    from pydicom.dataset import Dataset

SERIES_NUMBER = 9903
SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
# The segment of a class: its normalised map at the source's pixel grid, at least this.
LEVEL = 0.5
# The colour a viewer should draw each segment in (sRGB, by segment number, cycling):
# distinct hues, the first red, the hot end of the heatmaps' colour map. Without one a
# viewer picks its own (and OHIF says so each time it loads the object).
DISPLAY_COLOURS = (
    (255, 0, 0),
    (0, 200, 0),
    (0, 120, 255),
    (255, 200, 0),
    (200, 0, 255),
    (0, 210, 210),
)


@dataclass(frozen=True)
class Segment:
    """One explained class's segment."""

    index: int  # the class's index among the model's outputs
    label: str
    # (Rows, Columns) bool: the normalised map >= LEVEL; a volume's (I, J, K), on its
    # voxel grid (volume_dicom_out).
    mask: np.ndarray


def mask_of(heat: np.ndarray) -> np.ndarray:
    """``heat`` ``(H, W)`` in [0, 1] → its segment ``(H, W) bool``."""
    return np.greater_equal(heat, np.float32(LEVEL))


def _frame_position(source: Dataset, frame: int | None) -> Any:
    """The Plane Position (Patient) item of ``frame`` of a multi-frame ``source``, or None."""
    per_frame = source.get("PerFrameFunctionalGroupsSequence")
    index = frame or 0
    if not source.get("FrameOfReferenceUID") or per_frame is None or index >= len(per_frame):
        return None
    positions = per_frame[index].get("PlanePositionSequence")
    if not positions or not positions[0].get("ImagePositionPatient"):
        return None
    return positions[0]


# Storage classes whose IOD requires a Frame of Reference (CT, enhanced CT, MR, enhanced
# MR, PET, enhanced PET): a Segmentation derived from one that lacks it would be invalid.
_FRAME_OF_REFERENCE_REQUIRED = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.1.2.1",
        "1.2.840.10008.5.1.4.1.1.4",
        "1.2.840.10008.5.1.4.1.1.4.1",
        "1.2.840.10008.5.1.4.1.1.128",
        "1.2.840.10008.5.1.4.1.1.130",
    }
)


def _has_plane(source: Dataset) -> bool:
    """Whether a single-frame ``source`` places its pixels in its Frame of Reference
    completely: position, orientation, spacing and the slice thickness a Segmentation's
    Pixel Measures must carry with the spacing."""
    counts = {
        "ImagePositionPatient": 3,
        "ImageOrientationPatient": 6,
        "PixelSpacing": 2,
        "SliceThickness": 1,
    }
    if not source.get("FrameOfReferenceUID"):
        return False
    for keyword, count in counts.items():
        element = source.get(keyword)
        if element is None or element == "":
            return False
        values = element if count > 1 else [element]
        if len(values) != count:
            return False
    return True


def segmentation_problem(source: Dataset, frame: int | None) -> str | None:
    """Why ``source`` (``frame`` of it) cannot carry a Segmentation, or None."""
    if str(source.get("SOPClassUID", "")) == SOP_CLASS_UID:
        return "the source is a Segmentation itself; ask for 'dicom-sc'"
    if (
        not source.get("FrameOfReferenceUID")
        and str(source.get("SOPClassUID", "")) in _FRAME_OF_REFERENCE_REQUIRED
    ):
        modality = source.get("Modality", "this")
        return (
            f"the source lacks the Frame of Reference UID its {modality} image must have, so "
            "a Segmentation derived from it would be invalid; ask for 'dicom-sc'"
        )
    if int(source.get("NumberOfFrames", 1) or 1) > 1 and _frame_position(source, frame) is None:
        return (
            "a Segmentation of one frame of a multi-frame image needs that frame's position "
            "in a Frame of Reference (a per-frame Plane Position), which this image does not "
            "give; ask for 'dicom-sc'"
        )
    return frame_of_reference_problem(source, "a Segmentation")


def _as_pixel_grid(source: Dataset) -> None:
    """Remove the spacing, position and orientation of a single image that does not place
    its pixels completely (a CR, a Secondary Capture, a CT without its slice thickness):
    its Segmentation is a 2D object on its pixel grid, with no plane. Left in, highdicom
    would carry the spacing alone into Pixel Measures (dciodvfy wants the slice thickness
    beside it, and so does highdicom's own reader)."""
    for keyword in ("PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient"):
        if keyword in source:
            delattr(source, keyword)


def _segment_descriptions(
    segments: Sequence[Segment], how: Explained
) -> list[hd.seg.SegmentDescription]:
    """One description per segment, numbered from 1: its label, the class's code, the
    algorithm that made it and the colour to draw it in."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=MANUFACTURER,
        family=codes.DCM.ArtificialIntelligence,
        version=version(),
        source=MANUFACTURER,
        parameters={**how.parameters(), "level": str(LEVEL)},
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label_text(segment.label),
            # The segment is a region of the image (where the model's evidence for the
            # class lies), not the finding itself: a spatial concept, typed by the class.
            segmented_property_category=codes.SCT.SpatialAndRelationalConcept,
            segmented_property_type=how.class_code(segment.index, segment.label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(
                *DISPLAY_COLOURS[(number - 1) % len(DISPLAY_COLOURS)]
            ),
        )
        for number, segment in enumerate(segments, start=1)
    ]


def _plane_positions(position: Any) -> list[hd.PlanePositionSequence] | None:
    """For one frame of a multi-frame source, its Plane Position item ``position``,
    which highdicom matches to that source frame for the derivation reference; None
    (no item) for a single image."""
    import highdicom as hd

    if position is None:
        return None
    return [
        hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, position.ImagePositionPatient)
    ]


def _complete_header(
    result: hd.seg.Segmentation,
    source: Dataset,
    segments: Sequence[Segment],
    how: Explained,
    orientation: tuple[str, str] | None,
) -> None:
    """What ``result`` states beyond highdicom's own: its series description, the
    coding scheme of the classes' codes, the source's body part, the de-identification
    and, where it has no plane, the source's patient ``orientation``."""
    result.SeriesDescription = f"Grad-CAM >= {LEVEL} ({how.model})"[:64]
    if how.uses_own_scheme(segment.label for segment in segments):
        result.CodingSchemeIdentificationSequence = [coding_scheme_identification()]
    # No series Laterality: a Segmentation's laterality is per frame (Frame Anatomy), and
    # dciodvfy finds a General Series one an error there.
    body_part(result, source)
    state_deidentification(result)
    shared = result.SharedFunctionalGroupsSequence[0]
    per_frame = result.PerFrameFunctionalGroupsSequence[0]
    if "PlaneOrientationSequence" not in shared and "PlaneOrientationSequence" not in per_frame:
        # General Image: Type 2C where there is no plane: the source's orientation, or
        # empty if unknown (as for a Secondary Capture).
        result.PatientOrientation = list(orientation) if orientation else []


def segmentation(
    dicom: DicomSource,
    segments: Sequence[Segment],
    how: Explained,
    series_uid: str,
    instance_uid: str,
) -> bytes:
    """``segments`` (one per explained class, at the source's Rows × Columns) as one
    BINARY Segmentation of ``dicom`` (its frame); the caller checks
    ``segmentation_problem`` first."""
    import highdicom as hd

    source, frame = dicom.carried_copy(), dicom.frame
    multi_frame = int(source.get("NumberOfFrames", 1) or 1) > 1
    orientation = patient_orientation(source)  # (before its cosines may be taken out)
    if not multi_frame and not _has_plane(source):
        _as_pixel_grid(source)
    descriptions = _segment_descriptions(segments, how)
    # (frames, Rows, Columns, segments): one frame, the explained one.
    pixels = np.stack([segment.mask for segment in segments], axis=-1)[None].astype(np.uint8)
    position = _frame_position(source, frame) if multi_frame else None
    result = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=version(),
        device_serial_number="0",
        content_label="GRADCAM",
        content_description=f"Grad-CAM >= {LEVEL} ({how.method}, layer {how.layer})"[:64],
        # Where every segment is empty the one frame is kept (all zero), as highdicom
        # would, without its warning in the log.
        omit_empty_frames=bool(pixels.any()),
        plane_positions=_plane_positions(position),
    )
    _complete_header(result, source, segments, how, orientation)
    return to_bytes(result)
