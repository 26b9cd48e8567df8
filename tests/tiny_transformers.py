"""Small seeded transformers for tests/unit/engine/test_transformers.py, built in milliseconds.

Factories for a models file (``arch = "tests.tiny_transformers:tiny_vit"``):
torchvision's own ViT and Swin classes at toy sizes ("auto" knows them by type), and
two models written the way timm or a research repository writes them, which "auto"
does not know and which declare their layout: ``token_net`` (a class token, then
``(N, 1 + h·w, C)`` tokens) and ``channels_last_net`` (``(N, H, W, C)`` maps).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import SwinTransformer, VisionTransformer

SEED = 7


def tiny_vit(num_classes: int = 5) -> nn.Module:
    """torchvision's ViT at 32×32 with 8×8 patches: 1 + 4·4 tokens of 16 channels."""
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = VisionTransformer(
            image_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=2,
            hidden_dim=16,
            mlp_dim=32,
            num_classes=num_classes,
        )
        # torchvision starts the head at zero: every score, gradient and map would be 0.
        nn.init.normal_(model.heads.head.weight, std=0.5)
    return model


def tiny_swin(num_classes: int = 5) -> nn.Module:
    """torchvision's Swin at 32×32: 8×8×8 maps, then 4×4×16 after one patch merging."""
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = SwinTransformer(
            patch_size=[4, 4],
            embed_dim=8,
            depths=[2, 2],
            num_heads=[2, 2],
            window_size=[4, 4],
            num_classes=num_classes,
        )
        # Its head's 0.02 init gives gradients so small that pytorch-grad-cam's 1e-6 in
        # gradcam++'s denominator would outweigh them (docs/correctness.md's caveat).
        nn.init.normal_(model.head.weight, std=5.0)
    return model


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TokenNet(nn.Module):
    """A ViT in its own classes: 8×8 patches, a class token first, the head reading it."""

    def __init__(self, num_classes: int, dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(_Block(dim), _Block(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # row by row, as ViTs do
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        return self.head(self.norm(self.blocks(tokens))[:, 0])


class ChannelsLastNet(nn.Module):
    """Maps kept (N, H, W, C) after the patch embedding, as timm's Swin keeps them."""

    def __init__(self, num_classes: int, dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).permute(0, 2, 3, 1)  # a function, not a module: no type to know it by
        return self.head(self.act(self.mix(self.norm(x))).mean(dim=(1, 2)))


def token_net(num_classes: int = 3) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        return TokenNet(num_classes)


def channels_last_net(num_classes: int = 3) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        return ChannelsLastNet(num_classes)
