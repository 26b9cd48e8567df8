"""``report: "dicom-sr"``: a DICOM SR Measurement Report (TID 1500) of one source image.

A Comprehensive 3D SR document (built with highdicom) in a new series (``SERIES_NUMBER``)
of the source's study, observed by the service as a device. For each explained class one
measurement group:

- where the class's map has a maximum (a map that is not all zero): a Planar ROI group
  (TID 1410) whose region is a SCOORD POINT at the centre of the first pixel (in row-major
  order) where the map at the source's pixel grid is highest, on the source image (and
  its frame), so viewers that read TID 1500 (OHIF among them) draw it; its tracking
  identifier says "Grad-CAM peak: <label>";
- where the map is all zero (no peak to point at): a group without a region (TID 1501).

Each group carries the class as its finding type (``Explained.class_code``), DCM 130403
"Gradient-weighted class activation" as its method, an Algorithm Identification naming
the service with the method, layer and model as parameters, and the class's probability
(DCM 122157, the model's softmax or sigmoid score, no units) as a measurement whose own
algorithm is the model.

The document lists the source image in its Image Library (OHIF needs one) and, as the
Current Requested Procedure Evidence, the source and every DICOM object made with it in
the same answer (Secondary Captures, Parametric Maps, the Segmentation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from service.imaging.dicom_codes import (
    MANUFACTURER,
    Explained,
    coding_scheme_identification,
    gradient_weighted_class_activation,
    label_text,
    probability,
    version,
)
from service.imaging.dicom_out import to_bytes
from service.imaging.source_header import (
    DerivedObjectImpossible,
    DicomSource,
    patient_orientation,
    referenced_frame_number,
    state_deidentification,
)

if TYPE_CHECKING:
    import highdicom as hd
    from pydicom.dataset import Dataset

    # A finding's measurement group: with a region (its peak) or without one.
    _MeasurementGroup = (
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    )
    # Where a peak lies: on an image (a 2-D map) or in a Frame of Reference (a volume's).
    _Region = hd.sr.ImageRegion | hd.sr.ImageRegion3D

SERIES_NUMBER = 9904
SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage


@dataclass(frozen=True)
class Finding:
    """One explained class, as the report states it."""

    index: int  # the class's index among the model's outputs
    label: str
    probability: float
    peak: tuple[int, int] | None  # (row, column) of the map's maximum; None: all zero


@dataclass(frozen=True)
class MadeObject:
    """A DICOM object made from the same source in the same answer."""

    sop_class_uid: str
    series_uid: str
    instance_uid: str


def peak_of(heat: np.ndarray) -> tuple[int, int] | None:
    """``heat`` ``(H, W)`` in [0, 1]: (row, column) of its first maximum in row-major order,
    or None for a map that is all zero (it points nowhere)."""
    if heat.size == 0 or not float(heat.max()) > 0:
        return None
    row, column = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return int(row), int(column)


# Descriptors of an Image Library entry highdicom writes for these modalities, which it
# reads from the image without asking whether they are there.
_CROSS_SECTIONAL = frozenset({"CT", "MR", "PT"})
_PROJECTION = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})


def _library_view(source: Dataset) -> Dataset:
    """What the Image Library says of ``source``: its class, instance, size and Frame of
    Reference, and the modality's descriptors (pixel spacing, position, orientation) when
    the source has them all; else the entry goes without them (they are optional)."""
    from pydicom.dataset import Dataset

    view = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if keyword in source:
            setattr(view, keyword, source[keyword].value)
    modality = str(source.get("Modality", "") or "")
    if modality in _CROSS_SECTIONAL:
        needed = {
            "PixelSpacing": 2,
            "ImageOrientationPatient": 6,
            "ImagePositionPatient": 3,
            "SliceThickness": 1,
        }
    elif modality in _PROJECTION:
        needed = {"ImagerPixelSpacing": 2}
        orientation = patient_orientation(source)
        if orientation is not None:
            view.PatientOrientation = list(orientation)
        else:
            needed["PatientOrientation"] = 2  # not there: no descriptors
    else:
        needed = {}
    complete = all(
        source.get(keyword) not in (None, "")
        and len(source[keyword].value if source[keyword].VM > 1 else [source[keyword].value])
        == count
        for keyword, count in needed.items()
    )
    for keyword in needed if complete else ():
        if keyword in source:
            setattr(view, keyword, source[keyword].value)
    # highdicom picks the descriptors by Modality; an empty one picks none.
    view.Modality = modality if complete else ""
    return view


def _evidence(source: Dataset, made: MadeObject) -> Dataset:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.StudyInstanceUID = source.StudyInstanceUID
    item.SeriesInstanceUID = made.series_uid
    item.SOPInstanceUID = made.instance_uid
    item.SOPClassUID = made.sop_class_uid
    return item


def _source_image(source: Dataset, frame: int | None) -> hd.sr.SourceImageForRegion:
    """``source`` (and its ``frame``) as the image a peak's region lies on."""
    import highdicom as hd

    frame_number = referenced_frame_number(source, frame)
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
        referenced_frame_numbers=[frame_number] if frame_number is not None else None,
    )


@dataclass(frozen=True)
class _Algorithms:
    """Who made what a group states: the service made the map, the model the probability."""

    service: hd.sr.AlgorithmIdentification
    model: hd.sr.AlgorithmIdentification

    @classmethod
    def of(cls, how: Explained) -> _Algorithms:
        import highdicom as hd

        return cls(
            service=hd.sr.AlgorithmIdentification(
                name=MANUFACTURER,
                version=version(),
                parameters=[f"{key}={value}" for key, value in how.parameters().items()],
            ),
            # The probability is the model's output: its algorithm is the model.
            model=hd.sr.AlgorithmIdentification(name=label_text(how.model), version="unversioned"),
        )


class ReportedClass(Protocol):
    """What a measurement group states of an explained class (a ``Finding`` or a
    volume's finding)."""

    @property
    def index(self) -> int: ...  # the class's index among the model's outputs
    @property
    def label(self) -> str: ...
    @property
    def probability(self) -> float: ...


def _measurement_group(
    finding: ReportedClass,
    how: Explained,
    algorithms: _Algorithms,
    region: _Region | None,
) -> _MeasurementGroup:
    """The group of one ``finding``: a Planar ROI group whose region is its peak
    (``region``), or, where its map is all zero (no region), a group without one."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    label = label_text(finding.label)
    common: dict[str, Any] = {
        "finding_type": how.class_code(finding.index, finding.label),
        "method": gradient_weighted_class_activation(),
        "algorithm_id": algorithms.service,
        "measurements": [
            hd.sr.Measurement(
                name=probability(),
                value=round(float(finding.probability), 6),
                unit=codes.UCUM.NoUnits,
                algorithm_id=algorithms.model,
            )
        ],
    }
    if region is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=hd.UID(), identifier=f"Grad-CAM: {label}"[:64]
            ),
            **common,
        )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"Grad-CAM peak: {label}"[:64]
        ),
        referenced_region=region,
        **common,
    )


def _peak_region(
    peak: tuple[int, int] | None, image: hd.sr.SourceImageForRegion
) -> hd.sr.ImageRegion | None:
    """A 2-D map's ``peak`` (row, column) as a POINT on ``image``; None without a peak."""
    import highdicom as hd

    if peak is None:
        return None
    row, column = peak
    # Image coordinates: (column, row), the centre of the top left pixel at (0.5, 0.5).
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.array([[column + 0.5, row + 0.5]]),
        source_image=image,
    )


def _observer(how: Explained) -> hd.sr.ObserverContext:
    """The service as the observing device (the model it ran named as the device's model)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            # The same UID for every report of the service: it names the device.
            uid=str(generate_uid(entropy_srcs=[MANUFACTURER])),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=label_text(how.model),
        ),
    )


def _report_content(
    library: Sequence[Dataset],
    groups: Sequence[_MeasurementGroup],
    observer: hd.sr.ObserverContext,
) -> hd.sr.MeasurementReport:
    """The TID 1500 content of ``groups`` seen by ``observer``, with the images of
    ``library`` in its Image Library; ``DerivedObjectImpossible`` where the library
    cannot describe one."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    try:
        return hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=codes.SCT.ImagingProcedure,
            imaging_measurements=list(groups),
            referenced_images=[_library_view(image) for image in library],
        )
    except ValueError:
        # highdicom's Image Library knows the storage classes of images by modality.
        classes = ", ".join(sorted({str(image.SOPClassUID) for image in library}))
        raise DerivedObjectImpossible(
            f"a report's image library cannot describe an image of SOP class {classes}"
        ) from None


def measurement_report(
    dicom: DicomSource,
    findings: Sequence[Finding],
    how: Explained,
    made: Sequence[MadeObject],
    series_uid: str,
    instance_uid: str,
) -> bytes:
    """The report (module text) of ``findings`` on ``dicom`` (its frame), naming the
    objects ``made`` with it."""
    source = dicom.carried_copy()
    image = _source_image(source, dicom.frame)
    located = [(finding, _peak_region(finding.peak, image)) for finding in findings]
    return report_of(evidence_of([source], made), [source], located, how, series_uid, instance_uid)


def evidence_of(sources: Sequence[Dataset], made: Sequence[MadeObject]) -> list[Dataset]:
    """A report's Current Requested Procedure Evidence: the (conformant) ``sources`` and
    the objects ``made`` from them in the same answer (in the sources' study)."""
    return [*sources, *(_evidence(sources[0], item) for item in made)]


def report_of(
    evidence: Sequence[Dataset],
    library: Sequence[Dataset],
    located: Sequence[tuple[ReportedClass, _Region | None]],
    how: Explained,
    series_uid: str,
    instance_uid: str,
) -> bytes:
    """The Comprehensive 3D SR document of one measurement group per explained class,
    each with its peak's region (or none), the images of ``library`` (conformant copies
    with the Type 2 patient and study attributes) in its Image Library; patient and study
    from ``evidence[0]``."""
    import highdicom as hd

    algorithms = _Algorithms.of(how)
    groups = [_measurement_group(finding, how, algorithms, region) for finding, region in located]
    report = _report_content(library, groups, _observer(how))
    document = hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=report[0],
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=f"Grad-CAM report ({how.model})"[:64],
        is_complete=True,
        # Made by a machine, verified by no one.
        is_final=False,
        is_verified=False,
    )
    if how.uses_own_scheme(finding.label for finding, _ in located):
        document.CodingSchemeIdentificationSequence = [coding_scheme_identification()]
    state_deidentification(document)
    return to_bytes(document)
