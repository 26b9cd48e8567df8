"""Rendering costs on one core: JSON arrays, and whole 1024² heatmap renders, before and after.

    python tests/benchmarks/render.py [--repeats 15]

Prints medians (ms) measured side by side in one run, pinned to one core:
1. a 224×224 heatmap as JSON: stdlib ``json`` (via ``tolist()``) against orjson
   straight from numpy;
2. the whole render of a 1024×1024 ``png``, ``overlay`` and ``gray`` heatmap from
   a 16×16 layer map (resample, normalise, colour / blend, encode, base64), by
   the service (8-bit levels, palette colouring, Pillow's integer composite,
   fpng) and by the float path it replaced (float blend, numpy colour lookup,
   Pillow PNG at zlib level 1), and the ratio; then the same renders as JPEG
   and WebP (``heatmap.encoding``).
The PNG encoders themselves are compared in ``encoders.py``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
from collections.abc import Callable

import numpy as np
import orjson
from PIL import Image
from timing import median_ms

from service.contract.requests import HeatmapOptions
from service.demo.phantom import sample_phantom
from service.imaging.encoders import encode_image
from service.imaging.geometry import fit_geometry
from service.imaging.render import COLORMAP, OVERLAY_MAX_OPACITY, heatmap
from service.imaging.values import to_uint8
from service.pipeline.images import PreparedImage
from service.pipeline.results import draw_heatmap
from service.transport.interface import ModelInfo


def _float_path(cam: np.ndarray, prepared: PreparedImage, fmt: str) -> str:
    """The render as it was before: float maths, numpy lookups, Pillow PNG level 1."""
    heat = heatmap(cam, prepared.geometry, "original")
    levels = np.round(heat * 255).astype(np.uint8)
    if fmt == "gray":
        picture = levels
    elif fmt == "png":
        picture = COLORMAP[levels]
    else:
        base = np.repeat(np.asarray(prepared.image)[:, :, None], 3, axis=2)
        alpha = (OVERLAY_MAX_OPACITY * heat)[:, :, None]
        mixed = base.astype(np.float32) * (1 - alpha) + COLORMAP[levels] * alpha
        picture = np.round(mixed).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    rng = np.random.default_rng(0)

    heat224 = rng.random((224, 224), dtype=np.float32)
    body = {"values": heat224}
    t_json = median_ms(lambda: json.dumps({"values": heat224.tolist()}), args.repeats)
    t_orjson = median_ms(
        lambda: orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), args.repeats
    )
    print("| 224×224 array as JSON | ms |\n|---|---|")
    print(f"| stdlib json (tolist) | {t_json:.1f} |\n| orjson from numpy | {t_orjson:.2f} |")
    print(f"| ratio | **{t_json / t_orjson:.0f}×** |\n")

    # A 16×16 map over a 1024×1024 phantom radiograph, like a real overlay.
    gray = Image.fromarray(to_uint8(sample_phantom(np.random.default_rng(3), 1024, 1024).image))
    geometry = fit_geometry(1024, 1024, (128, 128), "stretch")
    prepared = PreparedImage(0, gray, np.zeros((128, 128, 1), np.uint8), None, geometry, [None])
    model = ModelInfo(
        "m", "a", ("x",), False, 1, (128, 128), (0.5,), (0.25,), "stretch", "l", (), (), "cpu"
    )
    cam = rng.random((16, 16), dtype=np.float32)

    def service_path(fmt: str, encoding: str = "png") -> Callable[[], str]:
        options = HeatmapOptions(format=fmt, encoding=encoding)  # type: ignore[arg-type]

        def render() -> str:
            heat = heatmap(cam, geometry, "original")
            picture = draw_heatmap(heat, prepared, options, model)
            return base64.b64encode(encode_image(picture, options.encoding)).decode("ascii")

        return render

    print(
        "| 1024×1024 render, one core | before: float + Pillow PNG | service | ratio | "
        "KiB (service) |\n|---|---|---|---|---|"
    )
    for fmt in ("png", "overlay", "gray"):
        before = median_ms(lambda fmt=fmt: _float_path(cam, prepared, fmt), args.repeats)
        render = service_path(fmt)
        after = median_ms(render, args.repeats)
        size = len(base64.b64decode(render())) / 1024
        print(
            f"| {fmt} | {before:.1f} ms | **{after:.1f} ms** | {before / after:.1f}× | {size:.0f} |"
        )
    print("\n| 1024×1024 render, one core | ms | KiB |\n|---|---|---|")
    for fmt in ("png", "overlay", "gray"):
        for encoding in ("jpeg", "webp"):
            render = service_path(fmt, encoding)
            size = len(base64.b64decode(render())) / 1024
            print(f"| {fmt}, {encoding} | {median_ms(render, args.repeats):.1f} | {size:.0f} |")


if __name__ == "__main__":
    main()
