"""gradcam-service explain on files: overlays and heatmaps at the image's size, a rerun
replacing its own outputs and nothing else, a frame per input, the API's pictures,
faithfulness and a DICOM report."""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from service.cli import main
from service.contract.requests import ExplainRequest
from service.engine.runtime import Runtime
from service.pipeline.explain import explain
from tests.helpers import EXAMPLES, as_json, encode, phantom_png, pydicom_file
from tests.unit.imaging.test_dicom_out import measurements


def test_explain_files_writes_overlays_at_image_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = []
    for seed, (w, h) in [(2, (300, 300)), (3, (517, 389))]:
        path = tmp_path / f"p{seed}.png"
        path.write_bytes(phantom_png(seed, w, h))
        images.append(path)
    broken = tmp_path / "notes.png"
    broken.write_text("not an image at all")
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"
    code = main(
        [
            "explain",
            str(images[0]),
            str(broken),
            str(missing),
            str(images[1]),
            "--out",
            str(out),
            "--target",
            "nodule",
            "--target",
            "2",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1  # some inputs failed ...
    error_lines = captured.err.strip().splitlines()
    assert any(
        str(broken) in line and "not in a supported image format" in line for line in error_lines
    )
    assert any(str(missing) in line for line in error_lines)
    # ... and the good ones were still explained, one overlay + heatmap per target.
    for path, size in [(images[0], (300, 300)), (images[1], (517, 389))]:
        for label in ("nodule", "opacity"):
            for kind in ("overlay", "heatmap"):
                png = Image.open(out / f"{path.stem}.{label}.{kind}.png")
                assert png.size == size and png.mode == "RGB"
        assert f"{path}: " in captured.out


def _outputs(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.iterdir())}


def test_outputs_never_overwrite_each_other_or_a_file_not_ours(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for folder, seed in (("a", 2), ("b", 3)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "scan.png").write_bytes(phantom_png(seed, 120, 100))
    inputs = [str(tmp_path / "a" / "scan.png"), str(tmp_path / "b" / "scan.png")]
    out = tmp_path / "out"
    assert main(["explain", *inputs, "--out", str(out)]) == 0
    first = _outputs(out)
    # Two inputs of one name: two sets of files (the second with -2), none lost.
    assert {name.split(".")[0] for name in first} == {"scan", "scan-2"}
    assert len(first) == 4
    assert Image.open(out / next(n for n in first if n.startswith("scan-2."))).size == (120, 100)
    # Again, as a user reruns a command: its own earlier outputs are replaced.
    assert main(["explain", *inputs, "--out", str(out)]) == 0
    again = _outputs(out)
    assert again.keys() == first.keys() and all(again[n] != first[n] for n in first)
    capsys.readouterr()
    # A file of an output's name that explain did not write (this one re-saved by
    # Pillow, without the mark) stops the command before any work: exit code 3.
    edited = out / next(n for n in first if n.endswith(".overlay.png"))
    Image.open(edited).save(edited)
    before = _outputs(out)
    assert main(["explain", *inputs, "--out", str(out)]) == 3
    assert f"{edited} exists and was not written by gradcam-service explain" in (
        capsys.readouterr().err
    )
    assert _outputs(out) == before
    assert main(["explain", *inputs, "--out", str(out), "--force"]) == 0
    assert _outputs(out).keys() == first.keys() and _outputs(out) != before


def test_only_the_outputs_mark_makes_a_file_ours(tmp_path: Path) -> None:
    from service.cli.outputs import marked_png, written_by_us
    from service.imaging.encoders import encode_png

    picture = np.zeros((4, 6, 3), np.uint8)
    ours, other, report = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.report.dcm"
    ours.write_bytes(marked_png(encode_png(picture)))
    other.write_bytes(encode_png(picture))
    report.write_bytes((EXAMPLES / "phantom_nodule.dcm").read_bytes())
    assert written_by_us(ours) and not written_by_us(other) and not written_by_us(report)
    # The mark is a valid PNG chunk: readers see the same picture, and its text.
    with Image.open(ours) as image:
        assert np.array_equal(np.asarray(image), picture)
        assert image.info["Software"] == "gradcam-service"


def test_frames_per_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    two_frames = str(pydicom_file("SC_rgb_rle_2frame.dcm"))
    out = tmp_path / "out"
    assert (
        main(
            [
                "explain",
                two_frames,
                two_frames,
                "--frame",
                "0",
                "--frame",
                "1",
                "--out",
                str(out),
                "--target",
                "nodule",
            ]
        )
        == 0
    )
    first = np.asarray(Image.open(out / "SC_rgb_rle_2frame.nodule.overlay.png"))
    second = np.asarray(Image.open(out / "SC_rgb_rle_2frame-2.nodule.overlay.png"))
    assert first.shape == second.shape and not np.array_equal(first, second)
    capsys.readouterr()
    # A frame the file does not have, or none for a multi-frame DICOM file: that input's
    # error, on one line in the command line's words (its name, --frame), exit code 1.
    assert main(["explain", two_frames, "--frame", "7", "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err == (
        f"error: {two_frames} has 2 frame(s); frame 7 does not exist.\n"
    )
    assert main(["explain", two_frames, "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err == (
        f"error: {two_frames} is a DICOM file with 2 frames; say which one to explain with "
        "--frame (0..1).\n"
    )
    # As many --frame as inputs, or one: anything else is a usage error (2).
    assert (
        main(
            [
                "explain",
                two_frames,
                two_frames,
                two_frames,
                "--frame",
                "0",
                "--frame",
                "1",
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    assert "--frame was given 2 times for 3 inputs" in capsys.readouterr().err


@pytest.mark.parametrize("fmt, kind", [("overlay", "overlay"), ("png", "heatmap")])
def test_files_written_by_the_cli_equal_the_api_pictures(
    runtime: Runtime, tmp_path: Path, fmt: str, kind: str
) -> None:
    """File mode and the JSON API draw through the same stages: pixel-equal pictures."""
    path = tmp_path / "scan.png"
    path.write_bytes(phantom_png(6, 230, 170))
    out = tmp_path / "out"
    assert main(["explain", str(path), "--out", str(out)]) == 0  # the top-1 class
    request = ExplainRequest.model_validate(
        {
            "images": [encode(path.read_bytes())],
            "heatmap": {"format": fmt, "size": "original", "encoding": "png"},
        }
    )
    answer = as_json(explain(request, runtime, runtime.settings))
    data = base64.b64decode(answer["results"][0]["explanations"][0]["heatmap"]["data"])
    from_api = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    label = answer["results"][0]["explanations"][0]["target"]["label"]
    from_cli = np.asarray(Image.open(out / f"scan.{label}.{kind}.png").convert("RGB"))
    assert from_api.shape == from_cli.shape == (170, 230, 3)
    assert np.array_equal(from_api, from_cli)
    # A picture with a map in it (a class the model does not see has an empty map).
    plain = np.asarray(Image.open(path).convert("RGB"))
    assert not np.array_equal(from_cli, plain) and from_cli.std() > 1


def test_explain_files_prints_faithfulness_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "scan.png").write_bytes(phantom_png(3, 128, 128))
    args = ["explain", str(tmp_path / "scan.png"), "--target", "nodule", "--target", "mass"]
    assert main([*args, "--out", str(tmp_path / "a"), "--faithfulness"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "→" in line]
    assert len(lines) == 2
    for line in lines:
        deletion, insertion = (
            float(line.split(f"{kind} AUC ")[1][:5]) for kind in ("deletion", "insertion")
        )
        assert 0 <= deletion <= 1 and 0 <= insertion <= 1
    # Without the flag: no curves computed, none printed.
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "AUC" not in capsys.readouterr().out


def test_explain_writes_a_report_beside_the_pictures_of_a_dicom_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A DICOM input gets ``<image>.report.dcm``, the API's ``report: "dicom-sr"``: valid,
    one group per target, made with the method asked for; other inputs get none."""
    import highdicom as hd

    from tests.helpers import dciodvfy_errors

    dicom, png = EXAMPLES / "phantom_nodule.dcm", EXAMPLES / "phantom_mass_tube.png"
    out = tmp_path / "out"
    targets = ["--target", "nodule", "--target", "mass"]
    command = ["explain", str(dicom), str(png), *targets, "--method", "layercam"]
    assert main([*command, "--out", str(out)]) == 0
    report = out / "phantom_nodule.report.dcm"
    assert f"report → {report}" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.dcm")) == [report.name]
    errors, text = dciodvfy_errors(report)
    assert not errors, text
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(report))
    groups = [
        *measurements(sr).get_planar_roi_measurement_groups(),
        *measurements(sr).get_image_measurement_groups(),
    ]
    assert sorted(g.finding_type.meaning for g in groups) == ["mass", "nodule"]
    assert "method=layercam" in str(sr)
    # A second run replaces the report it wrote; a report it did not write (here, a
    # DICOM file of that name) is enough to refuse one (exit code 3, nothing written).
    assert main([*command, "--out", str(out)]) == 0
    report.write_bytes(dicom.read_bytes())
    for picture in out.glob("*.png"):
        picture.unlink()
    capsys.readouterr()
    assert main([*command, "--out", str(out)]) == 3
    assert f"{report} exists and was not written" in capsys.readouterr().err
    assert not list(out.glob("*.png"))


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_a_progress_bar_only_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """From 5 images a bar shows how far the command is, on a terminal; in a log (stderr
    a file or a pipe) its carriage returns would be noise: none, stdout's lines suffice."""
    images = []
    for seed in range(5):
        images.append(tmp_path / f"p{seed}.png")
        images[-1].write_bytes(phantom_png(seed, 64, 64))
    command = ["explain", *map(str, images), "--target", "nodule"]
    assert main([*command, "--out", str(tmp_path / "a")]) == 0
    logged = capsys.readouterr()
    assert "\r" not in logged.err and "image" not in logged.err
    assert logged.out.count("nodule →") == 5
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main([*command, "--out", str(tmp_path / "b")]) == 0
    assert "\r" in terminal.getvalue() and "5/5" in terminal.getvalue()
