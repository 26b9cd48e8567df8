"""``gradcam-service explain`` with a volume model: each input a NIfTI file or a folder of
one DICOM series' files; per explained class, the map on the file's own grid as a float32
``.nii.gz`` with the file's affine (what a viewer lays over the file), and a PNG of three
orthogonal slices through the map's peak over the windowed volume (the API's
``overlay`` of a volume, at the file's size).

The API's stages, as for images (``pipeline/offline.py``), one volume at a time: a
volume is big, and the engine has nothing to gain from batching a command's few.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from service.cli import outputs, wording
from service.contract.errors import InvalidField, ServiceError
from service.contract.requests import HeatmapOptions
from service.imaging.dicom_codes import MANUFACTURER
from service.imaging.encoders import encode_png
from service.imaging.nifti import write_nifti
from service.imaging.volume_pictures import three_views
from service.pipeline.engine_call import ExplainedVolume
from service.pipeline.offline import OfflinePlan, explain_prepared, prepare_volume_file
from service.pipeline.results import RenderOptions
from service.pipeline.volume_results import map_at, peak_answer, render_volume_result

if TYPE_CHECKING:
    from service.engine.runtime import Runtime

# The predictions are rendered with the maps at the layer's grid (no upsampling): the
# maps written are drawn here, at the file's grid.
_PREDICTIONS_ONLY = HeatmapOptions(format="none", size="layer")


def refuse_image_options(args: argparse.Namespace, chosen: OfflinePlan) -> None:
    """What a volume model cannot do, told before any file is read (exit code 2)."""
    if args.frame:
        raise InvalidField(
            f"Model '{chosen.model.name}' explains volumes: --frame picks a frame of a 2-D "
            "image, a volume is read whole.",
            field="frame",
        )
    if args.faithfulness:
        raise InvalidField(
            f"Model '{chosen.model.name}' explains volumes: --faithfulness is computed for "
            "2-D images only.",
            field="include",
        )


def read_volume_input(path: Path) -> bytes | list[bytes]:
    """A file's bytes, or a folder's files' (one DICOM series; hidden files and a
    DICOMDIR left out), in name order (the reader orders the slices by position)."""
    if not path.is_dir():
        return path.read_bytes()
    files = sorted(
        entry
        for entry in path.iterdir()
        if entry.is_file() and not entry.name.startswith(".") and entry.name != "DICOMDIR"
    )
    if not files:
        raise FileNotFoundError(0, "the folder holds no files (a DICOM series' files)", str(path))
    return [entry.read_bytes() for entry in files]


def explain_volumes(
    args: argparse.Namespace, runtime: Runtime, chosen: OfflinePlan, stems: list[str]
) -> int:
    """Explain each input as a volume; the number that failed (each told on stderr)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for index, name in enumerate(args.images):
        path = Path(name)
        try:
            prepared = prepare_volume_file(chosen, read_volume_input(path), index)
        except (OSError, ServiceError) as error:
            print(f"error: {wording.about_file(path, error)}", file=sys.stderr)
            failures += 1
            continue
        [result] = explain_prepared(runtime, chosen, [prepared], runtime.settings.request_timeout_s)
        sys.stdout.write(
            f"{path}: " + _write_outputs(result, chosen, args.top_k, out, stems[index])
        )
    return failures


def _write_outputs(
    result: ExplainedVolume, chosen: OfflinePlan, top_k: int, out: Path, stem: str
) -> str:
    """Write one volume's maps and pictures; what to print about them."""
    options = RenderOptions(
        heatmap=_PREDICTIONS_ONLY, top_k=top_k, method=chosen.how.method, layer=chosen.layer
    )
    answer = render_volume_result(result, chosen.model, options)
    scores = ", ".join(f"{p.label} {p.score:.3f}" for p in answer.predictions)
    lines = []
    if answer.out_of_domain is not None:
        lines.append(f"out of domain: {answer.out_of_domain}")
    if chosen.model.random_weights:
        lines.append("random weights: the models file gives none, these scores mean nothing")
    for explanation, cam in zip(answer.explanations, result.cams, strict=True):
        label = outputs.safe(explanation.target.label)
        heat, affine = map_at(cam, result.prepared, "original")
        nifti = out / f"{stem}.{label}.{outputs.NIFTI_MAP}"
        nifti.write_bytes(write_nifti(heat, affine, description=MANUFACTURER))
        views = out / f"{stem}.{label}.{outputs.VIEWS}"
        picture = three_views(heat, affine, result.prepared.base, "overlay")
        views.write_bytes(outputs.marked_png(encode_png(picture)))
        mm = ", ".join(f"{v:.1f}" for v in peak_answer(heat, affine).mm)
        lines.append(f"{explanation.target.label} → {views}, {nifti}  (peak at RAS {mm} mm)")
    return f"{scores}\n" + "".join(f"  {line}\n" for line in lines)
