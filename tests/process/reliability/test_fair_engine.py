"""Heavy requests cannot starve light ones, through a real server.

Three clients loop on requests of 8 images × 4 classes with faithfulness curves (32
explanations, each 39 more forward passes); a one-image request sent beside them is
answered between two of their rounds (``engine/batching.py``). Before, it waited behind
whole heavy requests or was refused 503 (with four heavy clients on this machine: 0 of
10 answered; ``tests/benchmarks/heavy_beside_light.py``).
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import pytest
import requests

from tests.helpers import LiveServer, encode, phantom_png, wait_until

HEAVY: dict[str, Any] = {
    "images": [encode(phantom_png(seed, 256, 256)) for seed in range(8)],
    "targets": [[0, 1, 2, 3]] * 8,
    "include": ["faithfulness"],
    "heatmap": {"format": "none"},
}
LIGHT: dict[str, Any] = {"images": [encode(phantom_png(99, 256, 256))]}


@pytest.mark.slow
def test_a_light_request_is_answered_between_heavy_ones(server: LiveServer) -> None:
    stop = threading.Event()
    heavy: list[int] = []

    def loop() -> None:
        while not stop.is_set():
            answer = requests.post(f"{server.url}/v1/explain", json=HEAVY, timeout=120)
            heavy.append(answer.status_code)
            if answer.status_code == 200:
                curves = answer.json()["results"][0]["explanations"][0]["faithfulness"]
                assert len(curves["deletion"]) == 21

    clients = [threading.Thread(target=loop, daemon=True) for _ in range(3)]
    for client in clients:
        client.start()
    try:
        # The heavy ones are under way: one has gone through.
        wait_until(lambda: 200 in heavy, 60, "a heavy request answered", detail=lambda: str(heavy))
        light: list[tuple[int, float]] = []
        for _ in range(10):
            started = time.monotonic()
            status = requests.post(f"{server.url}/v1/explain", json=LIGHT, timeout=60).status_code
            light.append((status, time.monotonic() - started))
            time.sleep(0.3)  # light requests spread in time across the heavy ones' rounds
    finally:
        stop.set()
        for client in clients:
            client.join(120)
    answered = [took for status, took in light if status == 200]
    print(f"light: {light}; heavy: {heavy}")
    assert len(answered) >= 9, light
    assert statistics.median(answered) <= 1.0, light
    assert set(heavy) <= {200, 503}, heavy
