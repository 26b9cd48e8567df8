"""Model archives named in a models file: a torch.export archive served (its maps and
scores the eager model's, through ``load_model`` and a ``Runtime``), a TorchScript
archive refused wherever it is named, and every archive the service cannot serve
honestly named at load with what to export instead."""

from __future__ import annotations

import io
import json
import textwrap
import time
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.export import Dim

from service.contract.errors import ConfigError
from service.contract.models_file import load_models_file
from service.contract.settings import Settings
from service.engine.gradcam import GradCAM
from service.engine.loading.models import LoadedModel, load_model
from service.engine.runtime import Runtime
from service.transport.interface import Job

# Library models built per case (0.5-1.5 s each): in the full run, not the developer loop.
pytestmark = pytest.mark.slow

SIZE = 64
BATCH = {"x": {0: Dim("batch")}}


def _load(folder: Path, table: str, name: str = "m") -> LoadedModel:
    path = folder / "models.toml"
    path.write_text(textwrap.dedent(table))
    return load_model(name, load_models_file(path))


def _resnet(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=classes).eval()
    with torch.no_grad():  # batch norms that do something (fresh ones are the identity)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


def _export(
    model: nn.Module, path: Path, dynamic: Any = BATCH, size: int = SIZE, batch: int = 2
) -> Path:
    example = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=dynamic), path)
    return path


@pytest.fixture(scope="module")
def resnet_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    folder = tmp_path_factory.mktemp("archive")
    model = _resnet()
    torch.save(model.state_dict(), folder / "r18.pth")
    return model, _export(model, folder / "r18.pt2")


def _served(archive: Path) -> LoadedModel:
    return _load(archive.parent, f'[models.m]\nlibrary = "torch.export"\narch = "{archive.name}"\n')


# --- served ------------------------------------------------------------------------


def test_an_exported_model_is_served_with_its_input_size_and_layers(
    resnet_archive: tuple[nn.Module, Path],
) -> None:
    _, archive = resnet_archive
    model = _served(archive)
    assert model.input_size == (SIZE, SIZE) and model.channels == 3
    assert model.preprocessing.sources["input_size"] == "the exported program's input"
    assert model.preprocessing.sources["mean"] == "default"  # no archive says it
    assert model.labels == ("0", "1", "2") and model.default_layer == "layer4"
    kinds = {layer.name: layer.kind for layer in model.layers}
    assert kinds["layer4"] == "Sequential" and kinds["layer3.1"] == "BasicBlock"
    assert kinds["layer2.0.conv1"] == "Conv2d"
    assert all(not p.requires_grad for p in model.module.parameters())


@pytest.mark.parametrize("layer", ["layer4", "layer3", "layer2.1.conv2", "layer1.0.bn1"])
def test_its_maps_and_scores_are_the_eager_models(
    resnet_archive: tuple[nn.Module, Path], layer: str
) -> None:
    eager, archive = resnet_archive
    eager.requires_grad_(False)
    model = _served(archive)
    inputs = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    targets: list[list[int | None]] = [[None], [0, 2], [1]]
    methods = ["gradcam", "gradcam++", "layercam"]
    want = GradCAM(eager)(inputs, layer, targets, methods)
    got = GradCAM(model.module)(inputs, layer, targets, methods)
    assert torch.allclose(got.logits, want.logits, atol=1e-5)
    assert got.targets == want.targets
    for ours, theirs in zip(got.cams, want.cams, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.max())), (a - b).abs().max()
    assert all(p.grad is None for p in model.module.parameters())


@pytest.fixture(scope="module")
def twins(resnet_archive: tuple[nn.Module, Path]) -> Iterator[Runtime]:
    """The archive and the eager model it was exported from (its state_dict, by name)."""
    _, archive = resnet_archive
    (archive.parent / "both.toml").write_text(
        textwrap.dedent(
            f"""
            [models.exported]
            library = "torch.export"
            arch = "{archive.name}"

            [models.eager]
            arch = "resnet18"
            weights = "r18.pth"
            num_classes = 3
            input_size = [{SIZE}, {SIZE}]
            """
        )
    )
    started = Runtime(Settings(device="cpu", models_file=archive.parent / "both.toml")).start()
    yield started
    started.close()


def test_through_the_runtime_its_answers_are_the_eager_models(twins: Runtime) -> None:
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(2)]
    answers = {}
    for name in ("exported", "eager"):
        job = Job(name, "layer3", images, [None, None], [[None], [1]], ["gradcam", "xgradcam"])
        answers[name] = twins.run(job, time.monotonic() + 120)
    exported, eager = answers["exported"], answers["eager"]
    np.testing.assert_allclose(exported.scores, eager.scores, atol=1e-5)
    assert exported.targets == eager.targets
    for ours, theirs in zip(exported.maps, eager.maps, strict=True):
        a, b = ours[0].ravel(), theirs[0].ravel()
        assert a.max() > 0
        assert np.corrcoef(a, b)[0, 1] >= 0.999  # the eager one's batch norms are folded


def test_it_runs_any_batch_size_a_runtime_asks_for(twins: Runtime) -> None:
    """Faithfulness curves run 39 images in one forward pass."""
    blank = np.full((SIZE, SIZE, 3), 90, dtype=np.uint8)
    job = Job("exported", "layer4", [blank], [None], [[None]], ["gradcam"], [True])
    result = twins.run(job, time.monotonic() + 120)
    assert result.curves and result.curves[0][0].shape == (2, 21)


def test_a_vit_archive_is_explained_once_its_layout_is_declared(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=3,
    ).eval()  # fmt: skip
    _export(vit, tmp_path / "vit.pt2", size=32)
    layer = "encoder.layers.encoder_layer_1.ln_1"
    table = '[models.m]\nlibrary = "torch.export"\narch = "vit.pt2"\n'
    with pytest.raises(ConfigError, match=r"key 'layout': .* holds attention modules"):
        _load(tmp_path, table)
    with pytest.raises(ConfigError, match=r"key 'layer': .* name the layer"):
        _load(tmp_path, f'{table}layout = "tokens"\n')
    model = _load(tmp_path, f'{table}layout = "tokens"\nprefix_tokens = 1\nlayer = "{layer}"\n')
    inputs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    want = GradCAM(vit.requires_grad_(False))(inputs, layer, [[None], [2]], ["gradcam"] * 2)
    got = GradCAM(model.module)(inputs, layer, [[None], [2]], ["gradcam"] * 2)
    for ours, theirs in zip(got.cams, want.cams, strict=True):
        assert ours[0].shape == (4, 4)
        assert torch.allclose(ours[0], theirs[0], atol=1e-5)


class _MakesATensor(nn.Module):
    """A forward that makes a tensor on its input's device: exported with that device."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.conv(x) + torch.ones(1, 4, 1, 1, device=x.device)
        return self.head(maps.mean(dim=(2, 3)))


def test_devices_written_into_the_graph_follow_the_model(tmp_path: Path) -> None:
    _export(_MakesATensor().eval(), tmp_path / "m.pt2")
    path = tmp_path / "models.toml"
    path.write_text('[models.m]\nlibrary = "torch.export"\narch = "m.pt2"\nlayer = "conv"\n')
    model = load_model("m", load_models_file(path), device="meta")
    out = model.module(torch.zeros(2, 3, SIZE, SIZE, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 2)


# --- refused -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["script", "trace"])
def test_a_torchscript_archive_is_refused_as_the_model_and_as_weights(
    tmp_path: Path, how: str
) -> None:
    model = _resnet()
    example = torch.randn(1, 3, SIZE, SIZE)
    with warnings.catch_warnings():  # torch.jit is deprecated in torch 2.x
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, example)
        torch.jit.save(scripted, str(tmp_path / "model.ts"))
    for table, key in (
        ('library = "torch.export"\narch = "model.ts"', "arch"),
        ('arch = "resnet18"\nnum_classes = 3\nweights = "model.ts"', "weights"),
    ):
        with pytest.raises(ConfigError) as refused:
            _load(tmp_path, f"[models.m]\n{table}\n")
        message = str(refused.value)
        assert f"model 'm', key '{key}': " in message
        assert "model.ts is a TorchScript archive; Grad-CAM cannot hook the layers" in message
        assert "Ship its state_dict with the architecture by name" in message
        assert "torch.export.save" in message


def test_a_torch_export_archive_given_as_weights_says_how_to_name_it(
    resnet_archive: tuple[nn.Module, Path],
) -> None:
    _, archive = resnet_archive
    with pytest.raises(ConfigError) as refused:
        _load(archive.parent, '[models.m]\narch = "resnet18"\nweights = "r18.pt2"\n')
    assert "is a torch.export archive, not a state_dict" in str(refused.value)
    assert 'library = "torch.export", arch = "r18.pt2"' in str(refused.value)


def _rewritten(source: Path, target: Path, change: Any, extra: str | None = None) -> Path:
    """``source``'s entries written to ``target``, each through ``change(name, bytes)``,
    and one ``extra`` entry (under the archive's root) if given."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            new.writestr(name, change(name, old.read(name)))
        if extra is not None:
            new.writestr(f"{old.namelist()[0].split('/')[0]}/{extra}", b"\x7fELF")
    return target


def _with_pickled_weight(name: str, data: bytes) -> bytes:
    if name.endswith("model_weights_config.json"):
        config = json.loads(data)
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config).encode()
    return data


def _with_pickled_inputs(name: str, data: bytes) -> bytes:
    """Example inputs that only load with weights_only=False (a Path among them)."""
    if not name.endswith("sample_inputs/model.pt"):
        return data
    buffer = io.BytesIO()
    torch.save(((Path("x"),), {}), buffer)
    return buffer.getvalue()


def _unchanged(name: str, data: bytes) -> bytes:
    return data


@pytest.mark.parametrize(
    "change, extra, says",
    [
        (_with_pickled_weight, None, r"holds pickled objects \(weight conv1\.weight\)"),
        (_with_pickled_inputs, None, r"holds pickled objects \(its example inputs\)"),
        (_unchanged, "data/aotinductor/model/model.so", r"holds AOTInductor-compiled code"),
    ],
)
def test_an_archive_that_would_run_code_when_read_is_refused(
    resnet_archive: tuple[nn.Module, Path], tmp_path: Path, change: Any, extra: str, says: str
) -> None:
    archive = _rewritten(resnet_archive[1], tmp_path / "r18.pt2", change, extra)
    with pytest.raises(ConfigError, match=f"key 'arch': .*{says}"):
        _served(archive)


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda path: path.write_bytes(path.read_bytes()[:5000]), "is a damaged zip archive"),
        (lambda path: path.write_bytes(b"hello, world\n"), "is not a torch.export archive"),
        (lambda path: path.unlink(), "does not exist"),
    ],
)
def test_a_damaged_or_missing_archive_is_named(
    resnet_archive: tuple[nn.Module, Path], tmp_path: Path, damage: Any, says: str
) -> None:
    archive = tmp_path / "r18.pt2"
    archive.write_bytes(resnet_archive[1].read_bytes())
    damage(archive)
    with pytest.raises(ConfigError, match=f"model 'm', key 'arch': .*{says}"):
        _served(archive)


def test_an_archive_whose_entries_do_not_read_is_named(
    resnet_archive: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    def garble(name: str, data: bytes) -> bytes:
        return b"{not json" if name.endswith("models/model.json") else data

    archive = _rewritten(resnet_archive[1], tmp_path / "r18.pt2", garble)
    with pytest.raises(ConfigError, match=r"key 'arch': cannot read .*r18\.pt2 with torch"):
        _served(archive)


def test_a_checkpoint_named_as_an_archive_says_what_it_is(
    resnet_archive: tuple[nn.Module, Path],
) -> None:
    folder = resnet_archive[1].parent
    with pytest.raises(ConfigError, match=r"r18\.pth is a checkpoint \(a state_dict\), not a"):
        _load(folder, '[models.m]\nlibrary = "torch.export"\narch = "r18.pth"\n')


@pytest.mark.parametrize(
    "dynamic, batch, says",
    [
        (None, 2, r"exported for a fixed batch of 2 images; .*dynamic_shapes=\{\"x\": \{0: torch"),
        ({"x": {0: Dim("batch", max=8)}}, 2, r"exported for batches of 0 to 8 images"),
        ({"x": {0: Dim("batch", min=4)}}, 4, r"exported for batches of 4 or more images"),
    ],
)
def test_an_archive_without_a_dynamic_batch_is_refused(
    tmp_path: Path, dynamic: Any, batch: int, says: str
) -> None:
    archive = _export(_resnet(), tmp_path / "r18.pt2", dynamic, batch=batch)
    with pytest.raises(ConfigError, match=f"key 'arch': .*{says}"):
        _served(archive)


def test_an_archive_exported_in_training_mode_is_refused(tmp_path: Path) -> None:
    archive = _export(_resnet().train(), tmp_path / "r18.pt2")
    with pytest.raises(ConfigError, match=r"exported in training mode: aten\.batch_norm\.default "):
        _served(archive)


def test_a_fixed_input_size_the_models_file_contradicts_is_named(
    resnet_archive: tuple[nn.Module, Path],
) -> None:
    table = '[models.m]\nlibrary = "torch.export"\narch = "r18.pt2"\ninput_size = [224, 224]\n'
    with pytest.raises(ConfigError, match=r"key 'input_size': .*takes N×3×64×64 inputs, fixed"):
        _load(resnet_archive[1].parent, table)


def _calls_getcwd(name: str, data: bytes) -> bytes:
    """A graph whose first ReLU names ``os.getcwd``, as torch's attributes reach it."""
    if not name.endswith("models/model.json"):
        return data
    program = json.loads(data)
    node = next(n for n in program["graph_module"]["graph"]["nodes"] if "relu" in n["target"])
    node["target"] = "torch.serialization.os.getcwd"
    return json.dumps(program).encode()


def test_a_graph_that_calls_more_than_torch_operators_is_refused(
    resnet_archive: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    """torch's verifier, run as torch.export.load reads the archive, refuses it."""
    archive = _rewritten(resnet_archive[1], tmp_path / "r18.pt2", _calls_getcwd)
    with pytest.raises(ConfigError, match=r"cannot read .*SpecViolationError: Operator '<built"):
        _served(archive)
