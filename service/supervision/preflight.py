"""What ``serve`` checks before it starts anything: each mistake in well under a second,
as one line that names the file or setting and the fix, instead of after the engines
have loaded their models (which takes seconds to minutes).

Checked here, without torch: the port can be bound; the models file exists and is
valid; every weights and labels file it names exists and can be read, and each weights
file is a checkpoint by its first bytes (not a model archive), and every torch.export
archive is one; a CUDA device asked for exists. What needs the
model itself (an architecture, whether the weights fit it) is still checked by the
engine at load, with the same kind of message.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from service.contract.archives import EXPORT_LIBRARY, archive_kind, not_weights
from service.contract.checkpoint_format import (
    HEAD_BYTES,
    checkpoint_format,
    not_a_checkpoint,
    not_an_export_archive,
    weights_file,
)
from service.contract.errors import ConfigError
from service.contract.models_file import ModelsFile
from service.contract.settings import Settings

# Where a GPU driver shows itself whenever torch's "cuda" device can work: NVIDIA's
# control device, or AMD's (ROCm builds of torch call their GPUs "cuda" too).
_GPU_DEVICES = (Path("/dev/nvidiactl"), Path("/dev/kfd"))


def check_port(host: str, port: int) -> None:
    """The address gunicorn will bind is free (bound and let go at once, as gunicorn
    binds it: with SO_REUSEADDR, so a port only in TIME_WAIT counts as free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {port} on {host} is in use (another server?): stop it, or choose "
                    "another port with --port or GRADCAM_PORT"
                ) from None
            if error.errno == errno.EACCES:
                raise ConfigError(
                    f"port {port} on {host} needs privileges: choose a port above 1023 "
                    "with --port or GRADCAM_PORT"
                ) from None
            raise ConfigError(
                f"cannot listen on {host}:{port} ({error.strerror}): check --host "
                "(GRADCAM_HOST) and --port (GRADCAM_PORT)"
            ) from None


def _readable(path: Path, what: str, model: str, key: str) -> bytes:
    """The first bytes of the file ``path``; a ConfigError naming the key if it cannot be read."""
    where = f"model '{model}', key '{key}'"
    if not path.exists():
        raise ConfigError(f"{where}: {what} {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{where}: {what} {path} is not a file")
    try:
        with path.open("rb") as handle:
            return handle.read(HEAD_BYTES)
    except OSError as error:
        raise ConfigError(f"{where}: cannot read {what} {path} ({error.strerror})") from None


def check_model_files(models: ModelsFile) -> None:
    """Every weights, labels and archive file the models file names is there and
    readable, each weights file is a checkpoint and each archive a torch.export one."""
    for name, spec in models.models.items():
        if spec.labels is not None:
            _readable(models.resolve_path(spec.labels), "labels file", name, "labels")
        if spec.library == EXPORT_LIBRARY:
            _check_archive(name, models.resolve_path(spec.arch))
        path = weights_file(spec, models)
        if path is not None and spec.weights is not None:
            _check_weights(name, path, spec.weights)


def _check_archive(name: str, path: Path) -> None:
    _readable(path, "torch.export archive", name, "arch")
    problem = not_an_export_archive(path)
    if problem is not None:
        raise ConfigError(f"model '{name}', key 'arch': {problem}")


def _check_weights(name: str, path: Path, written: str) -> None:
    """A checkpoint by its first bytes, and no model archive (which holds no state_dict)."""
    head = _readable(path, "weights file", name, "weights")
    kind = checkpoint_format(head)
    if kind is None:
        raise ConfigError(f"model '{name}', key 'weights': {not_a_checkpoint(path, head)}")
    archive = archive_kind(path) if kind == "torch-zip" else None
    if archive is not None:
        raise ConfigError(f"model '{name}', key 'weights': {not_weights(path, archive, written)}")


def check_device(device: str) -> None:
    if device == "cuda" and not any(path.exists() for path in _GPU_DEVICES):
        raise ConfigError(
            "device cuda was asked for, but this machine shows no GPU (no "
            f"{' or '.join(map(str, _GPU_DEVICES))}): use --device cpu or auto "
            "(GRADCAM_DEVICE)"
        )


def preflight(settings: Settings) -> None:
    """Everything ``serve`` can check before it starts a process; ConfigError on the first
    mistake (the CLI prints it as one line and exits 2)."""
    models = settings.models_config()
    check_model_files(models)
    check_device(settings.device)
    check_port(settings.host, settings.port)
