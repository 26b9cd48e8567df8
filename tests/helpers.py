"""Test helpers: images (phantoms, PNGs, a decompression bomb), seeded torchvision models,
process inspection, ``wait_until`` (every wait on observable state), and ``LiveServer``, a
real ``serve``, which tests get from the ``live_server`` fixtures (tests/process/conftest.py)
through ``ServerFactory``."""

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import numpy as np
import orjson
import pytest
import requests
import torch
import torchvision
import urllib3
from PIL import Image
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import BaseModel
from pydicom.data import get_testdata_file
from werkzeug.test import TestResponse

from service.contract.responses import to_json
from service.contract.settings import Settings
from service.demo.phantom import Phantom, sample_phantom
from service.imaging.values import to_uint8
from service.memory import children
from service.transport.interface import ENGINE_MODULE

# The repository's root (tests/helpers.py is one folder below it) and its examples.
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
T = TypeVar("T")


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


def pydicom_file(name: str) -> Path:
    """A file of pydicom's test data (``get_testdata_file`` is typed to return a dataset
    too)."""
    found = get_testdata_file(name)
    assert isinstance(found, str), f"pydicom has no test file {name}"
    return Path(found)


def png_bytes(array: np.ndarray, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save_args)
    return buffer.getvalue()


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def form_body(parts: Sequence[tuple[str, bytes | str]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type, its parts in the order given: bytes
    as a file part (with a filename, as curl -F name=@file sends it), str as a text field.
    (Flask's test client and requests group the parts by name.)"""
    fields: list[tuple[str, Any]] = [
        (name, (f"{name}.bin", value) if isinstance(value, bytes) else value)
        for name, value in parts
    ]
    return urllib3.encode_multipart_formdata(fields)


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


def wait_until(
    condition: Callable[[], T | None],
    timeout_s: float,
    what: str,
    *,
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll ``condition`` until it returns something true, and return that: the one way a
    test waits for state it can observe (a queue depth, a log line, a metric, a file, a
    process). After ``timeout_s`` an AssertionError names ``what``, with ``detail()`` (a
    log's tail, the state last seen) when given; an AssertionError the condition raises
    (a process that exited, see ``answering``) ends the wait at once, with the same words.
    Polls every 10 ms at first, backing off to 0.2 s."""
    deadline = time.monotonic() + timeout_s
    pause = 0.01
    while True:
        try:
            value = condition()
        except AssertionError as gave_up:
            raise AssertionError(_waited(what, str(gave_up), detail)) from None
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(_waited(what, f"not within {timeout_s:g} s", detail))
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.2)


def _waited(what: str, why: str, detail: Callable[[], str] | None) -> str:
    message = f"waited for {what}: {why}"
    return f"{message}\n{detail()}" if detail is not None else message


def answering(url: str, process: subprocess.Popen[Any] | None = None) -> Callable[[], bool]:
    """A condition for ``wait_until``: a GET of ``url`` answers 200. With the ``process``
    that should answer, its exit ends the wait at once."""

    def answered() -> bool:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process exited ({process.returncode}) before {url} answered")
        try:
            return requests.get(url, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    return answered


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
        ready_s: float = 90,
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
        try:
            wait_until(
                answering(f"{self.url}/readyz", self.process),
                ready_s,
                f"serve ready at {self.url}",
                detail=self.read_log,
            )
        except AssertionError:
            self.stop()
            raise

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

    def metric(self, name: str, labels: str = "") -> float:
        """A metric as /metrics would give it, read from serve's multiprocess files: no
        request (and no thread of the server) needed, none counted."""
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir())  # type: ignore[no-untyped-call]
        return metric_value(generate_latest(registry).decode(), name, labels)

    def children(self, marker: str) -> list[int]:
        """PIDs of serve's children whose command line contains ``marker``."""
        return [pid for pid in children(self.process.pid) if marker in proc_cmdline(pid)]

    def engine_pids(self) -> list[int]:
        return self.children(f"-m {ENGINE_MODULE} ")

    def worker_pids(self) -> list[int]:
        masters = self.children("gunicorn")
        return children(masters[0]) if masters else []

    def stop(self) -> None:
        """SIGTERM to serve's process group (SIGKILL after 20 s); its log removed. Safe to
        call again: a test that stops a server itself leaves nothing for the fixture."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        if not self.log.closed:
            self.log.close()
            os.unlink(self.log.name)


class ServerFactory:
    """What the ``live_server`` fixtures hand a test: call it to start a real ``serve``
    (``live_server(workers=2, max_request_bytes=2**20)``); the fixture stops every server
    it started. Keyword settings are ``Settings`` fields, passed as their ``GRADCAM_*``
    variables; ``env`` adds any other variable (or a setting under its variable's name)."""

    def __init__(self) -> None:
        self.started: list[LiveServer] = []

    def __call__(
        self,
        *,
        env: dict[str, str] | None = None,
        workers: int = 1,
        threads: int = 8,
        device: str = "cpu",
        port: int | None = None,
        ready_s: float = 90,
        **settings: object,
    ) -> LiveServer:
        unknown = sorted(set(settings) - set(Settings.model_fields))
        assert not unknown, f"not settings: {unknown}"
        environ = {f"GRADCAM_{name.upper()}": str(value) for name, value in settings.items()}
        live = LiveServer(
            env={**environ, **(env or {})},
            workers=workers,
            threads=threads,
            device=device,
            port=port,
            ready_s=ready_s,
        )
        self.started.append(live)
        return live

    def stop_all(self) -> None:
        for live in reversed(self.started):
            live.stop()
        self.started.clear()


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The sum of a Prometheus text exposition's samples of ``name`` with exactly ``labels``
    (e.g. ``'{model="phantom"}'``; "" for none)."""
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)}\s+([0-9.eE+-]+)$", re.M)
    return sum(float(m) for m in pattern.findall(text))


def json_of(response: TestResponse) -> Any:
    """A Flask test client's answer, parsed (its ``.json`` is typed ``Any | None``)."""
    data = response.get_json(silent=True)
    assert data is not None, response.data[:300]
    return data


def as_json(answer: BaseModel) -> dict[str, Any]:
    """An answer as a client reads it: its JSON bytes, parsed (and read back into its own
    model on the way, so what the server writes is what the contract says)."""
    data = to_json(answer)
    type(answer).model_validate_json(data)
    parsed: dict[str, Any] = orjson.loads(data)
    return parsed
