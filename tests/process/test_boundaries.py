"""The process boundary: the HTTP side never loads torch, the engine side never loads Flask."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, LiveServer, proc_cmdline

SERVER_SIDE = [
    "service.server.app",
    "service.server.routes",
    "service.server.gunicorn_conf",
    "service.server.worker",
    "service.transport.engine_client",
    "service.transport.ipc",
    "service.transport.interface",
    "service.pipeline.explain",
    "service.imaging.decoding",
    "service.imaging.dicom",
    "service.imaging.geometry",
    "service.imaging.render",
    "service.supervision.supervisor",
    "service.cli",
    "service.metrics",
    "service.contract.requests",
    "service.contract.responses",
    "service.contract.catalog_responses",
]
ENGINE_SIDE = [
    "service.engine.process",
    "service.engine.engine_server",
    "service.engine.runtime",
    "service.engine.buckets",
    "service.engine.batch_inputs",
    "service.engine.warm_up",
    "service.engine.gradcam",
    "service.engine.loading.models",
    "service.engine.layers",
    "service.engine.batching",
    "service.engine.work_items",
]


def _loaded_after_import(modules: list[str], watched: list[str]) -> list[str]:
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(' '.join(w for w in {watched!r} if w in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=REPO,
    )
    return done.stdout.split()


def test_the_import_contracts_hold() -> None:
    """pyproject's [tool.importlinter] contracts, on every import statement (lazy ones
    too): the engine imports no web framework; the HTTP side, the pipeline and imaging
    no torch."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_the_server_side_never_imports_torch() -> None:
    assert _loaded_after_import(SERVER_SIDE, ["torch", "torchvision"]) == []


def test_the_engine_side_never_imports_flask() -> None:
    assert _loaded_after_import(ENGINE_SIDE, ["flask", "werkzeug", "gunicorn"]) == []


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_live_http_workers_hold_no_torch_and_stay_small(server: LiveServer) -> None:
    masters, engines = server.children("gunicorn"), server.engine_pids()
    assert len(masters) == 1 and len(engines) == 1
    workers = server.worker_pids()
    assert workers
    for pid in [server.process.pid, masters[0], *workers]:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libtorch" not in maps, f"process {pid} ({proc_cmdline(pid)}) loaded torch"
    assert "libtorch" in Path(f"/proc/{engines[0]}/maps").read_text()
    for pid in workers:
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kib = int(
            next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
        )
        # A worker that has made DICOM objects holds pydicom and highdicom (175-180 MiB
        # once the shared server has answered the catalogue, the schema fuzzing and the
        # DICOM tests; 200 MiB at the end of the whole suite, with the volume modules);
        # torch alone would add about 470 MiB more (and is caught above by its library).
        assert rss_kib < 240 * 1024, f"worker {pid} holds {rss_kib / 1024:.0f} MiB"
