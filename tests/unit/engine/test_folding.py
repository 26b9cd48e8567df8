"""Batch norm folded into convolutions at load (``engine/folding.py``): the same model,
the same maps at every kind of layer, only the pairs that can be folded, and the option
that turns it off."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from service.contract.requests import ExplainRequest
from service.contract.settings import Settings
from service.contract.terms import METHODS
from service.engine.folding import fold_batch_norms, folded_affine
from service.engine.gradcam import GradCAM
from service.engine.runtime import Runtime
from service.pipeline.explain import explain
from tests.helpers import REPO, as_json, encode, phantom_png, seeded_model

DEMO = REPO / "service" / "demo" / "models.toml"


def _with_statistics(model: nn.Module) -> nn.Module:
    """Batch norms with running statistics and affine parameters far from the identity,
    as trained ones are (a fresh model's are 0/1 and would hide a wrong fold)."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
            module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.copy_(torch.rand(c, generator=generator) * 0.4 - 0.2)
    return model


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module]:
    plain = _with_statistics(seeded_model("resnet18", num_classes=10))
    folded = copy.deepcopy(plain)
    names = fold_batch_norms(folded)
    # Every convolution of a ResNet-18 is followed by its own batch norm: 20 of them.
    assert len(names) == 20 and "conv1" in names and "layer2.0.downsample.0" in names
    return plain, folded


@pytest.fixture(scope="module")
def pair64() -> tuple[nn.Module, nn.Module]:
    plain = _with_statistics(seeded_model("resnet18", num_classes=10)).double()
    folded = copy.deepcopy(plain)
    fold_batch_norms(folded)
    return plain, folded


# Every method's maps of a (model, layer, dtype), or the error it raised: made by the first
# test that asks, in one batch of all the methods (which answers as separate calls do:
# test_gradcam.py's mixed batches), so 30 cases cost 6 batches per model.
_MAPS: dict[tuple[int, str, torch.dtype], dict[str, list[Tensor]] | ValueError] = {}


def _maps(model: nn.Module, inputs: Tensor, layer: str, method: str) -> list[Tensor]:
    key = (id(model), layer, inputs.dtype)
    if key not in _MAPS:
        n, methods = inputs.shape[0], list(METHODS)
        try:
            batch = GradCAM(model)(
                torch.cat([inputs] * len(methods)),
                layer,
                [[3]] * (n * len(methods)),
                [m for m in methods for _ in range(n)],
            )
            cams = [cams[0] for cams in batch.cams]
            _MAPS[key] = {m: cams[i * n : (i + 1) * n] for i, m in enumerate(methods)}
        except ValueError as error:
            _MAPS[key] = error
    found = _MAPS[key]
    if isinstance(found, ValueError):
        raise found
    return found[method]


def test_the_folded_model_computes_the_same_function(pair: tuple[nn.Module, nn.Module]) -> None:
    plain, folded = pair
    inputs = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    assert isinstance(folded.bn1, nn.Identity) and isinstance(plain.bn1, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(folded(inputs), plain(inputs), rtol=1e-4, atol=1e-5)
    # The names a models file or a request may use all still resolve.
    assert [n for n, _ in folded.named_modules()] == [n for n, _ in plain.named_modules()]


@pytest.mark.parametrize(
    "layer",
    [
        "layer4",  # a block that contains folded pairs
        "layer3.1.bn2",  # a batch norm, now an Identity returning the folded convolution
        "layer3.1.conv2",  # a folded convolution: explained before the batch norm it absorbed
        "conv1",
        "layer2.0.downsample.0",
        "layer3.1.relu",  # not part of any pair (runs twice per block: refused either way)
    ],
)
@pytest.mark.parametrize("method", METHODS)
def test_every_kind_of_layer_gives_the_same_maps(
    pair: tuple[nn.Module, nn.Module], pair64: tuple[nn.Module, nn.Module], layer: str, method: str
) -> None:
    inputs = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    plain, folded = pair
    try:
        expected = _maps(plain, inputs, layer, method)
    except ValueError as error:
        with pytest.raises(type(error)):
            _maps(folded, inputs, layer, method)
        return
    # The algebra, in float64: folding and undoing it change nothing but the last bits.
    plain64, folded64 = pair64
    for a, b in zip(
        _maps(plain64, inputs.double(), layer, method),
        _maps(folded64, inputs.double(), layer, method),
        strict=True,
    ):
        assert float((a - b).abs().max()) <= 1e-9 * max(float(a.abs().max()), 1e-12)
    # In float32 the two round differently: a pre-activation within rounding of zero may
    # then fall on the other side of a ReLU (here, once in layer2.1), which moves the
    # gradient before it by a small finite step. Any two float32 computations (channels
    # last against contiguous, two BLAS libraries) share this.
    for a, b in zip(expected, _maps(folded, inputs, layer, method), strict=True):
        assert float((a - b).abs().max()) <= 1e-2 * max(float(a.abs().max()), 1e-12)
        if a.std() > 0:
            assert float(torch.corrcoef(torch.stack([a.ravel(), b.ravel()]))[0, 1]) > 0.9999


class _Shared(nn.Module):
    """A convolution whose output feeds its batch norm *and* a skip: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        z = self.norm(y) + y
        z = self.norm2(self.conv2(z))
        return self.head(z.mean(dim=(2, 3)))


class _Untraceable(_Shared):
    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return super().forward(x)


def test_only_a_convolution_feeding_only_its_batch_norm_is_folded() -> None:
    model = _with_statistics(_Shared().eval().requires_grad_(False))
    assert fold_batch_norms(model) == ["conv2"]
    assert isinstance(model.norm, nn.BatchNorm2d) and isinstance(model.norm2, nn.Identity)
    assert folded_affine(model.get_submodule("conv")) is None
    assert folded_affine(model.get_submodule("conv2")) is not None


def test_a_batch_norm_that_cannot_be_undone_or_a_model_that_does_not_trace_stays() -> None:
    model = _with_statistics(_Shared().eval().requires_grad_(False))
    with torch.no_grad():
        norm2 = model.get_submodule("norm2")
        assert isinstance(norm2, nn.BatchNorm2d)
        norm2.weight[1] = 0.0  # a channel switched off: its input is unrecoverable
    assert fold_batch_norms(model) == []
    untraceable = _with_statistics(_Untraceable().eval().requires_grad_(False))
    before = copy.deepcopy(untraceable.state_dict())
    assert fold_batch_norms(untraceable) == []
    for key, value in untraceable.state_dict().items():
        assert torch.equal(value, before[key])


def _runtime(folder: Path, fold: bool) -> Runtime:
    folder.mkdir(parents=True, exist_ok=True)
    text = DEMO.read_text().replace(
        '"phantom_net.safetensors"', f'"{DEMO.parent / "phantom_net.safetensors"}"'
    )
    text = text.replace('"labels.txt"', f'"{DEMO.parent / "labels.txt"}"')
    text += f"fold_batch_norm = {'true' if fold else 'false'}\n"
    (folder / "models.toml").write_text(text)
    return Runtime(Settings(models_file=folder / "models.toml", device="cpu")).start()


def test_the_service_folds_unless_told_not_to_and_answers_the_same(tmp_path: Path) -> None:
    folded, plain = _runtime(tmp_path / "on", True), _runtime(tmp_path / "off", False)
    try:
        modules = [dict(rt.models["phantom"].module.named_modules()) for rt in (folded, plain)]
        assert any(folded_affine(m) is not None for m in modules[0].values())
        assert not any(folded_affine(m) is not None for m in modules[1].values())
        # The layers the model detail lists were found before folding: unchanged.
        assert folded.catalog().get("phantom").layers == plain.catalog().get("phantom").layers
        images = [encode(phantom_png(seed, 128, 128)) for seed in range(4)]
        request = ExplainRequest.model_validate(
            {"images": images, "heatmap": {"format": "array", "size": "layer"}}
        )
        a, b = (as_json(explain(request, rt, rt.settings)) for rt in (folded, plain))
        for x, y in zip(a["results"], b["results"], strict=True):
            assert [p["index"] for p in x["predictions"]] == [p["index"] for p in y["predictions"]]
            for p, q in zip(x["predictions"], y["predictions"], strict=True):
                assert abs(p["score"] - q["score"]) <= 1e-5
            mx = np.asarray(x["explanations"][0]["heatmap"]["values"])
            my = np.asarray(y["explanations"][0]["heatmap"]["values"])
            assert np.abs(mx - my).max() <= 1e-4
    finally:
        folded.close()
        plain.close()
