"""Models as radiology teams bring them: CheXNet-style checkpoints (``.pth.tar``,
wrapped, ``module.``-prefixed, a Sigmoid head), Lightning ``.ckpt`` files, factories
shipped next to the models file, outputs that are already probabilities, and
scores that saturate and tie."""

from __future__ import annotations

import io
import logging
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from service.contract.errors import ConfigError
from service.contract.models_file import load_models_file
from service.contract.requests import ExplainRequest
from service.contract.settings import Settings
from service.engine.loading.models import load_model
from service.engine.runtime import Runtime
from service.pipeline.explain import explain
from tests.helpers import as_json, encode, phantom_png, png_bytes

FINDINGS = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
]

# A CheXNet-style model as such projects write it: torchvision's DenseNet-121 inside
# a class of their own, and a head that ends in a Sigmoid. Written next to the models
# file under a name unique to each test (no PYTHONPATH, nothing cached between tests).
_CHEXNET = '''
import torch
import torchvision
from torch import nn


class DenseNet121(nn.Module):
    def __init__(self, num_classes=14):
        super().__init__()
        self.densenet121 = torchvision.models.densenet121(weights=None)
        features = self.densenet121.classifier.in_features
        self.densenet121.classifier = nn.Sequential(nn.Linear(features, num_classes), nn.Sigmoid())

    def forward(self, x):
        return self.densenet121(x)


class Functional(DenseNet121):
    """The same weights with the sigmoid as a function call: no module to read logits from."""

    def forward(self, x):
        return torch.sigmoid(self.densenet121.classifier[0](
            torch.flatten(nn.functional.adaptive_avg_pool2d(nn.functional.relu(
                self.densenet121.features(x)), 1), 1)))


def chexnet(num_classes=14):
    return DenseNet121(num_classes)


def chexnet_logits(num_classes=14):
    """The same weights without the Sigmoid: what the service should see."""
    model = DenseNet121(num_classes)
    model.densenet121.classifier[1] = nn.Identity()
    return model


def functional(num_classes=14):
    return Functional(num_classes)


def saturated(num_classes=3):
    """Logits near 25, 30 and 20: sigmoid scores that are all exactly 1.0 in float32."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, num_classes))
    with torch.no_grad():
        model[0].weight.fill_(0.1)
        model[4].weight.fill_(0.001)
        model[4].bias.copy_(torch.tensor([25.0, 30.0, 20.0]))
    return model
'''


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``build()`` with its default initialisation drawn from ``seed``."""
    torch.manual_seed(seed)
    return build().eval()


@pytest.fixture
def project(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, str]]:
    """A folder with the factory module (a unique name) and a labels file."""
    module = f"chexnet_{abs(hash(request.node.name)) % 10**8}"
    (tmp_path / f"{module}.py").write_text(_CHEXNET)
    (tmp_path / "labels.txt").write_text("\n".join(FINDINGS) + "\n")
    yield tmp_path, module


def _models_file(folder: Path, body: str) -> Path:
    path = folder / "models.toml"
    path.write_text(textwrap.dedent(body))
    return path


def _chexnet_checkpoint(folder: Path, module: str) -> Path:
    """A seeded CheXNet-style model saved as such projects share it: DataParallel's
    ``module.`` prefix, training state around the weights, a ``.pth.tar`` name."""
    import importlib
    import sys

    sys.path.insert(0, str(folder))
    try:
        model = _seeded(importlib.import_module(module).chexnet)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(module, None)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = folder / "model.pth.tar"
    torch.save(
        {
            "epoch": 7,
            "arch": "densenet121",
            "state_dict": state,
            "best_loss": 0.19,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
        },
        path,
    )
    return path


def _spec(module: str, factory: str, weights: str, output: str | None) -> str:
    output_line = f'output = "{output}"' if output else ""
    return f'''
        [models.chexnet]
        arch = "{module}:{factory}"
        weights = "{weights}"
        labels = "labels.txt"
        multilabel = true
        input_size = [64, 64]
        {output_line}
        '''


def _serve(folder: Path, module: str, factory: str, weights: str, output: str | None) -> Runtime:
    path = _models_file(folder, _spec(module, factory, weights, output))
    return Runtime(Settings(device="cpu", models_file=path)).start()


def _answer(runtime: Runtime, image: bytes) -> tuple[np.ndarray, np.ndarray, int]:
    """(scores by class, the top-1 class's heatmap at layer size, the top-1 class)."""
    request = ExplainRequest.model_validate(
        {"images": [encode(image)], "top_k": 14, "heatmap": {"format": "array", "size": "layer"}}
    )
    result = as_json(explain(request, runtime, runtime.settings))["results"][0]
    scores = np.zeros(len(FINDINGS))
    for prediction in result["predictions"]:
        scores[prediction["index"]] = prediction["score"]
    explanation = result["explanations"][0]
    return scores, np.asarray(explanation["heatmap"]["values"]), explanation["target"]["index"]


@pytest.mark.slow
def test_a_chexnet_checkpoint_loads_as_it_was_shared(
    project: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    folder, module = project
    _chexnet_checkpoint(folder, module)
    image = phantom_png(5, 80, 64)
    with caplog.at_level(logging.INFO):
        shared = _serve(folder, module, "chexnet", "model.pth.tar", "probabilities")
    try:
        assert "stripped the prefix 'module.'" in caplog.text
        assert "scores from the input of its final Sigmoid" in caplog.text
        scores, heat, top = _answer(shared, image)
    finally:
        shared.close()
    # What the service must see: the same weights without the Sigmoid, as logits.
    plain = _serve(folder, module, "chexnet_logits", "model.pth.tar", None)
    try:
        want_scores, want_heat, want_top = _answer(plain, image)
    finally:
        plain.close()
    assert np.allclose(scores, want_scores, atol=1e-6) and top == want_top
    assert np.allclose(heat, want_heat, atol=1e-5)
    assert scores.max() - scores.min() > 0.05


def test_probabilities_taken_for_logits_are_warned_about(
    project: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    folder, module = project
    _chexnet_checkpoint(folder, module)
    with caplog.at_level(logging.WARNING):
        doubled = _serve(folder, module, "chexnet", "model.pth.tar", None)
    try:
        scores, _, _ = _answer(doubled, phantom_png(5, 80, 64))
    finally:
        doubled.close()
    assert "ends in a Sigmoid module" in caplog.text and 'output = "probabilities"' in caplog.text
    # The symptom the warning is about: a second sigmoid squeezes every score.
    assert scores.min() >= 0.5 and scores.max() <= 0.7311


@pytest.mark.slow
def test_a_functional_sigmoid_is_undone(
    project: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    folder, module = project
    _chexnet_checkpoint(folder, module)
    image = phantom_png(6, 64, 64)
    with caplog.at_level(logging.WARNING):
        functional = _serve(folder, module, "functional", "model.pth.tar", "probabilities")
    try:
        scores, heat, top = _answer(functional, image)
    finally:
        functional.close()
    assert "no final Sigmoid/Softmax module" in caplog.text
    plain = _serve(folder, module, "chexnet_logits", "model.pth.tar", None)
    try:
        want_scores, want_heat, want_top = _answer(plain, image)
    finally:
        plain.close()
    assert np.allclose(scores, want_scores, atol=1e-5) and top == want_top
    assert np.corrcoef(heat.ravel(), want_heat.ravel())[0, 1] > 0.999


def test_a_prefix_that_does_not_fit_is_shown_briefly(project: tuple[Path, str]) -> None:
    """torchvision's densenet121 for a CheXNet checkpoint: the likely prefix and the few
    keys that still differ (its head is a Sequential), not 700 keys."""
    folder, module = project
    _chexnet_checkpoint(folder, module)
    path = _models_file(
        folder,
        """
        [models.m]
        arch = "densenet121"
        num_classes = 14
        weights = "model.pth.tar"
        """,
    )
    with pytest.raises(ConfigError) as refused:
        load_model("m", load_models_file(path))
    message = str(refused.value)
    assert "stripping 'module.densenet121.' (the likely prefix)" in message
    assert "missing: classifier.bias, classifier.weight" in message
    assert "unexpected: classifier.0.bias, classifier.0.weight" in message
    assert len(message) < 700, message


@pytest.mark.slow
def test_checkpoints_are_read_by_content(tmp_path: Path) -> None:
    """Every way these files come, under any extension, gives the same weights."""
    model = _seeded(torchvision_resnet, seed=3)
    state = model.state_dict()
    files = {
        "plain.pt": lambda p: torch.save(state, p),
        "wrapped.pth.tar": lambda p: torch.save({"epoch": 1, "state_dict": state}, p),
        "lightning.ckpt": lambda p: torch.save(
            {
                "epoch": 1,
                "global_step": 10,
                "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in state.items()},
                "hyper_parameters": {"lr": 0.01},
            },
            p,
        ),
        "net.bin": lambda p: torch.save({"net": state, "optimizer": {}}, p),
        "model-key.pth": lambda p: torch.save({"model": state, "args": {"arch": "x"}}, p),
        "safetensors-named.pt": lambda p: save_file(
            {k: v.contiguous() for k, v in state.items()}, str(p)
        ),
        "no-extension": lambda p: torch.save(state, p),
    }
    for name, write in files.items():
        write(tmp_path / name)
        path = _models_file(
            tmp_path,
            f'''
            [models.m]
            arch = "resnet18"
            num_classes = 3
            weights = "{name}"
            input_size = [64, 64]
            ''',
        )
        loaded = load_model("m", load_models_file(path))
        for key, value in loaded.module.state_dict().items():
            assert torch.equal(value, state[key]), (name, key)


def test_a_pickled_model_is_refused_with_a_way_out(tmp_path: Path) -> None:
    torch.save(torchvision_resnet(), tmp_path / "whole-model.pth")
    path = _models_file(
        tmp_path,
        """
        [models.m]
        arch = "resnet18"
        num_classes = 3
        weights = "whole-model.pth"
        """,
    )
    with pytest.raises(ConfigError) as refused:
        load_model("m", load_models_file(path))
    assert "save model.state_dict() instead" in str(refused.value)
    # Never torch's advice to unpickle anyway (that would run code from the file).
    assert "weights_only" not in str(refused.value)


def torchvision_resnet() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=3)


def test_factories_next_to_the_models_file_need_no_pythonpath(project: tuple[Path, str]) -> None:
    folder, module = project
    path = _models_file(
        folder,
        f'''
        [models.m]
        arch = "{module}:chexnet_logits"
        num_classes = 14
        input_size = [64, 64]
        ''',
    )
    import sys

    assert str(folder) not in sys.path
    loaded = load_model("m", load_models_file(path))
    assert loaded.num_classes == 14
    assert str(folder) not in sys.path  # looked there for the import only


def test_one_ranking_when_scores_saturate_and_tie(project: tuple[Path, str]) -> None:
    """predictions[0] is the class explained by default, even when every score is 1.0."""
    folder, module = project
    path = _models_file(
        folder,
        f'''
        [models.m]
        arch = "{module}:saturated"
        num_classes = 3
        multilabel = true
        channels = 1
        input_size = [32, 32]
        ''',
    )
    runtime = Runtime(Settings(device="cpu", models_file=path)).start()
    try:
        request = ExplainRequest.model_validate(
            {"images": [encode(phantom_png(1, 40, 40))], "heatmap": {"format": "none"}}
        )
        result = as_json(explain(request, runtime, runtime.settings))["results"][0]
    finally:
        runtime.close()
    assert [p["score"] for p in result["predictions"]] == [1.0, 1.0, 1.0]
    assert [p["index"] for p in result["predictions"]] == [1, 0, 2]  # by logit
    assert result["explanations"][0]["target"]["index"] == 1


# torchxrayvision as a radiology team would serve it offline: the architecture from
# the package, the weights from a file converted once where the internet is (its own
# download needs GitHub), its calibration (op_threshs) kept, its preprocessing as
# models-file keys: 1 channel, (2·x − 1)·1024 = (x − 0.5) / (1/2048), centre crop.
_XRV_FACTORY = """
import torch
import torchxrayvision as xrv


def densenet_all(num_classes=18):
    model = xrv.models.DenseNet(weights=None, num_classes=num_classes)
    # A buffer, so the converted state_dict (with its op_threshs) fits exactly.
    model.op_threshs = torch.zeros(num_classes)
    return model


def densenet_logits(num_classes=18):
    return xrv.models.DenseNet(weights=None, num_classes=num_classes)
"""


@pytest.mark.slow
def test_a_torchxrayvision_model_with_its_own_preprocessing(tmp_path: Path) -> None:
    xrv = pytest.importorskip("torchxrayvision")
    (tmp_path / "xrv_models.py").write_text(_XRV_FACTORY)
    labels = xrv.models.model_urls["densenet121-res224-all"]["labels"]
    thresholds = xrv.models.model_urls["densenet121-res224-all"]["op_threshs"]
    (tmp_path / "xrv-labels.txt").write_text("\n".join(labels) + "\n")
    # What the one-off conversion yields: the model's state_dict, thresholds included.
    image = np.asarray(Image.open(io.BytesIO(phantom_png(9, 560, 448))))  # not square
    pixels = xrv.datasets.normalize(image.astype(np.float32), 255)[None]
    pixels = xrv.datasets.XRayResizer(224)(xrv.datasets.XRayCenterCrop()(pixels))
    inputs = torch.from_numpy(pixels)[None].float()
    torch.manual_seed(4)
    reference = xrv.models.DenseNet(weights=None).eval()
    with torch.no_grad():  # random weights on ±1024 inputs saturate: scale the head down
        logits = reference(inputs)
        reference.classifier.weight *= 2 / logits.std()
        reference.classifier.bias -= reference(inputs).mean()
    reference.op_threshs = torch.tensor(thresholds)
    torch.save(reference.state_dict(), tmp_path / "xrv-densenet121-all.pt")
    path = _models_file(
        tmp_path,
        """
        [models.xrv]
        arch = "xrv_models:densenet_all"
        weights = "xrv-densenet121-all.pt"
        labels = "xrv-labels.txt"
        multilabel = true
        output = "probabilities"
        channels = 1
        input_size = [224, 224]
        mean = [0.5]
        std = [0.00048828125]
        resize = "crop"
        """,
    )
    runtime = Runtime(Settings(device="cpu", models_file=path)).start()
    try:
        request = ExplainRequest.model_validate(
            {
                "images": [encode(png_bytes(image))],
                "top_k": 18,
                "heatmap": {"format": "array", "size": "layer"},
            }
        )
        result = as_json(explain(request, runtime, runtime.settings))["results"][0]
    finally:
        runtime.close()
    assert result["geometry"]["box"] == [56.0, 0.0, 504.0, 448.0]  # the centre square
    # torchxrayvision's own pipeline on the same image: normalize, centre crop, resize.
    with torch.no_grad():
        theirs = reference(inputs)[0].numpy()
    ours = np.zeros(len(labels))
    for prediction in result["predictions"]:
        ours[prediction["index"]] = prediction["score"]
    # Calibrated like theirs (op_norm), not squeezed by a second sigmoid; resizers differ.
    assert np.abs(ours - theirs).max() < 0.01, np.abs(ours - theirs).max()
    assert [p["index"] for p in result["predictions"]][:3] == list(np.argsort(-theirs))[:3]
    heat = np.asarray(result["explanations"][0]["heatmap"]["values"])
    assert heat.shape == (7, 7) and heat.max() == pytest.approx(1.0)
    # The calibration only rescales the score's gradient: the same map as the logits'.
    state = reference.state_dict()
    del state["op_threshs"]
    torch.save(state, tmp_path / "xrv-logits.pt")
    text = (
        path.read_text()
        .replace("densenet_all", "densenet_logits")
        .replace("xrv-densenet121-all.pt", "xrv-logits.pt")
        .replace('output = "probabilities"', "")
    )
    path.write_text(text)
    runtime = Runtime(Settings(device="cpu", models_file=path)).start()
    try:
        target = result["explanations"][0]["target"]["index"]
        logits_result = as_json(
            explain(
                ExplainRequest.model_validate(
                    {
                        "images": [encode(png_bytes(image))],
                        "targets": [target],
                        "heatmap": {"format": "array", "size": "layer"},
                    }
                ),
                runtime,
                runtime.settings,
            )
        )["results"][0]
    finally:
        runtime.close()
    plain = np.asarray(logits_result["explanations"][0]["heatmap"]["values"])
    assert np.corrcoef(heat.ravel(), plain.ravel())[0, 1] > 0.999
