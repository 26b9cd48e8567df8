"""What one request may cost, checked before the work is done.

Every limit is checked from what is known cheaply: the JSON (images, targets),
then each image's header (its size, before a pixel is decoded). A request over a
limit gets a 413 with a stable code, and nothing else is spent on it:

=================================  =====================  ==========================
limit (setting)                    default                code
=================================  =====================  ==========================
images per request                 32                     ``too_many_images``
explanations (targets) per request 128                    ``too_many_targets``
... with include "faithfulness"    32                     ``too_many_targets``
pixels of one image                25 MP                  ``image_too_large``
either side of one image           16384                  ``image_too_large``
pixels of all images together      100 MP                 ``too_many_pixels``
pixels drawn (heatmaps, images)   64 MP                    ``output_too_large``
``array`` values in the answer     4 Mi (2048²)           ``array_too_large``
=================================  =====================  ==========================

With these, one request holds at most one decoded image at full size in float
(the others are kept as 8-bit pictures, and only for ``overlay`` at ``original``
size), and renders one heatmap at a time.

The same figures give the request's memory cost (``memory.RequestMemory``), reserved
from the service's memory budget image by image, before each is decoded: the body's
copies, the decode of its largest image, the pictures kept, its largest heatmap
drawn, and its answer (each picture at half its uncompressed size once encoded, in
base64, times the copies the answer passes through on its way out). A picture that
encodes larger than that (noise does not compress) has the difference reserved as
soon as its image is drawn (``pictures_encoded``). The constants are upper bounds of
what ``tests/benchmarks/memory.py`` measures (docs/reliability.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.contract.errors import ErrorCode, PayloadTooLarge
from service.contract.requests import HeatmapOptions
from service.contract.settings import Settings
from service.memory import RequestMemory
from service.transport.interface import ModelInfo

# Bytes of memory per pixel (per value for arrays), upper bounds (module text).
BODY_COPIES = 2  # the parsed JSON's strings and one image's decoded bytes, beside the body
DECODE_BYTES_PER_PIXEL = 24  # decode and convert one image (float images: float copies)
KEPT_BYTES_PER_PIXEL = 4  # an 8-bit picture kept to draw on at its own size (Pillow: 4)
DRAW_BYTES_PER_PIXEL = 16  # one heatmap drawn: float map, levels, blend, encoder buffers
# An answer's picture: expected at 1.5 bytes a pixel once encoded (half of RGB; checked
# after encoding), 4/3 for base64, three copies (the response dict, the JSON bytes,
# the bytes written).
ENCODED_BYTES_PER_PIXEL = 1.5
ANSWER_COPIES = 3
PICTURE_ANSWER_BYTES_PER_PIXEL = int(ENCODED_BYTES_PER_PIXEL * 4 / 3 * ANSWER_COPIES)
ARRAY_ANSWER_BYTES_PER_VALUE = 40  # float32, up to 12 characters of JSON, three copies


@dataclass
class RequestBudget:
    """The limits of one request, and what its images have used of them so far."""

    settings: Settings
    model: ModelInfo
    layer: str
    options: HeatmapOptions
    with_image: bool = False
    keeps_display: bool = False  # an 8-bit copy of each image is kept to draw on
    # report "dicom-sr": each map is also drawn at the image's own size (for its peak)
    reports: bool = False
    memory: RequestMemory | None = None
    body_bytes: int = 0
    # The maps also go out as numbers: the ``array`` format, or the Open Inference
    # Protocol's ``heatmap`` output beside its ``heatmap_png`` (None: from the format).
    arrays: bool | None = None
    pixels_used: int = field(default=0, init=False)
    output_used: int = field(default=0, init=False)
    array_used: int = field(default=0, init=False)
    _held_bytes: int = field(default=0, init=False)  # kept pictures and answers
    _peak_step_bytes: int = field(default=0, init=False)  # the largest decode or drawing
    _expected_base64: dict[int, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.arrays is None:
            self.arrays = self.options.format == "array"

    def check_explanations(self, counts: list[int], faithfulness: bool = False) -> None:
        """``counts[i]``: explanations asked for image ``i`` (distinct targets);
        ``faithfulness``: each of them also gets its curves (39 forward passes)."""
        total = sum(counts)
        limit = self.settings.max_faithfulness_per_request
        if faithfulness and total > limit:
            raise PayloadTooLarge(
                f"The request asks for faithfulness curves of {total} explanations; the limit "
                f"is {limit} (each costs 39 forward passes). Split it into several requests.",
                code=ErrorCode.TOO_MANY_TARGETS,
                field="include",
            )
        limit = self.settings.max_explanations_per_request
        if total > limit:
            raise PayloadTooLarge(
                f"The request asks for {total} explanations (targets over all images); the "
                f"limit is {limit}. Split it into several requests.",
                code=ErrorCode.TOO_MANY_TARGETS,
                field="targets",
            )

    def admit_image(self, index: int, width: int, height: int, explanations: int) -> None:
        """Charge image ``index`` (size from its header) and its heatmaps, or refuse it."""
        field_name = f"images[{index}]"
        side = self.settings.max_image_side
        if width > side or height > side:
            raise PayloadTooLarge(
                f"Image {index} is {width}×{height}; neither side may exceed {side} pixels.",
                code=ErrorCode.IMAGE_TOO_LARGE,
                image=index,
                field=field_name,
            )
        pixels = width * height
        if pixels > self.settings.max_image_pixels:
            raise PayloadTooLarge(
                f"Image {index} has {width}×{height} = {pixels} pixels; the limit is "
                f"{self.settings.max_image_pixels}.",
                code=ErrorCode.IMAGE_TOO_LARGE,
                image=index,
                field=field_name,
            )
        self.pixels_used += pixels
        if self.pixels_used > self.settings.max_request_pixels:
            raise PayloadTooLarge(
                f"Images 0..{index} have {self.pixels_used} pixels together; the limit for one "
                f"request is {self.settings.max_request_pixels}. Send fewer or smaller images "
                "per request.",
                code=ErrorCode.TOO_MANY_PIXELS,
                image=index,
                field=field_name,
            )
        drawn = (
            0
            if self.options.format == "none"
            else (explanations * self._heatmap_pixels(width, height))
        )
        # ``include: ["image"]`` draws the image itself at its size too.
        self.output_used += drawn + (width * height if self.with_image else 0)
        if self.output_used > self.settings.max_output_pixels:
            raise PayloadTooLarge(
                f"The pictures drawn for images 0..{index} would have {self.output_used} "
                f"pixels; the limit for one request is {self.settings.max_output_pixels}. Ask for "
                "heatmap.size 'input' or 'layer', fewer targets, or fewer images per request"
                f"{', or no image in include' if self.with_image else ''}.",
                code=ErrorCode.OUTPUT_TOO_LARGE,
                image=index,
                field="heatmap.size",
            )
        if self.arrays:
            self.array_used += drawn
            if self.array_used > self.settings.max_array_values:
                raise PayloadTooLarge(
                    f"The 'array' heatmaps of images 0..{index} would hold {self.array_used} "
                    f"numbers; the limit for one request is {self.settings.max_array_values}. "
                    "Ask for heatmap.size 'input' or 'layer', or a 'gray' PNG (the same levels, "
                    "a fraction of the bytes).",
                    code=ErrorCode.ARRAY_TOO_LARGE,
                    image=index,
                    field="heatmap.format",
                )
        if self.memory is not None:
            self.memory.need(self._memory_bytes(index, pixels, drawn, explanations))

    def pictures_encoded(self, index: int, base64_chars: int) -> None:
        """Image ``index``'s pictures came to ``base64_chars``: reserve what they took
        beyond the estimate (503 if that no longer fits)."""
        beyond = base64_chars - self._expected_base64.get(index, 0)
        if self.memory is not None and beyond > 0:
            self._held_bytes += beyond * ANSWER_COPIES
            self._expected_base64[index] = base64_chars
            self.memory.need(self._total_bytes())

    def _memory_bytes(self, index: int, pixels: int, drawn: int, explanations: int) -> int:
        """The request's estimated peak memory with this image added (module text)."""
        pictures = 0
        if self.arrays:
            self._held_bytes += drawn * ARRAY_ANSWER_BYTES_PER_VALUE
        if self.options.format not in ("array", "none"):
            pictures += drawn
        if self.with_image:
            pictures += pixels
        self._held_bytes += pictures * PICTURE_ANSWER_BYTES_PER_PIXEL
        self._expected_base64[index] = int(pictures * ENCODED_BYTES_PER_PIXEL * 4 / 3)
        if self.keeps_display:
            self._held_bytes += pixels * KEPT_BYTES_PER_PIXEL
        one_heatmap = drawn // max(1, explanations)
        if self.reports:
            one_heatmap = max(one_heatmap, pixels)
        self._peak_step_bytes = max(
            self._peak_step_bytes,
            pixels * DECODE_BYTES_PER_PIXEL,
            one_heatmap * DRAW_BYTES_PER_PIXEL,
        )
        return self._total_bytes()

    def charge(self, held: int, step: int) -> int:
        """Add ``held`` bytes kept to the answer and a work step of ``step`` bytes (a
        volume's, ``volume_budget.py``); the request's estimated peak memory now."""
        self._held_bytes += held
        self._peak_step_bytes = max(self._peak_step_bytes, step)
        return self._total_bytes()

    def _total_bytes(self) -> int:
        return BODY_COPIES * self.body_bytes + self._held_bytes + self._peak_step_bytes

    def _heatmap_pixels(self, width: int, height: int) -> int:
        if self.options.size == "original":
            return width * height
        if self.options.size == "input":
            return self.model.input_size[0] * self.model.input_size[1]
        layer = next(layer for layer in self.model.layers if layer.name == self.layer)
        return layer.height * layer.width
