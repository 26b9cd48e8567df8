"""Rendering costs: JSON serialisation of arrays, PNG compression levels, a full overlay.

    python tests/benchmarks/render.py [--repeats 9]

Prints medians (ms) measured side by side in one run:
1. a 224×224 heatmap as JSON: stdlib ``json`` (via ``tolist()``) against orjson
   straight from numpy;
2. a 1024×1024 overlay PNG at each zlib level (time and size);
3. the whole ``overlay`` render of a 1024×1024 image at the level the service
   uses: resample a 16×16 map, normalise, colour, blend, encode, base64.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import orjson
import torch
from PIL import Image

from service.demo.phantom import sample_phantom, to_uint8
from service.imaging.geometry import fit_geometry
from service.imaging.render import PNG_COMPRESS_LEVEL, blend, heatmap


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)

    heat224 = rng.random((224, 224), dtype=np.float32)
    body = {"values": heat224}
    t_json = _median_ms(lambda: json.dumps({"values": heat224.tolist()}), args.repeats)
    t_orjson = _median_ms(lambda: orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                          args.repeats)
    print("| 224×224 array as JSON | ms |\n|---|---|")
    print(f"| stdlib json (tolist) | {t_json:.1f} |\n| orjson from numpy | {t_orjson:.2f} |")
    print(f"| ratio | **{t_json / t_orjson:.0f}×** |\n")

    # A 16×16 map over a 1024×1024 phantom radiograph, like a real overlay.
    geometry = fit_geometry(1024, 1024, (128, 128), "stretch")
    cam = torch.from_numpy(rng.random((16, 16), dtype=np.float32))
    heat = heatmap(cam, geometry, "original")
    gray = to_uint8(sample_phantom(np.random.default_rng(3), 1024, 1024).image)
    base = np.repeat(gray[:, :, None], 3, axis=2)
    overlay = blend(base, heat)
    print("| 1024×1024 overlay PNG, zlib level | ms | KiB |\n|---|---|---|")
    for level in range(10):
        def encode(level: int = level) -> bytes:
            buffer = io.BytesIO()
            Image.fromarray(overlay).save(buffer, format="PNG", compress_level=level)
            return buffer.getvalue()
        size = len(encode()) / 1024
        mark = " (used)" if level == PNG_COMPRESS_LEVEL else ""
        print(f"| {level}{mark} | {_median_ms(encode, args.repeats):.0f} | {size:.0f} |")

    def full_overlay() -> str:
        from service.imaging.render import encode_png

        h = heatmap(cam, geometry, "original")
        return base64.b64encode(encode_png(blend(base, h))).decode("ascii")

    print(f"\nwhole overlay render, 1024×1024, level {PNG_COMPRESS_LEVEL}: "
          f"**{_median_ms(full_overlay, args.repeats):.0f} ms** (median of {args.repeats})")


if __name__ == "__main__":
    main()
