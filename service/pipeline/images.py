"""An image's way to the engine: decoded and fitted to the model, its targets resolved
and its layer chosen, before any compute, so one bad image never fails a batch (the
engine call itself is ``engine_call.py``'s)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from service.contract.errors import (
    ErrorCode,
    InvalidField,
)
from service.contract.requests import (
    ClassRef,
    TargetSpec,
)
from service.contract.suggestions import close_matches, did_you_mean
from service.contract.terms import Box
from service.imaging.decoding import Admit, decode_image
from service.imaging.dicom import describe_dicom, is_dicom, read_header
from service.imaging.geometry import Geometry, to_model_pixels
from service.imaging.render import (
    to_rgb_image,
)
from service.imaging.source_header import DicomSource
from service.pipeline.domain import DomainPolicy, check_domain
from service.pipeline.volumes import refuse_volume_for_image_model
from service.transport.interface import ModelInfo

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedImage:
    """One image, decoded and fitted to the model, with its targets resolved."""

    index: int
    # The image as displayed (EXIF orientation applied) in 8 bits, mode L or RGB;
    # kept only where a picture is drawn over it at its own size.
    display: Image.Image | None
    pixels: np.ndarray  # (H_in, W_in, 1 or 3) uint8, or float32 in [0, 1]
    box: Box | None  # where the image lies on the input, if not all of it
    geometry: Geometry
    targets: list[int | None]  # None = the top-1 class
    dicom: dict[str, Any] | None = None  # a DICOM file's attributes, when asked for
    # A DICOM source, for the DICOM objects derived from it (dicom-sc, -pm, -seg, -sr).
    source: DicomSource | None = None
    frame: int | None = None  # the frame explained (multi-frame sources)
    out_of_domain: str | None = None  # why it is not an image the model is for (domain.py)


def _class_index(ref: ClassRef, model: ModelInfo, index: int) -> int:
    field = f"targets[{index}]"
    if isinstance(ref, str):
        found = model.class_index(ref)
        if found is None:
            close = close_matches(ref, model.labels)
            if close:
                known = did_you_mean(close)
            else:
                shown = ", ".join(model.labels[:20]) + (", ..." if model.num_classes > 20 else "")
                known = f" Its labels: {shown}."
            raise InvalidField(
                f"Image {index}: model '{model.name}' has no class '{ref}'.{known}",
                code=ErrorCode.UNKNOWN_LABEL,
                image=index,
                field=field,
                suggestions=close,
            )
        return found
    if not 0 <= ref < model.num_classes:
        raise InvalidField(
            f"Image {index}: class index {ref} is outside 0..{model.num_classes - 1}"
            f" for model '{model.name}'.",
            code=ErrorCode.TARGET_OUT_OF_RANGE,
            image=index,
            field=field,
        )
    return ref


def resolve_targets(spec: TargetSpec, model: ModelInfo, index: int) -> list[int | None]:
    """The distinct classes to explain for one image, in the order given."""
    if spec is None:
        return [None]
    refs = spec if isinstance(spec, list) else [spec]
    return list(dict.fromkeys(_class_index(ref, model, index) for ref in refs))


@dataclass(frozen=True)
class ImageSlot:
    """One image's place in its request: its index (errors name it), the classes to
    explain (None: the top-1 class) and its frame (None: the file's default)."""

    index: int
    targets: list[int | None]
    frame: int | None = None


@dataclass(frozen=True)
class Keep:
    """What a request needs of each image beyond the model input: the 8-bit copy that
    pictures are drawn over at its own size, a DICOM file's attributes (``include:
    ["dicom"]``), its DICOM source for derived objects (DICOM formats, reports)."""

    display: bool = False
    attributes: bool = False
    source: bool = False


def prepare_image(
    data: bytes,
    slot: ImageSlot,
    model: ModelInfo,
    admit: Admit,
    keep: Keep = Keep(),
    domain: DomainPolicy = "refuse",
) -> PreparedImage:
    """Decode and fit one image; every problem raises a ``ServiceError`` naming
    ``slot.index``. ``admit(width, height)`` checks the size from the header first
    (``budgets.py``); a DICOM image outside the model's domain is refused, or marked
    (``domain.py``)."""
    index, frame = slot.index, slot.frame
    refuse_volume_for_image_model(data, index, model)
    # Overlays are drawn on the colour original, even for a 1-channel model.
    colour = keep.display and model.channels == 1
    image = decode_image(data, index, 3 if colour else model.channels, admit, frame)
    # The full-size image leaves here as 8 bits, or not at all.
    display = to_rgb_image(image) if keep.display else None
    if colour and image.mode == "RGB":
        image = image.convert("L")  # as decode_image converts for a 1-channel model
    pixels, box, geometry = to_model_pixels(
        image,
        model.image_size,
        model.resize,
        model.scale_size,
        model.interpolation,
        model.crop_offset,
    )
    # The header is read once, after the decoder accepted the file (read_header trusts
    # it): for the model's domain, the attributes shown, the derived DICOM objects.
    declared = bool(model.modalities or model.body_parts)
    wants_header = (declared or keep.attributes or keep.source) and is_dicom(data)
    header = read_header(data) if wants_header else None
    out_of_domain = (
        check_domain(header, model, index, domain) if declared and header is not None else None
    )
    dicom = describe_dicom(header, frame) if keep.attributes and header is not None else None
    return PreparedImage(
        index,
        display,
        pixels,
        box,
        geometry,
        slot.targets,
        dicom,
        DicomSource(header, frame) if keep.source and header is not None else None,
        frame,
        out_of_domain,
    )


def choose_layer(model: ModelInfo, layer: str | None) -> str:
    """The requested layer if it can be explained, else the model's default."""
    if layer is None:
        return model.default_layer
    if layer in model.layer_names():
        return layer
    if layer not in model.modules:
        # The explainable layers first: those are what a caller can use.
        close = close_matches(layer, model.layer_names()) or close_matches(layer, model.modules)
        raise InvalidField(
            f"Model '{model.name}': the model has no layer '{layer}'.{did_you_mean(close)}",
            code=ErrorCode.UNKNOWN_LAYER,
            field="layer",
            suggestions=close,
        )
    raise InvalidField(
        f"Layer '{layer}' of model '{model.name}' does not return an (N, C, H, W) "
        "feature map exactly once per forward pass; GET the model's layers for "
        "the ones that do.",
        code=ErrorCode.UNSUPPORTED_LAYER,
        field="layer",
    )
