"""How an image becomes a model's input, resolved once at load, with where each value
came from.

Each key of ``PREPROCESSING_KEYS`` (channels, input size, mean, std, resize mode, crop
share, interpolation) is the models file's where it sets it, else the library's own
config (timm's resolved data config, the Hugging Face image processor, torchvision's
weights), else the service's default (3 channels, 224 × 224, ImageNet's statistics,
"stretch", no crop, bilinear). ``sources`` says which, key by key, and the model's
detail (``GET /v1/models/{name}``) shows it, so nobody has to guess what the service
fed the model.

The crop share becomes ``scale_size``: the size the image is resized to before the
input is cut from its centre, ``floor(input / crop_pct)`` per side as timm computes it;
a library may give it exactly instead (a processor's ``shortest_edge``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from service.contract.models_file import PREPROCESSING_KEYS, VOLUME_KEYS, ModelSpec
from service.contract.terms import ChannelOrder, CropOffset, Interpolation, ResizeMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODELS_FILE = "models file"
DEFAULT = "default"
_DEFAULTS: dict[str, Any] = {
    "channels": 3,
    "input_size": (224, 224),
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "resize": "stretch",
    "crop_pct": 1.0,
    "interpolation": "bilinear",
}
# A volume's defaults: one channel, the window's [0, 1] as it is (MONAI's pipelines
# normalise by the window, not by statistics), MONAI Resize's own mode.
_VOLUME_DEFAULTS: dict[str, Any] = {
    **_DEFAULTS,
    "channels": 1,
    "mean": (0.0,),
    "std": (1.0,),
    "interpolation": "area",
}


@dataclass(frozen=True)
class VolumeInput:
    """How a volume becomes a volume model's input, as the models file says: oriented to
    ``orientation``, resampled to ``spacing`` mm (None: kept), ``window`` mapped to [0, 1]
    (None: the values as stored)."""

    orientation: str = "RAS"
    spacing: tuple[float, float, float] | None = None
    window: tuple[float, float] | None = None


@dataclass(frozen=True)
class Preprocessing:
    """A model's input, as resolved: ``sources[key]`` is where each value came from."""

    channels: int
    input_size: tuple[int, ...]  # (height, width), or a volume's (x, y, z) once oriented
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: ResizeMode
    crop_pct: float
    interpolation: Interpolation
    scale_size: tuple[int, int] | None = None  # resized to this before the centre is cut
    crop_offset: CropOffset = "round"  # the library's rounding of the cut (terms.py)
    channel_order: ChannelOrder = "rgb"
    sources: dict[str, str] = field(default_factory=dict)
    # A volume's way to the input (imaging/volume_fitting.py); None for an image model.
    volume: VolumeInput | None = None

    def zeros(self, batch: int = 1) -> torch.Tensor:
        """A zero input of this shape, for the probes at load."""
        return torch.zeros(batch, self.channels, *self.input_size)


@dataclass(frozen=True)
class LibraryConfig:
    """What a library's own config says of a model's input (any of
    ``PREPROCESSING_KEYS``, and ``scale_size``), and its name for ``sources``;
    ``sources`` names another origin for the values that have one (timm's input size
    from ``arch_args``)."""

    source: str
    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


def resolve(spec: ModelSpec, library: LibraryConfig) -> Preprocessing:
    """The models file's values, else the library's, else the defaults (module text)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    defaults = _VOLUME_DEFAULTS if spec.is_volume else _DEFAULTS
    for key in PREPROCESSING_KEYS:
        if spec.given(key) and getattr(spec, key) is not None:
            values[key], sources[key] = getattr(spec, key), MODELS_FILE
        elif key in library.values:
            values[key] = library.values[key]
            sources[key] = library.sources.get(key, library.source)
        else:
            values[key], sources[key] = defaults[key], DEFAULT
    channels = int(values["channels"])
    input_size = tuple(int(side) for side in values["input_size"])
    crop_pct = float(values["crop_pct"])
    scale_size = None
    if not spec.given("crop_pct") and not spec.given("input_size"):
        scale_size = library.values.get("scale_size")  # exact, where the library gives it
    if scale_size is None and crop_pct < 1:
        # timm's rule (transforms_imagenet_eval): floor(size / crop_pct), side by side.
        scale_size = (math.floor(input_size[0] / crop_pct), math.floor(input_size[1] / crop_pct))
    return Preprocessing(
        channels=channels,
        input_size=input_size,
        mean=_per_channel(values["mean"], channels),
        std=_per_channel(values["std"], channels),
        resize=values["resize"],
        crop_pct=crop_pct,
        interpolation=values["interpolation"],
        scale_size=tuple(scale_size) if scale_size is not None else None,  # type: ignore[arg-type]
        crop_offset=library.values.get("crop_offset", "round"),
        channel_order=library.values.get("channel_order", "rgb"),
        sources=sources,
        volume=_volume_input(spec, sources),
    )


def _volume_input(spec: ModelSpec, sources: dict[str, str]) -> VolumeInput | None:
    """A volume model's orientation, spacing and window (recorded in ``sources``)."""
    if not spec.is_volume:
        return None
    for key in VOLUME_KEYS:
        sources[key] = MODELS_FILE if spec.given(key) else DEFAULT
    spacing = spec.spacing
    window = spec.window
    return VolumeInput(
        orientation=spec.orientation,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])) if spacing else None,
        window=(float(window[0]), float(window[1])) if window else None,
    )


def _per_channel(values: Any, channels: int) -> tuple[float, ...]:
    """``values`` for ``channels`` channels: a 3-channel statistic averaged for a
    1-channel model (as the weights folded into its first convolution are summed)."""
    floats = tuple(float(v) for v in values)
    if len(floats) == channels:
        return floats
    if channels == 1:
        return (sum(floats) / len(floats),)
    if len(floats) == 1:
        return floats * channels
    return floats
