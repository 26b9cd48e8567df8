"""4× as many slow or stalled clients of each kind as request threads cannot starve the
service: /healthz and a normal request are still answered within 2 s."""

from __future__ import annotations

import socket
import time

import pytest

from tests.helpers import LiveServer, ServerFactory, wait_until
from tests.process.reliability.slow_clients import KINDS, SlowClients, answer_times

THREADS = 4


@pytest.fixture(scope="module")
def slow_server(module_live_server: ServerFactory) -> LiveServer:
    return module_live_server(threads=THREADS, client_timeout_s=3)


@pytest.mark.slow
def test_slow_clients_do_not_starve_the_workers(slow_server: LiveServer) -> None:
    def explained() -> float:
        return slow_server.metric("gradcam_images_explained_total", '{model="phantom"}')

    before = explained()
    clients = SlowClients("127.0.0.1", slow_server.port, per_kind=4 * THREADS).start()
    try:
        # Every kind in place (start() returns once each has sent its part), and the big
        # answers computed: explained, their requests done, their bytes held for readers
        # that never read.
        wait_until(
            lambda: (
                explained() >= before + 4 * THREADS
                and slow_server.metric("gradcam_requests_in_flight") == 0
            ),
            30,
            "the unread answers computed",
        )
        worst = answer_times(slow_server.url)
    finally:
        clients.close()
    assert worst["healthz"] < 2.0 and worst["explain"] < 2.0, worst
    assert len(KINDS) * 4 * THREADS == 80


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize(
    "opening",
    [
        b"POST /v1/explain HTTP/1.1\r\nHost: t\r\nX-Slow: a",
        b"POST /v1/explain HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{",
    ],
    ids=["headers", "body"],
)
def test_a_stalled_request_gets_408_after_the_client_timeout(
    slow_server: LiveServer, opening: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", slow_server.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(opening)
        answer = _read_all(sock)
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b'"code":"request_timeout"' in answer
    assert 2.5 < took < 6, took


def test_a_silent_connection_is_closed_after_the_client_timeout(slow_server: LiveServer) -> None:
    with socket.create_connection(("127.0.0.1", slow_server.port), timeout=10) as sock:
        started = time.monotonic()
        assert _read_all(sock) == b""
        assert 2.5 < time.monotonic() - started < 6
