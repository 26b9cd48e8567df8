"""Choosing the PNG encoder by measurement, on one core.

    python tests/benchmarks/encoders.py [--repeats 21]

Three 1024×1024 test images:

* ``overlay``: the phantom radiograph ``examples/phantom_four_findings.png``
  (resized with Pillow bilinear, as RGB) with a smooth heatmap blended over it the
  way the service does (colour table of ``service.imaging.render``, opacity
  ``0.6 × value``), uint8 (H, W, 3);
* ``heatmap``: that smooth heatmap through the colour table alone, (H, W, 3);
* ``gray``: the smooth map itself, (H, W) uint8.

Each encoder × image: median of ``--repeats`` timed runs (after one warm-up), the
output size, and for PNGs a bit-exact round trip (decoded with Pillow, compared to
the input array: shape, dtype and every value). JPEG and WebP are there only for
reference (lossy, so no round trip). Then a few facts about fpng's wrapper that
matter for using it in the service. Everything runs pinned to CPU 0 with
single-threaded native libraries, so the numbers are per request on one core.
"""

from __future__ import annotations

import os

# One core, one thread: set before numpy or any codec library is imported.
for _var in (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "BLIS_NUM_THREADS",
):
    os.environ[_var] = "1"
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {0})

import argparse  # noqa: E402
import io  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import PIL  # noqa: E402
from PIL import Image  # noqa: E402
from timing import median_ms  # noqa: E402

from service.imaging.render import COLORMAP, OVERLAY_MAX_OPACITY  # noqa: E402

try:
    import fpng
except ImportError:  # pragma: no cover - optional
    fpng = None
try:
    import imagecodecs
except ImportError:  # pragma: no cover - optional
    imagecodecs = None

ROOT = Path(__file__).resolve().parents[2]
PHANTOM = ROOT / "examples" / "phantom_four_findings.png"
SIZE = 1024


def make_images() -> dict[str, np.ndarray]:
    """``overlay`` (H, W, 3), ``heatmap`` (H, W, 3) and ``gray`` (H, W), all uint8."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) / SIZE
    blobs = ((0.35, 0.40, 0.12, 1.0), (0.65, 0.62, 0.08, 0.8), (0.55, 0.25, 0.18, 0.5))
    value = sum(
        w * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s)) for cx, cy, s, w in blobs
    )
    value = value / value.max()
    gray = np.round(value * 255).astype(np.uint8)
    heat = COLORMAP[gray]
    with Image.open(PHANTOM) as im:
        photo = np.asarray(
            im.convert("L").resize((SIZE, SIZE), Image.Resampling.BILINEAR).convert("RGB"),
            dtype=np.float64,
        )
    alpha = (OVERLAY_MAX_OPACITY * value)[:, :, None]
    overlay = np.round(photo * (1 - alpha) + heat * alpha).clip(0, 255).astype(np.uint8)
    return {"overlay": overlay, "heatmap": np.ascontiguousarray(heat), "gray": gray}


# -- encoders: each takes an array and returns the encoded bytes ----------------------


def _pillow(fmt: str, **params: object) -> Callable[[np.ndarray], bytes]:
    def encode(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt, **params)
        return buffer.getvalue()

    return encode


def build_encoders(webp_methods: tuple[int, ...]) -> list[tuple[str, str, Callable, set]]:
    """(name, kind, encode, images it applies to); kind is "png" or "lossy"."""
    everything = {"overlay", "heatmap", "gray"}
    colour = {"overlay", "heatmap"}
    encoders: list[tuple[str, str, Callable, set]] = [
        ("Pillow PNG level 0", "png", _pillow("PNG", compress_level=0), everything),
        ("Pillow PNG level 1", "png", _pillow("PNG", compress_level=1), everything),
        ("Pillow PNG level 6 (default)", "png", _pillow("PNG", compress_level=6), everything),
    ]
    if fpng is not None:
        # fpng writes only 24/32 bpp: a 2-D array raises, (H, W, 1) returns b"".
        encoders.append(("fpng.from_ndarray", "png", fpng.from_ndarray, colour))
    if imagecodecs is not None:
        ic = imagecodecs
        encoders += [
            (
                "imagecodecs.png_encode level 1",
                "png",
                lambda a: ic.png_encode(a, level=1),
                everything,
            ),
            (
                "imagecodecs.png_encode L1 RLE+SUB",
                "png",
                lambda a: ic.png_encode(
                    a, level=1, strategy=ic.PNG.STRATEGY.RLE, filter=ic.PNG.FILTER.SUB
                ),
                everything,
            ),
            (
                "imagecodecs.spng_encode level 1",
                "png",
                lambda a: ic.spng_encode(a, level=1),
                everything,
            ),
            (
                "imagecodecs.apng_encode level 1",
                "png",
                lambda a: ic.apng_encode(a, level=1),
                everything,
            ),
        ]
    encoders.append(("JPEG (Pillow, quality 90)", "lossy", _pillow("JPEG", quality=90), colour))
    for method in webp_methods:
        encoders.append(
            (
                f"WebP (Pillow, q85, method {method})",
                "lossy",
                _pillow("WEBP", lossless=False, quality=85, method=method),
                colour,
            )
        )
    return encoders


# -- measuring ------------------------------------------------------------------------


def round_trip(encoded: bytes, array: np.ndarray) -> str:
    try:
        with Image.open(io.BytesIO(encoded)) as im:
            if im.format != "PNG":
                return f"FAIL ({im.format})"
            decoded = np.asarray(im)
    except Exception as error:
        return f"FAIL ({type(error).__name__})"
    if decoded.shape != array.shape or decoded.dtype != array.dtype:
        return f"FAIL ({decoded.dtype}{decoded.shape})"
    return "OK" if np.array_equal(decoded, array) else "FAIL (values)"


def fpng_facts(images: dict[str, np.ndarray]) -> list[str]:
    """What fpng's wrapper does with the inputs the service could hand it."""
    if fpng is None:
        return ["fpng is not installed"]
    facts = []
    probe = (
        "import sys, fpng; c = sys.modules.get('cv2');"
        "print('cv2 really imported:', c is not None and type(c).__name__ != '_LazyModule',"
        " '| PIL.Image imported:', 'PIL.Image' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    facts.append("on `import fpng`: " + (out.stdout.strip() or out.stderr.strip()[-200:]))
    heat, gray = images["heatmap"], images["gray"]
    cases = {
        "gray (H, W)": gray,
        "gray (H, W, 1)": gray[:, :, None],
        "gray as RGB (np.repeat)": np.repeat(gray[:, :, None], 3, axis=2),
        "RGBA (H, W, 4)": np.dstack([heat, gray]),
        "non-contiguous: heat[:, ::2]": heat[:, ::2],
        "non-contiguous: heat[..., ::-1] (BGR view)": heat[..., ::-1],
        "non-contiguous: transposed view": heat.transpose(1, 0, 2),
        "Fortran order": np.asfortranarray(heat),
        "int32 with values 0..300": np.minimum(heat.astype(np.int32) + 45, 300),
    }
    for label, array in cases.items():
        try:
            encoded = fpng.from_ndarray(array)
        except Exception as error:
            facts.append(f"{label}: raises {type(error).__name__}: {error}")
            continue
        if not encoded:
            facts.append(f"{label}: returns {type(encoded).__name__} of length 0 (no error)")
            continue
        expected = array.astype(np.uint8) if array.dtype != np.uint8 else array
        verdict = round_trip(encoded, np.ascontiguousarray(expected))
        if array.dtype != np.uint8:
            verdict += (
                "; silently cast to uint8 (wraps mod 256)"
                if np.any(array > 255) and verdict == "OK"
                else ""
            )
        facts.append(f"{label}: {len(encoded) // 1024} KiB, round trip {verdict}")
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21, help="timed runs per cell (≥ 15)")
    parser.add_argument(
        "--webp-methods", default="0,4", help="comma-separated WebP methods to time (0 fastest … 6)"
    )
    args = parser.parse_args()
    if args.repeats < 15:
        parser.error("--repeats must be at least 15")
    webp_methods = tuple(int(m) for m in args.webp_methods.split(","))

    images = make_images()
    names = list(images)
    versions = [
        f"Python {platform.python_version()}",
        f"numpy {np.__version__}",
        f"Pillow {PIL.__version__}",
    ]
    if fpng is not None:
        versions.append(f"fpng {fpng.__version__}")
    if imagecodecs is not None:
        v = imagecodecs.version(dict)
        versions.append(
            f"imagecodecs {imagecodecs.__version__} (libpng {v.get('libpng')}, "
            f"libspng {v.get('libspng')}, zlib {v.get('zlib')})"
        )
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(f"{platform.processor() or platform.machine()}, CPUs {cpus}; " + ", ".join(versions))
    print(
        f"images {SIZE}×{SIZE}: "
        + ", ".join(f"{n} {images[n].shape} {images[n].nbytes // 1024} KiB raw" for n in names)
    )
    print(
        f"median of {args.repeats} runs after one warm-up; round trip = Pillow decode, "
        "exact compare\n"
    )

    header = "| encoder | " + " | ".join(f"{n} ms | {n} KiB | {n} RT" for n in names) + " |"
    print(header)
    print("|---|" + "---:|---:|:---:|" * len(names))
    for label, kind, encode, applies in build_encoders(webp_methods):
        cells = []
        for name in names:
            array = images[name]
            if name not in applies:
                cells += ["—", "—", "—"]
                continue
            encoded = encode(array)
            check = round_trip(encoded, array) if kind == "png" else "lossy"
            ms = median_ms(lambda e=encode, a=array: e(a), args.repeats)
            cells += [f"{ms:.1f}", f"{len(encoded) / 1024:.0f}", check]
        print(f"| {label} | " + " | ".join(cells) + " |")

    print("\nfpng.from_ndarray on other inputs:")
    for fact in fpng_facts(images):
        print(f"- {fact}")


if __name__ == "__main__":
    main()
