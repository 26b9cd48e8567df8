"""A job's raw pixels as the model's input: one normalised ``(N, C, H, W)`` batch on the
device (a volume model's ``(N, 1, D, H, W)``).

Jobs arrive as raw pixels at the model's input size (usually 8-bit); they are checked
against the model, copied to the device once per kind of image, and normalised there.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from service.contract.errors import ServiceError
from service.engine.loading.models import LoadedModel
from service.transport.interface import Job


class InvalidJob(ServiceError):
    """A job whose pixels do not fit the model: a bug on the sending side, not the client's."""


def normaliser(model: LoadedModel, device: torch.device) -> tuple[Tensor, Tensor]:
    """``model``'s mean and std on ``device``, shaped to broadcast over a batch."""
    shape = (1, -1, *[1] * len(model.input_size))
    return (
        torch.tensor(model.mean, dtype=torch.float32, device=device).view(shape),
        torch.tensor(model.std, dtype=torch.float32, device=device).view(shape),
    )


def batch_inputs(
    model: LoadedModel, job: Job, device: torch.device, normalisation: tuple[Tensor, Tensor]
) -> Tensor:
    """``(N, C, H, W) float32`` normalised on the device from the job's raw pixels (a
    volume model's ``(N, 1, D, H, W)``)."""
    if model.preprocessing.volume is not None:
        return _volume_inputs(model, job, device, normalisation)
    _check_images(model, job)
    height, width = model.input_size
    cuda = device.type == "cuda"
    groups: dict[tuple[str, int], list[int]] = {}
    for i, image in enumerate(job.images):
        groups.setdefault((image.dtype.name, image.shape[2]), []).append(i)
    inputs = torch.empty(len(job.images), model.channels, height, width, device=device)
    for (dtype, _), indices in groups.items():
        # One host array and one copy per kind of image (usually a single uint8 one).
        host = torch.from_numpy(np.stack([job.images[i] for i in indices]))
        if cuda:
            host = host.pin_memory()
        pixels = host.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        if dtype == "uint8":
            pixels = pixels / 255.0
        index = torch.tensor(indices, device=device)
        inputs.index_copy_(0, index, pixels.expand(-1, model.channels, -1, -1))
    if model.preprocessing.channel_order == "bgr":
        inputs = inputs.flip(1)  # before the statistics, which are the model's order
    mean, std = normalisation
    inputs = (inputs - mean) / std
    for i, box in enumerate(job.boxes):
        if box is not None:
            # Letterbox: what lies outside the image is exactly 0 after normalisation.
            x0, y0, x1, y1 = box
            keep = inputs[i, :, y0:y1, x0:x1].clone()
            inputs[i].zero_()
            inputs[i, :, y0:y1, x0:x1] = keep
    return inputs


def _check_images(model: LoadedModel, job: Job) -> None:
    height, width = model.input_size
    for i, image in enumerate(job.images):
        if (
            image.ndim != 3
            or image.shape[:2] != (height, width)
            or image.shape[2] not in (1, model.channels)
            or image.dtype not in (np.uint8, np.float32)
        ):
            channels = "1" if model.channels == 1 else f"1 or {model.channels}"
            raise InvalidJob(
                f"image {i} of the job is {image.dtype}{list(image.shape)}, not "
                f"({height}, {width}, {channels}) uint8 or float32"
            )


def _volume_inputs(
    model: LoadedModel, job: Job, device: torch.device, normalisation: tuple[Tensor, Tensor]
) -> Tensor:
    """Volumes arrive fitted by the HTTP worker (oriented, resampled, windowed, resized:
    ``imaging/volume_fitting.py``) as ``(D, H, W, 1) float32``: one copy, then the
    model's statistics (none by default)."""
    expected = (*model.input_size, 1)
    for i, volume in enumerate(job.images):
        if volume.shape != expected or volume.dtype != np.float32:
            raise InvalidJob(
                f"volume {i} of the job is {volume.dtype}{list(volume.shape)}, not "
                f"{expected} float32"
            )
    host = torch.from_numpy(np.stack(job.images))
    if device.type == "cuda":
        host = host.pin_memory()
    inputs = host.to(device, non_blocking=True).permute(0, 4, 1, 2, 3)
    mean, std = normalisation
    return ((inputs - mean) / std).contiguous()
