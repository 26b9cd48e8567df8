"""What the service answers about itself: the models it serves (``GET /v1/models``, one
model's detail, its layers) and its health (``/healthz``, ``/readyz``). The explain
answers are ``responses.py``'s; both share its base, its serialiser and its rules (a
field that does not apply is absent)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from service.contract.responses import Absent, Answer, Count
from service.contract.terms import (
    ChannelOrder,
    CropOffset,
    Interpolation,
    Library,
    MemoryFormat,
    Precision,
    ResizeMode,
)


class ModelSummary(Answer):
    """A served model, as ``GET /v1/models`` lists it."""

    name: str
    arch: str
    default: bool = Field(description="Whether requests without `model` get this one.")
    num_classes: Count
    multilabel: bool
    channels: Literal[1, 3]
    input_size: Annotated[list[Count], Field(min_length=2, max_length=3)] = Field(
        description=(
            "[height, width]; a volume model's three sides, in the array order of the "
            "volume once oriented (x, y, z for RAS)."
        )
    )
    default_layer: str
    random_weights: bool = Field(
        default=False, description="Served without weights: its answers mean nothing."
    )
    modalities: list[str] = Field(
        default_factory=list,
        description="The DICOM modalities the model is for (empty: not declared).",
    )
    body_parts: list[str] = Field(
        default_factory=list,
        description="The DICOM body parts the model is for (empty: not declared).",
    )


class ModelDetail(ModelSummary):
    """A served model with its labels, its preprocessing and where it runs."""

    library: Library = Field(
        default="torchvision", description="Where the architecture comes from."
    )
    labels: list[str]
    mean: list[float]
    std: list[float]
    resize: ResizeMode
    crop_pct: float = Field(
        default=1.0,
        description=(
            "The share of the resized image the model sees: it is resized to "
            "`scale_size`, then `input_size` is cut from its centre."
        ),
    )
    scale_size: Annotated[list[Count], Field(min_length=2, max_length=2)] | None = Field(
        default=None, description="[height, width] before the centre is cut; null: no cut."
    )
    interpolation: Interpolation = "bilinear"
    crop_offset: CropOffset = Field(
        default="round",
        description=(
            "How the centre cut's offset is rounded at an odd margin: 'round' (half to "
            "even, torchvision's CenterCrop, timm) or 'floor' (the Hugging Face processors)."
        ),
    )
    channel_order: ChannelOrder = Field(
        default="rgb", description="The order of the input's colour channels ('bgr': MobileViT's)."
    )
    sources: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Where each preprocessing value came from: 'models file', the library's own "
            "config (timm's data config, the Hugging Face image processor, torchvision's "
            "weights, MONAI), or 'default'."
        ),
    )
    device: str
    precision: Precision
    memory_format: MemoryFormat
    orientation: str | Absent = Field(
        default=None, description="Volume models: the axes a volume is turned to (RAS)."
    )
    spacing: Annotated[list[float], Field(min_length=3, max_length=3)] | Absent = Field(
        default=None, description="Volume models: the voxel size (mm) it is resampled to."
    )
    window: Annotated[list[float], Field(min_length=2, max_length=2)] | Absent = Field(
        default=None, description="Volume models: the values mapped to [0, 1] (HU for CT)."
    )


class ModelList(Answer):
    models: list[ModelSummary]


class LayerShape(Answer):
    """A layer that can be explained, with the shape of its output for one image."""

    name: str
    kind: str
    channels: Count
    height: Count
    width: Count
    depth: Count | Absent = Field(default=None, description="Volume models' layers.")


class Layers(Answer):
    model: str
    default_layer: str
    layers: list[LayerShape]


class Status(Answer):
    status: Literal["ok", "ready", "draining", "unavailable"] = Field(
        description=(
            "ok (alive); ready (an engine answers); draining (shutting down: send new "
            "requests elsewhere); unavailable (no engine answers yet)."
        ),
    )
