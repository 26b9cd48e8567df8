"""Every test under tests/process/ starts processes of its own (serve, an engine, the CLI,
Orthanc, nginx, a browser, OHIF's server, a container): the folder gives them the
``process`` marker, which the developer loop leaves out (``-m "not process"``)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A conftest's hook sees the whole session's items: mark only the ones below it.
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.process)
