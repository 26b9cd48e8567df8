"""Tests that start processes of their own (serve, an engine, the CLI, Orthanc, nginx, a
browser, OHIF's server, a container): the folder gives each the ``process`` marker, which
the developer loop leaves out (``-m "not process"``); and the one way they start a real
``serve``, the ``live_server`` fixtures, which stop every server they started."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import LiveServer, ServerFactory

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A conftest's hook sees the whole session's items: mark only the ones below it.
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.process)


@pytest.fixture
def live_server() -> Iterator[ServerFactory]:
    """Starts servers for one test: ``live_server(workers=2, auth_tokens="t")``."""
    servers = ServerFactory()
    yield servers
    servers.stop_all()


@pytest.fixture(scope="module")
def module_live_server() -> Iterator[ServerFactory]:
    """Starts servers that a module's tests share (through a module-scoped fixture of
    their own), stopped after the module's last test."""
    servers = ServerFactory()
    yield servers
    servers.stop_all()


@pytest.fixture(scope="session")
def session_live_server() -> Iterator[ServerFactory]:
    servers = ServerFactory()
    yield servers
    servers.stop_all()


@pytest.fixture(scope="session")
def server(session_live_server: ServerFactory) -> LiveServer:
    """One real server that every test may share, as it was started: nothing a test does
    may leave it changed (8 MiB body limit keeps the 413 test cheap)."""
    return session_live_server(max_request_bytes=8 * 2**20)
