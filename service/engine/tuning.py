"""How each model runs, chosen when it loads: memory format by a timed probe, precision by
a fidelity check against float32.

- **Memory format.** ``channels_last`` (NHWC) lets oneDNN and cuDNN pick faster
  convolution kernels for many CNNs (ResNet: +10-16 % on a CPU), but not for all
  (DenseNet's concatenations, VGG's large dense layers may lose). With
  ``memory_format = "auto"`` the engine times a few explanations in each format,
  alternating, and keeps ``channels_last`` only if it is at least ``_FASTER_BY``
  faster and its maps equal the contiguous ones within float32 error.
- **Precision.** ``precision = "bf16"`` runs the forward and the gradient under
  bfloat16 autocast (the CAM maths stays float32); ``"auto"`` does so only where the
  hardware computes bfloat16 natively (AVX-512 BF16 or AMX on a CPU, Ampere or newer
  on CUDA): elsewhere it is emulated and slower. Either way the model must pass a
  check first, on probe inputs against float32: every map's Pearson correlation ≥
  ``MIN_PEARSON``, the same top-1 class, probabilities within
  ``MAX_PROBABILITY_DIFFERENCE``; a model that fails runs in float32, with one log
  line and ``gradcam_precision_fallbacks_total``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from service.contract.terms import Precision
from service.engine.folding import fold_batch_norms
from service.engine.gradcam import GradCAM, channels_last_format

if TYPE_CHECKING:
    from service.engine.loading.models import LoadedModel

logger = logging.getLogger(__name__)

MIN_PEARSON = 0.999
MAX_PROBABILITY_DIFFERENCE = 0.01
_FASTER_BY = 0.05
_PROBE_IMAGES = 4  # for the checks
_TIMED_IMAGES = 2  # for the timings (start-up time is the price)
_PROBE_ROUNDS = 2


@dataclass(frozen=True)
class Execution:
    """How a model runs: the memory format of its inputs and weights, its precision."""

    channels_last: bool
    precision: Precision
    fell_back: bool  # bf16 was asked for but failed its check
    why: str  # for the log


@dataclass(frozen=True)
class Probe:
    """What the choices explain to compare: ``model`` on ``device``, with the probe
    ``inputs`` ``(N, C, H, W) float32`` (``probe_inputs``), their top-1 class at ``layer``."""

    model: torch.nn.Module
    device: torch.device
    inputs: Tensor
    layer: str


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (not emulated)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = next(
            (
                line
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("flags")
            ),
            "",
        ).split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def probe_inputs(channels: int, size: tuple[int, ...], device: torch.device) -> Tensor:
    """Seeded smooth random images (or volumes), normalised: the same probe at every start."""
    generator = torch.Generator().manual_seed(20261204)
    coarse = torch.rand(_PROBE_IMAGES, channels, *[8] * len(size), generator=generator)
    mode = "trilinear" if len(size) == 3 else "bilinear"
    images = torch.nn.functional.interpolate(coarse, size=size, mode=mode, align_corners=False)
    return ((images - 0.45) / 0.25).to(device)


def top1_maps(
    engine: GradCAM, inputs: Tensor, layer: str, method: str = "gradcam"
) -> tuple[Tensor, Tensor]:
    """(logits, maps) of ``engine``'s explanation of each input's top-1 class."""
    n = inputs.shape[0]
    batch = engine(inputs, layer, [[None]] * n, [method] * n)
    return batch.logits, torch.stack([cams[0] for cams in batch.cams])


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two maps; two flat maps agree only if they are equal."""
    x, y = a.flatten().double(), b.flatten().double()
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    if denominator == 0:
        return 1.0 if float((a - b).abs().max()) <= 1e-6 else 0.0
    return float((x * y).sum()) / denominator


def fidelity(
    reference: tuple[Tensor, Tensor], candidate: tuple[Tensor, Tensor], multilabel: bool
) -> tuple[bool, str]:
    """Whether ``candidate`` (logits, maps) agrees with ``reference``, and the figures."""
    (ref_logits, ref_maps), (logits, maps) = reference, candidate
    lowest = min(pearson(ref_maps[i], maps[i]) for i in range(ref_maps.shape[0]))
    same_top1 = bool((ref_logits.argmax(1) == logits.argmax(1)).all())

    def scores(x: Tensor) -> Tensor:
        return torch.sigmoid(x) if multilabel else torch.softmax(x, dim=1)

    difference = float((scores(ref_logits) - scores(logits)).abs().max())
    ok = lowest >= MIN_PEARSON and same_top1 and difference <= MAX_PROBABILITY_DIFFERENCE
    return ok, (
        f"maps Pearson ≥ {lowest:.5f}, top-1 {'same' if same_top1 else 'DIFFERENT'}, "
        f"probabilities within {difference:.4f}"
    )


def _timed(engine: GradCAM, inputs: Tensor, layer: str) -> float:
    started = time.perf_counter()
    top1_maps(engine, inputs, layer)
    if inputs.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def choose_memory_format(probe: Probe, setting: str) -> tuple[bool, str]:
    """(channels_last, why). Leaves the probe's model in the chosen format."""
    model, device, inputs, layer = probe.model, probe.device, probe.inputs, probe.layer
    nhwc_format = channels_last_format(inputs.dim())
    if setting == "contiguous":
        return False, "set in the models file"
    if setting == "channels_last":
        model.to(memory_format=nhwc_format)  # type: ignore[call-overload]
        return True, "set in the models file"
    if device.type == "cuda":
        # Not yet measured on a GPU: the probe stays off there until it has been.
        return False, "auto: kept contiguous on CUDA (not yet measured)"
    contiguous = GradCAM(model, device)
    reference = top1_maps(contiguous, inputs, layer)
    model.to(memory_format=nhwc_format)  # type: ignore[call-overload]
    nhwc = GradCAM(model, device, channels_last=True)
    if pearson(reference[1], top1_maps(nhwc, inputs, layer)[1]) < 0.99999:
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
        return False, "channels_last maps differ beyond float32 error"
    times: dict[bool, list[float]] = {False: [], True: []}
    timed = inputs[:_TIMED_IMAGES]
    for _ in range(_PROBE_ROUNDS):  # alternating, so that drift hits both alike
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
        times[False].append(_timed(contiguous, timed, layer))
        model.to(memory_format=nhwc_format)  # type: ignore[call-overload]
        times[True].append(_timed(nhwc, timed, layer))
    plain, fast = min(times[False]), min(times[True])
    why = (
        f"{len(timed)} probe images: contiguous {plain * 1000:.0f} ms, "
        f"channels_last {fast * 1000:.0f} ms"
    )
    if fast <= plain * (1 - _FASTER_BY):
        return True, why
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return False, why


def choose_precision(
    probe: Probe, setting: str, channels_last: bool, multilabel: bool
) -> tuple[Precision, bool, str]:
    """(precision, fell back, why): bf16 only if asked for (or native, with "auto")
    and faithful on the probe inputs."""
    model, device, inputs, layer = probe.model, probe.device, probe.inputs, probe.layer
    if setting == "fp32":
        return "fp32", False, "float32 (the default)"
    if setting == "auto" and device.type == "cuda":
        return "fp32", False, "auto: float32 on CUDA (bf16 not yet measured)"
    if setting == "auto" and not native_bf16(device):
        return "fp32", False, "auto: this device has no native bfloat16"
    reference = top1_maps(GradCAM(model, device, channels_last=channels_last), inputs, layer)
    candidate = top1_maps(
        GradCAM(model, device, channels_last=channels_last, dtype=torch.bfloat16), inputs, layer
    )
    ok, figures = fidelity(reference, candidate, multilabel)
    if ok:
        return "bf16", False, f"bfloat16 autocast: {figures}"
    return "fp32", True, f"bfloat16 failed its check against float32 ({figures})"


def tune(loaded: LoadedModel, device: torch.device) -> Execution:
    """How ``loaded``, with the options of its models-file table, runs on ``device``
    (module text), probed at its default layer; its module is left in the chosen memory
    format, its batch norms folded if asked and it runs in float32 (folded, bfloat16
    drifted further from float32 than its check allows on the demo model)."""
    model, spec, layer = loaded.module, loaded.spec, loaded.default_layer
    folded: list[str] = []
    if spec.fold_batch_norm and spec.precision == "fp32":
        folded = fold_batch_norms(model)  # first, so the format probe times the folded model
    probe = Probe(model, device, probe_inputs(loaded.channels, loaded.input_size, device), layer)
    channels_last, format_why = choose_memory_format(probe, spec.memory_format)
    chosen, fell_back, precision_why = choose_precision(
        probe, spec.precision, channels_last, loaded.multilabel
    )
    if spec.fold_batch_norm and spec.precision != "fp32" and chosen == "fp32":
        folded = fold_batch_norms(model)
    layout = "channels_last" if channels_last else "contiguous"
    return Execution(
        channels_last,
        chosen,
        fell_back,
        f"{layout} ({format_why}); {precision_why}; "
        f"{len(folded)} batch norm(s) folded into their convolutions",
    )
