"""The names of explain's outputs and their marks, for a volume's files: a .nii.gz input's
stem, the map's .nii.gz marked in its header, and the refusal of a file not ours."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from service.cli.common import OutputExists
from service.cli.outputs import refuse_existing, stems, written_by_us
from service.imaging.nifti import write_nifti


def test_a_volume_s_stem_drops_both_of_its_suffixes() -> None:
    given = [Path("a/ct.nii.gz"), Path("b/ct.nii"), Path("series_dir/"), Path("x/CT.NII.GZ")]
    assert stems(given) == ["ct", "ct-2", "series_dir", "CT"]
    assert stems([Path("scan.png"), Path(".nii.gz")]) == ["scan", ".nii"]


def test_a_map_written_with_the_mark_is_ours(tmp_path: Path) -> None:
    heat = np.zeros((3, 4, 5), np.float32)
    ours, other = tmp_path / "ct.nodule.heatmap.nii.gz", tmp_path / "other.nii.gz"
    ours.write_bytes(write_nifti(heat, np.eye(4), description="gradcam-service"))
    other.write_bytes(write_nifti(heat, np.eye(4)))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(gzip.compress(b"not a header"))
    plain = tmp_path / "plain.nii.gz"
    plain.write_bytes(b"not even gzip")
    assert written_by_us(ours)
    assert not any(written_by_us(path) for path in (other, broken, plain))


@pytest.mark.parametrize("name", ["ct.nodule.heatmap.nii.gz", "ct.nodule.views.png"])
def test_a_volume_s_output_not_ours_stops_the_run(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"someone else's file")
    (tmp_path / "ct.nii.gz").write_bytes(b"the input, in the same folder: not an output")
    with pytest.raises(OutputExists, match=name):
        refuse_existing(tmp_path, ["ct"])
    refuse_existing(tmp_path, ["other"])
