"""A volume's way to a volume model: read (a NIfTI file), checked against the request's
limits from its header, fitted as MONAI's pipeline fits it (``imaging/volume_fitting``),
before any compute, so one bad volume never fails a batch. And the refusals that keep
the two kinds of model apart: a 2-D image for a volume model, a volume for a 2-D one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service.contract.errors import ErrorCode, InvalidField
from service.contract.requests import DicomSeriesImage, DicomWebImage, ExplainRequest
from service.imaging.dicom import is_dicom, read_header
from service.imaging.dicom_volume import (
    read_dicom_series_sources,
    read_multiframe_volume_source,
)
from service.imaging.nifti import is_nifti, read_nifti
from service.imaging.volume import Volume, VolumeAdmit
from service.imaging.volume_fitting import VolumeFit, VolumeGeometry, apply_window, fit_volume
from service.pipeline.domain import DomainPolicy, check_domain
from service.transport.interface import ModelInfo

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


@dataclass(frozen=True)
class PreparedVolume:
    """One volume fitted to the model, with its targets resolved: ``pixels`` ``(D, H, W,
    1) float32``, the model's input; ``geometry``, where it lies in the file; ``base``,
    the file's voxels windowed to [0, 1], kept only where a picture is drawn over them at
    their own size. (``box``: none, a volume fills its input.)"""

    index: int
    pixels: np.ndarray
    geometry: VolumeGeometry
    targets: list[int | None]
    base: np.ndarray | None = None
    box: None = None
    out_of_domain: str | None = None
    # A DICOM volume's headers: a series' slices in the volume's k order, or its one
    # multi-frame file (for the DICOM objects derived from it); None for NIfTI.
    sources: Sequence[Dataset] | Dataset | None = None


def volume_fit(model: ModelInfo) -> VolumeFit:
    """What ``model`` asks of its input, as the fitting reads it."""
    depth, height, width = model.input_size
    return VolumeFit(
        input_size=(depth, height, width),
        orientation=model.orientation or "RAS",
        spacing=model.spacing,
        window=model.window,
        interpolation=model.interpolation,
    )


def windowed(voxels: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """``voxels`` in [0, 1]: the model's window, else the volume's own range."""
    low, high = window if window is not None else (float(voxels.min()), float(voxels.max()))
    if high <= low:  # a flat volume without a window: nothing to show
        return np.zeros(voxels.shape, dtype=np.float32)
    return apply_window(voxels, low, high)


def _read(
    data: bytes | list[bytes], index: int, model: ModelInfo, admit: VolumeAdmit
) -> tuple[Volume, Sequence[Dataset] | Dataset | None]:
    """The volume, and its DICOM headers where it is DICOM (``PreparedVolume.sources``)."""
    if isinstance(data, list):
        return read_dicom_series_sources(data, admit, index)
    if is_nifti(data):
        return read_nifti(data, admit, index), None
    if is_dicom(data):
        header = read_header(data)
        if int(getattr(header, "NumberOfFrames", 1) or 1) > 1:
            return read_multiframe_volume_source(data, admit, index)
    kind = "a DICOM file of one image" if is_dicom(data) else "no volume"
    raise InvalidField(
        f"Model '{model.name}' explains volumes: images[{index}] is {kind}. Send a NIfTI "
        'file (.nii or .nii.gz), a multi-frame DICOM, a series as {"series": [...]} (its '
        "instances) or a DICOMweb series (no instance), or use a 2-D model "
        "(GET /v1/models).",
        code=ErrorCode.VOLUME_REQUIRED,
        image=index,
        field=f"images[{index}]",
    )


@dataclass(frozen=True)
class VolumeSlot:
    """One volume's place in its request: its index (errors name it), the classes to
    explain, whether its voxels are kept to draw over (``keep_base``), and what happens
    to a DICOM volume outside the model's domain."""

    index: int
    targets: list[int | None]
    keep_base: bool = False
    domain: DomainPolicy = "refuse"


def prepare_volume(
    data: bytes | list[bytes], slot: VolumeSlot, model: ModelInfo, admit: VolumeAdmit
) -> PreparedVolume:
    """Read and fit one volume (a file, or a series' files); every problem raises a
    ``ServiceError`` naming ``slot.index``. ``admit(shape)`` checks its size from the
    header first (``volume_budget.py``)."""
    volume, sources = _read(data, slot.index, model, admit)
    header = sources[0] if isinstance(sources, Sequence) else sources
    declared = bool(model.modalities or model.body_parts)
    out_of_domain = (
        check_domain(header, model, slot.index, slot.domain)
        if declared and header is not None
        else None
    )
    pixels, geometry = fit_volume(volume, volume_fit(model))
    base = windowed(volume.voxels, model.window) if slot.keep_base else None
    return PreparedVolume(
        slot.index,
        pixels[..., None],
        geometry,
        slot.targets,
        base,
        out_of_domain=out_of_domain,
        sources=sources,
    )


def refuse_volume_for_image_model(data: bytes, index: int, model: ModelInfo) -> None:
    """A 422 for a volume sent to a 2-D model (which would read a NIfTI file as nothing)."""
    if is_nifti(data):
        raise InvalidField(
            f"Model '{model.name}' explains 2-D images: images[{index}] is a volume (NIfTI). "
            "Send it to a volume model (GET /v1/models: an input_size of three numbers).",
            code=ErrorCode.IMAGE_REQUIRED,
            image=index,
            field=f"images[{index}]",
        )


def _volume_problems(request: ExplainRequest) -> list[tuple[str, str]]:
    problems = []
    if "faithfulness" in request.include:
        problems.append(("include", "faithfulness curves are computed for 2-D images only"))
    if request.frame is not None:
        problems.append(("frame", "frame picks a frame of a 2-D image; a volume is read whole"))
    if request.heatmap.format == "dicom-sc":
        problems.append(
            (
                "heatmap.format",
                "dicom-sc is a picture of a 2-D image; a volume's map is a 'dicom-pm' (a "
                "Parametric Map with a frame per slice) or a 'dicom-seg'",
            )
        )
    return problems


def check_request_kind(request: ExplainRequest, model: ModelInfo) -> None:
    """A 422 for what a request may not ask of this kind of model, before any decoding:
    a volume model's answers have no faithfulness curves, frames or DICOM objects yet;
    a 2-D model's maps are no NIfTI files."""
    if not model.is_volume:
        for index, given in enumerate(request.images):
            if isinstance(given, DicomSeriesImage) or (
                isinstance(given, DicomWebImage) and given.dicomweb.instance is None
            ):
                raise InvalidField(
                    f"Model '{model.name}' explains 2-D images: images[{index}] is a series "
                    "(a volume). Name one instance, or send it to a volume model.",
                    code=ErrorCode.IMAGE_REQUIRED,
                    image=index,
                    field=f"images[{index}]",
                )
        if request.heatmap.format == "nifti":
            raise InvalidField(
                f"heatmap.format 'nifti' is a volume's map; model '{model.name}' explains "
                "2-D images (ask for 'array', 'png', 'overlay', 'gray' or a DICOM format).",
                field="heatmap.format",
            )
        return
    problems = _volume_problems(request)
    if problems:
        told = " ".join(f"{field}: {message}." for field, message in problems)
        raise InvalidField(f"Model '{model.name}' explains volumes. {told}", field=problems[0][0])
