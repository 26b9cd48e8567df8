"""The command line with a volume model, as a user runs it: a MONAI 3-D DenseNet in a
models file (tests/volume_models.py). explain writes, per class, the map on the file's
own grid as a .nii.gz with the file's affine and a PNG of three slices through its peak;
a DICOM series given as a folder is the same volume; a PNG is one error line; reruns,
--force and --request as for images; layers prints the 3-D shapes."""

from __future__ import annotations

import base64
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.contract.responses import ExplainResponse
from tests.dicom_series import write_ct_series
from tests.helpers import EXAMPLES, encode
from tests.volume_models import (
    DICOM_ORIGIN,
    DICOM_SPACING,
    LAYER,
    ct_phantom,
    ras_affine,
    write_models,
)

nibabel = pytest.importorskip("nibabel")
pytest.importorskip("monai.networks.nets")

pytestmark = pytest.mark.slow
SHAPE = ct_phantom().shape


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    # The installed console script, as a user runs it.
    command = [str(Path(sys.executable).with_name("gradcam-service")), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The models file, ct.nii.gz, and the same voxels as a DICOM series in series/."""
    folder = tmp_path_factory.mktemp("cli-volumes")
    write_models(folder)
    series = folder / "series"
    series.mkdir()
    files = write_ct_series(ct_phantom(), DICOM_SPACING, DICOM_ORIGIN, signed=True)
    for number, data in enumerate(files):
        (series / f"slice{number:03d}.dcm").write_bytes(data)
    return folder


def _models(folder: Path) -> list[str]:
    return ["--models", str(folder / "models.toml"), "--model", "ct3d"]


def _read_map(path: Path) -> object:
    return nibabel.Nifti1Image.from_bytes(gzip.decompress(path.read_bytes()))


def test_a_nifti_file_and_a_series_folder_each_get_a_map_and_views(
    folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    png = EXAMPLES / "phantom_nodule.png"
    inputs = [str(folder / "ct.nii.gz"), str(folder / "series"), str(png)]
    done = _cli("explain", *_models(folder), *inputs, "--target", "nodule", "--out", str(out))
    # The PNG is a bad input (exit code 1), told on one line naming it; the others done.
    assert done.returncode == 1, done.stderr
    [error] = done.stderr.strip().splitlines()
    assert error.startswith(f"error: {png}: Model 'ct3d' explains volumes: it is no volume.")
    assert "NIfTI" in error and "GET /v1/models" not in error
    maps = []
    for stem in ("ct", "series"):
        nifti, views = out / f"{stem}.nodule.heatmap.nii.gz", out / f"{stem}.nodule.views.png"
        assert f"  nodule → {views}, {nifti}  (peak at RAS " in done.stdout
        image = _read_map(nifti)
        assert image.shape == SHAPE and image.get_data_dtype() == np.float32  # type: ignore[attr-defined]
        np.testing.assert_allclose(image.affine, ras_affine(), atol=1e-5)  # type: ignore[attr-defined]
        values = np.asarray(image.get_fdata())  # type: ignore[attr-defined]
        assert values.min() >= 0 and values.max() == pytest.approx(1.0)
        maps.append(values)
        picture = Image.open(views)
        assert picture.mode == "RGB" and picture.width > 2 * picture.height
        assert picture.info["Software"] == "gradcam-service"
    # The same voxels, as a file or as a series: one map.
    np.testing.assert_allclose(maps[0], maps[1], atol=2e-3)
    scores = [line for line in done.stdout.splitlines() if not line.startswith(" ")]
    assert scores[0].startswith(f"{folder / 'ct.nii.gz'}: ") and "nodule 0." in scores[0]


def test_a_rerun_replaces_its_files_and_stops_at_another_s(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = ["explain", *_models(folder), str(folder / "ct.nii.gz"), "--out", str(out)]
    assert _cli(*command).returncode == 0
    [written] = out.glob("ct.*.heatmap.nii.gz")
    # A map of that name that explain did not write (an edited copy, saved without the mark).
    edited = _read_map(written)
    nibabel.save(nibabel.Nifti1Image(edited.get_fdata() * 0.5, edited.affine), written)  # type: ignore[attr-defined]
    before = written.read_bytes()
    refused = _cli(*command)
    assert refused.returncode == 3, refused.stderr
    assert f"{written} exists and was not written by gradcam-service explain" in refused.stderr
    assert written.read_bytes() == before
    assert _cli(*command, "--force").returncode == 0
    assert written.read_bytes() != before


def test_request_answers_a_nifti_body_as_the_api(folder: Path, tmp_path: Path) -> None:
    body = {
        "model": "ct3d",
        "images": [encode((folder / "ct.nii.gz").read_bytes())],
        "targets": ["nodule"],
        "heatmap": {"format": "nifti", "size": "input"},
        "include": ["image"],
    }
    path = tmp_path / "request.json"
    path.write_text(json.dumps(body))
    done = _cli("explain", "--models", str(folder / "models.toml"), "--request", str(path))
    assert done.returncode == 0, done.stderr
    [result] = ExplainResponse.model_validate_json(done.stdout).results
    heatmap = result.explanations[0].heatmap
    assert (result.depth, result.height, result.width) == SHAPE
    image = nibabel.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(heatmap.data or "")))
    assert image.shape == (heatmap.depth, heatmap.height, heatmap.width)
    assert result.image is not None and result.image.encoding == "nifti"


def test_what_a_volume_model_cannot_do_is_told(folder: Path, tmp_path: Path) -> None:
    nifti = str(folder / "ct.nii.gz")
    out = ["--out", str(tmp_path / "out")]
    # --frame is a 2-D image's: a usage error (2), nothing written.
    framed = _cli("explain", *_models(folder), nifti, "--frame", "3", *out)
    assert framed.returncode == 2 and "--frame picks a frame of a 2-D image" in framed.stderr
    assert not (tmp_path / "out").exists()
    # A volume for the 2-D model, and a series folder: each input's error (exit code 1).
    models = ["--models", str(folder / "models.toml"), "--model", "phantom"]
    wrong = _cli("explain", *models, nifti, str(folder / "series"), *out)
    assert wrong.returncode == 1
    lines = wrong.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: {nifti}: Model 'phantom' explains 2-D images: it is a")
    assert lines[1].startswith(f"error: {folder / 'series'} is a folder: a folder is read as")


def test_layers_prints_a_volume_model_s_3d_shapes(folder: Path) -> None:
    done = _cli("layers", *_models(folder))
    assert done.returncode == 0, done.stderr
    assert "input 1×48×48×32" in done.stdout.splitlines()[0]
    assert any(
        line.startswith(f"* {LAYER} ") and line.endswith(" 30×3×3×2")
        for line in done.stdout.splitlines()
    ), done.stdout
