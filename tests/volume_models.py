"""A small volume model and a CT phantom for the tests that serve, explain or show volumes:
a MONAI 3-D DenseNet with BatchNorm statistics that keep a random net's maps alive, a
NIfTI phantom (air, a body, a dense sphere off centre) and a models file that holds both
the volume model (``ct3d``, the default) and the 2-D demo model (``phantom``).

The server's tests (``tests/process/server/test_volumes_served.py``), the web page's
and the command line's share them: one phantom, one network, one models file."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

DEMO = Path(__file__).resolve().parents[1] / "service" / "demo"
ARCH_ARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "init_features": 8,
    "growth_rate": 8,
    "block_config": (2, 2, 2),
}
INPUT_SIZE = (48, 48, 32)
WINDOW = (-1000.0, 400.0)
SPACING = (1.5, 1.5, 2.5)
LAYER = "features.denseblock3"
# DICOM's column, row and slice spacing of the phantom's series, and its first position.
DICOM_SPACING = (0.9, 0.9, 2.0)
DICOM_ORIGIN = (-30.0, -25.0, 40.0)
# The dense sphere: its centre (I, J, K) on the phantom's grid, and its radius in voxels
# along I and J (along K the radius is 6 / 2.2 slices).
SPHERE_CENTRE = (36, 18, 14)
SPHERE_RADIUS = 6


def network() -> nn.Module:
    from monai.networks import nets

    torch.manual_seed(0)
    net = nets.DenseNet(**ARCH_ARGS)
    # Batch norms given the statistics of smooth noise and affine parameters off 1/0, so
    # that a random net's activations do not vanish and its maps are not all zero.
    generator = torch.Generator().manual_seed(1)
    coarse = torch.rand(8, 1, 6, 6, 4, generator=generator)
    noise = nn.functional.interpolate(coarse, size=INPUT_SIZE, mode="trilinear")
    net.train()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.momentum = None
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.num_features, generator=generator) * 0.4)
        net(noise)
    return net.eval()


def ct_phantom() -> np.ndarray:
    """HU (I, J, K): air, a body of soft tissue, a dense sphere off centre."""
    i, j, k = np.meshgrid(np.arange(56), np.arange(48), np.arange(24), indexing="ij")
    hu = np.full(i.shape, -1000.0)
    hu[((i - 28) / 24) ** 2 + ((j - 24) / 20) ** 2 <= 1] = 40.0
    ci, cj, ck = SPHERE_CENTRE
    hu[(i - ci) ** 2 + (j - cj) ** 2 + ((k - ck) * 2.2) ** 2 <= SPHERE_RADIUS**2] = 180.0
    noise = np.random.default_rng(3).normal(0, 15, hu.shape)
    return np.round(hu + noise)


def ras_affine() -> np.ndarray:
    """The affine the DICOM series' readers give (LPS negated in x and y)."""
    affine = np.diag([-DICOM_SPACING[0], -DICOM_SPACING[1], DICOM_SPACING[2], 1.0])
    affine[:3, 3] = (-DICOM_ORIGIN[0], -DICOM_ORIGIN[1], DICOM_ORIGIN[2])
    return affine


def write_models(folder: Path) -> Path:
    """``folder/models.toml`` with ``ct3d`` (the default) and the 2-D ``phantom``, its
    weights and labels beside it, and the phantom as ``folder/ct.nii.gz``."""
    import nibabel
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(network().state_dict(), str(folder / "ct3d.safetensors"))
    (folder / "labels.txt").write_text("normal\nnodule\n")
    nifti = nibabel.Nifti1Image(ct_phantom().astype(np.int16), ras_affine())
    nibabel.save(nifti, folder / "ct.nii.gz")
    args = ", ".join(
        f"{key} = {list(value) if isinstance(value, tuple) else value}"
        for key, value in ARCH_ARGS.items()
    )
    models = folder / "models.toml"
    models.write_text(
        textwrap.dedent(
            f"""
            [models.ct3d]
            library = "monai"
            arch = "DenseNet"
            arch_args = {{ {args} }}
            weights = "ct3d.safetensors"
            labels = "labels.txt"
            input_size = {list(INPUT_SIZE)}
            window = {list(WINDOW)}
            spacing = {list(SPACING)}
            layer = "{LAYER}"
            modalities = ["CT"]
            default = true

            [models.phantom]
            arch = "service.demo.model:phantom_net"
            weights = "{DEMO / "phantom_net.safetensors"}"
            labels = "{DEMO / "labels.txt"}"
            multilabel = true
            channels = 1
            input_size = [128, 128]
            mean = [0.37]
            std = [0.21]
            layer = "features"
            """
        )
    )
    return models
