"""Small seeded timm and Hugging Face models for tests/unit/engine/layouts/, built in a
fraction of a second each: the library's own classes at toy sizes, as "auto" meets them.

Factories for a models file too (``arch = "tests.library_models:timm_vit"``): each takes
``num_classes`` and returns a module whose call returns the logits (a Hugging Face
model is wrapped in ``Logits``, which reads ``.logits`` from its output). timm and
transformers are imported on first use, so collecting the tests does not pay for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

SEED = 7


class Logits(nn.Module):
    """A Hugging Face image classifier called as the service calls a model: pixels in,
    logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(pixel_values=x).logits
        assert isinstance(logits, Tensor)
        return logits


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        return build().eval().requires_grad_(False)


def timm_model(name: str, **kwargs: Any) -> nn.Module:
    """timm's ``name``, seeded, in eval mode with frozen parameters."""
    import timm

    return _seeded(lambda: timm.create_model(name, pretrained=False, **kwargs))


def hf_model(config: str, model: str, **kwargs: Any) -> nn.Module:
    """transformers' ``model`` with its ``config`` of ``kwargs``, seeded, in eval mode with
    frozen parameters, wrapped to return the logits."""
    import transformers

    settings = getattr(transformers, config)(**kwargs)
    return _seeded(lambda: Logits(getattr(transformers, model)(settings)))


# timm: a ViT's blocks of 24 channels, 2 heads, 2 blocks.
_TIMM_VIT = {"embed_dim": 24, "num_heads": 2, "depth": 2}


def timm_vit(num_classes: int = 5) -> nn.Module:
    """A class token, then 16×16 patches of a 48×64 input: a 3×4 grid."""
    return timm_model(
        "vit_tiny_patch16_224", num_classes=num_classes, img_size=(48, 64), **_TIMM_VIT
    )


def timm_vit_dynamic(num_classes: int = 5) -> nn.Module:
    """Made for 64×64 with ``dynamic_img_size``: its patch embedding returns (N, h, w, C)
    and it runs at other sizes (48×80: a 3×5 grid)."""
    return timm_model(
        "vit_tiny_patch16_224",
        num_classes=num_classes,
        img_size=64,
        dynamic_img_size=True,
        **_TIMM_VIT,
    )


def timm_deit(num_classes: int = 5) -> nn.Module:
    """DeiT distilled: class and distillation tokens, then a 4×4 grid at 64×64."""
    return timm_model(
        "deit_tiny_distilled_patch16_224", num_classes=num_classes, img_size=64, **_TIMM_VIT
    )


def timm_dinov2_registers(num_classes: int = 5) -> nn.Module:
    """DINOv2 with 4 register tokens: 1 + 4 prefix tokens, 14×14 patches of 56×70: 4×5."""
    return timm_model(
        "vit_small_patch14_reg4_dinov2", num_classes=num_classes, img_size=(56, 70), **_TIMM_VIT
    )


def timm_beit(num_classes: int = 5) -> nn.Module:
    """BEiT: relative position bias, the head on the mean of the patch tokens; 4×4."""
    return timm_model("beit_base_patch16_224", num_classes=num_classes, img_size=64, **_TIMM_VIT)


def timm_eva(num_classes: int = 5) -> nn.Module:
    """EVA-02: rotary embeddings, a SwiGLU MLP; 14×14 patches of 56×56: 4×4."""
    return timm_model("eva02_tiny_patch14_224", num_classes=num_classes, img_size=56, **_TIMM_VIT)


def timm_hybrid(num_classes: int = 5) -> nn.Module:
    """A ResNet stem and stages as the patch embedding (ResNet-26, stride 32): 3×3 at 96."""
    return timm_model("vit_small_r26_s32_224", num_classes=num_classes, img_size=96, **_TIMM_VIT)


def timm_swin(num_classes: int = 5) -> nn.Module:
    """Swin: (N, H, W, C) from its patch embedding on, 8×8 then 4×4 at 32×32."""
    return timm_model(
        "swin_tiny_patch4_window7_224",
        num_classes=num_classes,
        img_size=32,
        embed_dim=12,
        depths=(2, 2),
        num_heads=(2, 2),
        window_size=4,
    )


def timm_maxvit(num_classes: int = 5) -> nn.Module:
    """MaxViT: NCHW stages of MBConv then channels-last block and grid attention; 4×4 at
    128."""
    return timm_model("maxvit_rmlp_pico_rw_256", num_classes=num_classes, img_size=128)


def timm_coatnet(num_classes: int = 5) -> nn.Module:
    """CoAtNet: MBConv stages then transformer stages, all NCHW (Attention2d); 4×4 at 128."""
    return timm_model("coatnet_nano_rw_224", num_classes=num_classes, img_size=128)


def timm_convnext(num_classes: int = 5) -> nn.Module:
    """ConvNeXt-Atto with its blocks' norm and MLP channels-last (``conv_mlp=False``), at any
    input size (4×4 at 128)."""
    return timm_model("convnext_atto", num_classes=num_classes, conv_mlp=False)


# Hugging Face: ViT-like models of 24 channels, 2 layers, 8×8 patches.
_HF_VIT = {
    "hidden_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 8,
}


def hf_vit(num_classes: int = 5) -> nn.Module:
    """ViT: a class token, then 4×4 patches of 32×32."""
    return hf_model(
        "ViTConfig",
        "ViTForImageClassification",
        image_size=32,
        intermediate_size=48,
        num_labels=num_classes,
        **_HF_VIT,
    )


def hf_deit(num_classes: int = 5) -> nn.Module:
    """DeiT with its teacher's head: class and distillation tokens, 4×4 patches."""
    return hf_model(
        "DeiTConfig",
        "DeiTForImageClassificationWithTeacher",
        image_size=32,
        intermediate_size=48,
        num_labels=num_classes,
        **_HF_VIT,
    )


def hf_beit(num_classes: int = 5) -> nn.Module:
    """BEiT: relative position bias, mean pooling; 4×4 patches."""
    return hf_model(
        "BeitConfig",
        "BeitForImageClassification",
        image_size=32,
        intermediate_size=48,
        num_labels=num_classes,
        **_HF_VIT,
    )


def hf_dinov2(num_classes: int = 5) -> nn.Module:
    """DINOv2 (no registers) at 32×48, not its 32×32: a 4×6 grid (it interpolates)."""
    return hf_model(
        "Dinov2Config",
        "Dinov2ForImageClassification",
        image_size=32,
        mlp_ratio=2,
        num_labels=num_classes,
        **_HF_VIT,
    )


def hf_dinov2_registers(num_classes: int = 5) -> nn.Module:
    """DINOv2 with 4 register tokens (``config.num_register_tokens``): 1 + 4 prefix."""
    return hf_model(
        "Dinov2WithRegistersConfig",
        "Dinov2WithRegistersForImageClassification",
        image_size=32,
        mlp_ratio=2,
        num_register_tokens=4,
        num_labels=num_classes,
        **_HF_VIT,
    )


def hf_swin(num_classes: int = 5) -> nn.Module:
    """Swin: (N, H·W, C) hidden states, no prefix; 8×8 then 4×4 at 32×32."""
    return hf_model(
        "SwinConfig",
        "SwinForImageClassification",
        image_size=32,
        patch_size=4,
        embed_dim=12,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=4,
        num_labels=num_classes,
    )


def hf_convnext(num_classes: int = 5) -> nn.Module:
    """ConvNeXt: NCHW stages whose layers run channels-last between their permutes."""
    return hf_model(
        "ConvNextConfig",
        "ConvNextForImageClassification",
        hidden_sizes=[12, 24],
        depths=[1, 1],
        num_stages=2,
        num_labels=num_classes,
    )


def hf_resnet(num_classes: int = 5) -> nn.Module:
    """ResNet: a CNN, every map (N, C, H, W)."""
    return hf_model(
        "ResNetConfig",
        "ResNetForImageClassification",
        embedding_size=8,
        hidden_sizes=[12, 24],
        depths=[1, 1],
        num_labels=num_classes,
    )
