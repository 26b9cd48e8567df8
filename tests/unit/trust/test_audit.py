"""``gradcam-service audit`` (service/trust/audit.py): the measures against hand-made maps,
the verdict against ground truth (boxes where the findings are, and boxes deliberately
elsewhere), resuming after an interruption, the reports, and bad input."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main
from service.demo.phantom import sample_phantom
from service.imaging.values import to_uint8
from service.trust import audit as audit_module
from service.trust.audit_records import ImageRecord, Shares, Thresholds, judge, shares
from tests.helpers import REPO, pydicom_file


def test_shares_of_a_hand_made_map() -> None:
    heat = np.zeros((100, 200), np.float32)
    heat[50, 100] = 3.0  # centre
    heat[2, 3] = 1.0  # top-left corner: on the border
    measured = shares(heat, [[95.0, 45.0, 105.0, 55.0]])
    assert measured.in_box == pytest.approx(0.75)
    assert measured.on_border == pytest.approx(0.25)
    # Pixel x spans [x, x + 1): a box ending at 100.4 does not hold pixel 100's centre.
    assert shares(heat, [[90.0, 40.0, 100.4, 60.0]]).in_box == pytest.approx(0.0)
    # Grown by a cell of 1 px it does.
    assert shares(heat, [[90.0, 40.0, 100.4, 60.0]], (1.0, 1.0)).near_box == pytest.approx(0.75)
    # The border is the outer 10 % of each side: rows 0-9 and 90-99, columns 0-19 and 180-199.
    edge = np.zeros((100, 200), np.float32)
    edge[9, 100] = edge[10, 100] = edge[50, 19] = edge[50, 20] = 1.0
    assert shares(edge, []).on_border == pytest.approx(0.5)
    assert shares(edge, []).in_box is None
    assert shares(np.zeros((4, 4)), [[0, 0, 2, 2]]) == Shares(None, None, None)


def test_judging_rules() -> None:
    rules = Thresholds()
    boxed = ImageRecord(key="a", explained_score=0.9, mass_near_box=0.3, mass_on_border=0.0)
    judge(boxed, rules)
    assert boxed.flagged and "70% of the mass away from the boxes" in boxed.why
    # Boxes decide where there are some: a finding at the edge is not a border shortcut.
    edge_finding = ImageRecord(key="b", explained_score=0.9, mass_near_box=0.9, mass_on_border=0.8)
    judge(edge_finding, rules)
    assert not edge_finding.flagged
    unboxed = ImageRecord(key="c", explained_score=0.9, mass_on_border=0.8)
    judge(unboxed, rules)
    assert unboxed.flagged and "on the border" in unboxed.why[0]
    # A class the model does not see is not judged.
    faint = ImageRecord(key="d", explained_score=0.1, mass_on_border=0.9)
    judge(faint, rules)
    assert not faint.judged and not faint.flagged


def _dataset(folder: Path, count: int, elsewhere: bool = False) -> Path:
    """Phantoms at 160×160 and their boxes; ``elsewhere`` moves every box to the opposite
    side of the image (ground truth that is wrong on purpose)."""
    folder.mkdir(parents=True)
    boxes = folder / "boxes.csv"
    with boxes.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "x0", "y0", "x1", "y1"])
        for i in range(count):
            picture = sample_phantom(np.random.default_rng(5000 + i), 160, 160)
            name = f"img{i:03d}.png"
            Image.fromarray(to_uint8(picture.image)).save(folder / name)
            for finding in picture.findings:
                x0, y0, x1, y1 = finding.box
                if elsewhere:
                    x0, y0, x1, y1 = 160 - x1, 160 - y1, 160 - x0, 160 - y0
                writer.writerow([name, finding.kind, x0, y0, x1, y1])
    return boxes


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_the_honest_model_passes_and_wrong_boxes_are_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    boxes = _dataset(tmp_path / "set", 24)
    out = tmp_path / "out"
    args = ["audit", "--images", str(tmp_path / "set"), "--boxes", str(boxes), "-q"]
    assert main([*args, "--out", str(out)]) == EXIT_OK
    report = _report(out)
    assert report["verdict"]["flagged"] is False, report["verdict"]
    assert report["verdict"]["images"] == 24 and report["verdict"]["errors"] == 0
    judged = [r for r in report["images"] if r["judged"]]
    assert len(judged) >= 15
    for record in judged:
        assert record["mass_near_box"] > 0.8, record
        x, y = record["peak"]
        assert any(
            x0 - 12 <= x <= x1 + 12 and y0 - 12 <= y <= y1 + 12
            for x0, y0, x1, y1 in record["boxes"]
        )
    assert "not flagged" in capsys.readouterr().out
    # The same images, the boxes on the other side: the audit must say so.
    wrong = _dataset(tmp_path / "wrong", 24, elsewhere=True)
    bad = tmp_path / "bad"
    assert (
        main(
            [
                "audit",
                "--images",
                str(tmp_path / "wrong"),
                "--boxes",
                str(wrong),
                "-q",
                "--out",
                str(bad),
            ]
        )
        == EXIT_OK
    )
    verdict = _report(bad)["verdict"]
    assert verdict["flagged"] is True and verdict["flagged_images"] >= 12
    assert "FLAGGED" in capsys.readouterr().out


@pytest.mark.slow  # three audit runs
def test_an_interrupted_audit_resumes_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    boxes = _dataset(tmp_path / "set", 40)
    out = tmp_path / "out"
    args = [
        "audit",
        "--images",
        str(tmp_path / "set"),
        "--boxes",
        str(boxes),
        "-q",
        "--out",
        str(out),
    ]
    real_record = audit_module.measure
    calls = {"n": 0}

    def interrupted(*a: object, **k: object) -> object:
        calls["n"] += 1
        if calls["n"] == 21:
            raise KeyboardInterrupt
        return real_record(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(audit_module, "measure", interrupted)
    assert main(args) == EXIT_INTERRUPTED
    assert "run the same command again to resume" in capsys.readouterr().err
    lines = (out / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 20  # the settings, then the 20 images finished
    # A line cut short by a kill is dropped and its image done again.
    with (out / "audit.jsonl").open("a") as f:
        f.write('{"key": "img020.png", "err')
    monkeypatch.setattr(audit_module, "measure", real_record)
    assert main(args) == EXIT_OK
    assert "resuming: 20 of 40 images already audited" in capsys.readouterr().err
    keys = [json.loads(line)["key"] for line in (out / "audit.jsonl").read_text().splitlines()[1:]]
    assert sorted(keys) == [f"img{i:03d}.png" for i in range(40)]  # each exactly once
    assert len(_report(out)["images"]) == 40
    # An image that failed is tried again on the next run (here: it is readable now).
    broken = tmp_path / "set" / "late.png"
    broken.write_bytes(b"not yet")
    assert main(args) == 1
    Image.open(tmp_path / "set" / "img000.png").save(broken)
    assert main(args) == EXIT_OK
    report = _report(out)
    assert len(report["images"]) == 41 and report["verdict"]["errors"] == 0
    # Other settings into the same folder are refused; --restart starts over.
    assert main([*args, "--method", "layercam"]) == EXIT_USAGE
    assert "other settings (method)" in capsys.readouterr().err
    assert main([*args, "--method", "layercam", "--restart"]) == EXIT_OK


def test_the_html_report_stands_alone(tmp_path: Path) -> None:
    boxes = _dataset(tmp_path / "set", 6)
    (tmp_path / "set" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    code = main(
        [
            "audit",
            "--images",
            str(tmp_path / "set"),
            "--boxes",
            str(boxes),
            "-q",
            "--out",
            str(out),
            "--faithfulness",
        ]
    )
    assert code == 1  # one input failed, the others were audited
    page = (out / "report.html").read_text()
    report = _report(out)
    assert report["verdict"]["errors"] == 1
    (broken,) = [r for r in report["images"] if r["error"]]
    assert broken["key"] == "broken.png" and "The image" in broken["error"]
    assert "Not explained (1)" in page
    # No server, no internet: every picture inline, no external reference.
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert page.count('src="data:image/jpeg;base64,') == 6
    assert 'src="data:image/png;base64,' in page  # the mean maps
    assert "<svg" in page and "sortable" in page
    explained = [r for r in report["images"] if r["error"] is None]
    assert all(0 <= r["deletion_auc"] <= 1 and 0 <= r["insertion_auc"] <= 1 for r in explained)
    for label, figures in report["classes"].items():
        assert (out / figures["mean_map"]).is_file(), label
        assert sum(figures["mass_on_border"]["histogram"]) == figures["mass_on_border"]["n"]


def test_dicom_files_are_audited_like_images(tmp_path: Path) -> None:
    files = [
        str(Path("examples/phantom_nodule.dcm").resolve()),
        str(pydicom_file("CT_small.dcm")),
    ]
    out = tmp_path / "out"
    assert main(["audit", "--images", *files, "-q", "--out", str(out)]) == EXIT_OK
    keys = {r["key"]: r for r in _report(out)["images"]}
    assert set(keys) == set(files)
    assert keys[files[0]]["explained"] == "nodule"


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--images", "/nonexistent"], "no such file or folder"),
        (["--images", "."], "nothing to audit"),
    ],
)
def test_bad_usage_costs_no_model_load(
    tmp_path: Path, extra: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    extra = [str(empty) if e == "." else e for e in extra]
    assert main(["audit", *extra, "--out", str(tmp_path / "out")]) == EXIT_USAGE
    assert says in capsys.readouterr().err


_HEADER = b"image,label,x0,y0,x1,y1\n"


@pytest.mark.parametrize(
    "content, says",
    [
        (_HEADER + b"img000.png,nodule,10,10,5,20\n", "boxes.csv:2: a box needs x1 > x0"),
        (
            _HEADER + b"img000.png,nodule,nan,10,20,20\n",
            "boxes.csv:2: x0, y0, x1, y1 must be finite",
        ),
        (_HEADER + b"img000.png,nodule,0,0,inf,20\n", "must be finite"),
        (_HEADER + b"img000.png,nodule,0,0,1e999,20\n", "must be finite"),
        (_HEADER + b"img000.png,nodule,0,0,x,20\n", "must be numbers"),
        (_HEADER + b"img\xff.png,nodule,0,0,9,9\n", "not UTF-8 text"),
        (_HEADER + b"img000.png," + b"a" * 140_000 + b",0,0,9,9\n", "not a CSV file of boxes"),
        (_HEADER + b"img000.png,nodule,0,0,9,9\x00\n", "must be numbers"),
        (b"image,x0\n", "the first line must name the columns"),
        (None, "No such file or directory"),
        ("folder", "Is a directory"),
    ],
    ids=[
        "x1<x0",
        "nan",
        "inf",
        "1e999",
        "word",
        "latin-1",
        "128 KiB field",
        "NUL",
        "header",
        "missing",
        "folder",
    ],
)
def test_a_broken_boxes_file_is_refused_before_a_model_loads(
    tmp_path: Path, content: bytes | str | None, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _dataset(tmp_path / "set", 1)
    bad = tmp_path / "boxes.csv"
    if content == "folder":
        bad.mkdir()
    elif isinstance(content, bytes):
        bad.write_bytes(content)
    arguments = ["--images", str(tmp_path / "set"), "--boxes", str(bad)]
    assert main(["audit", *arguments, "--out", str(tmp_path / "o")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize(
    "content, says",
    [(b"\xff\xfe", "not UTF-8 text"), (None, "No such file or directory"), ("folder", "Is a")],
)
def test_a_broken_dicomweb_list_is_refused(
    tmp_path: Path, content: bytes | str | None, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    studies = tmp_path / "studies.txt"
    if content == "folder":
        studies.mkdir()
    elif isinstance(content, bytes):
        studies.write_bytes(content)
    assert main(["audit", "--dicomweb", str(studies), "--out", str(tmp_path / "o")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err


SHORTCUT_MODELS = str(REPO / "service/demo/shortcut.toml")


@pytest.mark.slow  # two audits of the shortcut set
def test_the_audit_flags_the_shortcut_model_and_not_the_honest_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ground truth (issue #21 item 4): ``phantom_shortcut`` learned the corner marker that
    was on every nodule image in training; on nodule images that carry the marker its
    nodule map lies on the marker, off the lesion. ``phantom`` looks at the nodule."""
    from tools.demo_model.audit_set import write_audit_set

    images = tmp_path / "set"
    write_audit_set(images, 30, seed=7, marker="nodule", require="nodule")
    verdicts = {}
    for model in ("phantom", "phantom_shortcut"):
        out = tmp_path / model
        args = ["audit", "--images", str(images), "--boxes", str(images / "boxes.csv")]
        args += ["--models", SHORTCUT_MODELS, "--model", model, "--target", "nodule"]
        assert main([*args, "-q", "--out", str(out)]) == EXIT_OK
        verdicts[model] = report = _report(out)
        nodule = report["classes"]["nodule"]
        assert nodule["images"] == 30  # every image judged: both models see a nodule
        if model == "phantom":
            assert not report["verdict"]["flagged"]
            assert nodule["mass_near_box"]["median"] > 0.8
            assert nodule["mass_on_border"]["median"] < 0.05
        else:
            assert report["verdict"]["flagged_classes"] == ["nodule"]
            assert nodule["flagged_images"] == len(nodule["flagged_keys"]) == 30
            assert nodule["mass_near_box"]["median"] < 0.05
            assert nodule["mass_on_border"]["median"] > 0.8
    assert "FLAGGED" in capsys.readouterr().out


def test_no_progress_bar_off_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without -q, stderr not a terminal (a log): no bar and its carriage returns."""
    _dataset(tmp_path / "set", 2)
    assert main(["audit", "--images", str(tmp_path / "set"), "--out", str(tmp_path / "o")]) == 0
    assert "\r" not in capsys.readouterr().err
