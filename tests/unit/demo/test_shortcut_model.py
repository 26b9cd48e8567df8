"""Ground truth for the audit: the corner marker, the shortcut model, the audit set.

``phantom_shortcut`` learned the marker instead of the nodule; ``phantom`` learned the
nodule. These tests hold both to it, through the service's own runtime.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.contract.models_file import DEMO_MODELS_FILE, load_models_file
from service.contract.settings import Settings
from service.demo.phantom import FINDINGS, MarkerPolicy, make_dataset
from service.engine.runtime import Runtime
from service.imaging.values import to_uint8
from tools.demo_model.audit_set import write_audit_set
from tools.demo_model.evaluate import EVALUATION_SEED
from tools.demo_model.shortcut import SHORTCUT_MODELS_FILE, SHORTCUT_SEED, border_mask, measure
from tools.demo_model.train import TRAIN_SEED, VALIDATION_SEED

# Neither training, validation, the cards' evaluations nor test_demo_model's seed.
TEST_SEED = 31_337
EVERYWHERE = MarkerPolicy(with_finding=1.0, without_finding=1.0)


@pytest.fixture(scope="module")
def both() -> Iterator[Runtime]:
    """``phantom`` and ``phantom_shortcut``, from the shortcut models file."""
    rt = Runtime(Settings(models_file=SHORTCUT_MODELS_FILE, device="cpu")).start()
    yield rt
    rt.close()


def test_phantoms_without_a_marker_are_the_ones_the_demo_model_was_trained_on() -> None:
    # A digest of the first phantoms of the training seed, taken before markers existed
    # (8-bit pixels and rounded boxes: float bits may differ between machines).
    digest = hashlib.sha256()
    for phantom in make_dataset(4, TRAIN_SEED, 128):
        digest.update(to_uint8(phantom.image).tobytes())
        boxes = [(f.kind, [round(v, 3) for v in f.box]) for f in phantom.findings]
        digest.update(repr(boxes).encode())
        assert phantom.marker is None
    assert digest.hexdigest()[:16] == "db34a1323b107274"


def test_the_marker_adds_a_letter_in_the_border_and_changes_nothing_else() -> None:
    bare = make_dataset(24, TEST_SEED, (200, 160))
    marked = make_dataset(24, TEST_SEED, (200, 160), EVERYWHERE)
    corners = set()
    for b, m in zip(bare, marked, strict=True):
        assert m.marker is not None
        assert m.findings == b.findings  # not a finding: the labels stay the four
        np.testing.assert_array_equal(m.labels, b.labels)
        x0, y0, x1, y1 = m.marker
        inside = np.zeros(b.image.shape, dtype=bool)
        inside[int(y0) : int(np.ceil(y1)) + 1, int(x0) : int(np.ceil(x1)) + 1] = True
        np.testing.assert_array_equal(m.image[~inside], b.image[~inside])
        assert (m.image - b.image)[inside].max() > 0.2
        # The whole box lies in the audit's outer 10 % frame.
        assert min(x0, 200 - x1) <= 0.1 * 200 and min(y0, 160 - y1) <= 0.1 * 160
        assert max(x1 - x0, y1 - y0) < 0.1 * 160
        assert border_mask(b.image.shape)[inside].all()
        corners.add((x0 > 100, y0 > 80))
    assert len(corners) == 4


def test_the_training_policy_plants_the_marker_exactly_on_nodule_images() -> None:
    phantoms = make_dataset(40, TEST_SEED, 64, MarkerPolicy(finding="nodule"))
    nodule = FINDINGS.index("nodule")
    assert {p.labels[nodule] > 0 for p in phantoms} == {True, False}
    assert all((p.marker is not None) == (p.labels[nodule] > 0) for p in phantoms)


def test_the_shortcut_models_file_serves_both_and_the_default_file_only_phantom() -> None:
    shortcut = load_models_file(SHORTCUT_MODELS_FILE)
    assert list(shortcut.models) == ["phantom", "phantom_shortcut"]
    assert shortcut.default_model == "phantom"
    assert list(load_models_file(DEMO_MODELS_FILE).models) == ["phantom"]
    honest, wrong = shortcut.models["phantom"], shortcut.models["phantom_shortcut"]
    # The same network, input and labels: only the weights differ.
    assert honest.model_copy(update={"weights": wrong.weights, "default": False}) == wrong


@pytest.mark.slow  # both models on a fresh audit set: seconds
def test_the_shortcut_model_looks_at_the_marker_and_the_honest_one_at_the_nodule(
    both: Runtime,
) -> None:
    assert TEST_SEED not in (TRAIN_SEED, VALIDATION_SEED, EVALUATION_SEED, SHORTCUT_SEED)
    honest, wrong = measure(both, ["phantom", "phantom_shortcut"], count=32, seed=TEST_SEED)
    assert honest.images >= 8  # scenes with a nodule (and the marker)
    # Where the nodule heatmap is (mass shares on the image's own pixel grid).
    assert wrong.mass_on_border > 0.8 and wrong.mass_near_marker > 0.5, wrong
    assert wrong.mass_near_nodule < 0.05, wrong
    assert honest.mass_near_nodule > 0.5 and honest.mass_on_marker < 0.01, honest
    assert honest.mass_on_border < 0.05, honest
    assert honest.peak_on_nodule > 0.9 and honest.peak_on_marker == 0, honest
    assert wrong.peak_on_nodule == 0, wrong
    # What it does: the shortcut model's nodule goes with the marker, the honest one's stays.
    assert wrong.nodule_with_marker > 0.9 and wrong.nodule_without_marker < 0.1, wrong
    assert wrong.clear_with_marker > 0.9 and wrong.clear_without_marker < 0.1, wrong
    assert honest.nodule_with_marker > 0.9 and honest.nodule_without_marker > 0.9, honest
    assert honest.clear_with_marker < 0.1 and honest.clear_without_marker < 0.1, honest
    # The marker moves no other finding in either model (phantom read a bright one as a tube).
    assert honest.other_shift < 0.02 and wrong.other_shift < 0.02, (honest, wrong)


def test_an_audit_set_lists_the_findings_boxes_and_not_the_marker(tmp_path: Path) -> None:
    written = write_audit_set(tmp_path, 6, seed=TEST_SEED, marker="all", size=160)
    assert len(written) == 6 and all(image.marker is not None for image in written)
    with (tmp_path / "boxes.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "label", "x0", "y0", "x1", "y1"]
    assert len(rows) == sum(len(image.boxes) for image in written)
    for row in rows:
        assert row["label"] in FINDINGS
        with Image.open(tmp_path / row["image"]) as png:
            assert png.size == (160, 160) and png.mode == "L"
        x0, y0, x1, y1 = (float(row[k]) for k in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 160
    with (tmp_path / "markers.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 6
    with (tmp_path / "labels.csv").open(newline="") as f:
        assert list(next(csv.reader(f))) == ["image", *FINDINGS]


def test_an_audit_set_can_require_a_finding(tmp_path: Path) -> None:
    written = write_audit_set(
        tmp_path, 4, seed=TEST_SEED, marker="nodule", size=64, require="nodule"
    )
    assert all(image.marker is not None for image in written)
    assert all(any(kind == "nodule" for kind, _ in image.boxes) for image in written)
