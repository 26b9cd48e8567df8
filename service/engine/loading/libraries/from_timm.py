"""``library = "timm"``: ``timm.create_model(arch, **arch_args)``.

The input is preprocessed as timm's own eval transform does it, from the model's
resolved data config (``resolve_model_data_config``): input size, mean, std,
interpolation, ``crop_pct`` and ``crop_mode`` ("center": the shorter side resized to
``input / crop_pct``, then the centre cut, resize "crop"; "squash": each side, resize
"stretch"; "border": the longer side, padded, resize "letterbox"). A model built for
another size (``img_size`` in ``arch_args``) is fed that size, as timm resolves a size
it is given (``resolve_data_config``'s ``img_size``): its pretrained config still names
the size its weights were trained at, which a ViT built for another size refuses.
Class names: timm's ImageNet names (offline) when the model's outputs are an ImageNet
subset's.
``weights = "pretrained"`` downloads the pretrained weights ``arch`` names (a tag after
a dot: ``convnext_tiny.fb_in22k``) from the Hugging Face hub, as timm does.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from service.contract.models_file import ModelsFile, ModelSpec
from service.contract.suggestions import close_matches, did_you_mean
from service.engine.loading.errors import ModelConfigError
from service.engine.loading.libraries import Built, call_factory, require
from service.engine.loading.preprocessing import LibraryConfig

SOURCE = "timm's data config"
BUILT_SIZE = "arch_args (img_size)"
PRETRAINED = "pretrained"
_RESIZE = {"center": "crop", "squash": "stretch", "border": "letterbox"}


def build(name: str, spec: ModelSpec, num_classes: int | None, models: ModelsFile) -> Built:
    timm = require(name, "timm")
    if not timm.is_model(spec.arch):
        close = close_matches(spec.arch, timm.list_models())
        raise ModelConfigError(
            name,
            "arch",
            f"timm has no model '{spec.arch}'.{did_you_mean(close)} timm.list_models() lists them",
        )
    kwargs: dict[str, Any] = dict(spec.arch_args)
    if num_classes is not None:
        kwargs.setdefault("num_classes", num_classes)
    if spec.given("channels"):
        kwargs.setdefault("in_chans", spec.channels)
    pretrained = spec.weights == PRETRAINED
    model = _create(name, timm, spec.arch, pretrained, kwargs)
    values = _data_config(timm, model)
    built_for = _built_size(kwargs.get("img_size"))
    if built_for is not None:
        values["input_size"] = built_for
    return Built(
        model,
        LibraryConfig(SOURCE, values, {"input_size": BUILT_SIZE} if built_for else {}),
        _imagenet_names(timm, model),
        weights_loaded=pretrained,
    )


def _create(name: str, timm: Any, arch: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    if not pretrained:
        return call_factory(name, lambda **k: timm.create_model(arch, **k), arch, kwargs)
    try:
        module: nn.Module = timm.create_model(arch, pretrained=True, **kwargs)
    except (OSError, RuntimeError) as error:  # no hub: one line, what to fetch and where
        raise ModelConfigError(
            name,
            "weights",
            f"could not download timm's pretrained weights of '{arch}' ({error}). Without "
            "internet access, run timm.create_model("
            f"'{arch}', pretrained=True) on a machine that has it and copy its Hugging Face "
            "cache ($HF_HOME/hub) here, or save its state_dict and give its path as weights",
        ) from None
    return module


def _data_config(timm: Any, model: nn.Module) -> dict[str, Any]:
    """What timm's resolved data config says of the input, as the models file's keys."""
    config = timm.data.resolve_model_data_config(model)
    channels, height, width = config["input_size"]
    return {
        "channels": channels,
        "input_size": (height, width),
        "mean": tuple(config["mean"]),
        "std": tuple(config["std"]),
        "interpolation": config.get("interpolation") or "bilinear",
        "crop_pct": float(config.get("crop_pct") or 1.0),
        "resize": _RESIZE.get(config.get("crop_mode") or "center", "crop"),
    }


def _built_size(img_size: Any) -> tuple[int, int] | None:
    """``(height, width)`` of timm's ``img_size`` argument (a side, or height and
    width, as its patch embeddings read it); None if not given."""
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        return img_size, img_size
    if isinstance(img_size, list | tuple) and len(img_size) == 2:
        return int(img_size[0]), int(img_size[1])
    return None


def _imagenet_names(timm: Any, model: nn.Module) -> tuple[str, ...] | None:
    """timm's ImageNet class descriptions, offline, when the model's outputs are those of
    an ImageNet subset it knows (1000 classes, 21k, ...); else None."""
    try:
        subset = timm.data.infer_imagenet_subset(model)
        if not subset:
            return None
        info = timm.data.ImageNetInfo(subset)
        if info.num_classes() != getattr(model, "num_classes", None):
            return None
        return tuple(info.index_to_description(i) for i in range(info.num_classes()))
    except (AttributeError, KeyError, OSError, ValueError):
        return None
