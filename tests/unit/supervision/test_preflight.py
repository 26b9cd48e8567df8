"""``serve``'s checks before it starts anything (service/supervision/preflight.py): each mistake is
one line naming the file or setting and the fix."""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

import pytest
import torch

from service.contract.errors import ConfigError
from service.contract.models_file import load_models_file
from service.contract.settings import Settings
from service.supervision.preflight import check_device, check_model_files, check_port, preflight
from tests.helpers import REPO, free_port

DEMO = REPO / "service" / "demo"


def _models(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(body)
    return path


def test_a_port_in_use_is_named_with_the_fix() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is in use.*--port"):
            check_port("127.0.0.1", port)
    check_port("127.0.0.1", port)  # free again once closed


def test_a_host_that_is_not_here_is_named() -> None:
    with pytest.raises(ConfigError, match=r"cannot listen on 192\.0\.2\.1:8000.*--host"):
        check_port("192.0.2.1", 8000)  # TEST-NET-1: never an address of this machine


@pytest.mark.parametrize(
    "content, start",
    [
        (b"", "it is empty"),
        (b"<html>not found</html>", "the text '<html>not fo'"),
        (b"\x89PNG\r\n\x1a\n0000", "the bytes 89 50 4e 47"),
    ],
)
def test_a_weights_file_that_is_no_checkpoint_is_named(
    tmp_path: Path, content: bytes, start: str
) -> None:
    (tmp_path / "w.pth").write_bytes(content)
    models = load_models_file(
        _models(tmp_path, '[models.m]\narch = "resnet18"\nweights = "w.pth"\n')
    )
    with pytest.raises(ConfigError) as refused:
        check_model_files(models)
    message = str(refused.value)
    assert message.startswith(f"model 'm', key 'weights': {tmp_path / 'w.pth'} is not a checkpoint")
    assert start in message and "state_dict" in message and "weights_only" not in message


def test_checkpoints_of_every_format_pass(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {"w": torch.zeros(2)}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(state, str(tmp_path / "w.safetensors"))
    (tmp_path / "labels.txt").write_text("a\nb\n")
    for name in ("zip.pt", "legacy.pt", "w.safetensors"):
        body = f'[models.m]\narch = "resnet18"\nweights = "{name}"\nlabels = "labels.txt"\n'
        check_model_files(load_models_file(_models(tmp_path, body)))


def test_missing_files_are_named_by_their_key(tmp_path: Path) -> None:
    for body, message in (
        (
            'weights = "gone.pth"\n',
            "model 'm', key 'weights': weights file .*gone.pth does not exist",
        ),
        ('labels = "gone.txt"\n', "model 'm', key 'labels': labels file .*gone.txt does not exist"),
    ):
        models = load_models_file(_models(tmp_path, f'[models.m]\narch = "resnet18"\n{body}'))
        with pytest.raises(ConfigError, match=message):
            check_model_files(models)


def test_torchvision_weight_names_are_left_to_the_engine(tmp_path: Path) -> None:
    for name in ("DEFAULT", "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2"):
        body = f'[models.m]\narch = "resnet50"\nweights = "{name}"\n'
        check_model_files(load_models_file(_models(tmp_path, body)))


def _archives(folder: Path) -> None:
    """A TorchScript and a torch.export archive of one small model, and its state_dict."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten()).eval()
    example = torch.zeros(2, 3, 8, 8)
    with warnings.catch_warnings():  # torch.jit is deprecated in torch 2.x
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model), str(folder / "m.ts"))
    batch = {"input": {0: torch.export.Dim("batch")}}
    program = torch.export.export(model, (example,), dynamic_shapes=batch)
    torch.export.save(program, folder / "m.pt2")
    torch.save(model.state_dict(), folder / "m.pth")


def test_a_model_archive_given_as_weights_is_named(tmp_path: Path) -> None:
    _archives(tmp_path)
    for weights, says in (
        ("m.ts", "m.ts is a TorchScript archive; Grad-CAM cannot hook the layers"),
        ("m.pt2", 'm.pt2 is a torch.export archive, not a state_dict: .*arch = "m.pt2"'),
    ):
        body = f'[models.m]\narch = "resnet18"\nweights = "{weights}"\n'
        with pytest.raises(ConfigError, match=f"model 'm', key 'weights': .*{says}"):
            check_model_files(load_models_file(_models(tmp_path, body)))


def test_a_torch_export_archive_is_one_before_the_engine_reads_it(tmp_path: Path) -> None:
    _archives(tmp_path)
    (tmp_path / "cut.pt2").write_bytes((tmp_path / "m.pt2").read_bytes()[:300])
    for arch, says in (
        ("m.ts", "m.ts is a TorchScript archive;.*Ship its state_dict"),
        ("m.pth", r"m.pth is a checkpoint \(a state_dict\), not a torch.export archive"),
        ("cut.pt2", "cut.pt2 is a damaged zip archive"),
        ("gone.pt2", "torch.export archive .*gone.pt2 does not exist"),
    ):
        body = f'[models.m]\nlibrary = "torch.export"\narch = "{arch}"\n'
        with pytest.raises(ConfigError, match=f"model 'm', key 'arch': .*{says}"):
            check_model_files(load_models_file(_models(tmp_path, body)))
    body = '[models.m]\nlibrary = "torch.export"\narch = "m.pt2"\n'
    check_model_files(load_models_file(_models(tmp_path, body)))


def test_cuda_without_a_gpu_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "service.supervision.preflight._GPU_DEVICES", (Path("/nonexistent/nvidiactl"),)
    )
    with pytest.raises(ConfigError, match=r"device cuda was asked for.*--device cpu"):
        check_device("cuda")
    check_device("cpu")
    check_device("auto")


def test_the_demo_passes(tmp_path: Path) -> None:
    preflight(Settings(port=free_port()))
