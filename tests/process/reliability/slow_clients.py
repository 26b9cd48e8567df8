"""Slow and stalled clients of every kind, and how fast the service still answers others.

Used by ``test_slow_clients.py`` and by ``tests/benchmarks/slow_clients.py`` (which
compares two checkouts under the same abuse).
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import requests

from service.imaging.values import to_uint8
from tests.helpers import phantom, png_bytes

KINDS = ("silent", "header_trickle", "body_trickle", "short_body", "no_reader")
TRICKLE_EVERY_S = 0.5


def _body(size: int, fmt: str) -> bytes:
    image = base64.b64encode(png_bytes(to_uint8(phantom(5, size, size).image))).decode()
    return json.dumps({"images": [image], "heatmap": {"format": fmt}}).encode()


def _request(body: bytes) -> bytes:
    return (
        b"POST /v1/explain HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body


@dataclass
class SlowClients:
    """``per_kind`` connections of each of ``KINDS`` to ``host:port``, kept slow."""

    host: str
    port: int
    per_kind: int
    sockets: dict[str, list[socket.socket]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=5)
        return sock

    def start(self) -> SlowClients:
        big_answer = _request(_body(1024, "array"))  # ~10 MB of JSON to not read
        for kind in KINDS:
            opened = []
            for _ in range(self.per_kind):
                if kind == "no_reader":
                    sock = socket.socket()
                    # A tiny receive window: the server's writes stall at once.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    sock.settimeout(5)
                    sock.connect((self.host, self.port))
                    sock.sendall(big_answer)
                else:
                    sock = self._connect()
                if kind == "header_trickle":
                    sock.sendall(b"POST /v1/explain HTTP/1.1\r\nHost: test\r\nX-Slow: ")
                elif kind == "body_trickle":
                    sock.sendall(
                        b"POST /v1/explain HTTP/1.1\r\nHost: test\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 100000\r\n"
                        b"\r\n{"
                    )
                elif kind == "short_body":
                    sock.sendall(
                        b"POST /v1/explain HTTP/1.1\r\nHost: test\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 1000\r\n"
                        b'\r\n{"images": ['
                    )
                opened.append(sock)
            self.sockets[kind] = opened
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()
        return self

    def _trickle(self) -> None:
        while not self._stop.wait(TRICKLE_EVERY_S):
            for kind in ("header_trickle", "body_trickle"):
                for sock in self.sockets.get(kind, []):
                    # The server may have closed it: that is its right.
                    with contextlib.suppress(OSError):
                        sock.send(b"a" if kind == "header_trickle" else b" ")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for opened in self.sockets.values():
            for sock in opened:
                sock.close()


def answer_times(url: str, repeats: int = 5) -> dict[str, float]:
    """The slowest of ``repeats`` answers to ``/healthz`` and to a small explain request,
    each on a fresh connection (seconds; 99 for no answer within 10 s)."""
    small = _body(64, "png")
    worst = {"healthz": 0.0, "explain": 0.0}
    for _ in range(repeats):
        for name in worst:
            started = time.monotonic()
            try:
                if name == "healthz":
                    ok = requests.get(f"{url}/healthz", timeout=10).status_code == 200
                else:
                    ok = (
                        requests.post(
                            f"{url}/v1/explain",
                            data=small,
                            timeout=10,
                            headers={"Content-Type": "application/json"},
                        ).status_code
                        == 200
                    )
            except requests.RequestException:
                ok = False
            took = time.monotonic() - started if ok else 99.0
            worst[name] = max(worst[name], took)
    return worst
