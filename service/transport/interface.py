"""What crosses the boundary between the HTTP side and the engine (no torch here).

The HTTP workers decode and fit images; the engine runs the model. Between them
travel only these plain types:

- ``ModelInfo`` / ``Catalog``: what the engine serves, so that a worker can
  validate a request (labels, layers, input size) without the model itself;
- ``Job``: one request's images, already at the model's input size, as raw
  pixels (``uint8`` for 8-bit images, ``float32`` in [0, 1] otherwise, so 16-bit
  DICOM keeps its precision), with their targets and methods;
- ``JobResult``: scores and the raw layer-resolution maps, as numpy arrays.

``Engine`` is what the explain path needs from an engine: the in-process
``engine.runtime.Runtime`` (CLI, tests) and the worker's
``server.engine_client.EnginePool`` (IPC to the engine processes) both provide it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from service.contract.errors import ClientClosed, DeadlineExceeded, UnknownModel
from service.contract.suggestions import close_matches, did_you_mean
from service.contract.terms import (
    Box,
    ChannelOrder,
    CropOffset,
    Interpolation,
    LayerLayout,
    MemoryFormat,
    Precision,
    ResizeMode,
)

# How `gradcam-service serve` tells the HTTP workers where the engines listen:
# their Unix socket paths, os.pathsep-separated.
ENGINE_SOCKETS_ENV = "GRADCAM_ENGINE_SOCKETS"
# The engine process: ``python -m service.engine`` (``engine/process.py``).
ENGINE_MODULE = "service.engine"
# Exit codes of the engine process that its supervisor acts on.
ENGINE_EXIT_CONFIG = 2  # a broken models file or setting: not worth a restart
ENGINE_EXIT_MODEL_LOOP_DIED = 3  # restart it


def engine_command(socket: str, device: str, ready_fd: int) -> list[str]:
    """The command line of one engine process: it serves on ``socket``, computes on
    ``device`` and writes its ready word to ``ready_fd`` (serve's supervisor and the
    tests start engines with it)."""
    return [
        sys.executable,
        "-m",
        ENGINE_MODULE,
        "--socket",
        socket,
        "--device",
        device,
        "--ready-fd",
        str(ready_fd),
    ]


# What one explanation's faithfulness curves cost, in explanations (``Job.work``):
# 39 forward passes, at about a third of a forward-and-backward each.
FAITHFULNESS_WORK = 13


@dataclass(frozen=True)
class LayerInfo:
    """A candidate target layer and its map's shape ``(C, H, W)`` for one input image
    (a volume model's ``(C, D, H, W)``: ``depth`` is set); ``layout``: how the layer's
    output holds that map (``engine/layouts/``)."""

    name: str
    kind: str
    channels: int
    height: int
    width: int
    layout: LayerLayout = "nchw"
    depth: int | None = None

    @property
    def grid(self) -> tuple[int, ...]:
        """The map's spatial shape: ``(H, W)``, or a volume's ``(D, H, W)``."""
        if self.depth is None:
            return self.height, self.width
        return self.depth, self.height, self.width


@dataclass(frozen=True)
class ModelInfo:
    """A served model as the HTTP side sees it: everything but the weights."""

    name: str
    arch: str
    labels: tuple[str, ...]
    multilabel: bool
    channels: int
    input_size: tuple[int, ...]  # (height, width); a volume model's (D, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: ResizeMode
    default_layer: str
    layers: tuple[LayerInfo, ...]
    modules: tuple[str, ...]  # every named module, for "did you mean" on unknown layers
    device: str
    precision: Precision = "fp32"  # what answers (engine/tuning.py)
    memory_format: MemoryFormat = "contiguous"
    # Label -> (scheme, value, meaning): the models file's codes for its classes.
    codes: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    # The size an image is resized to before its centre is cut to input_size (None: no
    # cut), and the filter (imaging/geometry.py); where each preprocessing value came from.
    scale_size: tuple[int, int] | None = None
    crop_pct: float = 1.0
    interpolation: Interpolation = "bilinear"
    crop_offset: CropOffset = "round"
    channel_order: ChannelOrder = "rgb"
    # What the model is for (pipeline/domain.py), and whether it runs on random weights
    # (no weights given: its answers mean nothing, and every answer says so).
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    random_weights: bool = False
    sources: dict[str, str] = field(default_factory=dict)
    library: str = "torchvision"
    # A volume model's way from a volume to its input (imaging/volume_fitting.py): the
    # axes' orientation, the voxel size in mm (None: kept), the window mapped to [0, 1].
    orientation: str | None = None
    spacing: tuple[float, float, float] | None = None
    window: tuple[float, float] | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        """A 2-D model's ``(height, width)`` (``input_size``, typed as two numbers)."""
        height, width = self.input_size
        return height, width

    @property
    def is_volume(self) -> bool:
        """A 3-D model: it takes volumes, not images."""
        return len(self.input_size) == 3

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def class_index(self, label: str) -> int | None:
        try:
            return self.labels.index(label)
        except ValueError:
            return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(
            **{
                **data,
                "labels": tuple(data["labels"]),
                "input_size": tuple(data["input_size"]),
                "scale_size": tuple(data["scale_size"]) if data.get("scale_size") else None,
                "modalities": tuple(data.get("modalities", ())),
                "body_parts": tuple(data.get("body_parts", ())),
                "mean": tuple(data["mean"]),
                "std": tuple(data["std"]),
                "layers": tuple(LayerInfo(**layer) for layer in data["layers"]),
                "modules": tuple(data["modules"]),
                "codes": {label: tuple(code) for label, code in data.get("codes", {}).items()},
                "spacing": tuple(data["spacing"]) if data.get("spacing") else None,
                "window": tuple(data["window"]) if data.get("window") else None,
            }
        )


@dataclass(frozen=True)
class Catalog:
    """The models an engine serves, in models-file order, and the default one."""

    models: dict[str, ModelInfo]
    default_model: str

    def get(self, name: str | None) -> ModelInfo:
        key = name or self.default_model
        try:
            return self.models[key]
        except KeyError:
            known = ", ".join(sorted(self.models))
            close = close_matches(key, self.models)
            raise UnknownModel(
                f"There is no model '{key}'.{did_you_mean(close)} Models served: {known}.",
                field="model",
                suggestions=close,
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "default_model": self.default_model,
            "models": [m.to_dict() for m in self.models.values()],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Catalog:
        models = [ModelInfo.from_dict(m) for m in data["models"]]
        return cls({m.name: m for m in models}, data["default_model"])


@dataclass(frozen=True)
class Job:
    """One request's images for one (model, layer).

    ``images[i]``: ``(H_in, W_in, c) uint8`` or ``float32`` in [0, 1], with ``c`` 1 or 3
    (a gray image for a colour model travels as one channel); ``boxes[i]``: where
    the image lies in the input when it does not fill it; ``targets[i]``: class
    indices to explain (``None`` = the top-1 class); ``methods[i]``: its CAM variant;
    ``faithfulness[i]``: whether image ``i``'s explanations get deletion and insertion
    curves (``engine/faithfulness.py``; empty: none do).
    """

    model: str
    layer: str
    images: list[np.ndarray]
    boxes: list[Box | None]
    targets: list[list[int | None]]
    methods: list[str]
    faithfulness: list[bool] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.images)

    def wants_faithfulness(self) -> list[bool]:
        """One flag per image (``faithfulness`` filled in when empty)."""
        return self.faithfulness or [False] * len(self.images)

    @property
    def work(self) -> float:
        """The job's cost in images, for the engine's pace estimate: an explanation with
        faithfulness curves adds 39 forward passes without gradients (about 13 images'
        forward and backward)."""
        return len(self.images) + FAITHFULNESS_WORK * self.rounds

    @property
    def rounds(self) -> int:
        """The rounds of work after the job's batch: one per explanation with
        faithfulness curves (the engine runs other jobs between them)."""
        if not self.faithfulness:
            return 0
        return sum(len(t) for t, f in zip(self.targets, self.faithfulness, strict=True) if f)


@dataclass(frozen=True)
class JobTimings:
    """Where a job's time went inside the engine (for the stage metrics)."""

    queue_wait_s: float = 0.0
    compute_s: float = 0.0
    batch_images: int = 0


@dataclass(frozen=True)
class JobResult:
    """The engine's answer for a ``Job``.

    - ``scores``: ``(N, K) float32``: softmax probabilities, or sigmoid scores for a
      multilabel model;
    - ``logits``: ``(N, K) float32``: the raw outputs the scores come from; they order
      the classes (``class_order``), so saturated scores that tie still rank as the
      engine's top-1 did;
    - ``targets[i]``: the classes explained for image ``i`` (top-1 resolved);
    - ``maps[i][j]``: ``(h, w) float32 >= 0``, image ``i``'s map for target ``j`` at
      the layer's resolution, before normalisation;
    - ``curves[i][j]``: ``(2, 21) float32``, deletion and insertion scores of that map
      (only for the images whose job asked for faithfulness; empty list: none did).
    """

    scores: np.ndarray
    logits: np.ndarray
    targets: list[list[int]]
    maps: list[list[np.ndarray]]
    timings: JobTimings = field(default_factory=JobTimings)
    curves: list[list[np.ndarray]] = field(default_factory=list)

    def slice(self, start: int, stop: int, timings: JobTimings) -> JobResult:
        """Images ``start:stop`` of a batch result, as one request's result."""
        return JobResult(
            self.scores[start:stop],
            self.logits[start:stop],
            self.targets[start:stop],
            self.maps[start:stop],
            timings,
            self.curves[start:stop],
        )


def class_order(logits: np.ndarray) -> np.ndarray:
    """Class indices from the most to the least likely: by raw output, ties by index.

    The one ranking rule: the engine's top-1 (``argmax``, first index on ties) is
    always ``class_order(...)[0]``, and predictions are listed in this order, even
    where scores saturate (a sigmoid gives 1.0 to every logit above ~17).
    """
    return np.lexsort((np.arange(logits.shape[-1]), -logits.astype(np.float64)))


class Engine(Protocol):
    """What the explain path needs from an engine, in-process or across a socket."""

    def catalog(self) -> Catalog:
        """The models served; ``EngineUnavailable`` while no engine can answer."""
        ...

    def run(
        self, job: Job, deadline: float, disconnected: Callable[[], bool] | None = None
    ) -> JobResult:
        """Explain ``job``; waits until ``deadline`` (``time.monotonic()``) at most.

        Raises ``Overloaded`` (queue full), ``DeadlineExceeded``, ``ClientClosed``
        (``disconnected()`` turned true), ``EngineUnavailable``, or a 500
        ``ServiceError`` when the model itself failed on this job.
        """
        ...

    def ready(self, timeout_s: float = 1.0) -> bool:
        """Models loaded, warmed up, and the model loop alive (answering within ``timeout_s``)."""
        ...


def wait_for(
    future: Future[JobResult],
    deadline: float,
    disconnected: Callable[[], bool] | None = None,
    poll_s: float = 0.05,
) -> JobResult:
    """Wait for ``future`` until ``deadline`` (monotonic), cancelling it if the client left.

    ``DeadlineExceeded`` at the deadline, ``ClientClosed`` once ``disconnected()``
    is true (checked every ``poll_s``); the future's own exception otherwise.
    """
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            future.cancel()
            raise DeadlineExceeded("The request took longer than its deadline.")
        try:
            return future.result(timeout=min(poll_s, remaining))
        except TimeoutError:
            if disconnected is not None and disconnected():
                future.cancel()
                raise ClientClosed("The client disconnected before the result was ready.") from None
