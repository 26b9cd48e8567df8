"""The source's header as a derived object carries it: a conformant copy of it, its
patient orientation, the reference to it, and whether its pixels were lossy.

Every derived object is built from a conformant copy of the source's header
(``conformant_header``): values the standard's value representations forbid (an ISO
birth date ``1911-11-11``, a time ``10:11:12``, a sex ``male``, an over-long name) are
corrected where the intended value is certain (``19111111``, ``101112``, ``M``) and
blanked otherwise, as Type 2 attributes may be; an invalid UID makes the object
impossible (``DerivedObjectImpossible``, which names the attribute, never its value).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


class DerivedObjectImpossible(ValueError):
    """The source's header cannot be carried into a derived object; the message names the
    attribute (never its value) and is shown to the client as the heatmap's reason."""


# Separators that make a common non-DICOM date or time: 1911-11-11, 1911/11/11, 10:11:12.
_ISO_DATE = re.compile(r"(\d{4})[-./](\d{2})[-./](\d{2})")
_ISO_TIME = re.compile(r"(\d{2}):(\d{2})(?::(\d{2}(?:\.\d{1,6})?))?")
_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
# A UID is an OID: its first component is 0, 1 or 2 (ISO/IEC 8824; pydicom checks only
# the characters, and files with "999.999..." UIDs exist).
_UID_ROOTS = frozenset({"0", "1", "2"})
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
                if element.VR == "UI" and text.split(".", 1)[0] not in _UID_ROOTS:
                    raise ValueError("a UID's first component is 0, 1 or 2")
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
    header = copy.deepcopy(source)
    _conform(header)
    return header


class DicomSource:
    """A DICOM source image as the objects derived from it read it: its header as
    received, the frame explained, and the conformant copy they all carry, made once per
    image (on first use, inside the first object's build, whose errors it raises; again
    for each later object, without making it again)."""

    def __init__(self, header: Dataset, frame: int | None) -> None:
        self.header = header
        self.frame = frame
        self._carried: Dataset | None = None
        self._failure: Exception | None = None

    def carried(self) -> Dataset:
        """The conformant copy: read it, never change it (``carried_copy`` to change)."""
        if self._failure is not None:
            raise self._failure
        if self._carried is None:
            try:
                self._carried = conformant_header(self.header)
            except Exception as failure:
                self._failure = failure
                raise
        return self._carried

    def carried_copy(self) -> Dataset:
        """A copy of the conformant header to change, with the patient and study
        attributes it lacks present and empty (``with_type_2_patient_study``)."""
        return with_type_2_patient_study(copy.deepcopy(self.carried()))


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


def _orientation_letters(vector: Sequence[float]) -> str:
    """A direction cosine vector as patient-orientation letters (PS3.3 C.7.6.1.1.1)."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    order = sorted(range(3), key=lambda axis: -abs(vector[axis]))
    return "".join(
        letters[axis][0 if vector[axis] > 0 else 1] for axis in order if abs(vector[axis]) > 1e-4
    )


def patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation (rows, columns), or from its direction cosines."""
    given = source.get("PatientOrientation")
    if given is not None and len(given) == 2 and all(given):
        return str(given[0]), str(given[1])
    cosines = source.get("ImageOrientationPatient")
    if cosines is not None and len(cosines) == 6:
        values = [float(v) for v in cosines]
        return _orientation_letters(values[:3]), _orientation_letters(values[3:])
    return None


def referenced_frame_number(source: Dataset, frame: int | None) -> int | None:
    """The (1-based) frame number a reference to ``frame`` of ``source`` carries, or None.

    Named for multi-frame SOP classes only: the standard forbids it for single-frame ones,
    even where a file of such a class carries several frames."""
    if int(source.get("NumberOfFrames", 1) or 1) > 1 and source.SOPClassUID not in _SINGLE_FRAME:
        return (frame or 0) + 1
    return None


def instance_reference(source: Dataset) -> Dataset:
    """The Source Image Sequence item that names ``source`` whole (all its frames)."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def source_reference(source: Dataset, frame: int | None) -> Dataset:
    """The Source Image Sequence item that names ``source`` (and its frame, if allowed)."""
    item = instance_reference(source)
    number = referenced_frame_number(source, frame)
    if number is not None:
        item.ReferencedFrameNumber = number
    return item


# Patient and study attributes highdicom reads from a source as attributes for the
# Segmentations and reports it builds (Type 2 there: present, empty when unknown).
_TYPE_2_PATIENT_STUDY = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def with_type_2_patient_study(header: Dataset) -> Dataset:
    """``header`` (a conformant copy) with the patient and study attributes it lacks
    present and empty, as the derived object carries them; in place."""
    for keyword in _TYPE_2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def state_deidentification(dataset: Dataset) -> None:
    """A derived object that says Patient Identity Removed YES (copied from its source)
    must say how (Type 1C); where the source does not, say that it does not."""
    if str(dataset.get("PatientIdentityRemoved", "")) != "YES":
        return
    if not dataset.get("DeidentificationMethod") and not dataset.get(
        "DeidentificationMethodCodeSequence"
    ):
        dataset.DeidentificationMethod = "not stated by the source image"


# What a derived object needs of the source to belong to its study and name it.
_IDENTIFYING_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def missing_uids(source: Dataset) -> str | None:
    """Why ``source`` cannot be referenced (the UIDs it lacks, by keyword), or None."""
    missing = [key for key in _IDENTIFYING_UIDS if not str(source.get(key, "") or "")]
    if missing:
        return (
            f"the source has no {', '.join(missing)}, so no object derived from it can "
            "belong to its study or name it"
        )
    return None


def source_was_lossy(source: Dataset) -> tuple[str, str | None]:
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
