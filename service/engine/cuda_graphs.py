"""Grad-CAM as captured CUDA graphs: the forward pass, ``autograd.grad`` and the CAM
formula of one (model, layer, method, batch size) replayed as one graph launch.

On a GPU a ResNet-50 explanation is a few hundred small kernels: at batch 1-32 the
engine measured 1.36-1.43× the eager forward (H200, ``tests/benchmarks/gpu_check.sh``),
time spent launching kernels rather than running them. A graph launches them all at
once. Off by default (``GRADCAM_CUDA_GRAPHS=off``) until measured on a GPU.

- Only jobs a graph can hold use one: a bucketed batch size (``batch_buckets``: the
  graph's shapes are fixed), one method and one target per image (the target classes
  are an input of the graph: a class index, or -1 for the top-1 class, resolved on
  the device). Anything else runs eagerly.
- Each graph owns static buffers: the inputs are copied into them (non-blocking, from
  pinned memory), the graph replays, its outputs are copied out.
- At capture, the graph's answer on probe inputs is checked against the eager
  engine's: same logits (1e-3) and maps (Pearson ≥ ``MIN_PEARSON``); a capture that
  fails or a check that does not hold leaves that key eager, with one log line and
  ``gradcam_cuda_graph_fallbacks_total``.
- At most ``MAX_GRAPHS`` graphs are kept (the least recently used one goes).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from service import metrics
from service.engine.folding import explained_activation
from service.engine.gradcam import GradCAM, cam_formula, channels_last_format
from service.engine.layers import resolve_layer
from service.engine.layouts import Layout, Refused, decide_layout
from service.engine.tuning import pearson, top1_maps
from service.logs import log_failure

logger = logging.getLogger(__name__)

MIN_PEARSON = 0.9999
MAX_GRAPHS = 32
_WARM_UP_STEPS = 3

Key = tuple[str, str, str, int]  # model, layer, method, batch size


class Graph(Protocol):
    """What a captured graph does: ``torch.cuda.CUDAGraph`` behind ``capture``."""

    def capture(self, step: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]: ...

    def replay(self) -> None: ...


class CudaGraph:
    """``step`` captured on CUDA (after warm-up steps on a side stream, as the CUDA graph
    documentation asks), replayed with ``replay``."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.device = device
        self._graph = torch.cuda.CUDAGraph()

    def capture(self, step: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(_WARM_UP_STEPS):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        # thread_local: the engine's other threads (pinning request tensors, say) may
        # touch CUDA while this one captures; only this thread's calls must be capturable.
        with torch.cuda.graph(self._graph, capture_error_mode="thread_local"):
            outputs = step()
        return outputs

    def replay(self) -> None:
        self._graph.replay()


@dataclass(frozen=True)
class ExplainedLayer:
    """What a graph explains: ``method`` on ``layer`` of ``model``, its forward pass and
    gradient under autocast to ``dtype`` (None: float32), as the eager engine runs it."""

    model: nn.Module
    layer: str
    method: str
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class InputBuffer:
    """The form of a graph's static input: ``(batch, *shape) float32`` zeros on
    ``device``, in channels-last memory if the model runs so."""

    batch: int
    shape: tuple[int, ...]  # (C, H, W), or a volume's (C, D, H, W)
    device: torch.device
    channels_last: bool = False


class CapturedCam:
    """One (model, layer, method, batch size) as a graph, with its static buffers."""

    def __init__(self, explained: ExplainedLayer, buffer: InputBuffer, graph: Graph) -> None:
        self.inputs = torch.zeros(buffer.batch, *buffer.shape, device=buffer.device)
        if buffer.channels_last:
            self.inputs = self.inputs.contiguous(
                memory_format=channels_last_format(self.inputs.dim())
            )
        self.given = torch.full((buffer.batch,), -1, dtype=torch.long, device=buffer.device)
        model, layer = explained.model, explained.layer
        self._model, self._layer, self._module = model, layer, resolve_layer(model, layer)
        self._formula = cam_formula(explained.method)
        self._dtype = explained.dtype
        self._graph = graph
        self.logits, self.maps = graph.capture(self._step)

    def _step(self) -> tuple[Tensor, Tensor]:
        captured: list[tuple[Tensor, Layout]] = []
        input_shape = tuple(self.inputs.shape)

        def capture(module: nn.Module, __: object, output: object) -> object:
            # A layer the probe listed (requests name no other): a refusal would be a
            # bug, and a capture that raises falls back to the eager engine.
            layout = decide_layout(self._model, self._layer, module, output, input_shape)
            if isinstance(layout, Refused):
                raise ValueError(f"layer '{self._layer}' {layout.reason}")
            leaf, passed_on = explained_activation(module, layout.map_of(output))
            captured.append((leaf, layout))
            return layout.passed_on(output, passed_on)

        handle = self._module.register_forward_hook(capture)
        try:
            # No autocast cache: a cast cached during capture would be replayed stale
            # (the CUDA graph documentation asks for cache_enabled=False).
            with (
                torch.inference_mode(False),
                torch.enable_grad(),
                torch.autocast(
                    self.inputs.device.type,
                    dtype=self._dtype or torch.bfloat16,
                    enabled=self._dtype is not None,
                    cache_enabled=False,
                ),
            ):
                logits = self._model(self.inputs)
                ((activation, layout),) = captured
                index = torch.where(self.given >= 0, self.given, logits.argmax(dim=1))
                score = logits.gather(1, index[:, None]).float().sum()
                (grad,) = torch.autograd.grad(score, activation)
                a = layout.to_grid(activation.detach()).float()
                maps = self._formula(a, layout.to_grid(grad).float()).clamp(min=0)
            return logits.detach().float(), maps
        finally:
            handle.remove()

    def __call__(self, inputs: Tensor, given: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, maps) of ``inputs`` (B, C, H, W) for classes ``given`` (-1: top-1)."""
        self.inputs.copy_(inputs, non_blocking=True)
        self.given.copy_(given, non_blocking=True)
        self._graph.replay()
        return self.logits.clone(), self.maps.clone()


class GraphCache:
    """The captured graphs of one engine, made on first use, checked, bounded."""

    def __init__(self, make_graph: Callable[[torch.device], Graph] = CudaGraph) -> None:
        self._graphs: OrderedDict[Key, CapturedCam] = OrderedDict()
        self._eager: set[Key] = set()  # keys whose capture failed or did not hold
        self._make_graph = make_graph
        self.replays = 0

    def run(
        self, key: Key, engine: GradCAM, inputs: Tensor, given: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """(logits, maps) from the key's graph, or None: run it eagerly."""
        if key in self._eager:
            return None
        model_name = key[0]
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(key, engine, inputs)
            if captured is None:
                return None
        self._graphs.move_to_end(key)
        self.replays += 1
        metrics.CUDA_GRAPH_REPLAYS.labels(model_name).inc()
        return captured(inputs, given)

    def _capture(self, key: Key, engine: GradCAM, inputs: Tensor) -> CapturedCam | None:
        model_name, layer, method, batch = key
        try:
            captured = CapturedCam(
                ExplainedLayer(engine.model, layer, method, engine.dtype),
                InputBuffer(
                    batch,
                    tuple(inputs.shape[1:]),  # type: ignore[arg-type]
                    engine.device,
                    engine.channels_last,
                ),
                self._make_graph(engine.device),
            )
            # The check: the graph's answer on these inputs equals the eager engine's.
            given = torch.full((batch,), -1, dtype=torch.long, device=engine.device)
            logits, maps = captured(inputs, given)
            eager_logits, eager_maps = top1_maps(engine, inputs, layer, method)
            if (
                not torch.allclose(logits.cpu(), eager_logits, rtol=1e-3, atol=1e-3)
                or pearson(maps.cpu(), eager_maps) < MIN_PEARSON
            ):
                raise ValueError("the graph's answer differs from the eager engine's")
        except Exception as error:
            self._eager.add(key)
            metrics.CUDA_GRAPH_FALLBACKS.labels(model_name).inc()
            log_failure(
                logger,
                f"model '{model_name}', layer '{layer}', {method}, batch "
                f"{batch}: no CUDA graph, eager instead",
                error,
                logging.WARNING,
            )
            return None
        self._graphs[key] = captured
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        logger.info(
            "model '%s', layer '%s', %s, batch %d: captured as a CUDA graph",
            model_name,
            layer,
            method,
            batch,
        )
        return captured
