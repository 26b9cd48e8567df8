"""What every layout rule shares: a decision (``Layout`` or ``Refused``), the layer it is
about (``Site``), and how token counts are matched to a model's own grids.

The rules themselves are in this package's family modules; ``__init__`` dispatches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from service.contract.terms import LayerLayout


@dataclass(frozen=True)
class Layout:
    """How one layer's output holds its map: ``kind``; for ``tokens`` the ``prefix``
    tokens dropped and the ``grid`` ``(h, w)`` the others fill, row by row. With
    ``first_of_tuple`` the layer returns a tuple whose first element is that output (a
    Hugging Face layer's ``(hidden_states, attention_weights)``)."""

    kind: LayerLayout
    prefix: int = 0
    grid: tuple[int, int] = (0, 0)
    first_of_tuple: bool = False

    def to_grid(self, x: Tensor) -> Tensor:
        """``x`` as the layer returns it (or its gradient) → ``(N, C, h, w)``; for
        ``nchw`` the very tensor, so a CNN's maths is untouched."""
        if self.kind in ("nchw", "ncdhw"):
            return x
        if self.kind == "nhwc":
            return x.permute(0, 3, 1, 2)
        h, w = self.grid
        return x[:, self.prefix :].transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)

    def grid_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(C, h, w)`` of the map (a volume's ``(C, d, h, w)``), from the shape of the
        layer's output tensor."""
        if self.kind in ("nchw", "ncdhw"):
            return tuple(shape[1:])
        if self.kind == "nhwc":
            return shape[3], shape[1], shape[2]
        return shape[2], *self.grid

    def map_of(self, output: object) -> Tensor:
        """The tensor that holds the map, out of what the layer returned."""
        tensor = output[0] if self.first_of_tuple and isinstance(output, tuple) else output
        assert isinstance(tensor, Tensor)  # decide_layout saw it so
        return tensor

    def passed_on(self, output: object, tensor: Tensor) -> object:
        """What a forward hook returns so that the model continues with ``tensor`` in
        place of the map (the rest of a tuple as it was)."""
        if self.first_of_tuple and isinstance(output, tuple):
            return (tensor, *output[1:])
        return tensor


@dataclass(frozen=True)
class Refused:
    """A layer that cannot be explained, and why, in one line that follows its name
    ("layer 'x' returns ..."). ``shown``: worth a line in ``gradcam-service layers``;
    false for outputs with no room for a map at all (a head's logits, a pooled vector)."""

    reason: str
    shown: bool = True


Decision = Layout | Refused


@dataclass(frozen=True)
class Site:
    """The layer a rule decides about: its ``module``, the tensor ``output`` that would
    hold the map, and the ``(N, C, H, W)`` shape of the model's input."""

    module: nn.Module
    output: Tensor
    input_shape: tuple[int, ...]

    @property
    def input_size(self) -> tuple[int, int]:
        return self.input_shape[2], self.input_shape[3]

    def shape_text(self) -> str:
        """The output's shape with its batch written N: ``(N, 197, 768)``."""
        return "(" + ", ".join(["N", *map(str, self.output.shape[1:])]) + ")"


# A rule looks at one ancestor ``owner`` of the layer, and the layer's dotted name inside
# it: a Decision if the owner is a model (or a block) it knows, None to keep looking up.
Rule = Callable[[nn.Module, str, Site], Decision | None]


def from_library(module: nn.Module, package: str) -> bool:
    """Whether ``module``'s class is (or derives from) one defined in ``package`` (``timm``,
    ``transformers``): known without importing the library, which the engine does not need."""
    prefix = package + "."
    return any(cls.__module__.startswith(prefix) for cls in type(module).__mro__)


def token_grid(tokens: int, prefix: int, input_size: tuple[int, int]) -> tuple[int, int] | None:
    """``(h, w)`` of the ``tokens - prefix`` patch tokens when they tile the input's
    ``(height, width)`` in the same proportion (square patches); None if they cannot.
    For a declared layout, which names no grid."""
    cells = tokens - prefix
    height, width = input_size
    if cells <= 0 or (cells * height) % width:
        return None
    squared = cells * height // width  # h² = h·w · height / width
    rows = math.isqrt(squared)
    if rows == 0 or rows * rows != squared or cells % rows:
        return None
    return rows, cells // rows


def match_tokens(site: Site, prefixes: Sequence[int], grids: Sequence[tuple[int, int]]) -> Decision:
    """``site``'s ``(N, tokens, C)`` output as the model's own grid: ``tokens`` must be one
    of ``prefixes`` plus the cells of exactly one of ``grids`` (both from the model's
    attributes at this input size), else it is refused."""
    tokens = site.output.shape[1]
    found = {
        (prefix, grid)
        for prefix in dict.fromkeys(prefixes)
        for grid in dict.fromkeys(grids)
        if grid[0] > 0 and grid[1] > 0 and prefix + grid[0] * grid[1] == tokens
    }
    if len(found) == 1:
        prefix, grid = found.pop()
        return Layout("tokens", prefix, grid)
    shapes = " or ".join(f"{h}×{w}" for h, w in dict.fromkeys(grids))
    extra = " + ".join(str(p) for p in dict.fromkeys(prefixes) if p)
    told = f"{shapes} patches" + (f" (after {extra} prefix tokens, or alone)" if extra else "")
    fit = "fit in more than one way" if found else "do not tile"
    return Refused(f"returns {site.shape_text()}: {tokens} tokens {fit} the model's {told}")


def floor_and_ceil_grids(size: tuple[int, int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """The grids a network of these total ``strides`` makes of an input of ``size``, rounded
    down (unpadded convolutions) and up (padded ones)."""
    height, width = size
    grids: list[tuple[int, int]] = []
    for stride in strides:
        grids.append((height // stride, width // stride))
        grids.append((-(-height // stride), -(-width // stride)))
    return list(dict.fromkeys(grids))


def channels_last(site: Site, grids: Sequence[tuple[int, int]]) -> Decision:
    """``site``'s 4-D output as ``(N, H, W, C)``, if ``(H, W)`` is one of the model's
    ``grids``: an attention's ``(N, heads, tokens, tokens)`` is 4-D too."""
    if tuple(site.output.shape[1:3]) in grids:
        return Layout("nhwc")
    shapes = ", ".join(f"{h}×{w}" for h, w in grids)
    return Refused(
        f"returns {site.shape_text()}: read as (N, H, W, C), its H×W is none of "
        f"the model's grids ({shapes})"
    )


def path_to(owner: nn.Module, inner: str) -> Iterator[tuple[nn.Module, str]]:
    """Each module from ``owner`` down to (not including) the layer ``inner`` names in it,
    with the name of its child on the way."""
    module = owner
    for part in inner.split("."):
        yield module, part
        module = module.get_submodule(part)
