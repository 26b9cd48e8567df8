"""Test helpers: images (phantoms, PNGs, a decompression bomb), seeded torchvision models,
process inspection, and ``LiveServer``, a real ``serve`` started for a test. The fixtures that
use them are in ``conftest.py``."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import orjson
import pytest
import requests
import torch
import torchvision
from PIL import Image
from pydantic import BaseModel

from service.contract.responses import to_json
from service.demo.phantom import Phantom, sample_phantom
from service.imaging.values import to_uint8
from service.memory import children
from service.transport.interface import ENGINE_MODULE

# The repository's root (tests/helpers.py is one folder below it) and its examples.
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def missing_tool(what: str, packages: str) -> NoReturn:
    """A test needs ``what``, from Debian's ``packages``: in CI that is a failure
    (``.ci/run`` installs them), elsewhere the test is skipped, saying how to install."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing: .ci/run installs Debian's {packages}")
    pytest.skip(f"{what} is not installed (apt-get install {packages})")


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    """dicom3tools' ``dciodvfy`` on a DICOM file: its error lines, and its whole report."""
    found = shutil.which("dciodvfy")
    if found is None:
        missing_tool("dciodvfy", "dicom3tools")
    checked = subprocess.run(
        [found, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    report = checked.stdout + checked.stderr
    return [line for line in report.splitlines() if line.startswith("Error")], report


def png_bytes(array: np.ndarray, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save_args)
    return buffer.getvalue()


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` × ``height``, with a tiny body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def phantom(seed: int, width: int = 256, height: int = 256) -> Phantom:
    return sample_phantom(np.random.default_rng(seed), width, height)


def phantom_png(seed: int, width: int = 256, height: int = 256) -> bytes:
    return png_bytes(to_uint8(phantom(seed, width, height).image))


def seeded_model(arch: str, seed: int = 0, **kwargs: object) -> torch.nn.Module:
    """A random-init torchvision model in eval mode with frozen parameters."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None, **kwargs).eval()
    model.requires_grad_(False)
    return model


def proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_answering(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Whether a GET of ``url`` answers 200 within ``timeout_s`` (False at once once
    ``alive()`` turns false): a server a test started is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.1)
    return False


def wait_ready(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Whether the service at ``url`` says it is ready (``/readyz``) within ``timeout_s``."""
    return wait_answering(f"{url}/readyz", timeout_s, alive)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class LiveServer:
    """A real ``gradcam-service serve`` (gunicorn) on 127.0.0.1, stopped by its PID."""

    def __init__(
        self,
        env: dict[str, str] | None = None,
        workers: int = 1,
        device: str = "cpu",
        threads: int = 8,
        port: int | None = None,
    ) -> None:
        # A given port: a restart where clients (Orthanc's router) expect it.
        self.port = free_port() if port is None else port
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(workers),
            "--threads",
            str(threads),
            "--device",
            device,
        ]
        # Closed in stop(): it outlives this constructor on purpose.
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="gradcam-server-", suffix=".log", delete=False
        )
        self.process = subprocess.Popen(
            command,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "GRADCAM_TORCH_THREADS": "2", **(env or {})},
        )
        if wait_ready(self.url, 90, alive=lambda: self.process.poll() is None):
            return
        if self.process.poll() is not None:
            raise RuntimeError(f"server exited: {self.read_log()}")
        self.stop()
        raise RuntimeError(f"server not ready in 90 s: {self.read_log()}")

    def read_log(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def metrics_dir(self) -> str:
        """The multiprocess metrics folder serve's children write to."""
        # The supervisor sets it after it starts: its children's environments have it.
        child = self.engine_pids()[0]
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        for entry in environ:
            if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                return entry.split(b"=", 1)[1].decode()
        raise LookupError("serve has no metrics folder")

    def children(self, marker: str) -> list[int]:
        """PIDs of serve's children whose command line contains ``marker``."""
        return [pid for pid in children(self.process.pid) if marker in proc_cmdline(pid)]

    def engine_pids(self) -> list[int]:
        return self.children(f"-m {ENGINE_MODULE} ")

    def worker_pids(self) -> list[int]:
        masters = self.children("gunicorn")
        return children(masters[0]) if masters else []

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()
        os.unlink(self.log.name)


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The sum of a Prometheus text exposition's samples of ``name`` with exactly ``labels``
    (e.g. ``'{model="phantom"}'``; "" for none)."""
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)}\s+([0-9.eE+-]+)$", re.M)
    return sum(float(m) for m in pattern.findall(text))


def as_json(answer: BaseModel) -> dict[str, Any]:
    """An answer as a client reads it: its JSON bytes, parsed (and read back into its own
    model on the way, so what the server writes is what the contract says)."""
    data = to_json(answer)
    type(answer).model_validate_json(data)
    parsed: dict[str, Any] = orjson.loads(data)
    return parsed
