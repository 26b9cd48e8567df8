"""The engine call of a request: its prepared images as one ``Job``, batched in the engine
with other requests, and the answer as one ``ExplainedImage`` per image. The HTTP path
(``explain.compute``) and the command line (``offline.py``) both call the engine here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from service.pipeline.context import RequestContext
from service.pipeline.images import PreparedImage
from service.pipeline.volumes import PreparedVolume
from service.transport.interface import Engine, Job, ModelInfo, class_order

# What went to the engine: a 2-D image, or a volume.
Prepared = TypeVar("Prepared", PreparedImage, PreparedVolume)


@dataclass(frozen=True)
class Explained(Generic[Prepared]):
    prepared: Prepared
    scores: np.ndarray  # (K,) probabilities (softmax) or sigmoid scores (multilabel)
    order: np.ndarray  # (K,) class indices, most likely first (interface.class_order)
    targets: list[int]
    cams: list[np.ndarray]  # (h, w) raw maps, one per target (a volume's (d, h, w))
    # (2, 21) deletion and insertion curves, one per target, if asked for (else empty)
    curves: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class Explaining:
    """How a request's images are explained: by which model, at which layer, with which
    method, and whether each explanation gets its faithfulness curves."""

    model: ModelInfo
    layer: str
    method: str = "gradcam"
    faithfulness: bool = False


ExplainedImage = Explained[PreparedImage]
ExplainedVolume = Explained[PreparedVolume]


def call_engine(
    engine: Engine, how: Explaining, prepared: Sequence[Prepared], context: RequestContext
) -> list[Explained[Prepared]]:
    """One engine call for all ``prepared`` images (batched there with other requests),
    within the request's deadline and while its client waits."""
    job = Job(
        model=how.model.name,
        layer=how.layer,
        images=[p.pixels for p in prepared],
        boxes=[p.box for p in prepared],
        targets=[p.targets for p in prepared],
        methods=[how.method] * len(prepared),
        faithfulness=[True] * len(prepared) if how.faithfulness else [],
    )
    result = engine.run(job, context.deadline, context.disconnected)
    return [
        Explained(
            p,
            result.scores[i],
            class_order(result.logits[i]),
            result.targets[i],
            result.maps[i],
            result.curves[i] if result.curves else [],
        )
        for i, p in enumerate(prepared)
    ]
