"""The Grad-CAM engine: one forward and one backward for a whole batch.

How it stays cheap and exact:

- A forward hook on the target layer swaps the layer's output for a detached
  copy that requires grad. Nothing before the layer records a graph (parameters
  are frozen, the input needs no grad), so the backward pass runs only from the
  score down to the layer: it costs about as much as the layers after it.
- The hook returns a *clone* of the captured leaf, so a model that modifies the
  output in place further on (DenseNet's ``F.relu(features, inplace=True)``)
  neither corrupts the captured activation nor trips autograd; on a convolution
  that absorbed a batch norm (``folding.py``) the leaf is its output before it.
- Gradients come from ``torch.autograd.grad(score, activation)``: no
  ``.backward()``, so no parameter ``.grad`` is ever written and no graph
  outlives the call.
- Each image's score is picked with ``gather`` and the scores are summed: since
  an image's score depends on that image alone (the model is in eval mode), one
  backward pass yields every image's own gradient. An image with several
  targets takes one more backward pass per extra target (on the same graph).
- Each CAM variant is only its weighting formula (``_CAM_FORMULAS``) applied to
  the same activations and gradients, in float32, on the device; the maps come
  back to the CPU in one copy at the end.
- A transformer layer's tokens or channels-last map (``layouts/``) is captured as
  the layer returns it (a Hugging Face layer's tuple: its first element); the
  activation and its gradient are then viewed alike as ``(N, C, h, w)`` (prefix tokens
  dropped), so the formulas never see the difference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from service.contract.terms import Method
from service.engine.folding import explained_activation
from service.engine.layers import resolve_layer
from service.engine.layouts import Layout, Refused, decide_layout
from service.engine.work_items import Abandoned

# (N, C, h, w) activations, (N, C, h, w) gradients → (N, h, w) map before ReLU; a
# volume's (N, C, d, h, w) → (N, d, h, w) alike: every formula reduces over all the
# spatial axes, whatever their number.
CamFormula = Callable[[Tensor, Tensor], Tensor]

_EPS = 1e-7


def _space(x: Tensor) -> tuple[int, ...]:
    """The spatial axes of an ``(N, C, ...)`` map."""
    return tuple(range(2, x.dim()))


def _gradcam(a: Tensor, g: Tensor) -> Tensor:
    # Selvaraju et al. 2017: channel weights are the spatially averaged gradients.
    return (g.mean(dim=_space(g), keepdim=True) * a).sum(dim=1)


def _gradcam_plus_plus(a: Tensor, g: Tensor) -> Tensor:
    # Chattopadhay et al. 2018, with the exponential-score closed form for the
    # higher derivatives: alpha = g² / (2g² + Σa·g³); weights = Σ alpha·relu(g).
    g2 = g * g
    denominator = 2 * g2 + a.sum(dim=_space(a), keepdim=True) * g2 * g
    safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    alpha = torch.where(denominator != 0, g2 / safe, torch.zeros_like(g2))
    weights = (alpha * g.clamp(min=0)).sum(dim=_space(g), keepdim=True)
    return (weights * a).sum(dim=1)


def _xgradcam(a: Tensor, g: Tensor) -> Tensor:
    # Fu et al. 2020: gradients weighted by the activation, normalised per channel.
    space = _space(a)
    weights = (g * a).sum(dim=space, keepdim=True) / (a.sum(dim=space, keepdim=True) + _EPS)
    return (weights * a).sum(dim=1)


def _layercam(a: Tensor, g: Tensor) -> Tensor:
    # Jiang et al. 2021: positive gradients as element-wise weights.
    return (g.clamp(min=0) * a).sum(dim=1)


def _hirescam(a: Tensor, g: Tensor) -> Tensor:
    # Draelos & Carin 2020: element-wise gradient × activation, no averaging.
    return (g * a).sum(dim=1)


# One formula for each of the API's methods (``contract.terms.METHODS``, the one list).
_CAM_FORMULAS: dict[Method, CamFormula] = {
    "gradcam": _gradcam,
    "gradcam++": _gradcam_plus_plus,
    "xgradcam": _xgradcam,
    "layercam": _layercam,
    "hirescam": _hirescam,
}


def channels_last_format(dims: int) -> torch.memory_format:
    """Channels last for a batch of ``dims`` dimensions: NHWC for images, NDHWC for
    volumes (torch names them apart)."""
    return torch.channels_last_3d if dims == 5 else torch.channels_last


def cam_formula(method: str) -> CamFormula:
    """The weighting formula of ``method`` (one of ``METHODS``)."""
    return _CAM_FORMULAS[method]  # type: ignore[index]  # a method the contract checked


def formula_methods() -> tuple[str, ...]:
    """The methods the engine has a formula for (a test keeps them ``METHODS``)."""
    return tuple(_CAM_FORMULAS)


class LayerOutputError(ValueError):
    """The target layer's output cannot be explained (no feature map, or runs twice)."""


class TargetError(ValueError):
    """A target class index outside the model's outputs."""


@dataclass(frozen=True)
class CamBatch:
    """What one engine call returns, all on the CPU.

    - ``logits``: ``(N, K) float32``, the model's raw outputs.
    - ``targets[i]``: the class indices explained for image ``i`` (``None`` resolved to top-1).
    - ``cams[i][j]``: ``(h, w) float32 >= 0`` (a volume's ``(d, h, w)``), the map for
      image ``i``, target ``j``, at the target layer's resolution, before normalisation.
    """

    logits: Tensor
    targets: list[list[int]]
    cams: list[list[Tensor]]


def _check_request(n: int, targets: Sequence[Sequence[int | None]], methods: Sequence[str]) -> None:
    """``ValueError`` unless each of ``n`` images has one or more targets and a known method."""
    if len(targets) != n or len(methods) != n:
        raise ValueError(f"{n} images need {n} target lists and {n} methods")
    if any(len(t) == 0 for t in targets):
        raise ValueError("every image needs at least one target")
    unknown = set(methods) - set(_CAM_FORMULAS)
    if unknown:
        raise ValueError(f"unknown CAM method(s): {', '.join(sorted(unknown))}")


class GradCAM:
    """Explains a batch with any of ``METHODS`` at any layer of one model.

    The model must be in eval mode with frozen parameters (``models.load_model``
    does both); the engine never changes either.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str = "cpu",
        autocast: bool = False,
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        # Mixed precision for the forward pass and the gradient: ``dtype`` (bfloat16,
        # tuning.py), or float16 on CUDA with ``autocast``. The captured activation and
        # its gradient come out in that type; the CAM maths below is float32.
        if dtype is None and autocast and self.device.type == "cuda":
            dtype = torch.float16
        self.dtype = dtype
        # Inputs in NHWC, for a model whose weights are (tuning.py).
        self.channels_last = channels_last

    def __call__(
        self,
        inputs: Tensor,
        layer: str,
        targets: Sequence[Sequence[int | None]],
        methods: Sequence[str],
        should_stop: Callable[[], bool] | None = None,
    ) -> CamBatch:
        """Explain ``inputs`` ``(N, C, H, W) float32`` (volumes: ``(N, C, D, H, W)``).

        ``targets[i]`` lists the classes to explain for image ``i`` (``None`` = its
        top-1 class); ``methods[i]`` is image ``i``'s CAM variant. ``should_stop``
        is asked before each extra target round (one backward pass each): true
        raises ``Abandoned``.
        """
        _check_request(inputs.shape[0], targets, methods)
        module = resolve_layer(self.model, layer)
        captured: list[tuple[Tensor, Layout]] = []

        def capture(mod: nn.Module, args: object, output: object) -> object:
            layout = decide_layout(self.model, layer, mod, output, tuple(inputs.shape))
            if isinstance(layout, Refused):
                raise LayerOutputError(f"layer '{layer}' {layout.reason}")
            if captured:
                raise LayerOutputError(
                    f"layer '{layer}' runs more than once per forward pass; choose another layer"
                )
            leaf, passed_on = explained_activation(mod, layout.map_of(output))
            captured.append((leaf, layout))
            return layout.passed_on(output, passed_on)

        handle = module.register_forward_hook(capture)
        try:
            # Grad-CAM needs autograd even when a caller sits in no_grad/inference_mode.
            with (
                torch.inference_mode(False),
                torch.enable_grad(),
                torch.autocast(
                    self.device.type,
                    dtype=self.dtype or torch.bfloat16,
                    enabled=self.dtype is not None,
                ),
            ):
                x = inputs.to(self.device, non_blocking=True)
                if self.channels_last:
                    x = x.contiguous(memory_format=channels_last_format(x.dim()))
                logits = self.model(x)
                if not isinstance(logits, Tensor) or logits.dim() != 2:
                    raise LayerOutputError("the model's output is not an (N, classes) tensor")
                if not captured:
                    raise LayerOutputError(f"layer '{layer}' did not run in the forward pass")
                return self._explain(logits, *captured[0], targets, methods, should_stop)
        finally:
            handle.remove()
            captured.clear()

    def logits(self, inputs: Tensor) -> Tensor:
        """``(n, K) float32`` raw outputs for ``inputs`` (normalised, on the device), without
        gradients, in this engine's precision and memory format: the forward passes of the
        faithfulness curves (``faithfulness.py``)."""
        with (
            torch.inference_mode(),
            torch.autocast(
                self.device.type,
                dtype=self.dtype or torch.bfloat16,
                enabled=self.dtype is not None,
            ),
        ):
            x = (
                inputs.contiguous(memory_format=channels_last_format(inputs.dim()))
                if self.channels_last
                else inputs
            )
            return self.model(x).float()

    def _explain(
        self,
        logits: Tensor,
        activation: Tensor,
        layout: Layout,
        targets: Sequence[Sequence[int | None]],
        methods: Sequence[str],
        should_stop: Callable[[], bool] | None,
    ) -> CamBatch:
        n, classes = logits.shape
        for i, image_targets in enumerate(targets):
            for t in image_targets:
                # Checked here, not left to gather: on CUDA a bad index kills the context.
                if t is not None and not 0 <= t < classes:
                    raise TargetError(f"image {i}: class {t} is outside 0..{classes - 1}")
        a = layout.to_grid(activation.detach()).float()
        top1 = logits.detach().argmax(dim=1)
        rounds = max(len(t) for t in targets)
        maps: list[Tensor] = []
        slots: list[tuple[int, int]] = []
        for k in range(rounds):
            if k and should_stop is not None and should_stop():
                raise Abandoned(f"stopped after {k} of {rounds} target rounds")
            rows = [i for i in range(n) if len(targets[i]) > k]
            given = torch.tensor(
                [
                    targets[i][k] if len(targets[i]) > k and targets[i][k] is not None else -1
                    for i in range(n)
                ],
                device=logits.device,
            )
            index = torch.where(given >= 0, given, top1)
            scores = logits.gather(1, index[:, None]).squeeze(1).float()
            if len(rows) < n:
                scores = scores[rows]
            (grad,) = torch.autograd.grad(scores.sum(), activation, retain_graph=k + 1 < rounds)
            # The gradient w.r.t. the leaf as the layer returned it, viewed as the activation is.
            g = layout.to_grid(grad).float()
            for method in dict.fromkeys(methods[i] for i in rows):
                chosen = [i for i in rows if methods[i] == method]
                cams = cam_formula(method)(a[chosen], g[chosen]).clamp(min=0)
                maps.extend(cams.unbind(0))
                slots.extend((i, k) for i in chosen)
        # One copy back for everything the caller needs.
        all_maps = torch.stack(maps).cpu()
        logits_cpu = logits.detach().float().cpu()
        top1_cpu = logits_cpu.argmax(dim=1).tolist()
        resolved = [[top1_cpu[i] if t is None else t for t in targets[i]] for i in range(n)]
        cams_out: list[list[Tensor]] = [[torch.empty(0)] * len(targets[i]) for i in range(n)]
        for (i, k), cam in zip(slots, all_maps, strict=True):
            cams_out[i][k] = cam
        return CamBatch(logits=logits_cpu, targets=resolved, cams=cams_out)
