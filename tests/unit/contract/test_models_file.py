"""Models files: every mistake stops start-up with a message naming model and key."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from service.contract.errors import ConfigError
from service.contract.models_file import load_models_file
from service.contract.settings import Settings
from service.engine.loading.models import load_model
from tests.helpers import seeded_model


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(textwrap.dedent(body))
    return path


def _load(path: Path, name: str = "m") -> object:
    return load_model(name, load_models_file(path))


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state_dict of a seeded resnet18 with 3 classes, saved as .pt."""
    folder = tmp_path_factory.mktemp("weights")
    path = folder / "resnet18-3.pt"
    torch.save(seeded_model("resnet18", num_classes=3).state_dict(), path)
    return path


# (models file body, text the error must contain) for each kind of mistake.
BAD_FILES = [
    ('[models.m]\narch = "resnet999"\n', ["model 'm'", "key 'arch'", "resnet999"]),
    (
        '[models.m]\narch = "no_such_pkg.mod:factory"\n',
        ["model 'm'", "key 'arch'", "cannot import"],
    ),
    ('[models.m]\narch = "service.demo.model:nothing_here"\n', ["key 'arch'", "nothing_here"]),
    (
        '[models.m]\narch = "resnet18"\nweights = "missing.pt"\n',
        ["model 'm'", "key 'weights'", "does not exist"],
    ),
    (
        '[models.m]\narch = "resnet18"\nweights = "IMAGENET9K_V9"\n',
        ["key 'weights'", "IMAGENET1K_V1"],
    ),
    ('[models.m]\narch = "resnet18"\nchannels = "3"\n', ["model 'm'", "key 'channels'"]),
    ('[models.m]\narch = "resnet18"\nchannels = 2\n', ["model 'm'", "channels must be 1 or 3"]),
    ('[models.m]\narch = "resnet18"\ninput_size = [224]\n', ["model 'm'", "key 'input_size'"]),
    ('[models.m]\narch = "resnet18"\nnum_classes = -1\n', ["model 'm'", "key 'num_classes'"]),
    ('[models.m]\narch = "resnet18"\nmultilabel = "yes"\n', ["model 'm'", "key 'multilabel'"]),
    ('[models.m]\narch = "resnet18"\nmean = [0.5]\n', ["model 'm'", "mean has 1 values"]),
    ('[models.m]\narch = "resnet18"\nresize = "squash"\n', ["model 'm'", "key 'resize'"]),
    ('[models.m]\narch = "resnet18"\nlayers = "layer4"\n', ["model 'm'", "key 'layers'"]),
    (
        '[models.m]\narch = "resnet18"\nnum_classes = 3\nlayer = "layer9"\n',
        ["model 'm'", "key 'layer'", "layer9"],
    ),
    (
        '[models.m]\narch = "resnet18"\nnum_classes = 3\nlayer = "fc"\n',
        ["model 'm'", "key 'layer'", "(N, C, H, W)"],
    ),
    (
        '[models.m]\narch = "service.demo.model:phantom_net"\nchannels = 3\n',
        ["model 'm'", "key 'input_size'", "check 'channels' and 'input_size'"],
    ),
    (
        '[models.a]\narch = "resnet18"\ndefault = true\n[models.b]\narch = "resnet18"\n'
        "default = true\n",
        ["more than one model has default = true"],
    ),
    ("[models]\n", ["key 'models'"]),
    # A name is a URL path segment (/v1/models/<name>, /v2/models/<name>/infer).
    ('[models."a/b"]\narch = "resnet18"\n', ["model name 'a/b' is not one path segment"]),
    ('[models.".."]\narch = "resnet18"\n', ["model name '..'"]),
    ('[models."x y"]\narch = "resnet18"\n', ["model name 'x y'"]),
    ('[models."%2F"]\narch = "resnet18"\n', ["model name '%2F'"]),
    (f'[models.{"m" * 65}]\narch = "resnet18"\n', ["up to 64 characters"]),
    ('[models.m\narch = "resnet18"\n', ["not valid TOML"]),
    # A model archive (contract/archives.py): TorchScript is refused by name, and an
    # exported program holds its weights and was built with its arguments.
    (
        '[models.m]\nlibrary = "torchscript"\narch = "m.ts"\n',
        ["model 'm', key 'library'", "TorchScript is not served", "torch.export.save"],
    ),
    (
        '[models.m]\nlibrary = "torch.export"\narch = "m.pt2"\nweights = "w.pth"\n',
        ["model 'm'", 'weights is not read with library = "torch.export"'],
    ),
    (
        '[models.m]\nlibrary = "torch.export"\narch = "m.pt2"\narch_args = { a = 1 }\n',
        ["model 'm'", "arch_args is not read"],
    ),
]


@pytest.mark.parametrize("body,expected", BAD_FILES, ids=[str(i) for i in range(len(BAD_FILES))])
def test_bad_models_file_names_model_and_key(
    tmp_path: Path, body: str, expected: list[str]
) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        config = load_models_file(path)
        for name in config.models:
            load_model(name, config)
    for text in expected:
        assert text in str(info.value), str(info.value)


def test_missing_models_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_models_file(tmp_path / "nope.toml")


def test_corrupt_weights(tmp_path: Path) -> None:
    (tmp_path / "bad.pt").write_bytes(b"this is not a checkpoint")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    for name, start in (("bad.pt", "the text 'this is not '"), ("bad.safetensors", "00 00")):
        path = _write(tmp_path, f'[models.m]\narch = "resnet18"\nweights = "{name}"\n')
        with pytest.raises(
            ConfigError, match=r"model 'm', key 'weights': .* is not a checkpoint"
        ) as bad:
            _load(path)
        assert start in str(bad.value)
        assert "weights_only" not in str(bad.value)


def test_weights_that_do_not_fit(tmp_path: Path, small_weights: Path) -> None:
    path = _write(
        tmp_path, f'[models.m]\narch = "resnet34"\nnum_classes = 3\nweights = "{small_weights}"\n'
    )
    with pytest.raises(ConfigError, match=r"key 'weights'.*does not fit.*(missing|unexpected)"):
        _load(path)
    path = _write(tmp_path, f'[models.m]\narch = "resnet18"\nweights = "{small_weights}"\n')
    with pytest.raises(
        ConfigError,
        match=r"key 'weights'.*fc.weight: \(3, 512\) in the file, "
        r"\(1000, 512\) in the model.*set num_classes = 3",
    ):
        _load(path)  # 1000 classes by default, the weights have 3


def test_labels_must_match_outputs(tmp_path: Path, small_weights: Path) -> None:
    (tmp_path / "labels.txt").write_text("a\nb\n")
    path = _write(
        tmp_path,
        f'[models.m]\narch = "resnet18"\nnum_classes = 3\n'
        f'weights = "{small_weights}"\nlabels = "labels.txt"\n',
    )
    with pytest.raises(ConfigError, match=r"model 'm', key 'labels': 2 labels but num_classes = 3"):
        _load(path)
    (tmp_path / "labels.txt").write_text("a\nb\na\n")
    with pytest.raises(ConfigError, match="repeats a label"):
        _load(path)


def test_torchvision_weights_name_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty hub cache and no internet: the error says how to give a local file.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr("torch.hub.urlopen", _refuse, raising=False)
    path = _write(tmp_path, '[models.m]\narch = "resnet18"\nweights = "IMAGENET1K_V1"\n')
    with pytest.raises(ConfigError) as info:
        _load(path)
    message = str(info.value)
    assert "model 'm', key 'weights': could not download" in message
    assert "resnet18-f37072fd.pth" in message and "give its path" in message


def _refuse(*args: object, **kwargs: object) -> None:
    raise OSError("network is unreachable (test)")


def test_good_files_load(
    tmp_path: Path, small_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reference = seeded_model("resnet18", num_classes=3)
    save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()},
        str(tmp_path / "w.safetensors"),
    )
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}},
        tmp_path / "wrapped.pth",
    )
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    path = _write(
        tmp_path,
        f"""
        [models.pt]
        arch = "resnet18"
        weights = "{small_weights}"
        num_classes = 3
        [models.safe]
        arch = "resnet18"
        weights = "w.safetensors"
        labels = "labels.txt"
        default = true
        [models.wrapped]
        arch = "resnet18"
        weights = "wrapped.pth"
        num_classes = 3
        [models.gray]
        arch = "resnet18"
        num_classes = 3
        channels = 1
        input_size = [96, 80]
        [models.custom]
        arch = "service.demo.model:phantom_net"
        channels = 1
        num_classes = 2
        input_size = [64, 64]
    """,
    )
    config = load_models_file(path)
    assert config.default_model == "safe"
    with caplog.at_level(logging.INFO, logger="service.engine.loading"):
        models = {name: load_model(name, config) for name in config.models}
    assert "default target layer 'layer4'" in caplog.text
    assert models["safe"].labels == ("cat", "dog", "bird")
    assert models["pt"].labels == ("0", "1", "2")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        for name in ("pt", "safe", "wrapped"):
            assert torch.allclose(models[name].module(x), expected, atol=1e-5), name
    conv1 = models["gray"].module.get_submodule("conv1")
    assert isinstance(conv1, torch.nn.Conv2d) and conv1.in_channels == 1
    assert models["gray"].mean == (pytest.approx(0.449, abs=1e-3),)
    assert models["custom"].default_layer == "features"
    assert models["custom"].num_classes == 2
    assert all(not p.requires_grad for m in models.values() for p in m.module.parameters())
    assert all(not m.module.training for m in models.values())


def test_settings_from_env_name_the_variable() -> None:
    settings = Settings.from_env({"GRADCAM_DEVICE": "cpu", "GRADCAM_MAX_IMAGES_PER_REQUEST": "4"})
    assert settings.device == "cpu" and settings.max_images_per_request == 4
    with pytest.raises(ConfigError, match="GRADCAM_MAX_IMAGES_PER_REQUEST"):
        Settings.from_env({"GRADCAM_MAX_IMAGES_PER_REQUEST": "many"})
    with pytest.raises(ConfigError, match="GRADCAM_DEVICE"):
        Settings.from_env({"GRADCAM_DEVICE": "tpu"})


def test_local_torchvision_weights_get_torchvision_class_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No internet, a checkpoint file, no labels file: the ImageNet names torchvision
    ships with its weight enums are used (offline), not class indices."""
    torch.save(seeded_model("squeezenet1_1", num_classes=1000).state_dict(), tmp_path / "w.pth")
    path = _write(tmp_path, '[models.m]\narch = "squeezenet1_1"\nweights = "w.pth"\n')
    with caplog.at_level(logging.INFO, logger="service.engine.loading"):
        model = load_model("m", load_models_file(path))
    assert len(model.labels) == 1000
    assert model.labels[0] == "tench" and model.labels[207] == "golden retriever"
    assert "class names from torchvision's" in caplog.text
    # Another number of outputs: indices, as before (the names would be wrong).
    torch.save(seeded_model("squeezenet1_1", num_classes=3).state_dict(), tmp_path / "w3.pth")
    path = _write(
        tmp_path, '[models.m]\narch = "squeezenet1_1"\nweights = "w3.pth"\nnum_classes = 3\n'
    )
    assert load_model("m", load_models_file(path)).labels == ("0", "1", "2")
