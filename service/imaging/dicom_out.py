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

Every object is built from the source's header only (read without pixel data), and
from a conformant copy of it (``conformant_header``): values the standard's value
representations forbid (an ISO birth date ``1911-11-11``, a time ``10:11:12``, a sex
``male``, an over-long name) are corrected where the intended value is certain
(``19111111``, ``101112``, ``M``) and blanked otherwise, as Type 2 attributes may be;
an invalid UID makes the object impossible (``DerivedObjectImpossible``, which names
the attribute, never its value).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

MANUFACTURER = "gradcam-service"
# Series numbers of what the service adds to a study (high, so they list last).
SC_SERIES_NUMBER = 9901
PM_SERIES_NUMBER = 9902
_JPEG_QUALITY = 90

# Transfer syntaxes whose compression loses information (the derived object inherits it).
_LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",  # JPEG 2000
}


# Storage SOP classes of single-frame images: CR, DX/MG/IO (presentation and processing),
# CT, MR, US, Secondary Capture, PET.
_SINGLE_FRAME = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.2",
        "1.2.840.10008.5.1.4.1.1.1.2.1",
        "1.2.840.10008.5.1.4.1.1.1.3",
        "1.2.840.10008.5.1.4.1.1.1.3.1",
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.1.4",
        "1.2.840.10008.5.1.4.1.1.6.1",
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.128",
    }
)


class DerivedObjectImpossible(ValueError):
    """The source's header cannot be carried into a derived object; the message names the
    attribute (never its value) and is shown to the client as the heatmap's reason."""


# Separators that make a common non-DICOM date or time: 1911-11-11, 1911/11/11, 10:11:12.
_ISO_DATE = re.compile(r"(\d{4})[-./](\d{2})[-./](\d{2})")
_ISO_TIME = re.compile(r"(\d{2}):(\d{2})(?::(\d{2}(?:\.\d{1,6})?))?")
_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
# Value representations whose values are text the standard constrains.
_CHECKED_VRS = frozenset(
    {
        "AE",
        "AS",
        "CS",
        "DA",
        "DS",
        "DT",
        "IS",
        "LO",
        "LT",
        "PN",
        "SH",
        "ST",
        "TM",
        "UC",
        "UI",
        "UR",
        "UT",
    }
)


def _corrected(vr: str, keyword: str, value: str) -> str:
    """``value`` made conformant where its meaning is certain; else "" (blank)."""
    from pydicom.config import RAISE
    from pydicom.valuerep import validate_value

    candidate = value.strip()
    if vr == "DA" and (found := _ISO_DATE.fullmatch(candidate)):
        candidate = "".join(found.groups())
    elif vr == "TM" and (found := _ISO_TIME.fullmatch(candidate)):
        candidate = "".join(part for part in found.groups() if part)
    elif vr == "CS":
        candidate = candidate.upper()
        if keyword == "PatientSex":
            candidate = _SEX.get(candidate, "")
    try:
        validate_value(vr, candidate, RAISE)
    except (ValueError, TypeError):
        return ""
    return candidate


def _conform(dataset: Dataset) -> None:
    """Every checked value of ``dataset`` (and its sequences) conformant, in place."""
    from pydicom.config import RAISE
    from pydicom.multival import MultiValue
    from pydicom.valuerep import validate_value

    for element in dataset:
        if element.VR == "SQ":
            for item in element.value or []:
                _conform(item)
            continue
        if element.VR not in _CHECKED_VRS or element.value in (None, ""):
            continue
        values = list(element.value) if isinstance(element.value, MultiValue) else [element.value]
        texts = [str(v) for v in values]
        try:
            for text in texts:
                validate_value(element.VR, text, RAISE)
            if element.keyword == "PatientSex" and texts[0] not in ("M", "F", "O"):
                raise ValueError("not M, F or O")  # highdicom's enumeration
            continue
        except (ValueError, TypeError):
            pass
        if element.VR == "UI":
            raise DerivedObjectImpossible(
                f"the source's {element.keyword or element.tag} is not a valid DICOM UID"
            )
        fixed = [_corrected(element.VR, element.keyword, text) for text in texts]
        element.value = fixed[0] if len(fixed) == 1 else fixed


def conformant_header(source: Dataset) -> Dataset:
    """A copy of ``source`` whose values a derived object may carry (module text)."""
    import copy

    header = copy.deepcopy(source)
    _conform(header)
    return header


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


def new_uid() -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid())


def _orientation_letters(vector: Sequence[float]) -> str:
    """A direction cosine vector as patient-orientation letters (PS3.3 C.7.6.1.1.1)."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    order = sorted(range(3), key=lambda axis: -abs(vector[axis]))
    return "".join(
        letters[axis][0 if vector[axis] > 0 else 1] for axis in order if abs(vector[axis]) > 1e-4
    )


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation (rows, columns), or from its direction cosines."""
    given = source.get("PatientOrientation")
    if given is not None and len(given) == 2 and all(given):
        return str(given[0]), str(given[1])
    cosines = source.get("ImageOrientationPatient")
    if cosines is not None and len(cosines) == 6:
        values = [float(v) for v in cosines]
        return _orientation_letters(values[:3]), _orientation_letters(values[3:])
    return None


def _source_reference(source: Dataset, frame: int | None) -> Dataset:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    # The frame is named for multi-frame SOP classes only (the standard forbids it for
    # single-frame ones, even where a file of such a class carries several frames).
    if int(source.get("NumberOfFrames", 1) or 1) > 1 and source.SOPClassUID not in _SINGLE_FRAME:
        item.ReferencedFrameNumber = (frame or 0) + 1
    return item


def _source_was_lossy(source: Dataset) -> tuple[str, str | None]:
    """("01", method) when the source's pixels went through lossy compression."""
    syntax = str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", ""))
    if syntax in _LOSSY_SYNTAXES:
        return "01", _LOSSY_SYNTAXES[syntax]
    if str(source.get("LossyImageCompression", "00")) == "01":
        methods = source.get("LossyImageCompressionMethod")
        method = None
        if methods:
            method = str(methods[0] if not isinstance(methods, str) else methods)
        return "01", method
    return "00", None


def _common(
    dataset: Dataset, source: Dataset, made: DerivedFrom, frame: int | None, description: str
) -> None:
    dataset.SeriesDescription = f"Grad-CAM {made.label}"[:64]
    dataset.DerivationDescription = description[:1024]
    dataset.SourceImageSequence = [_source_reference(source, frame)]
    # General Series: Laterality is Type 2C, needed for a paired body part. Copied from
    # the source; with no body part to tell, present and empty (validators ask for it).
    if "Laterality" in source:
        dataset.Laterality = source.Laterality
    if "BodyPartExamined" in source:
        dataset.BodyPartExamined = source.BodyPartExamined
    elif "Laterality" not in source:
        dataset.Laterality = ""


def secondary_capture(
    source: Dataset, overlay: np.ndarray, made: DerivedFrom, frame: int | None, encoding: str
) -> bytes:
    """``overlay`` ``(Rows, Columns, 3) uint8`` as a Secondary Capture of ``source``."""
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

    source = conformant_header(source)
    jpeg = encoding == "jpeg"
    given = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
    spacing = (float(given[0]), float(given[1])) if given and len(given) == 2 else None
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
        frame,
        f"Grad-CAM ({made.method}, layer {made.layer}, model "
        f"{made.model}) of class '{made.label}' blended over the image as displayed",
    )
    image.ImageType = ["DERIVED", "SECONDARY"]
    # Type 2C: the source's orientation, oblique ones included ("LP"), or empty if unknown.
    orientation = _patient_orientation(source)
    image.PatientOrientation = list(orientation) if orientation else []  # [] writes empty
    image.BurnedInAnnotation = (
        "YES" if str(source.get("BurnedInAnnotation", "NO")) == "YES" else "NO"
    )
    lossy, method = _source_was_lossy(source)
    if jpeg:
        lossy, method = "01", "ISO_10918_1"
    image.LossyImageCompression = lossy
    if lossy == "01":
        if jpeg:
            raw = overlay.size
            image.LossyImageCompressionRatio = f"{raw / max(len(image.PixelData), 1):.2f}"[:16]
        if method:
            image.LossyImageCompressionMethod = method
    return _bytes(image)


def parametric_map(source: Dataset, heat: np.ndarray, made: DerivedFrom) -> bytes:
    """``heat`` ``(Rows, Columns)`` in [0, 1] as a float Parametric Map on ``source``'s
    plane; the caller checks ``parametric_map_problem`` first."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    source = conformant_header(source)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="GRADCAM",
        lut_explanation=f"Grad-CAM of {made.label}"[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    result = hd.pm.ParametricMap(
        source_images=[source],
        pixel_array=np.ascontiguousarray(heat, dtype=np.float32),
        series_instance_uid=made.series_uid,
        series_number=PM_SERIES_NUMBER,
        sop_instance_uid=made.instance_uid,
        instance_number=made.instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=_version(),
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="GRADCAM",
        content_description=f"Grad-CAM {made.label}"[:64],
    )
    _common(
        result,
        source,
        made,
        None,
        f"Grad-CAM ({made.method}, layer {made.layer}, model "
        f"{made.model}) of class '{made.label}', normalised to [0, 1]",
    )
    return _bytes(result)


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
    return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradcam-service")
    except PackageNotFoundError:
        return "0"


def _bytes(dataset: Any) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
