"""Models of timm, Hugging Face transformers and MONAI, named in a models file: built
with their libraries, their weights read, their inputs preprocessed as their own
libraries do it (pixel for pixel on the same image), their logits found whatever their
forward pass returns, and every mistake named at load."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from service.contract.errors import ConfigError
from service.contract.models_file import load_models_file
from service.engine.batch_inputs import batch_inputs, normaliser
from service.engine.loading.models import LoadedModel, load_model
from service.pipeline.images import ImageSlot, Keep, prepare_image
from service.transport.interface import Job


def _load(tmp_path: Path, table: str, name: str = "m") -> LoadedModel:
    path = tmp_path / "models.toml"
    path.write_text(textwrap.dedent(table))
    return load_model(name, load_models_file(path))


def _photo(width: int = 301, height: int = 203, seed: int = 0) -> Image.Image:
    """A colour image with detail at every scale, of odd size (crops round)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    smooth = np.stack([np.sin(9 * x), np.cos(7 * y), np.sin(5 * (x + y))], axis=2) * 0.4 + 0.5
    noisy = np.clip(smooth + rng.normal(0, 0.08, smooth.shape), 0, 1)
    return Image.fromarray((noisy * 255).astype(np.uint8))


def _our_input(model: LoadedModel, image: Image.Image) -> torch.Tensor:
    """The tensor the service feeds ``model`` for ``image``: the HTTP side's fitting, the
    engine's normalisation."""
    info = model.info()
    buffer = _png(image)
    prepared = prepare_image(buffer, ImageSlot(0, [None]), info, lambda w, h: None, Keep())
    job = Job(
        model.name, model.default_layer, [prepared.pixels], [prepared.box], [[None]], ["gradcam"]
    )
    return batch_inputs(model, job, model.device, normaliser(model, model.device))


def _png(image: Image.Image) -> bytes:
    import io

    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# --- timm ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "convnext_atto", "deit_tiny_distilled_patch16_224"])
def test_a_timm_model_is_preprocessed_as_timm_does_it(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    reference = timm.create_model(arch, pretrained=False, num_classes=3).eval()
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    model = _load(
        tmp_path,
        f"""
        [models.m]
        library = "timm"
        arch = "{arch}"
        weights = "w.safetensors"
        num_classes = 3
        """,
    )
    config = timm.data.resolve_model_data_config(reference)
    assert model.input_size == config["input_size"][1:]
    assert model.preprocessing.interpolation == config["interpolation"]
    assert model.preprocessing.crop_pct == pytest.approx(config["crop_pct"])
    assert model.preprocessing.sources["mean"] == "timm's data config"
    image = _photo()
    theirs = timm.data.create_transform(**config)(image)[None]
    ours = _our_input(model, image)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    with torch.no_grad():
        assert torch.allclose(model.module(ours), reference(theirs), atol=1e-4)


def test_the_models_file_overrides_timms_config_key_by_key(tmp_path: Path) -> None:
    model = _load(
        tmp_path,
        """
        [models.m]
        library = "timm"
        arch = "resnet18"
        num_classes = 2
        input_size = [160, 192]
        interpolation = "bilinear"
        """,
    )
    shape = model.preprocessing
    assert shape.input_size == (160, 192) and shape.interpolation == "bilinear"
    assert shape.sources["input_size"] == "models file"
    crop_pct = timm.data.resolve_model_data_config(model.module)["crop_pct"]
    assert shape.sources["crop_pct"] == "timm's data config" and shape.crop_pct == crop_pct
    # floor(size / crop_pct), as timm computes it
    assert shape.scale_size == (int(160 // crop_pct), int(192 // crop_pct))


def test_a_timm_model_built_for_another_size_is_fed_that_size(tmp_path: Path) -> None:
    """timm's data config names the size the weights were trained at (224 for this ViT,
    518 for DINOv2's), which a ViT built for another refuses: ``img_size`` in
    ``arch_args`` is its input, as timm resolves a size it is given (before: "a forward
    pass on a (1, 3, 224, 224) input failed (Input height (224) doesn't match model
    (48).)")."""
    kwargs: dict[str, Any] = {"img_size": (48, 64), "embed_dim": 24, "num_heads": 2, "depth": 1}
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=3, **kwargs).eval()
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    model = _load(
        tmp_path,
        """
        [models.m]
        library = "timm"
        arch = "vit_tiny_patch16_224"
        arch_args = { img_size = [48, 64], embed_dim = 24, num_heads = 2, depth = 1 }
        weights = "w.safetensors"
        num_classes = 3
        """,
    )
    assert model.input_size == (48, 64)
    assert model.preprocessing.sources["input_size"] == "arch_args (img_size)"
    assert model.preprocessing.sources["crop_pct"] == "timm's data config"
    config = timm.data.resolve_model_data_config(reference, args={"input_size": (3, 48, 64)})
    image = _photo()
    theirs = timm.data.create_transform(**config)(image)[None]
    ours = _our_input(model, image)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    with torch.no_grad():
        assert torch.allclose(model.module(ours), reference(theirs), atol=1e-4)
    square = _load(
        tmp_path,
        '[models.m]\nlibrary = "timm"\narch = "vit_tiny_patch16_224"\n'
        "arch_args = { img_size = 32, depth = 1 }\n",
    )
    assert square.input_size == (32, 32)


def test_timm_names_imagenets_classes_offline(tmp_path: Path) -> None:
    model = _load(tmp_path, '[models.m]\nlibrary = "timm"\narch = "resnet18"\n')
    assert model.num_classes == 1000 and model.labels[0] == "tench, Tinca tinca"


# --- Hugging Face transformers -------------------------------------------------------


def _vit_folder(folder: Path, labels: dict[int, str], size: int = 32) -> nn.Module:
    torch.manual_seed(0)
    settings: dict[str, Any] = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": size,
        "patch_size": 8,
        "num_labels": len(labels),
        "id2label": labels,
        "label2id": {v: k for k, v in labels.items()},
    }
    config = transformers.ViTConfig(**settings)
    model = transformers.ViTForImageClassification(config).eval()
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    return model


def test_a_hugging_face_folder_is_served_as_its_processor_and_config_say(tmp_path: Path) -> None:
    reference = _vit_folder(tmp_path / "vit", {0: "cat", 1: "dog", 2: "bird"})
    model = _load(tmp_path, '[models.m]\nlibrary = "transformers"\narch = "vit"\n')
    assert model.labels == ("cat", "dog", "bird")
    assert model.input_size == (32, 32) and model.preprocessing.resize == "stretch"
    assert model.preprocessing.mean == pytest.approx((0.5, 0.5, 0.5))
    assert model.preprocessing.sources["mean"] == "the Hugging Face image processor"
    image = _photo()
    processor = transformers.ViTImageProcessorPil.from_pretrained(tmp_path / "vit")
    theirs = processor(images=image, return_tensors="pt")["pixel_values"]
    ours = _our_input(model, image)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    with torch.no_grad():
        logits = model.module(ours)  # a tensor: the ModelOutput's logits
        assert torch.allclose(logits, reference(pixel_values=theirs).logits, atol=1e-5)


@pytest.mark.parametrize(
    ("processor", "args"),
    [
        # Each resizes one of the two widths to an odd margin around its 64 × 64 cut.
        ("BitImageProcessorPil", {"size": {"shortest_edge": 72}}),
        ("ConvNextImageProcessorPil", {"size": {"shortest_edge": 64}, "crop_pct": 0.875}),
        ("DeiTImageProcessorPil", {"size": {"height": 71, "width": 69}}),
    ],
)
@pytest.mark.parametrize("width", [300, 301])
def test_a_processor_s_centre_cut_is_its_own_at_odd_margins(
    tmp_path: Path, processor: str, args: dict[str, Any], width: int
) -> None:
    # Hugging Face cuts at (size - crop) // 2 where torchvision rounds half to even: at an
    # odd margin the two inputs are one pixel apart (1.8 in normalised units).
    _vit_folder(tmp_path / "vit", {0: "a", 1: "b"}, size=64)
    made = getattr(transformers, processor)(crop_size={"height": 64, "width": 64}, **args)
    made.save_pretrained(tmp_path / "vit")
    model = _load(tmp_path, '[models.m]\nlibrary = "transformers"\narch = "vit"\n')
    image = _photo(width=width, height=203)
    theirs = made(images=image, return_tensors="pt")["pixel_values"]
    ours = _our_input(model, image)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_multi_label_from_the_config(tmp_path: Path) -> None:
    _vit_folder(tmp_path / "vit", {0: "a", 1: "b"})
    config = transformers.AutoConfig.from_pretrained(tmp_path / "vit")
    config.problem_type = "multi_label_classification"
    config.save_pretrained(tmp_path / "vit")
    assert _load(tmp_path, '[models.m]\nlibrary = "transformers"\narch = "vit"\n').multilabel


# --- MONAI ----------------------------------------------------------------------------


def test_a_monai_densenet_takes_its_channels_and_classes_by_its_own_names(tmp_path: Path) -> None:
    model = _load(
        tmp_path,
        """
        [models.m]
        library = "monai"
        arch = "DenseNet121"
        arch_args = { in_channels = 1, out_channels = 4 }
        input_size = [64, 64]
        """,
    )
    assert model.channels == 1 and model.num_classes == 4
    assert model.mean == (0.0,) and model.std == (1.0,)
    assert model.preprocessing.sources["channels"] == "MONAI (intensities in [0, 1])"


@pytest.mark.parametrize(
    ("arch", "args", "first_conv"),
    [
        # resnet18(pretrained, progress, **kwargs) -> ResNet: ResNet's own names.
        ("resnet18", "", "conv1"),
        # SEResNet50(layers, ..., **kwargs): SENet's spatial_dims, in_channels, num_classes.
        ("SEResNet50", "arch_args = { layers = [1, 1, 1, 1] }", "layer0.conv1"),
    ],
)
def test_a_monai_network_taking_kwargs_is_2d_with_the_file_s_channels_and_classes(
    tmp_path: Path, arch: str, args: str, first_conv: str
) -> None:
    model = _load(
        tmp_path,
        f"""
        [models.m]
        library = "monai"
        arch = "{arch}"
        {args}
        channels = 1
        num_classes = 4
        input_size = [64, 64]
        """,
    )
    conv = model.module.get_submodule(first_conv)
    assert isinstance(conv, torch.nn.Conv2d) and conv.in_channels == 1
    assert model.num_classes == 4


def test_a_monai_vit_answers_its_logits_not_its_hidden_states(tmp_path: Path) -> None:
    model = _load(
        tmp_path,
        """
        [models.m]
        library = "monai"
        arch = "ViT"
        arch_args.in_channels = 1
        arch_args.img_size = [32, 32]
        arch_args.patch_size = [8, 8]
        arch_args.hidden_size = 48
        arch_args.mlp_dim = 96
        arch_args.num_layers = 2
        arch_args.num_heads = 2
        arch_args.classification = true
        arch_args.num_classes = 3
        input_size = [32, 32]
        layout = "tokens"
        prefix_tokens = 1
        """,
    )
    out = model.module(torch.rand(2, 1, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)
    # Declared tokens: what its last attention (an SABlock) reads, not its final norm,
    # whose patch tokens never reach the head (its class token alone does).
    assert model.default_layer == "blocks.1.norm1"


# --- mistakes, named at load -----------------------------------------------------------


@pytest.mark.parametrize(
    "table, says",
    [
        (
            'library = "timm"\narch = "convnxt_tiny"',
            ["key 'arch'", "timm has no model", "convnext_tiny"],
        ),
        (
            'library = "timm"\narch = "resnet18"\narch_args = { wings = 2 }',
            ["key 'arch_args'", "resnet18(wings=2) failed"],
        ),
        (
            'library = "monai"\narch = "DenseNet12"',
            ["monai.networks.nets has no network", "DenseNet121"],
        ),
        ('library = "transformers"\narch = "./nowhere"', ["key 'arch'", "is not a folder"]),
        ('library = "timm"\narch = "my.pkg:factory"', ['with library = "torchvision"']),
    ],
)
def test_a_library_mistake_names_the_model_and_key(
    tmp_path: Path, table: str, says: list[str]
) -> None:
    with pytest.raises(ConfigError) as refused:
        _load(tmp_path, f"[models.m]\n{table}\n")
    for text in says:
        assert text in str(refused.value), str(refused.value)


def test_a_folder_without_a_config_is_named(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        _load(tmp_path, '[models.m]\nlibrary = "transformers"\narch = "hf"\n')


def test_a_library_not_installed_names_its_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "monai", None)  # import monai now fails
    with pytest.raises(ConfigError, match=r"pip install 'gradcam-service\[monai\]'"):
        _load(tmp_path, '[models.m]\nlibrary = "monai"\narch = "DenseNet121"\n')


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> Any:
        pooled = self.conv(x).mean(dim=(2, 3))
        return {"coarse": self.a(pooled), "fine": self.b(pooled)}


def two_heads(num_classes: int | None = None) -> nn.Module:
    return _TwoHeads()


def test_ambiguous_outputs_are_named_and_the_models_file_chooses(tmp_path: Path) -> None:
    table = f'[models.m]\narch = "{__name__}:two_heads"\ninput_size = [32, 32]\n'
    with pytest.raises(ConfigError, match=r"key 'logits'.*'coarse': \(1, 3\).*'fine': \(1, 5\)"):
        _load(tmp_path, table)
    model = _load(tmp_path, table + 'logits = "fine"\n')
    assert model.num_classes == 5


def test_a_file_of_another_librarys_architecture_says_which(tmp_path: Path) -> None:
    """timm's convnext_tiny under torchvision's name fits none of its keys: the error
    says whose keys they are (before: "182 of the model's 182 keys are missing")."""
    torch.manual_seed(0)
    save_file(timm.create_model("convnext_tiny").state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "hf").mkdir()
    _vit_folder(tmp_path / "hf", {0: "a", 1: "b"})
    with pytest.raises(ConfigError, match=r"its keys are those of timm's \"convnext_tiny\""):
        _load(tmp_path, '[models.m]\narch = "convnext_tiny"\nweights = "w.safetensors"\n')
    with pytest.raises(ConfigError, match=r'timm has a model of that name: library = "timm"'):
        _load(tmp_path, '[models.m]\narch = "convnext_atto"\n')
    with pytest.raises(ConfigError, match=r"its keys are a Hugging Face vit model's"):
        _load(tmp_path, '[models.m]\narch = "resnet18"\nweights = "hf/model.safetensors"\n')
