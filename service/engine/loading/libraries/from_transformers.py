"""``library = "transformers"``: a Hugging Face image-classification model, from a
``save_pretrained`` folder (``config.json``, its weights, ``preprocessor_config.json``;
relative to the models file) or a hub id (downloaded as transformers does).

The input is preprocessed as the folder's image processor says: ``size`` (height and
width: resize "stretch"; ``shortest_edge``: the shorter side, resize "crop"),
``crop_size`` with ``do_center_crop``, ConvNeXt's ``crop_pct``, ``image_mean`` and
``image_std`` (folded with ``rescale_factor`` into the service's [0, 1] scale),
``resample``. Labels: the config's ``id2label``; multi-label where its ``problem_type``
says so. The forward pass returns a ``ModelOutput``; its ``logits`` are what is
explained (``outputs.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from service.contract.models_file import ModelsFile, ModelSpec
from service.engine.loading.errors import ModelConfigError
from service.engine.loading.libraries import Built, require
from service.engine.loading.preprocessing import LibraryConfig

SOURCE = "the Hugging Face image processor"
# PIL's resampling numbers, as processors store them.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
# At or past this shortest edge ConvNeXt's processor warps to a square without cropping.
_CONVNEXT_NO_CROP_FROM = 384


def build(name: str, spec: ModelSpec, num_classes: int | None, models: ModelsFile) -> Built:
    transformers = require(name, "transformers")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    source = _source(name, spec, models)
    config = _config(name, transformers, source, spec)
    if num_classes is not None and num_classes != config.num_labels:
        config.num_labels = num_classes
        config.id2label = {i: str(i) for i in range(num_classes)}
        config.label2id = {str(i): i for i in range(num_classes)}
    model, loaded = _model(name, transformers, source, config)
    values = _processor_values(name, transformers, source, config)
    return Built(
        model,
        LibraryConfig(SOURCE if "input_size" in values else "the Hugging Face config", values),
        _labels(config),
        multilabel=True if config.problem_type == "multi_label_classification" else None,
        weights_loaded=loaded,
    )


def _source(name: str, spec: ModelSpec, models: ModelsFile) -> str:
    """The folder (made absolute against the models file), or the hub id as given."""
    folder = models.resolve_path(spec.arch)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelConfigError(
                name,
                "arch",
                f"{folder} has no config.json: give a folder written by save_pretrained "
                "(config.json, the weights, preprocessor_config.json) or a hub id",
            )
        return str(folder)
    if spec.arch.startswith((".", "/")) or Path(spec.arch).suffix:
        raise ModelConfigError(name, "arch", f"{folder} is not a folder")
    return spec.arch


def _config(name: str, transformers: Any, source: str, spec: ModelSpec) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(source, **spec.arch_args)
    except (OSError, ValueError) as error:
        raise ModelConfigError(
            name,
            "arch",
            f"no Hugging Face config for '{source}' ({str(error).splitlines()[0]}). Without "
            "internet access, save the model on a machine that has it "
            "(model.save_pretrained(folder) and its image processor's) and give the folder",
        ) from None


def _model(name: str, transformers: Any, source: str, config: Any) -> tuple[nn.Module, bool]:
    """The model with the folder's (or hub's) weights if it has any, else random."""
    auto = transformers.AutoModelForImageClassification
    has_weights = not Path(source).is_dir() or any(
        (Path(source) / file).is_file()
        for file in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    )
    try:
        if has_weights:
            model = auto.from_pretrained(source, config=config, ignore_mismatched_sizes=True)
            return model, True
        return auto.from_config(config), False
    except (OSError, ValueError, KeyError) as error:
        raise ModelConfigError(
            name, "arch", f"cannot build an image classifier from '{source}': {error}"
        ) from None


def _processor_values(name: str, transformers: Any, source: str, config: Any) -> dict[str, Any]:
    """The processor's preprocessing as the models file's keys (none without one)."""
    values: dict[str, Any] = {"channels": int(getattr(config, "num_channels", 3))}
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        return values
    values.update(_geometry(processor))
    values["interpolation"] = _RESAMPLE.get(int(getattr(processor, "resample", 2)), "bilinear")
    values["crop_offset"] = "floor"  # its center_crop: (size - crop) // 2
    if getattr(processor, "do_flip_channel_order", False):
        values["channel_order"] = "bgr"
    values["mean"], values["std"] = _statistics(processor)
    return values


def _statistics(processor: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The processor's intensity steps as the service's ``(pixel / 255 - mean) / std``.

    It computes ``x = pixel · rescale`` (minus 1 with EfficientNet's ``rescale_offset``),
    then ``(x - image_mean) / image_std`` where it normalises (``do_normalize``; None,
    as MobileViT's, is not normalising: no ImageNet default), then divides by
    ``image_std`` once more with EfficientNet's ``include_top``. With the service's
    pixel / 255: mean and std of those divided by rescale · 255."""
    scale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
    unit = scale * 255
    offset = 1.0 if getattr(processor, "rescale_offset", False) else 0.0
    image_std = tuple(float(v) for v in (getattr(processor, "image_std", None) or (1.0,)))
    if getattr(processor, "do_normalize", False):
        mean = tuple(offset + float(v) for v in processor.image_mean)
        std = image_std
    else:
        mean, std = (offset,), (1.0,)
    if getattr(processor, "include_top", False):
        std = tuple(float(v) for v in np.multiply(std, image_std))  # (1,) broadcasts
    return tuple(v / unit for v in mean), tuple(v / unit for v in std)


def _side(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def _geometry(processor: Any) -> dict[str, Any]:
    """Input size, resize mode and the size before the centre cut, from ``size``,
    ``crop_size``, ``do_center_crop`` and ConvNeXt's ``crop_pct``."""
    size = processor.size
    crop = processor.crop_size if getattr(processor, "do_center_crop", False) else None
    height, width = _side(size, "height"), _side(size, "width")
    shortest = _side(size, "shortest_edge")
    crop_hw = (_side(crop, "height"), _side(crop, "width")) if crop is not None else None
    if height and width:
        if crop_hw is not None and crop_hw[0] and crop_hw[1]:
            return {"input_size": crop_hw, "resize": "stretch", "scale_size": (height, width)}
        return {"input_size": (height, width), "resize": "stretch"}
    if shortest is None:
        return {}
    crop_pct = getattr(processor, "crop_pct", None)
    if crop_pct is not None:  # ConvNeXt's rule
        if shortest < _CONVNEXT_NO_CROP_FROM:
            cut = int(shortest / crop_pct)
            return {
                "input_size": (shortest, shortest),
                "resize": "crop",
                "crop_pct": shortest / cut,
                "scale_size": (cut, cut),
            }
        return {"input_size": (shortest, shortest), "resize": "stretch"}
    if crop_hw is not None and crop_hw[0] and crop_hw[1]:
        return {
            "input_size": crop_hw,
            "resize": "crop",
            "crop_pct": crop_hw[0] / shortest,
            "scale_size": (shortest, shortest),
        }
    return {"input_size": (shortest, shortest), "resize": "crop"}


def _labels(config: Any) -> tuple[str, ...] | None:
    """The config's class names, unless they are transformers' placeholders (LABEL_0)."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label)]
    if not names or all(label == f"LABEL_{i}" for i, label in enumerate(names)):
        return None
    return tuple(names)
