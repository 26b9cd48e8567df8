"""The model matrix of docs/models.md: timm, Hugging Face transformers and MONAI families,
each built with seeded random weights and written where the service reads it (a weights
file, a ``save_pretrained`` folder), with its models-file block, the reference model the
test runs beside the server, and the library's own preprocessing of an image.

Used by ``tests/process/server/test_model_matrix.py`` (each model through the real
server against pytorch-grad-cam) and ``tests/benchmarks/model_matrix.py`` (the table).
Sizes: timm's small variants at their own input size where they are small (a family is
its blocks, not its width); the larger families with fewer or narrower blocks through
``arch_args``, as a user would pass them; Hugging Face configurations at 64×64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn

from tests.library_models import Logits

SEED = 11
CLASSES = 5
# A random head's logits are so flat (top score ~0.2 of 5) that the gradients are ~1e-4:
# pytorch-grad-cam's eps of 1e-6 in gradcam++'s alpha (g² / (2g² + Σa·g³ + eps)) then
# outweighs g² and its maps drift from the formula (Pearson 0.996 on ResNet-D). Heads ten
# times larger, as trained ones are, make the eps negligible (0.99997).
HEAD_GAIN = 10.0


@dataclass(frozen=True)
class Entry:
    """One model of the matrix.

    ``layout``: how pytorch-grad-cam must reshape the default layer's output to
    (N, C, h, w) (``nchw``: as it is; ``nhwc``: channels last; ``tokens``: (N, L, C)
    whose first ``prefix`` tokens are not patches, the rest a square grid), decided from
    the family's own definition, not from the service. ``methods``: the CAM methods
    compared (all five on a subset).
    """

    name: str
    library: str
    arch: str
    family: str
    layout: str = "nchw"
    arch_args: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, Any] = field(default_factory=dict)  # other models-file keys
    methods: tuple[str, ...] = ("gradcam",)
    hf: tuple[str, str, str] | None = None  # config class, model class, processor class
    processor_args: dict[str, Any] = field(default_factory=dict)

    @property
    def reference_layer_prefix(self) -> str:
        """A Hugging Face model runs inside ``Logits`` beside the server: its layers'
        names there start with ``model.``."""
        return "model." if self.library == "transformers" else ""


ALL_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")
# gradcam++'s alpha, g² / (2g² + Σa·g³), needs Σa > 0, as a ReLU's maps have: a
# transformer's normalised tokens sum to about 0 over the grid, the denominator crosses
# zero and each implementation's guard (pytorch-grad-cam's eps) decides the map.
TOKEN_METHODS = ("gradcam", "xgradcam", "layercam", "hirescam")
_VIT_BLOCKS = {"depth": 4, "embed_dim": 192, "num_heads": 3}

TIMM: list[Entry] = [
    Entry("timm-resnet18d", "timm", "resnet18d", "ResNet-D", methods=ALL_METHODS),
    Entry("timm-efficientnet_b0", "timm", "efficientnet_b0", "EfficientNet"),
    Entry("timm-mobilenetv3", "timm", "mobilenetv3_small_050", "MobileNetV3"),
    Entry("timm-regnetx_002", "timm", "regnetx_002", "RegNet"),
    Entry("timm-densenet121", "timm", "densenet121", "DenseNet"),
    Entry("timm-convnext_atto", "timm", "convnext_atto", "ConvNeXt", methods=ALL_METHODS),
    Entry("timm-convnextv2_atto", "timm", "convnextv2_atto", "ConvNeXt V2"),
    Entry("timm-ghostnet", "timm", "ghostnet_100", "GhostNet"),
    Entry("timm-rexnet", "timm", "rexnet_100", "ReXNet"),
    Entry("timm-hrnet", "timm", "hrnet_w18_small", "HRNet"),
    Entry("timm-vit_tiny", "timm", "vit_tiny_patch16_224", "ViT", "tokens", methods=TOKEN_METHODS),
    Entry(
        "timm-deit_distilled", "timm", "deit_tiny_distilled_patch16_224", "DeiT distilled", "tokens"
    ),
    Entry(
        "timm-dinov2_reg",
        "timm",
        "vit_small_patch14_reg4_dinov2",
        "DINOv2 with registers",
        "tokens",
        {"img_size": 224, "depth": 4},
    ),
    Entry("timm-beit", "timm", "beit_base_patch16_224", "BEiT", "tokens", _VIT_BLOCKS),
    Entry("timm-eva02", "timm", "eva02_tiny_patch14_224", "EVA-02", "tokens"),
    Entry(
        "timm-swin",
        "timm",
        "swin_tiny_patch4_window7_224",
        "Swin",
        "nhwc",
        {"depths": (1, 1, 2, 1)},
        methods=TOKEN_METHODS,
    ),
    Entry("timm-maxvit", "timm", "maxvit_rmlp_pico_rw_256", "MaxViT"),
    Entry("timm-coatnet", "timm", "coatnet_pico_rw_224", "CoAtNet"),
    Entry("timm-efficientformer", "timm", "efficientformer_l1", "EfficientFormer"),
    Entry("timm-efficientformerv2", "timm", "efficientformerv2_s0", "EfficientFormer V2"),
    Entry("timm-fastvit", "timm", "fastvit_t8", "FastViT"),
    Entry("timm-mobilevit", "timm", "mobilevit_xxs", "MobileViT"),
    Entry("timm-edgenext", "timm", "edgenext_xx_small", "EdgeNeXt"),
    Entry("timm-tiny_vit", "timm", "tiny_vit_5m_224", "TinyViT"),
    Entry("timm-poolformer", "timm", "poolformer_s12", "PoolFormer (MetaFormer)"),
    Entry("timm-pvt_v2", "timm", "pvt_v2_b0", "PVT v2"),
]

_HF_VIT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 64,
    "patch_size": 8,
}
_HF_SQUARE = {"size": {"height": 64, "width": 64}}
_HF_CROP = {"size": {"shortest_edge": 72}, "crop_size": {"height": 64, "width": 64}}
_HF_CNN = {"size": {"shortest_edge": 128}, "crop_pct": 0.875}  # 4×4 maps
_HF_STAGES = {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}

HF: list[Entry] = [
    Entry(
        "hf-vit",
        "transformers",
        "",
        "ViT",
        "tokens",
        _HF_VIT,
        hf=("ViTConfig", "ViTForImageClassification", "ViTImageProcessor"),
        processor_args=_HF_SQUARE,
        methods=TOKEN_METHODS,
    ),
    Entry(
        "hf-deit",
        "transformers",
        "",
        "DeiT with teacher",
        "tokens",
        _HF_VIT,
        hf=("DeiTConfig", "DeiTForImageClassificationWithTeacher", "DeiTImageProcessor"),
        processor_args={
            "size": {"height": 72, "width": 72},
            "crop_size": {"height": 64, "width": 64},
        },
    ),
    Entry(
        "hf-beit",
        "transformers",
        "",
        "BEiT",
        "tokens",
        {**_HF_VIT, "use_mean_pooling": True},
        hf=("BeitConfig", "BeitForImageClassification", "BeitImageProcessor"),
        processor_args={**_HF_SQUARE, "do_center_crop": False},
    ),
    Entry(
        "hf-dinov2_reg",
        "transformers",
        "",
        "DINOv2 with registers",
        "tokens",
        {**_HF_VIT, "num_register_tokens": 4},
        hf=(
            "Dinov2WithRegistersConfig",
            "Dinov2WithRegistersForImageClassification",
            "BitImageProcessor",
        ),
        processor_args=_HF_CROP,
    ),
    Entry(
        "hf-swin",
        "transformers",
        "",
        "Swin",
        "tokens",
        {
            "image_size": 64,
            "patch_size": 4,
            "embed_dim": 16,
            "depths": [1, 1],
            "num_heads": [1, 2],
            "window_size": 4,
        },
        hf=("SwinConfig", "SwinForImageClassification", "ViTImageProcessor"),
        processor_args=_HF_SQUARE,
    ),
    Entry(
        "hf-convnext",
        "transformers",
        "",
        "ConvNeXt",
        arch_args=_HF_STAGES,
        hf=("ConvNextConfig", "ConvNextForImageClassification", "ConvNextImageProcessor"),
        processor_args=_HF_CNN,
    ),
    Entry(
        "hf-convnextv2",
        "transformers",
        "",
        "ConvNeXt V2",
        arch_args=_HF_STAGES,
        hf=("ConvNextV2Config", "ConvNextV2ForImageClassification", "ConvNextImageProcessor"),
        processor_args=_HF_CNN,
    ),
    Entry(
        "hf-resnet",
        "transformers",
        "",
        "ResNet",
        arch_args={"embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1]},
        hf=("ResNetConfig", "ResNetForImageClassification", "ConvNextImageProcessor"),
        processor_args=_HF_CNN,
        methods=ALL_METHODS,
    ),
    Entry(
        "hf-regnet",
        "transformers",
        "",
        "RegNet",
        arch_args={
            "embedding_size": 8,
            "hidden_sizes": [8, 16, 32, 64],
            "depths": [1, 1, 1, 1],
            "groups_width": 8,
        },
        hf=("RegNetConfig", "RegNetForImageClassification", "ConvNextImageProcessor"),
        processor_args=_HF_CNN,
    ),
    Entry(
        "hf-efficientnet",
        "transformers",
        "",
        "EfficientNet",
        arch_args={
            "image_size": 128,
            "width_coefficient": 0.5,
            "depth_coefficient": 0.5,
            "hidden_dim": 640,
        },
        hf=(
            "EfficientNetConfig",
            "EfficientNetForImageClassification",
            "EfficientNetImageProcessor",
        ),
        processor_args={"size": {"height": 128, "width": 128}},
    ),
    Entry(
        "hf-mobilenetv2",
        "transformers",
        "",
        "MobileNetV2",
        arch_args={"depth_multiplier": 0.35, "image_size": 128},
        hf=("MobileNetV2Config", "MobileNetV2ForImageClassification", "MobileNetV2ImageProcessor"),
        processor_args={"size": {"shortest_edge": 144}, "crop_size": {"height": 128, "width": 128}},
    ),
    Entry(
        "hf-mobilevit",
        "transformers",
        "",
        "MobileViT",
        arch_args={
            "image_size": 128,
            "hidden_sizes": [16, 24, 32],
            "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64],
        },
        hf=("MobileViTConfig", "MobileViTForImageClassification", "MobileViTImageProcessor"),
        processor_args={"size": {"shortest_edge": 144}, "crop_size": {"height": 128, "width": 128}},
    ),
]

_MONAI_INPUT = {"input_size": [96, 96], "channels": 1}  # the file's names: see _monai_kwargs

MONAI: list[Entry] = [
    Entry(
        "monai-densenet121",
        "monai",
        "DenseNet121",
        "DenseNet",
        arch_args={"init_features": 16, "growth_rate": 8, "block_config": [2, 2, 2, 2]},
        keys=_MONAI_INPUT,
        methods=ALL_METHODS,
    ),
    Entry("monai-resnet18", "monai", "resnet18", "ResNet", keys=_MONAI_INPUT),
    Entry(
        "monai-efficientnet",
        "monai",
        "EfficientNetBN",
        "EfficientNet-BN",
        arch_args={"model_name": "efficientnet-b0"},
        keys=_MONAI_INPUT,
    ),
    Entry(
        "monai-seresnet",
        "monai",
        "SEResNet50",
        "SE-ResNet",
        arch_args={"layers": (1, 1, 1, 1)},
        keys=_MONAI_INPUT,
    ),
    Entry(
        "monai-vit",
        "monai",
        "ViT",
        "ViT",
        "tokens",
        arch_args={
            "img_size": 96,
            "patch_size": 16,
            "hidden_size": 96,
            "mlp_dim": 192,
            "num_layers": 2,
            "num_heads": 4,
            "classification": True,
        },
        keys={**_MONAI_INPUT, "layout": "tokens", "prefix_tokens": 1},
    ),
]

ENTRIES: list[Entry] = [*TIMM, *HF, *MONAI]


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = build().eval().requires_grad_(False)
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features == CLASSES:
            module.weight.mul_(HEAD_GAIN)  # the heads (DeiT's teacher has two)
    return model


def _hf_build(entry: Entry) -> tuple[nn.Module, Any]:
    import transformers

    assert entry.hf is not None
    config_class, model_class, _ = entry.hf
    config = getattr(transformers, config_class)(num_labels=CLASSES, **entry.arch_args)
    model = _seeded(lambda: getattr(transformers, model_class)(config))
    for module in model.modules():
        # transformers draws batch norms' scales from N(0, 0.02), as it does a linear
        # layer's weights: ten of them in a row and EfficientNet's and MobileViT's last
        # maps are exactly 0 (no map at any layer). Trained nets' are near 1.
        if isinstance(module, nn.BatchNorm2d):
            module.weight.fill_(1.0)
    return model, config


def _monai_kwargs(entry: Entry) -> dict[str, Any]:
    """The reference's arguments, each under the network's own name (the models file
    says ``channels`` and ``num_classes``: the service finds those names itself)."""
    kwargs: dict[str, Any] = {"spatial_dims": 2, "pretrained": False, **entry.arch_args}
    if entry.arch == "ViT":
        del kwargs["pretrained"]
    channels = "n_input_channels" if entry.arch == "resnet18" else "in_channels"
    classes = "out_channels" if entry.arch == "DenseNet121" else "num_classes"
    return {**kwargs, channels: 1, classes: CLASSES}


def build_reference(entry: Entry) -> nn.Module:
    """The model as its library builds it, seeded, its batch norms calibrated: called on
    pixels, returns logits."""
    model: nn.Module
    if entry.library == "timm":
        import timm

        model = _seeded(
            lambda: timm.create_model(entry.arch, num_classes=CLASSES, **entry.arch_args)
        )
        size = timm.data.resolve_data_config(
            {"img_size": entry.arch_args["img_size"]} if "img_size" in entry.arch_args else {},
            model=model,
        )["input_size"]
    elif entry.library == "transformers":
        model, config = _hf_build(entry)
        side = int(getattr(config, "image_size", 128))
        model, size = Logits(model).eval(), (3, side, side)
    else:
        from monai.networks import nets

        model = _seeded(lambda: getattr(nets, entry.arch)(**_monai_kwargs(entry)))
        model = _FirstOutput(model) if entry.arch == "ViT" else model
        size = (1, *entry.keys["input_size"])
    _calibrate(model, tuple(size))
    return model


def _calibrate(model: nn.Module, size: tuple[int, ...]) -> None:
    """Batch norms' statistics from 8 noise images, as a trained net's are from its
    data. At their initial identity statistics, deep random nets' activations vanish
    (EfficientNet's squeeze-excite gates halve them block after block: maps of 1e-27,
    whose Pearson is noise), and folding a norm into its convolution is never tried."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, *size, generator=generator))
    model.eval()


class _FirstOutput(nn.Module):
    """MONAI's ViT returns (logits, hidden states); pytorch-grad-cam wants the logits.
    ``inner`` keeps the names: ``blocks.1.norm1`` here is ``inner.blocks.1.norm1``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)[0]
        assert isinstance(out, Tensor)
        return out


def reference_layer(entry: Entry, layer: str) -> str:
    """The server's layer name as the reference model names it."""
    if entry.library == "transformers":
        return f"model.{layer}"
    if entry.library == "monai" and entry.arch == "ViT":
        return f"inner.{layer}"
    return layer


def write(entry: Entry, model: nn.Module, folder: Path) -> str:
    """Write ``model`` where its models-file block reads it; return that block (TOML)."""
    lines = [f"[models.{entry.name}]", f'library = "{entry.library}"']
    if entry.library == "transformers":
        import transformers

        assert entry.hf is not None
        target = folder / entry.name
        inner: Any = model.model if isinstance(model, Logits) else model
        inner.save_pretrained(target)
        processor = getattr(transformers, entry.hf[2])(**entry.processor_args)
        processor.save_pretrained(target)
        lines.append(f'arch = "{entry.name}"')
    else:
        module = model.inner if isinstance(model, _FirstOutput) else model
        save_file(
            {k: v.contiguous() for k, v in module.state_dict().items()},
            str(folder / f"{entry.name}.safetensors"),
        )
        lines += [f'arch = "{entry.arch}"', f'weights = "{entry.name}.safetensors"']
        args = dict(entry.arch_args)
        lines.append(f"num_classes = {CLASSES}")
        if args:
            lines.append(
                "arch_args = { " + ", ".join(f"{k} = {_toml(v)}" for k, v in args.items()) + " }"
            )
    lines += [f"{key} = {_toml(value)}" for key, value in entry.keys.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def matrix_image(entry: Entry) -> Image.Image:
    """A picture with structure at several scales: RGB 300×260 (cropped and resized as
    the library does), or for MONAI grey at its input size exactly (its preprocessing is
    a scale to [0, 1]: no resampling to agree on)."""
    rng = np.random.default_rng(5)
    if entry.library == "monai":
        h, w = entry.keys["input_size"]
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        grey = 0.5 + 0.3 * np.sin(9 * x + 4 * y) + 0.1 * rng.standard_normal((h, w))
        grey[h // 4 : h // 2, w // 2 : 3 * w // 4] = 1.0
        return Image.fromarray((np.clip(grey, 0, 1) * 255).astype(np.uint8), mode="L")
    h, w = 260, 300
    y, x = np.mgrid[0:h, 0:w] / 300
    rgb = np.stack([0.5 + 0.4 * np.sin(13 * x), 0.5 + 0.4 * np.cos(7 * y + 3 * x), x * y], axis=2)
    rgb += 0.05 * rng.standard_normal((h, w, 3))
    rgb[60:140, 150:240] = (0.9, 0.2, 0.1)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), mode="RGB")


def preprocess(entry: Entry, model: nn.Module, image: Image.Image, folder: Path) -> Tensor:
    """``image`` as the library itself prepares it for ``model``: timm's
    ``create_transform`` of its resolved data config, the Hugging Face image processor
    (the PIL one), MONAI's intensities scaled to [0, 1]."""
    if entry.library == "timm":
        import timm.data

        args = {"img_size": entry.arch_args["img_size"]} if "img_size" in entry.arch_args else {}
        config = timm.data.resolve_data_config(args, model=model)
        return timm.data.create_transform(**config)(image).unsqueeze(0)
    if entry.library == "transformers":
        import transformers

        processor = transformers.AutoImageProcessor.from_pretrained(
            folder / entry.name, use_fast=False
        )
        pixels: Tensor = processor(images=image, return_tensors="pt")["pixel_values"]
        return pixels
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).reshape(
        1, 1, *image.size[::-1]
    )


def reshape_for(entry: Entry, model: nn.Module) -> Callable[[Tensor], Tensor]:
    """pytorch-grad-cam's reshape_transform for the family's layout (see ``Entry``)."""
    if entry.layout == "nhwc":
        return lambda x: x.permute(0, 3, 1, 2)
    if entry.layout == "nchw":
        return lambda x: x
    prefix = _prefix_tokens(entry, model)

    def tokens(x: Tensor) -> Tensor:
        patches = x[:, prefix:]
        side = math.isqrt(patches.shape[1])
        assert side * side == patches.shape[1], f"{patches.shape[1]} tokens tile no square"
        return patches.reshape(x.shape[0], side, side, x.shape[2]).permute(0, 3, 1, 2)

    return tokens


def _prefix_tokens(entry: Entry, model: Any) -> int:
    """Tokens before the patches, as each library defines them."""
    if entry.library == "timm":
        return int(model.num_prefix_tokens)
    if entry.library == "monai":
        return 1  # its ViT's class token
    config = model.model.config
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    if config.model_type == "swin":
        return 0
    distilled = 1 if config.model_type == "deit" else 0
    return 1 + distilled + registers
