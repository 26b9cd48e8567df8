"""Results a PACS stores: DICOM objects built with highdicom from the source's header.

- ``dicom-sc``: a Secondary Capture Image, the overlay in RGB at the source's Rows ×
  Columns (drawn on what a viewer shows: rescale, window, MONOCHROME1 inverted, or the
  colour original). A new series in the source's study; patient and study copied;
  the source image referenced; derived; Burned In Annotation as the source says (the
  heatmap carries no text); lossy-compression attributes when the source was lossy or
  the object is JPEG-encoded.
- ``dicom-pm``: a Parametric Map of float values in [0, 1] on the source's pixel
  grid and Frame of Reference (CT, MR and other images with a plane position), so
  viewers such as OHIF overlay it on the source.

The Segmentation (``dicom-seg``) and the SR report (``dicom-sr``) are built in
``dicom_seg.py`` and ``dicom_sr.py`` with the helpers here and the codes of
``dicom_codes.py``.

Every object is built from the source's header only (read without pixel data), and
from a conformant copy of it (``source_header``: values corrected or blanked where
the standard forbids them; an invalid UID makes the object impossible,
``DerivedObjectImpossible``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from service import package_version
from service.imaging.dicom_codes import MANUFACTURER
from service.imaging.source_header import (
    DicomSource,
    patient_orientation,
    source_reference,
    source_was_lossy,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# Series numbers of what the service adds to a study (high, so they list last; the
# Segmentation and the report are 9903 and 9904, dicom_seg.py and dicom_sr.py).
SC_SERIES_NUMBER = 9901
PM_SERIES_NUMBER = 9902
SC_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
PM_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage


@dataclass(frozen=True)
class DerivedFrom:
    """What a derived object says about how it was made."""

    label: str  # the explained class
    method: str
    layer: str
    model: str
    instance_number: int  # within the new series (one series per source image)
    series_uid: str
    instance_uid: str


# Body Part Examined defined terms of structures that are not paired (PS3.16 Annex L):
# a derived object of such a part carries no Laterality.
UNPAIRED_BODY_PARTS = frozenset(
    {
        "ABDOMEN",
        "ABDOMENPELVIS",
        "AORTA",
        "APPENDIX",
        "BLADDER",
        "BRAIN",
        "CERVIX",
        "CHEST",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "CIRCLEOFWILLIS",
        "COCCYX",
        "COLON",
        "CORONARYARTERY",
        "CSPINE",
        "CTSPINE",
        "DUODENUM",
        "ESOPHAGUS",
        "GALLBLADDER",
        "HEAD",
        "HEADNECK",
        "HEART",
        "JEJUNUM",
        "LARYNX",
        "LIVER",
        "LSPINE",
        "LSSPINE",
        "MEDIASTINUM",
        "MOUTH",
        "NECK",
        "NECKCHEST",
        "NECKCHESTABDOMEN",
        "NECKCHESTABDPELV",
        "NOSE",
        "PANCREAS",
        "PELVIS",
        "PENIS",
        "PHARYNX",
        "PROSTATE",
        "RECTUM",
        "SACRUM",
        "SCALP",
        "SKULL",
        "SPINE",
        "SPLEEN",
        "STERNUM",
        "STOMACH",
        "THYMUS",
        "THYROID",
        "TLSPINE",
        "TONGUE",
        "TRACHEA",
        "TSPINE",
        "URETHRA",
        "UTERUS",
        "VAGINA",
        "VULVA",
        "WHOLEBODY",
    }
)


def new_uid() -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid())


def _unpaired(part: str) -> str | None:
    """``part`` as the defined term of an unpaired structure ("WHOLE BODY" is written
    "WHOLEBODY"), or None when it is paired or unknown."""
    term = part.replace(" ", "").upper()
    return term if term in UNPAIRED_BODY_PARTS else None


def body_part(dataset: Dataset, source: Dataset) -> None:
    """The source's Body Part Examined, if any (an unpaired one as its defined term)."""
    part = str(source.get("BodyPartExamined", "") or "")
    if part:
        dataset.BodyPartExamined = _unpaired(part) or part


def body_part_and_laterality(dataset: Dataset, source: Dataset) -> None:
    """The source's Body Part Examined and Laterality, as a derived image series carries
    them. General Series: Laterality is Type 2C: absent for an unpaired body part, else
    present (the source's value, or empty when unknown)."""
    body_part(dataset, source)
    if _unpaired(str(source.get("BodyPartExamined", "") or "")) is None:
        dataset.Laterality = source.get("Laterality", "") or ""


def _common(
    dataset: Dataset,
    source: Dataset,
    made: DerivedFrom,
    references: Sequence[Dataset],
    description: str,
) -> None:
    """What every derived image states beyond highdicom's own: its series description,
    how it was derived, the images it was derived from (Source Image Sequence items:
    ``source_reference``; each slice of a volume's series) and ``source``'s body part
    and laterality."""
    dataset.SeriesDescription = f"Grad-CAM {made.label}"[:64]
    dataset.DerivationDescription = description[:1024]
    dataset.SourceImageSequence = list(references)
    body_part_and_laterality(dataset, source)


def secondary_capture(
    dicom: DicomSource, overlay: np.ndarray, made: DerivedFrom, encoding: str
) -> bytes:
    """``overlay`` ``(Rows, Columns, 3) uint8`` as a Secondary Capture of ``dicom``."""
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

    source, frame = dicom.carried(), dicom.frame
    jpeg = encoding == "jpeg"
    given = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
    spacing = (float(given[0]), float(given[1])) if given and len(given) == 2 else None
    if spacing is not None and min(spacing) <= 0:
        spacing = None  # a spacing of zero (seen in real files) says nothing: leave it out
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(overlay),
        photometric_interpretation="YBR_FULL_422" if jpeg else "RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=made.series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=made.instance_uid,
        instance_number=made.instance_number,
        manufacturer=MANUFACTURER,
        pixel_spacing=spacing,  # type: ignore[arg-type]  # mm, floats (its hint says int)
        # highdicom takes one letter per axis; the real value is set below.
        patient_orientation=("L", "F"),
        transfer_syntax_uid=JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian,
    )
    _common(
        image,
        source,
        made,
        [source_reference(source, frame)],
        f"Grad-CAM ({made.method}, layer {made.layer}, model "
        f"{made.model}) of class '{made.label}' blended over the image as displayed",
    )
    image.ImageType = ["DERIVED", "SECONDARY"]
    # Type 2C: the source's orientation, oblique ones included ("LP"), or empty if unknown.
    orientation = patient_orientation(source)
    image.PatientOrientation = list(orientation) if orientation else []  # [] writes empty
    image.BurnedInAnnotation = (
        "YES" if str(source.get("BurnedInAnnotation", "NO")) == "YES" else "NO"
    )
    lossy, method = source_was_lossy(source)
    if jpeg:
        lossy, method = "01", "ISO_10918_1"
    image.LossyImageCompression = lossy
    if lossy == "01":
        if jpeg:
            raw = overlay.size
            image.LossyImageCompressionRatio = f"{raw / max(len(image.PixelData), 1):.2f}"[:16]
        if method:
            image.LossyImageCompressionMethod = method
    return to_bytes(image)


def parametric_map(dicom: DicomSource, heat: np.ndarray, made: DerivedFrom) -> bytes:
    """``heat`` ``(Rows, Columns)`` in [0, 1] as a float Parametric Map on ``dicom``'s
    plane; the caller checks ``parametric_map_problem`` first."""
    source = dicom.carried()
    return parametric_map_frames([source], heat, made, [source_reference(source, None)])


def parametric_map_frames(
    sources: Sequence[Dataset],
    frames: np.ndarray,
    made: DerivedFrom,
    references: Sequence[Dataset],
) -> bytes:
    """``frames`` in [0, 1], ``(Rows, Columns)`` or ``(frames, Rows, Columns)``, as one
    float Parametric Map on the planes of the (conformant) ``sources``: one image, a
    series' slices (one per frame, in the frames' order) or one multi-frame image (its
    frames as stored), from which highdicom takes each frame's plane; ``references``: the
    Source Image Sequence items."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    mapping = hd.pm.RealWorldValueMapping(
        lut_label="GRADCAM",
        lut_explanation=f"Grad-CAM of {made.label}"[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    result = hd.pm.ParametricMap(
        source_images=list(sources),
        pixel_array=np.ascontiguousarray(frames, dtype=np.float32),
        series_instance_uid=made.series_uid,
        series_number=PM_SERIES_NUMBER,
        sop_instance_uid=made.instance_uid,
        instance_number=made.instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=package_version(fallback="0"),
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="GRADCAM",
        content_description=f"Grad-CAM {made.label}"[:64],
    )
    _common(
        result,
        sources[0],
        made,
        references,
        f"Grad-CAM ({made.method}, layer {made.layer}, model "
        f"{made.model}) of class '{made.label}', normalised to [0, 1]",
    )
    frames_in_slice_order(result)
    return to_bytes(result)


_PIXEL_KEYWORDS = ("FloatPixelData", "DoubleFloatPixelData", "PixelData")


def frames_in_slice_order(dataset: Dataset) -> None:
    """A multi-frame object's frames put in order along its slice normal (row × column),
    the order of the series it lies on. highdicom writes them the other way, and OHIF
    3.13 lays a Parametric Map's frames over the CT in their stored order: a map high on
    the six most superior slices was drawn on the six most inferior. Each frame keeps its
    own position, so a reader that places frames by position sees no change."""
    items = list(dataset.get("PerFrameFunctionalGroupsSequence") or [])
    if len(items) < 2 or not all("PlanePositionSequence" in item for item in items):
        return
    shared = dataset.SharedFunctionalGroupsSequence[0]
    holder = shared if "PlaneOrientationSequence" in shared else items[0]
    cosines = np.asarray(holder.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    normal = np.cross(cosines[:3], cosines[3:])
    along = [
        float(np.dot(np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float), normal))
        for item in items
    ]
    order = np.argsort(along, kind="stable")
    if (order == np.arange(len(items))).all():
        return
    keyword = next(k for k in _PIXEL_KEYWORDS if k in dataset)
    stored = np.frombuffer(dataset[keyword].value, dtype=np.uint8).reshape(len(items), -1)
    dataset[keyword].value = stored[order].tobytes()
    dataset.PerFrameFunctionalGroupsSequence = [items[i] for i in order]


def parametric_map_problem(source: Dataset) -> str | None:
    """Why ``source`` cannot carry a Parametric Map, or None."""
    missing = [
        key
        for key in (
            "FrameOfReferenceUID",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
        )
        if source.get(key) in (None, "")
    ]
    if int(source.get("SamplesPerPixel", 1)) != 1:
        return "a Parametric Map needs a grayscale source image"
    if missing:
        modality = source.get("Modality", "this")
        return (
            f"a Parametric Map lies on the source's plane in a Frame of Reference, which "
            f"this {modality} image does not have (no {', '.join(missing)}); ask for "
            "'dicom-sc' instead"
        )
    if int(source.get("NumberOfFrames", 1) or 1) > 1:
        return "a Parametric Map of one frame of a multi-frame source is not supported"
    return frame_of_reference_problem(source, "a map")


def frame_of_reference_problem(source: Dataset, what: str) -> str | None:
    """Why an object on ``source``'s Frame of Reference would be invalid, or None."""
    frame_of_reference = str(source.get("FrameOfReferenceUID", "") or "")
    if frame_of_reference and frame_of_reference == str(source.get("StudyInstanceUID", "")):
        # A defect of the source (seen in real files); an object carrying it is invalid.
        return (
            f"the source's Frame of Reference UID is its Study Instance UID, which the "
            f"standard forbids, so {what} on that frame would be invalid; ask for 'dicom-sc'"
        )
    return None


def to_bytes(dataset: Any) -> bytes:
    """``dataset`` as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
