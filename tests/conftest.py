"""Fixtures every test may use: the demo model's runtime. Shared code is in ``helpers.py``;
the fixtures that start servers are in ``process/conftest.py``, for the tests below it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from service.contract.settings import Settings
from service.engine.runtime import Runtime

# Tests run on the CPU, on the 2 cores of the CI machine.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def runtime() -> Iterator[Runtime]:
    """The demo model's runtime, as the CLI and each server worker start it."""
    rt = Runtime(Settings(device="cpu")).start()
    yield rt
    rt.close()
