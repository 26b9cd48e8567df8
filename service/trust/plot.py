"""The sanity check's plot (``sanity.png``), drawn with Pillow (no torch, no matplotlib:
the service does not depend on a plotting library for one chart).

Both similarities per step, the median as a line with markers and the inter-quartile
range as a band; the threshold the Spearman median must fall below and the pass step
as dashed lines; the layers on the x axis, step 0 (the original) at the left. Drawn
at twice the size and scaled down, since Pillow's lines are not antialiased.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from service.trust.report import SanityReport, Spread

_S = 2  # supersampling
_SPEARMAN = (31, 95, 180)
_SSIM = (222, 120, 20)
_PASS, _FAIL = (20, 130, 60), (190, 30, 30)
_GRID, _AXIS, _TEXT, _MUTED = (225, 225, 225), (60, 60, 60), (20, 20, 20), (110, 110, 110)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _font(size: int) -> Font:
    return ImageFont.load_default(size=size * _S)


def _text_size(font: Font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom - top)


def _dashed(
    draw: ImageDraw.ImageDraw,
    start: tuple[float, float],
    end: tuple[float, float],
    colour: tuple[int, int, int],
    dash: float = 8 * _S,
) -> None:
    (x0, y0), (x1, y1) = start, end
    length = math.hypot(x1 - x0, y1 - y0)
    pieces = max(1, int(length // (2 * dash)))
    for i in range(pieces + 1):
        a, b = 2 * i * dash / length, min(1.0, (2 * i + 1) * dash / length)
        if a >= 1.0:
            break
        draw.line(
            [(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
            fill=colour,
            width=_S,
        )


def _vertical_label(text: str, font: Font) -> Image.Image:
    width, height = _text_size(font, text)
    # A mask: where the text is, the text colour goes through when it is pasted.
    label = Image.new("L", (width + 4 * _S, height + 6 * _S), 0)
    ImageDraw.Draw(label).text((2 * _S, 0), text, font=font, fill=255)
    return label.rotate(90, expand=True)


@dataclass(frozen=True)
class _Fonts:
    text: Font
    small: Font
    title: Font


@dataclass(frozen=True)
class _Axes:
    """Where the plot area lies on the canvas (supersampled pixels) and what it spans:
    one column per step, similarities from ``y_min`` up to ``y_max``."""

    left: int
    top: int
    width: int
    height: int
    steps: int
    y_min: float
    y_max: float

    @property
    def right(self) -> int:
        return self.left + self.width

    @property
    def bottom(self) -> int:
        return self.top + self.height

    def x_at(self, step: int) -> float:
        """The centre of ``step``'s column."""
        return self.left + (step + 0.5) * self.width / self.steps

    def y_at(self, value: float) -> float:
        return self.top + (self.y_max - value) / (self.y_max - self.y_min) * self.height


def _axes(report: SanityReport, label_height: int) -> tuple[_Axes, int, int]:
    """The plot area for ``report`` and the canvas's width and height, with room for
    x labels ``label_height`` high below it."""
    left, right, top = 84 * _S, 30 * _S, 96 * _S
    bottom = label_height + 44 * _S
    plot_w = max(640 * _S, 26 * _S * len(report.steps))
    plot_h = 360 * _S
    lowest = min(min(s.spearman_spread.q1, s.ssim_spread.q1) for s in report.steps)
    axes = _Axes(
        left=left,
        top=top,
        width=plot_w,
        height=plot_h,
        steps=len(report.steps),
        y_min=min(0.0, math.floor(lowest * 5) / 5),  # down to a multiple of 0.2
        y_max=1.06,  # room for the markers at 1
    )
    return axes, left + plot_w + right, top + plot_h + bottom


def _draw_y_axis(
    canvas: Image.Image, draw: ImageDraw.ImageDraw, axes: _Axes, fonts: _Fonts
) -> None:
    """The grid every 0.2 (the line at 0 darker), its values, the frame and the title."""
    tick = axes.y_min
    while tick <= 1.0 + 1e-9:
        y = axes.y_at(tick)
        draw.line([(axes.left, y), (axes.right, y)], fill=_AXIS if abs(tick) < 1e-9 else _GRID)
        text = f"{tick:.1f}"
        tw, th = _text_size(fonts.small, text)
        draw.text(
            (axes.left - tw - 8 * _S, y - th / 2 - 3 * _S), text, font=fonts.small, fill=_TEXT
        )
        tick += 0.2
    draw.rectangle([axes.left, axes.top, axes.right, axes.bottom], outline=_AXIS, width=_S)
    title = _vertical_label("similarity to the original map", fonts.text)
    canvas.paste(_TEXT, (4 * _S, int(axes.top + (axes.height - title.height) / 2)), title)


def _draw_guides(draw: ImageDraw.ImageDraw, axes: _Axes, report: SanityReport, small: Font) -> None:
    """The threshold (labelled on a light box) and the pass step, dashed."""
    y = axes.y_at(report.threshold)
    _dashed(draw, (axes.left, y), (axes.right, y), _MUTED)
    text = f"Spearman threshold {report.threshold:g}"
    tw, th = _text_size(small, text)
    tx, ty = axes.right - tw - 10 * _S, y - th - 10 * _S
    draw.rectangle([tx - 3 * _S, ty, tx + tw + 3 * _S, ty + th + 6 * _S], fill=(255, 255, 255, 200))
    draw.text((tx, ty), text, font=small, fill=_MUTED)
    x = axes.x_at(report.pass_by)
    _dashed(draw, (x, axes.top), (x, axes.bottom), _MUTED)
    draw.text((x + 5 * _S, axes.top + 5 * _S), "pass step", font=small, fill=_MUTED)


def _draw_series(
    draw: ImageDraw.ImageDraw,
    axes: _Axes,
    values: Sequence[Spread],
    colour: tuple[int, int, int],
    square: bool,
    line: int,
) -> None:
    """One similarity: its inter-quartile band, and its median as a line ``line`` wide
    with a marker (square or round) at each step."""
    upper = [(axes.x_at(i), axes.y_at(v.q3)) for i, v in enumerate(values)]
    lower = [(axes.x_at(i), axes.y_at(v.q1)) for i, v in reversed(list(enumerate(values)))]
    draw.polygon(upper + lower, fill=(*colour, 48))
    points = [(axes.x_at(i), axes.y_at(v.median)) for i, v in enumerate(values)]
    draw.line(points, fill=colour, width=line * _S, joint="curve")
    r = (line + 1) * _S
    for px, py in points:
        box = [px - r, py - r, px + r, py + r]
        if square:
            draw.rectangle(box, fill=colour)
        else:
            draw.ellipse(box, fill=colour)


def _draw_x_axis(
    canvas: Image.Image,
    draw: ImageDraw.ImageDraw,
    axes: _Axes,
    rotated: Sequence[Image.Image],
    font: Font,
) -> None:
    """A tick and a vertical label under each step, and the axis's caption at the foot."""
    for i, label in enumerate(rotated):
        x = axes.x_at(i)
        draw.line([(x, axes.bottom), (x, axes.bottom + 5 * _S)], fill=_AXIS, width=_S)
        canvas.paste((20, 20, 20), (int(x - label.width / 2), axes.bottom + 8 * _S), label)
    caption = "step and the last layer randomised (cascading from the output)"
    cw, _ = _text_size(font, caption)
    draw.text(
        (axes.left + (axes.width - cw) / 2, canvas.height - 26 * _S), caption, font=font, fill=_TEXT
    )


def _draw_legend(draw: ImageDraw.ImageDraw, axes: _Axes, small: Font) -> None:
    """A row under the verdict, outside the plot (curves may run anywhere in it)."""
    lx, ly = axes.left, 70 * _S
    for text, colour in (
        ("Spearman rank correlation: median, IQR", _SPEARMAN),
        ("SSIM: median, IQR", _SSIM),
    ):
        draw.rectangle([lx, ly - 6 * _S, lx + 22 * _S, ly + 6 * _S], fill=(*colour, 48))
        draw.line([(lx, ly), (lx + 22 * _S, ly)], fill=colour, width=3 * _S)
        draw.text((lx + 28 * _S, ly - 9 * _S), text, font=small, fill=_TEXT)
        lx += _text_size(small, text)[0] + 60 * _S


def _verdict(report: SanityReport) -> str:
    """The verdict in one line: where the median Spearman fell below the threshold, or
    what it still was at the pass step."""
    first = report.first_below
    if report.passed and first is not None:
        return (
            f"PASS: median Spearman below {report.threshold:g} at step {first} "
            f"({report.steps[first].layer}), required by step {report.pass_by}"
        )
    return (
        f"FAIL: median Spearman {report.steps[report.pass_by].spearman_spread.median:.2f} at "
        f"step {report.pass_by}, not below {report.threshold:g}: "
        "the maps do not follow the model's weights"
    )


def _draw_heading(
    draw: ImageDraw.ImageDraw, axes: _Axes, report: SanityReport, fonts: _Fonts
) -> None:
    """The title (what was checked) and, under it, the verdict in its colour."""
    title = (
        f"Cascading randomisation: model '{report.model}', "
        f"layer '{report.layer}', {report.method}, {len(report.images)} image(s)"
    )
    draw.text((axes.left, 14 * _S), title, font=fonts.title, fill=_TEXT)
    colour = _PASS if report.passed else _FAIL
    draw.text((axes.left, 40 * _S), _verdict(report), font=fonts.text, fill=colour)


def draw_plot(report: SanityReport) -> Image.Image:
    """The plot of ``report``, an RGB image about 900 pixels wide."""
    fonts = _Fonts(text=_font(13), small=_font(11), title=_font(15))
    labels = [f"{s.index}  {s.layer or '(original)'}" for s in report.steps]
    rotated = [_vertical_label(text, fonts.small) for text in labels]
    axes, width, height = _axes(report, max(image.height for image in rotated))
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas, "RGBA")
    _draw_y_axis(canvas, draw, axes, fonts)
    _draw_guides(draw, axes, report, fonts.small)
    # Spearman, on which the verdict rests, on top.
    _draw_series(draw, axes, [s.ssim_spread for s in report.steps], _SSIM, square=True, line=2)
    _draw_series(
        draw, axes, [s.spearman_spread for s in report.steps], _SPEARMAN, square=False, line=3
    )
    _draw_x_axis(canvas, draw, axes, rotated, fonts.text)
    _draw_legend(draw, axes, fonts.small)
    _draw_heading(draw, axes, report, fonts)
    return canvas.resize((width // _S, height // _S), Image.Resampling.LANCZOS)
