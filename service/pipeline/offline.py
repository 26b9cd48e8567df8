"""Files explained without a server: the one path of the command line's ``explain``,
``sanity`` and ``audit``.

The choices a request makes are made as the HTTP path makes them (``choose_layer``,
``resolve_targets``: the same errors, the same did-you-mean). Each file is then its own
request: decoded and fitted by ``prepare_image`` under the per-image limits of a fresh
``RequestBudget`` (not a total over the files); a file that cannot be read or refused
becomes one line to tell, and the others go on. The prepared images go to the engine in
chunks (``call_engine``), each within its own deadline.

A volume model's file (a NIfTI file, or a DICOM series as its files' bytes) is read and
fitted by ``prepare_volume`` in the same way, charged as a volume (``admit_volume``), and
keeps its windowed voxels: the commands draw the map over them at the file's own grid.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from service.contract.requests import ClassRef, HeatmapOptions, target_ref
from service.contract.settings import Settings
from service.pipeline.budgets import RequestBudget
from service.pipeline.context import RequestContext
from service.pipeline.engine_call import Explained, Explaining, Prepared, call_engine
from service.pipeline.images import (
    ImageSlot,
    Keep,
    PreparedImage,
    choose_layer,
    prepare_image,
    resolve_targets,
)
from service.pipeline.volume_budget import admit_volume
from service.pipeline.volumes import PreparedVolume, VolumeSlot, prepare_volume
from service.transport.interface import Engine, ModelInfo

# A file's images are charged for nothing drawn: the commands draw what they write.
_NOTHING_DRAWN = HeatmapOptions(format="none", size="original")


@dataclass(frozen=True)
class OfflinePlan:
    """What every file of one command is explained with."""

    how: Explaining
    targets: list[int | None]  # for each image (None: its top-1 class)
    settings: Settings

    @property
    def model(self) -> ModelInfo:
        return self.how.model

    @property
    def layer(self) -> str:
        return self.how.layer


def plan(
    model: ModelInfo,
    settings: Settings,
    layer: str | None = None,
    targets: Sequence[str] | None = None,
    method: str = "gradcam",
    faithfulness: bool = False,
) -> OfflinePlan:
    """The layer and targets as the HTTP path chooses them (``ServiceError`` for a layer
    or class the model does not have, or more explanations than a request may ask)."""
    chosen = choose_layer(model, layer)
    refs: list[ClassRef] | None = [target_ref(t) for t in targets] if targets else None
    resolved = resolve_targets(refs, model, 0)
    budget = RequestBudget(settings, model, chosen, _NOTHING_DRAWN)
    budget.check_explanations([len(resolved)], faithfulness)
    return OfflinePlan(Explaining(model, chosen, method, faithfulness), resolved, settings)


def prepare_file(
    plan: OfflinePlan,
    data: bytes,
    index: int,
    frame: int | None = None,
    keep_display: bool = False,
    keep_header: bool = False,
) -> PreparedImage:
    """One file's image, decoded and fitted as a request of its own (``ServiceError``)."""
    budget = RequestBudget(plan.settings, plan.model, plan.layer, _NOTHING_DRAWN)
    admit = partial(budget.admit_image, index, explanations=len(plan.targets))
    keep = Keep(display=keep_display, source=keep_header)
    slot = ImageSlot(index, plan.targets, frame)
    return prepare_image(data, slot, plan.model, admit, keep, plan.settings.out_of_domain)


def prepare_volume_file(plan: OfflinePlan, data: bytes | list[bytes], index: int) -> PreparedVolume:
    """One volume (a file's bytes, or a DICOM series' files), read and fitted as a request
    of its own, its windowed voxels kept to draw over (``ServiceError``)."""
    budget = RequestBudget(plan.settings, plan.model, plan.layer, _NOTHING_DRAWN)
    admit = partial(admit_volume, budget, index, explanations=len(plan.targets))
    slot = VolumeSlot(index, plan.targets, keep_base=True, domain=plan.settings.out_of_domain)
    return prepare_volume(data, slot, plan.model, admit)


def explain_prepared(
    engine: Engine, plan: OfflinePlan, prepared: Sequence[Prepared], deadline_s: float
) -> list[Explained[Prepared]]:
    """One engine call for a chunk of prepared images (or volumes), within ``deadline_s``
    from now."""
    context = RequestContext(deadline=time.monotonic() + deadline_s)
    return call_engine(engine, plan.how, prepared, context)
