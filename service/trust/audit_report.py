"""The audit's reports: ``report.json`` (every number) and ``report.html`` (one file that
opens from disk, no server, no internet: thumbnails and mean maps inline, a sortable
table, per-class histograms drawn as SVG), from the records of ``audit.py``'s log."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.imaging.render import colour_image, normalise
from service.imaging.values import to_uint8
from service.transport.interface import ModelInfo
from service.trust.audit_records import ImageRecord, Thresholds

_MEASURES = ("mass_in_box", "mass_near_box", "mass_on_border", "deletion_auc", "insertion_auc")
_BINS = 20


def _spread(values: Sequence[float]) -> dict[str, float | int] | None:
    if not values:
        return None
    v = np.asarray(values, dtype=np.float64)
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    return {
        "n": len(v),
        "mean": round(float(v.mean()), 4),
        "std": round(float(v.std()), 4),
        "median": round(float(median), 4),
        "q1": round(float(q1), 4),
        "q3": round(float(q3), 4),
        "histogram": np.histogram(np.clip(v, 0, 1), bins=_BINS, range=(0, 1))[0].tolist(),
    }


def _values(records: Sequence[ImageRecord], measure: str) -> list[float]:
    return [v for r in records if (v := getattr(r, measure)) is not None]


def _mean_map(records: Sequence[ImageRecord], model: ModelInfo) -> Image.Image | None:
    maps = [np.asarray(r.map, dtype=np.float32) for r in records if r.map]
    if not maps or len({m.shape for m in maps}) != 1:
        return None
    mean = normalise(np.mean(maps, axis=0))
    height, width = model.input_size
    levels = Image.fromarray(to_uint8(mean)).resize((width, height), Image.Resampling.BILINEAR)
    return colour_image(np.asarray(levels))


def summarise(
    records: Sequence[ImageRecord], thresholds: Thresholds
) -> tuple[dict[str, Any], dict[str, list[ImageRecord]]]:
    """The verdict and per-class figures; the records grouped by explained class."""
    explained = [r for r in records if r.error is None]
    by_class: dict[str, list[ImageRecord]] = {}
    for record in explained:
        if record.judged:  # a class the model does not see in the image says nothing
            by_class.setdefault(record.explained, []).append(record)
    classes: dict[str, Any] = {}
    for label, rows in sorted(by_class.items()):
        flagged = sum(r.flagged for r in rows)
        classes[label] = {
            "images": len(rows),
            "flagged_images": flagged,
            "flagged_share": round(flagged / len(rows), 4),
            "flagged": flagged / len(rows) >= thresholds.flag_share,
            "flagged_keys": [r.key for r in rows if r.flagged],
            **{m: _spread(_values(rows, m)) for m in _MEASURES},
        }
    flagged_classes = [label for label, c in classes.items() if c["flagged"]]
    verdict = {
        "flagged": bool(flagged_classes),
        "flagged_classes": flagged_classes,
        "images": len(records),
        "explained": len(explained),
        "judged": sum(r.judged for r in explained),
        "flagged_images": sum(r.flagged for r in explained),
        "errors": len(records) - len(explained),
    }
    return {"verdict": verdict, "classes": classes}, by_class


def write_reports(
    out: Path,
    settings: dict[str, Any],
    records: Sequence[ImageRecord],
    model: ModelInfo,
    thresholds: Thresholds,
) -> str:
    """Write both reports (and ``classes/<label>.png``); return a one-line summary."""
    summary, by_class = summarise(records, thresholds)
    (out / "classes").mkdir(exist_ok=True)
    mean_maps: dict[str, str] = {}
    for label, rows in by_class.items():
        picture = _mean_map(rows, model)
        if picture is not None:
            name = f"classes/{_safe(label)}.png"
            picture.save(out / name)
            mean_maps[label] = name
            summary["classes"][label]["mean_map"] = name
    report = {
        "settings": settings,
        **summary,
        "images": [{k: v for k, v in asdict(r).items() if k != "map"} for r in records],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.html").write_text(_html(out, settings, summary, records, mean_maps))
    verdict = summary["verdict"]
    if verdict["flagged"]:
        return (
            f"FLAGGED: {verdict['flagged_images']} of {verdict['explained']} images flagged; "
            f"class(es) {', '.join(verdict['flagged_classes'])} over "
            f"{thresholds.flag_share:.0%} of their images"
        )
    return (
        f"not flagged: {verdict['flagged_images']} of {verdict['explained']} images flagged, "
        f"no class over {thresholds.flag_share:.0%}"
    )


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _data_uri(path: Path, kind: str) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")


def _histogram_svg(counts: Sequence[int], threshold: float | None, title: str) -> str:
    """Bars over [0, 1] in ``_BINS`` bins, a dashed line at ``threshold``."""
    width, height, pad = 240, 90, 14
    top = max(counts) or 1
    bar = (width - 2 * pad) / len(counts)
    bars = "".join(
        f'<rect x="{pad + i * bar:.1f}" y="{height - pad - (c / top) * (height - 2 * pad):.1f}" '
        f'width="{bar - 1:.1f}" height="{(c / top) * (height - 2 * pad):.1f}" fill="#4a78b5">'
        f"<title>{i / _BINS:.2f}–{(i + 1) / _BINS:.2f}: {c}</title></rect>"
        for i, c in enumerate(counts)
    )
    line = ""
    if threshold is not None:
        x = pad + threshold * (width - 2 * pad)
        line = (
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{pad / 2}" y2="{height - pad}" '
            'stroke="#c0392b" stroke-dasharray="3,2"/>'
        )
    axis = (
        f'<line x1="{pad}" x2="{width - pad}" y1="{height - pad}" y2="{height - pad}" '
        'stroke="#555"/>'
        f'<text x="{pad}" y="{height - 2}" font-size="9">0</text>'
        f'<text x="{width - pad - 4}" y="{height - 2}" font-size="9">1</text>'
        f'<text x="{width / 2}" y="10" font-size="10" text-anchor="middle">'
        f"{html.escape(title)}</text>"
    )
    return f'<svg width="{width}" height="{height}" role="img">{axis}{bars}{line}</svg>'


def _cell(value: float | None, digits: int = 3) -> str:
    if value is None:
        return '<td data-v="-1">–</td>'
    return f'<td data-v="{value}">{value:.{digits}f}</td>'


_STYLE = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px}h2{font-size:17px;margin-top:28px}
.verdict{padding:10px 14px;border-radius:6px;font-weight:600;display:inline-block}
.bad{background:#fdecea;color:#a12}.good{background:#e8f5e9;color:#1b5e20}
.classes{display:flex;flex-wrap:wrap;gap:18px}
.class{border:1px solid #ddd;border-radius:6px;padding:10px}
.class img{width:160px;height:160px;image-rendering:auto}
table{border-collapse:collapse}th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
th{cursor:pointer;background:#f6f6f6;position:sticky;top:0}
tr.flagged td{background:#fff4f2}td img{height:80px}
"""

_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach((th, column) => {
  th.addEventListener('click', () => {
    const body = th.closest('table').tBodies[0];
    const rows = Array.from(body.rows);
    const up = th.dataset.dir !== 'up';
    th.dataset.dir = up ? 'up' : 'down';
    const key = r => {
      const c = r.cells[column];
      return c.dataset.v !== undefined ? parseFloat(c.dataset.v) : c.textContent;
    };
    rows.sort((a, b) => {
      const x = key(a), y = key(b);
      return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
    });
    rows.forEach(r => body.appendChild(r));
  });
});
document.getElementById('only-flagged').addEventListener('change', e => {
  document.querySelectorAll('#images tbody tr').forEach(r => {
    r.style.display = e.target.checked && !r.classList.contains('flagged') ? 'none' : '';
  });
});
"""


def _headline(verdict: dict[str, Any]) -> str:
    """The verdict as a coloured box."""
    if verdict["flagged"]:
        return (
            f'<div class="verdict bad">Flagged: class '
            f"{html.escape(', '.join(verdict['flagged_classes']))} "
            f"— {verdict['flagged_images']} of {verdict['explained']} images look outside their "
            "evidence</div>"
        )
    return (
        f'<div class="verdict good">Not flagged: {verdict["flagged_images"]} of '
        f"{verdict['explained']} images flagged</div>"
    )


def _class_card(
    out: Path, label: str, figures: dict[str, Any], thresholds: dict[str, Any], mean_map: str | None
) -> str:
    """One class's card: its mean heatmap (``mean_map``, a file in ``out``, inlined), the
    histograms of the measures that flag, each with its threshold, and every measure's
    spread."""
    e = html.escape
    stats = "".join(
        f"<tr><td>{m}</td><td>{figures[m]['mean']:.3f} ± {figures[m]['std']:.3f}</td>"
        f"<td>{figures[m]['median']:.3f} [{figures[m]['q1']:.3f}, {figures[m]['q3']:.3f}]</td>"
        "</tr>"
        for m in _MEASURES
        if figures[m] is not None
    )
    # Each histogram with its flag threshold.
    lines = {
        "mass_near_box": 1 - thresholds["max_outside"],
        "mass_on_border": thresholds["max_border"],
    }
    histograms = "".join(
        _histogram_svg(figures[m]["histogram"], threshold, m)
        for m, threshold in lines.items()
        if figures[m] is not None
    )
    picture = (
        f'<img src="{_data_uri(out / mean_map, "png")}" alt="mean heatmap of {e(label)}">'
        if mean_map is not None
        else ""
    )
    state = "flagged" if figures["flagged"] else "not flagged"
    return (
        f'<div class="class"><h3>{e(label)} ({state}: {figures["flagged_images"]} of '
        f"{figures['images']} images)</h3>{picture}<div>{histograms}</div>"
        "<table><tr><th>measure</th><th>mean ± sd</th><th>median [IQR]</th></tr>"
        f"{stats}</table></div>"
    )


def _image_row(out: Path, r: ImageRecord) -> str:
    """One explained image's row of the table, its thumbnail (a file in ``out``) inlined."""
    e = html.escape
    thumb = _data_uri(out / r.thumbnail, "jpeg") if r.thumbnail else ""
    return (
        f'<tr class="{"flagged" if r.flagged else ""}">'
        f'<td><img src="{thumb}" alt=""></td><td>{e(r.key)}</td>'
        f"<td>{e(r.predicted)}</td>{_cell(r.predicted_score)}"
        f"<td>{e(r.explained)}</td>{_cell(r.explained_score)}"
        f"{_cell(r.mass_in_box)}{_cell(r.mass_near_box)}{_cell(r.mass_on_border)}"
        f"<td>{r.peak[0] if r.peak else ''}, {r.peak[1] if r.peak else ''}</td>"
        f"{_cell(r.deletion_auc)}{_cell(r.insertion_auc)}"
        f'<td data-v="{int(r.flagged)}">{e("; ".join(r.why)) if r.flagged else ""}</td></tr>'
    )


def _error_table(records: Sequence[ImageRecord], count: int) -> str:
    """The images not explained and why (``count`` of them), or nothing if there are none."""
    e = html.escape
    errors = "".join(
        f"<tr><td>{e(r.key)}</td><td>{e(r.error or '')}</td></tr>" for r in records if r.error
    )
    if not errors:
        return ""
    return (
        f"<h2>Not explained ({count})</h2><table><tr><th>image</th><th>why</th></tr>"
        f"{errors}</table>"
    )


def _html(
    out: Path,
    settings: dict[str, Any],
    summary: dict[str, Any],
    records: Sequence[ImageRecord],
    mean_maps: dict[str, str],
) -> str:
    """``report.html``: the settings and thresholds in words, the verdict, a card per
    class and a sortable table of the images (with those not explained after it)."""
    e = html.escape
    verdict = summary["verdict"]
    thresholds = settings["thresholds"]
    cards = [
        _class_card(out, label, figures, thresholds, mean_maps.get(label))
        for label, figures in summary["classes"].items()
    ]
    rows = [_image_row(out, r) for r in records if r.error is None]
    described = ", ".join(
        f"{k} {e(str(settings[k]))}"
        for k in ("model", "arch", "layer", "method", "target")
        if settings.get(k)
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Grad-CAM audit: {e(settings["model"])}</title>
<style>{_STYLE}</style></head><body>
<h1>Grad-CAM audit</h1>
<p>{described}. {verdict["images"]} images, {verdict["judged"]} judged (the explained
class scores at least {thresholds["min_score"]:g}). A judged image is flagged when more than
{thresholds["max_outside"]:.0%} of its heatmap's mass lies away from its boxes for the
explained class (each box grown by one cell of the layer, the blur of a perfect map), or,
without boxes for it, more than {thresholds["max_border"]:.0%} on the outer 10 % border; a
class when at least {thresholds["flag_share"]:.0%} of its judged images are. The class
figures below are over judged images.</p>
{_headline(verdict)}
<h2>Per class: mean heatmap (at the model input), shares, histograms</h2>
<div class="classes">{"".join(cards)}</div>
<h2>Images</h2>
<p><label><input type="checkbox" id="only-flagged"> only flagged images</label>
(click a column to sort)</p>
<table id="images" class="sortable"><thead><tr><th>overlay</th><th>image</th><th>predicted</th>
<th>score</th><th>explained</th><th>score</th><th>mass in box</th><th>near box</th>
<th>on border</th>
<th>peak (x, y)</th><th>deletion AUC</th><th>insertion AUC</th><th>flagged</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
{_error_table(records, verdict["errors"])}
<script>{_SCRIPT}</script>
</body></html>
"""
