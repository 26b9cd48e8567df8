"""Shared fixtures: the demo model's runtime and one live server (helpers in ``helpers.py``);
the ``process`` marker on every test that starts a process of its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service.contract.settings import Settings
from service.engine.runtime import Runtime
from tests.helpers import LiveServer

# Tests run on the CPU, on the 2 cores of the CI machine.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def runtime() -> Iterator[Runtime]:
    """The demo model's runtime, as the CLI and each server worker start it."""
    rt = Runtime(Settings(device="cpu")).start()
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    """One real server for the HTTP tests (8 MiB body limit keeps the 413 test cheap)."""
    live = LiveServer(env={"GRADCAM_MAX_REQUEST_BYTES": str(8 * 2**20)})
    yield live
    live.stop()


# Modules whose tests start processes (serve, gunicorn, an engine, Orthanc, a browser,
# OHIF's server, the CLI): the developer loop leaves them out with -m "not process"
# (docs/development.md). Tests elsewhere that use the live ``server`` fixture are marked too.
_PROCESS_MODULES = {
    "test_access",
    "test_allocator",
    "test_boundaries",
    "test_browser",
    "test_catalogue",
    "test_cli",
    "test_crashes",
    "test_deploy",
    "test_dicomweb",
    "test_docker",
    "test_engine_process",
    "test_hardening",
    "test_http",
    "test_load",
    "test_locust",
    "test_memory_budget",
    "test_ohif",
    "test_ohif_front_ends",
    "test_openapi",
    "test_orthanc_routing",
    "test_slow_clients",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).stem in _PROCESS_MODULES or "server" in getattr(
            item, "fixturenames", ()
        ):
            item.add_marker(pytest.mark.process)
