"""The sanity check (``service/trust/``): its measures against independent references,
the cascade on the demo model (the correlation falls at step 1), negative controls
that make it fail, and the command end to end."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from service.cli import EXIT_EXISTS, EXIT_INPUT, EXIT_OK, EXIT_USAGE, main
from service.contract.settings import Settings
from service.demo.phantom import make_dataset
from service.engine.batch_inputs import normaliser
from service.engine.folding import fold_batch_norms, folded_affine
from service.engine.loading.models import LoadedModel, load_model
from service.imaging.values import to_uint8
from service.trust.plot import draw_plot
from service.trust.report import SanityReport
from service.trust.sanity import CascadeSettings, layer_groups, randomise, run_sanity
from service.trust.similarity import spearman, ssim

# Held-out phantoms (the evaluation seed); about a quarter show no finding, whose
# Grad-CAM map is all zero: the check leaves those out.
_SEED = 2026


# --- the measures -------------------------------------------------------------------


def _map_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    noise = rng.random((64, 48))
    yy, xx = np.mgrid[0:40, 0:56] / 40.0
    blob = np.exp(-((xx - 0.6) ** 2 + (yy - 0.4) ** 2) / 0.05)
    moved = np.exp(-((xx - 0.7) ** 2 + (yy - 0.5) ** 2) / 0.08)
    relu = np.maximum(rng.standard_normal((32, 32)), 0)
    return [
        (noise, np.clip(noise + 0.3 * rng.standard_normal(noise.shape), 0, 1)),
        (blob, moved),
        (blob, 1 - blob),
        (relu / relu.max(), np.zeros_like(relu)),
    ]


def test_ssim_matches_scikit_image() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    for a, b in _map_pairs():
        reference = metrics.structural_similarity(
            a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert ssim(a, b) == pytest.approx(reference, abs=1e-9)


def test_ssim_identities() -> None:
    for a, b in _map_pairs():
        assert ssim(a, a) == pytest.approx(1.0)
        assert ssim(a, b) == pytest.approx(ssim(b, a))
        assert ssim(a, b) < 1.0
    _, blob = _map_pairs()[1]
    assert ssim(blob, 1 - blob) < 0  # anti-correlated structure
    with pytest.raises(ValueError):
        ssim(np.zeros((10, 40)), np.zeros((10, 40)))  # smaller than the 11×11 window


def test_spearman_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for _ in range(5):
        a = np.maximum(rng.standard_normal((20, 30)), 0)  # ReLU'd: many ties at 0
        b = np.maximum(a + rng.standard_normal(a.shape), 0)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel())[0])


def test_spearman_identities() -> None:
    a = np.random.default_rng(2).random((16, 16))
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, np.exp(5 * a)) == pytest.approx(1.0)  # ranks only
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(spearman(a, np.zeros_like(a)))  # a constant map ranks nothing


# --- the cascade on the demo model --------------------------------------------------


def _inputs(model: LoadedModel, count: int) -> Tensor:
    pixels = torch.from_numpy(np.stack([p.image for p in make_dataset(count, _SEED)]))[:, None]
    mean, std = normaliser(model, model.device)
    return (pixels - mean) / std


def _checksum(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model("phantom", Settings(device="cpu").models_config(), "cpu")


@pytest.fixture(scope="module")
def report(demo: LoadedModel) -> SanityReport:
    inputs = _inputs(demo, 12)
    return run_sanity(demo, inputs, [f"p{i}" for i in range(12)], "features")


def test_the_layers_are_listed_from_the_output_by_forward_order(demo: LoadedModel) -> None:
    probe = _inputs(demo, 1)
    groups = layer_groups(demo.module, probe, "features")
    assert [g.name for g in groups] == [
        "classifier",
        "features.stage3.2.0+1",
        "features.stage3.1.0+1",
        "features.stage2.2.0+1",
        "features.stage2.1.0+1",
        "features.stage1.2.0+1",
        "features.stage1.1.0+1",
        "features.stem.0+1",
    ]
    assert [g.above_target for g in groups] == [True] + [False] * 7
    blocks = layer_groups(demo.module, probe, "features", depth=2)
    assert [g.name for g in blocks] == [
        "classifier",
        "features.stage3",
        "features.stage2",
        "features.stage1",
        "features.stem",
    ]


def test_forward_order_not_definition_order() -> None:
    class Backwards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)  # defined first, runs last
            self.body = nn.Conv2d(1, 4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.body(x).mean(dim=(2, 3)))

    groups = layer_groups(Backwards(), torch.zeros(1, 1, 8, 8), "body")
    assert [(g.name, g.above_target) for g in groups] == [("head", True), ("body", False)]


def test_randomise_resets_batch_norm_and_permutes_what_has_no_reset() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.arange(8.0))  # no reset_parameters()

        def forward(self, x: Tensor) -> Tensor:
            return x * self.gamma.view(1, -1, 1, 1)

    conv, norm, scaled = nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), Scaled()
    model = nn.Sequential(conv, norm, scaled).eval()
    assert norm.running_mean is not None and norm.running_var is not None
    with torch.no_grad():
        norm.running_mean.fill_(3.0)
        norm.running_var.fill_(7.0)
        norm.weight.fill_(2.0)
    before = conv.weight.clone()
    groups = layer_groups(model, torch.zeros(1, 1, 8, 8), "0")
    assert [g.modules for g in groups] == [("2",), ("0", "1")]
    for step, group in enumerate(groups, start=1):
        randomise(model, group, seed=0, step=step)
    assert not torch.equal(conv.weight, before)
    assert torch.equal(norm.running_mean, torch.zeros(8))
    assert torch.equal(norm.running_var, torch.ones(8))
    assert torch.equal(norm.weight, torch.ones(8)) and torch.equal(norm.bias, torch.zeros(8))
    gamma = scaled.gamma.detach()
    assert torch.equal(gamma.sort().values, torch.arange(8.0))
    assert not torch.equal(gamma, torch.arange(8.0))


def test_on_the_demo_model_the_correlation_falls_at_step_1(report: SanityReport) -> None:
    steps = report.steps
    assert steps[0].layer == "" and set(steps[0].spearman) == {1.0} and set(steps[0].ssim) == {1.0}
    # Randomising the classifier alone (step 1) scrambles the channel weights: the
    # median correlation goes from 1 to about -0.2 with seed 0 (its sign is the random
    # classifier's; docs/trust.md).
    assert steps[1].layer == "classifier"
    assert steps[1].spearman_spread.median < 0.1
    assert steps[1].spearman_spread.q3 < 0.3
    # ... and stays low as the cascade goes down to the stem.
    assert all(s.spearman_spread.median < 0.3 for s in steps[1:])
    assert report.pass_by == 1 and report.first_below == 1 and report.passed
    assert report.verdict().startswith("PASS")
    # Phantoms without a finding have an all-zero map: left out, and said so.
    assert report.skipped and len(report.images) + len(report.skipped) == 12
    assert len(report.images) >= 6


def test_the_served_model_is_not_modified(demo: LoadedModel) -> None:
    before = _checksum(demo.module)
    run_sanity(demo, _inputs(demo, 4), ["a", "b", "c", "d"], "features", CascadeSettings(depth=2))
    assert _checksum(demo.module) == before
    assert all(not m._forward_hooks for m in demo.module.modules())


def test_the_same_seed_gives_the_same_numbers(demo: LoadedModel) -> None:
    inputs, names = _inputs(demo, 4), ["a", "b", "c", "d"]
    runs = [
        run_sanity(demo, inputs, names, "features", CascadeSettings(depth=2, seed=s))
        for s in (0, 0, 1)
    ]
    assert runs[0].to_json() == runs[1].to_json()
    assert runs[0].to_json()["steps"] != runs[2].to_json()["steps"]


def test_a_folded_model_is_checked_as_it_runs(demo: LoadedModel) -> None:
    """The runtime's model has its batch norms folded (``folding.py``): its layers are
    the folded convolutions, which forget the batch norm they absorbed when re-initialised."""
    folded = load_model("phantom", Settings(device="cpu").models_config(), "cpu")
    assert fold_batch_norms(folded.module)
    inputs = _inputs(folded, 6)
    result = run_sanity(
        folded, inputs, [str(i) for i in range(6)], "features", CascadeSettings(depth=2)
    )
    assert result.passed and result.steps[1].spearman_spread.median < 0.1
    module = folded.module
    assert folded_affine(module.get_submodule("features.stem.0")) is not None  # untouched


# --- negative controls: the check can fail ------------------------------------------


def _input_only(module: nn.Module, inputs: Tensor, targets: Sequence[int]) -> Tensor:
    """A "method" that ignores the model: the (positive part of the) image itself."""
    return inputs[:, 0].clamp(min=0)


def _activation_only(module: nn.Module, inputs: Tensor, targets: Sequence[int]) -> Tensor:
    """A class-blind "method": the mean activation at 'features', with no gradient, so
    the layers between it and the score play no part."""
    captured: list[Tensor] = []
    handle = module.get_submodule("features").register_forward_hook(
        lambda m, a, out: captured.append(out.detach())
    )
    try:
        with torch.no_grad():
            module(inputs)
    finally:
        handle.remove()
    return captured[0].mean(dim=1).clamp(min=0)


def test_a_map_that_ignores_the_model_fails(demo: LoadedModel) -> None:
    inputs = _inputs(demo, 6)
    result = run_sanity(demo, inputs, [str(i) for i in range(6)], "features", explainer=_input_only)
    assert all(s.spearman_spread.median == pytest.approx(1.0) for s in result.steps)
    assert not result.passed and result.first_below is None
    assert result.verdict().startswith("FAIL") and "never falls below" in result.verdict()
    assert result.to_json()["passed"] is False


def test_a_map_blind_to_the_layers_above_it_fails(demo: LoadedModel) -> None:
    """Unchanged while only the classifier is random: the check wants the map to follow
    the layers that make the score, so this fails, though it changes further down."""
    inputs = _inputs(demo, 6)
    result = run_sanity(
        demo,
        inputs,
        [str(i) for i in range(6)],
        "features",
        CascadeSettings(depth=2),
        explainer=_activation_only,
    )
    assert result.steps[1].spearman_spread.median == pytest.approx(1.0)
    assert result.first_below is not None and result.first_below > 1
    assert not result.passed and "falls below only at step" in result.verdict()


# --- the command ---------------------------------------------------------------------


def _write_phantoms(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    paths = []
    for i, phantom in enumerate(make_dataset(count, _SEED, (150, 130))):
        path = folder / f"phantom_{i}.png"
        Image.fromarray(to_uint8(phantom.image)).save(path)
        paths.append(path)
    return paths


def test_the_command_writes_the_table_plot_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _write_phantoms(tmp_path / "in", 5)
    (tmp_path / "in" / "notes.txt").write_text("not an image: a folder's other files are skipped")
    out = tmp_path / "out"
    argv = ["sanity", "--images", str(tmp_path / "in"), "--out", str(out), "--depth", "2"]
    assert main(argv) == EXIT_OK
    printed = capsys.readouterr().out
    assert "Spearman median [IQR]" in printed and "features.stage3" in printed
    assert printed.strip().splitlines()[-1].startswith("PASS")
    data = json.loads((out / "sanity.json").read_text())
    assert data["passed"] is True and data["model"] == "phantom" and data["layer"] == "features"
    assert [s["layer"] for s in data["steps"]] == [
        None,
        "classifier",
        "features.stage3",
        "features.stage2",
        "features.stage1",
        "features.stem",
    ]
    assert len(data["images"]) + len(data["skipped_constant_original"]) == len(images)
    first = data["steps"][1]
    assert len(first["per_image"]) == len(data["images"])
    assert first["spearman"]["median"] == pytest.approx(
        float(np.median([p["spearman"] for p in first["per_image"]]))
    )
    with Image.open(out / "sanity.png") as plot:
        assert plot.format == "PNG" and plot.width >= 600 and plot.height >= 400

    # Outputs there already: nothing done without --force.
    assert main(argv) == EXIT_EXISTS
    assert "--force" in capsys.readouterr().err
    # A list of files, one unreadable: told, the others checked (exit code 1).
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    files = [str(p) for p in images[:3]] + [str(broken)]
    again = ["sanity", "--images", *files, "--out", str(out), "--force", "--max-images", "3"]
    assert main(again) == EXIT_OK  # --max-images 3: the broken file is past the limit
    assert main([*again[:-2], "--max-images", "4"]) == EXIT_INPUT
    # Told by its name, in the command line's words (not "Image 3").
    assert f"error: {broken} is not in a supported image format" in capsys.readouterr().err


def test_the_command_refuses_bad_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = _write_phantoms(tmp_path / "in", 1)
    out = str(tmp_path / "out")
    assert main(["sanity", "--images", str(tmp_path / "nowhere"), "--out", out]) == EXIT_USAGE
    assert "no such file" in capsys.readouterr().err
    bad_layer = ["sanity", "--images", str(images[0]), "--out", out, "--layer", "featurs"]
    assert main(bad_layer) == EXIT_USAGE
    assert "Did you mean 'features'" in capsys.readouterr().err
    assert (
        main(["sanity", "--images", str(images[0]), "--out", out, "--target", "nodle"])
        == EXIT_USAGE
    )
    assert "Did you mean 'nodule'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_plot_draws_both_verdicts(report: SanityReport, demo: LoadedModel) -> None:
    passed = draw_plot(report)
    failed = draw_plot(
        run_sanity(demo, _inputs(demo, 4), list("abcd"), "features", explainer=_input_only)
    )

    # The verdict line is green for PASS, red for FAIL.
    def reds(image: Image.Image) -> int:
        pixels = np.asarray(image.crop((0, 0, image.width, 60)))
        return int(((pixels[..., 0] > 150) & (pixels[..., 1] < 80)).sum())

    assert reds(failed) > 50 and reds(passed) == 0
