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


def draw_plot(report: SanityReport) -> Image.Image:
    """The plot of ``report``, an RGB image about 900 pixels wide."""
    font, small, title_font = _font(13), _font(11), _font(15)
    steps = report.steps
    labels = [f"{s.index}  {s.layer or '(original)'}" for s in steps]
    rotated = [_vertical_label(text, small) for text in labels]
    left, right, top = 84 * _S, 30 * _S, 96 * _S
    bottom = max(image.height for image in rotated) + 44 * _S
    plot_w = max(640 * _S, 26 * _S * len(steps))
    plot_h = 360 * _S
    width, height = left + plot_w + right, top + plot_h + bottom
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas, "RGBA")

    spreads = [(s.spearman_spread, s.ssim_spread) for s in steps]
    lowest = min(min(r.q1, m.q1) for r, m in spreads)
    y_min = min(0.0, math.floor(lowest * 5) / 5)  # down to a multiple of 0.2
    y_max = 1.06  # room for the markers at 1

    def x_at(i: int) -> float:
        return left + (i + 0.5) * plot_w / len(steps)

    def y_at(value: float) -> float:
        return top + (y_max - value) / (y_max - y_min) * plot_h

    # Grid and y axis.
    tick = y_min
    while tick <= 1.0 + 1e-9:
        y = y_at(tick)
        draw.line([(left, y), (left + plot_w, y)], fill=_AXIS if abs(tick) < 1e-9 else _GRID)
        text = f"{tick:.1f}"
        tw, th = _text_size(small, text)
        draw.text((left - tw - 8 * _S, y - th / 2 - 3 * _S), text, font=small, fill=_TEXT)
        tick += 0.2
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=_AXIS, width=_S)
    axis_title = _vertical_label("similarity to the original map", font)
    canvas.paste(_TEXT, (4 * _S, int(top + (plot_h - axis_title.height) / 2)), axis_title)

    # Threshold and pass step.
    y = y_at(report.threshold)
    _dashed(draw, (left, y), (left + plot_w, y), _MUTED)
    text = f"Spearman threshold {report.threshold:g}"
    tw, th = _text_size(small, text)
    tx, ty = left + plot_w - tw - 10 * _S, y - th - 10 * _S
    draw.rectangle([tx - 3 * _S, ty, tx + tw + 3 * _S, ty + th + 6 * _S], fill=(255, 255, 255, 200))
    draw.text((tx, ty), text, font=small, fill=_MUTED)
    x = x_at(report.pass_by)
    _dashed(draw, (x, top), (x, top + plot_h), _MUTED)
    draw.text((x + 5 * _S, top + 5 * _S), "pass step", font=small, fill=_MUTED)

    def series(
        values: Sequence[Spread], colour: tuple[int, int, int], square: bool, line: int
    ) -> None:
        upper = [(x_at(i), y_at(v.q3)) for i, v in enumerate(values)]
        lower = [(x_at(i), y_at(v.q1)) for i, v in reversed(list(enumerate(values)))]
        draw.polygon(upper + lower, fill=(*colour, 48))
        points = [(x_at(i), y_at(v.median)) for i, v in enumerate(values)]
        draw.line(points, fill=colour, width=line * _S, joint="curve")
        r = (line + 1) * _S
        for px, py in points:
            box = [px - r, py - r, px + r, py + r]
            if square:
                draw.rectangle(box, fill=colour)
            else:
                draw.ellipse(box, fill=colour)

    # Spearman, on which the verdict rests, on top.
    series([m for _, m in spreads], _SSIM, square=True, line=2)
    series([r for r, _ in spreads], _SPEARMAN, square=False, line=3)

    # X labels.
    for i, label in enumerate(rotated):
        x = x_at(i)
        draw.line([(x, top + plot_h), (x, top + plot_h + 5 * _S)], fill=_AXIS, width=_S)
        canvas.paste((20, 20, 20), (int(x - label.width / 2), top + plot_h + 8 * _S), label)
    caption = "step and the last layer randomised (cascading from the output)"
    cw, _ = _text_size(font, caption)
    draw.text((left + (plot_w - cw) / 2, height - 26 * _S), caption, font=font, fill=_TEXT)

    # Legend: a row under the verdict, outside the plot (curves may run anywhere in it).
    lx, ly = left, 70 * _S
    for text, colour in (
        ("Spearman rank correlation: median, IQR", _SPEARMAN),
        ("SSIM: median, IQR", _SSIM),
    ):
        draw.rectangle([lx, ly - 6 * _S, lx + 22 * _S, ly + 6 * _S], fill=(*colour, 48))
        draw.line([(lx, ly), (lx + 22 * _S, ly)], fill=colour, width=3 * _S)
        draw.text((lx + 28 * _S, ly - 9 * _S), text, font=small, fill=_TEXT)
        lx += _text_size(small, text)[0] + 60 * _S

    # Title and verdict.
    title = (
        f"Cascading randomisation: model '{report.model}', "
        f"layer '{report.layer}', {report.method}, {len(report.images)} image(s)"
    )
    draw.text((left, 14 * _S), title, font=title_font, fill=_TEXT)
    first = report.first_below
    if report.passed and first is not None:
        verdict = (
            f"PASS: median Spearman below {report.threshold:g} at step {first} "
            f"({steps[first].layer}), required by step {report.pass_by}"
        )
    else:
        verdict = (
            f"FAIL: median Spearman {steps[report.pass_by].spearman_spread.median:.2f} at "
            f"step {report.pass_by}, not below {report.threshold:g}: "
            "the maps do not follow the model's weights"
        )
    draw.text((left, 40 * _S), verdict, font=font, fill=_PASS if report.passed else _FAIL)
    return canvas.resize((width // _S, height // _S), Image.Resampling.LANCZOS)
