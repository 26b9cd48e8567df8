"""Shared fixtures: the demo model's runtime and one live server (helpers in ``helpers.py``)."""

from __future__ import annotations

from collections.abc import Iterator

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Until the tests that use the live ``server`` are split out of tests/unit/.
    for item in items:
        if "server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.process)
