"""What one request may cost, checked before the work is done.

Every limit is checked from what is known cheaply: the JSON (images, targets),
then each image's header (its size, before a pixel is decoded). A request over a
limit gets a 413 with a stable code, and nothing else is spent on it:

=================================  =====================  ==========================
limit (setting)                    default                code
=================================  =====================  ==========================
images per request                 32                     ``too_many_images``
explanations (targets) per request 128                    ``too_many_targets``
pixels of one image                25 MP                  ``image_too_large``
either side of one image           16384                  ``image_too_large``
pixels of all images together      100 MP                 ``too_many_pixels``
pixels drawn (heatmaps, images)   64 MP                    ``output_too_large``
``array`` values in the answer     4 Mi (2048²)           ``array_too_large``
=================================  =====================  ==========================

With these, one request holds at most one decoded image at full size in float
(the others are kept as 8-bit pictures, and only for ``overlay`` at ``original``
size), and renders one heatmap at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.errors import PayloadTooLarge
from service.interface import ModelInfo
from service.schemas import HeatmapOptions
from service.settings import Settings


@dataclass
class RequestBudget:
    """The limits of one request, and what its images have used of them so far."""

    settings: Settings
    model: ModelInfo
    layer: str
    options: HeatmapOptions
    with_image: bool = False
    pixels_used: int = field(default=0, init=False)
    output_used: int = field(default=0, init=False)
    array_used: int = field(default=0, init=False)

    def check_explanations(self, counts: list[int]) -> None:
        """``counts[i]``: explanations asked for image ``i`` (distinct targets)."""
        total = sum(counts)
        limit = self.settings.max_explanations_per_request
        if total > limit:
            raise PayloadTooLarge(
                f"The request asks for {total} explanations (targets over all images); the "
                f"limit is {limit}. Split it into several requests.", code="too_many_targets",
                field="targets")

    def admit_image(self, index: int, width: int, height: int, explanations: int) -> None:
        """Charge image ``index`` (size from its header) and its heatmaps, or refuse it."""
        field_name = f"images[{index}]"
        side = self.settings.max_image_side
        if width > side or height > side:
            raise PayloadTooLarge(
                f"Image {index} is {width}×{height}; neither side may exceed {side} pixels.",
                code="image_too_large", image=index, field=field_name)
        pixels = width * height
        if pixels > self.settings.max_image_pixels:
            raise PayloadTooLarge(
                f"Image {index} has {width}×{height} = {pixels} pixels; the limit is "
                f"{self.settings.max_image_pixels}.", code="image_too_large", image=index,
                field=field_name)
        self.pixels_used += pixels
        if self.pixels_used > self.settings.max_request_pixels:
            raise PayloadTooLarge(
                f"Images 0..{index} have {self.pixels_used} pixels together; the limit for one "
                f"request is {self.settings.max_request_pixels}. Send fewer or smaller images "
                "per request.", code="too_many_pixels", image=index, field=field_name)
        drawn = 0 if self.options.format == "none" else (
            explanations * self._heatmap_pixels(width, height))
        # ``include: ["image"]`` draws the image itself at its size too.
        self.output_used += drawn + (width * height if self.with_image else 0)
        if self.output_used > self.settings.max_output_pixels:
            raise PayloadTooLarge(
                f"The pictures drawn for images 0..{index} would have {self.output_used} "
                f"pixels; the limit for one request is {self.settings.max_output_pixels}. Ask for "
                "heatmap.size 'input' or 'layer', fewer targets, or fewer images per request"
                f"{', or no image in include' if self.with_image else ''}.",
                code="output_too_large", image=index, field="heatmap.size")
        if self.options.format == "array":
            self.array_used += drawn
            if self.array_used > self.settings.max_array_values:
                raise PayloadTooLarge(
                    f"The 'array' heatmaps of images 0..{index} would hold {self.array_used} "
                    f"numbers; the limit for one request is {self.settings.max_array_values}. "
                    "Ask for heatmap.size 'input' or 'layer', or a 'gray' PNG (the same levels, "
                    "a fraction of the bytes).", code="array_too_large", image=index,
                    field="heatmap.format")

    def _heatmap_pixels(self, width: int, height: int) -> int:
        if self.options.size == "original":
            return width * height
        if self.options.size == "input":
            return self.model.input_size[0] * self.model.input_size[1]
        layer = next(layer for layer in self.model.layers if layer.name == self.layer)
        return layer.height * layer.width
