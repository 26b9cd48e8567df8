"""Deletion and insertion curves of heatmaps (RISE: Petsiuk et al., 2018).

How faithful is a heatmap to the model? Remove the pixels it ranks highest and
the explained class's score should fall fast (deletion: a low area under the curve);
put them back one by one into an image that lacks them and it should rise fast
(insertion: a high area). The definition, so that anyone can recompute it:

- at the model's input size, rank the pixels by the heatmap (upsampled bilinearly,
  half-pixel centres, ``align_corners=False``), highest first, ties by pixel index
  (row-major);
- the substrate is the input blurred with a Gaussian of σ = 5 px (kernel radius
  ⌈3σ⌉ = 15, edges replicated), per channel;
- step ``k`` of ``STEPS`` = 20 replaces the first ``round(k · H · W / 20)`` ranked pixels
  (every channel): deletion puts the substrate's pixels there, insertion starts from
  the substrate and puts the input's pixels back;
- the score at each step is the explained class's score as the model reports it
  (softmax, or sigmoid for a multi-label model); step 0 of deletion and step 20 of
  insertion are the input itself, so they equal the answer's score;
- each AUC is the trapezoid rule over the fraction ``k / 20`` in [0, 1]
  (``pipeline.faithfulness.auc``).

Why blur and not a constant: the substrate decides what the metric measures. A gray
patch (the dataset mean) where the top pixels were is itself a finding to a
radiograph model, and the deletion curve climbs back; a blurred image keeps the
layout and removes the detail (docs/trust.md shows both).

The engine computes the curves in batches, one explanation's 38 intermediate images
(plus its image's substrate, once) per forward pass, without gradients, in the
model's precision and memory format (``GradCAM.logits``); one explanation is one round
of the model loop, with other requests' batches between rounds (``batching.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from service.engine.work_items import Abandoned

STEPS = 20
SIGMA_PX = 5.0


def gaussian_blur(inputs: Tensor, sigma: float = SIGMA_PX) -> Tensor:
    """``(N, C, H, W)`` blurred per channel by a separable Gaussian (radius ⌈3σ⌉, edges
    replicated, weights summing to 1, so blurring commutes with the per-channel
    normalisation)."""
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=inputs.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    n, c, h, w = inputs.shape
    x = inputs.float().reshape(n * c, 1, h, w)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.reshape(n, c, h, w)


def step_masks(cam: Tensor, size: tuple[int, int], steps: int = STEPS) -> Tensor:
    """``(steps + 1, 1, H, W) bool``: mask ``k`` is true on the first
    ``round(k · H · W / steps)`` pixels in the heatmap's ranking (module text)."""
    height, width = size
    up = F.interpolate(
        cam.float()[None, None], size=size, mode="bilinear", align_corners=False
    ).flatten()
    # A stable sort of the negated map: highest first, equal values by pixel index.
    order = torch.argsort(-up, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.tensor(
        [round(k * height * width / steps) for k in range(steps + 1)], device=cam.device
    )
    return (rank[None, :] < counts[:, None]).view(steps + 1, 1, height, width)


@dataclass(frozen=True)
class Explanations:
    """A batch's explanations, as their curves need them: ``inputs`` ``(N, C, H, W)``,
    the batch as the model saw it (normalised); ``scores`` ``(N, K)``, its scores;
    ``cams[i][j]``, image ``i``'s map for class ``targets[i][j]``; ``wanted[i]``, whether
    image ``i`` asked for curves."""

    inputs: Tensor
    scores: Tensor
    cams: Sequence[Sequence[Tensor]]
    targets: Sequence[Sequence[int]]
    wanted: Sequence[bool]


def curves(
    probabilities: Callable[[Tensor], Tensor],
    explained: Explanations,
    should_stop: Callable[[], bool] | None = None,
    substrate_of: Callable[[Tensor], Tensor] = gaussian_blur,
) -> list[list[np.ndarray]]:
    """The deletion and insertion curves of every explanation of the images ``wanted``,
    all at once (``curve_rounds`` has the arguments); ``should_stop`` is asked before each
    explanation."""
    rounds = curve_rounds(probabilities, explained, substrate_of)
    while True:
        if should_stop is not None and should_stop():
            rounds.close()
            raise Abandoned("stopped while computing faithfulness curves")
        try:
            next(rounds)
        except StopIteration as done:
            return done.value


def curve_rounds(
    probabilities: Callable[[Tensor], Tensor],
    explained: Explanations,
    substrate_of: Callable[[Tensor], Tensor] = gaussian_blur,
) -> Generator[None, None, list[list[np.ndarray]]]:
    """The curves one explanation at a time: each ``next()`` computes one explanation's
    (one batched forward pass of 38 images, with its image's substrate the first time),
    and the last returns them all, so the engine can run other requests in between.

    ``probabilities``: ``(n, C, H, W)`` normalised inputs → ``(n, K)`` scores, no
    gradients; ``explained``: the batch and its answer. Returns, per image, one
    ``(2, STEPS + 1) float32`` array (deletion, insertion) per target, or no arrays for
    an image not wanted. ``substrate_of`` makes the substrate of a ``(1, C, H, W)`` input
    (other substrates are for comparing them: ``tests/benchmarks/faithfulness.py``).
    """
    inputs, scores, cams = explained.inputs, explained.scores, explained.cams
    targets, wanted = explained.targets, explained.wanted
    size = (inputs.shape[2], inputs.shape[3])
    out: list[list[np.ndarray]] = [[] for _ in cams]
    explanations = [
        (i, cam, target)
        for i, image_cams in enumerate(cams)
        if wanted[i]
        for cam, target in zip(image_cams, targets[i], strict=True)
    ]
    substrates: dict[int, tuple[Tensor, Tensor | None]] = {}
    for number, (i, cam, target) in enumerate(explanations):
        if number:
            yield
        x = inputs[i : i + 1].float()
        substrate, substrate_scores = substrates.get(i) or (substrate_of(x), None)
        masks = step_masks(cam.to(inputs.device), size)[1:STEPS]  # the 19 in between
        batch = [torch.where(masks, substrate, x), torch.where(masks, x, substrate)]
        if substrate_scores is None:
            batch.append(substrate)  # every class's score on it, once per image
        probs = probabilities(torch.cat(batch)).float().cpu()
        if substrate_scores is None:
            substrate_scores = probs[-1]
        substrates[i] = (substrate, substrate_scores)
        between = probs[: 2 * (STEPS - 1), target]
        original = scores[i, target].float().cpu().view(1)
        blurred = substrate_scores[target].view(1)
        deletion = torch.cat([original, between[: STEPS - 1], blurred])
        insertion = torch.cat([blurred, between[STEPS - 1 :], original])
        out[i].append(torch.stack([deletion, insertion]).numpy())
    return out
