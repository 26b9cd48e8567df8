"""Shared fixtures: the demo runtime, phantom images, seeded torchvision models."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from service.config import Settings
from service.demo.phantom import Phantom, sample_phantom, to_uint8
from service.runtime import Runtime

# Tests run on the CPU, on the 2 cores of the CI machine.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def runtime() -> Iterator[Runtime]:
    """The demo model's runtime, as the CLI and each server worker start it."""
    rt = Runtime(Settings(device="cpu")).start()
    yield rt
    rt.close()


def png_bytes(array: np.ndarray, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save_args)
    return buffer.getvalue()


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def phantom(seed: int, width: int = 256, height: int = 256) -> Phantom:
    return sample_phantom(np.random.default_rng(seed), width, height)


def phantom_png(seed: int, width: int = 256, height: int = 256) -> bytes:
    return png_bytes(to_uint8(phantom(seed, width, height).image))


def seeded_model(arch: str, seed: int = 0, **kwargs: object) -> torch.nn.Module:
    """A random-init torchvision model in eval mode with frozen parameters."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None, **kwargs).eval()
    model.requires_grad_(False)
    return model
