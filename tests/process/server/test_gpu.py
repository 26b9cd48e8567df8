"""The real server on a CUDA device: it answers, only its engine holds the GPU, and CUDA
graphs give the eager maps. Marked gpu: skipped where CUDA is missing;
tests/benchmarks/gpu_check.sh runs them on a GPU machine (the engine on CUDA in-process:
tests/unit/engine/test_gpu.py)."""

from __future__ import annotations

import subprocess
from typing import Any

import numpy as np
import pytest
import requests
import torch

from tests.helpers import LiveServer, ServerFactory, encode, metric_value, phantom_png

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def cuda_server(module_live_server: ServerFactory) -> LiveServer:
    return module_live_server(device="cuda", workers=2)


def test_server_on_cuda(cuda_server: LiveServer) -> None:
    detail = requests.get(f"{cuda_server.url}/v1/models/phantom", timeout=10).json()
    assert detail["device"].startswith("cuda")
    response = requests.post(
        f"{cuda_server.url}/v1/explain",
        timeout=60,
        json={"images": [encode(phantom_png(2, 300, 240))], "heatmap": {"format": "overlay"}},
    )
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["predictions"][0]["label"] == "nodule"
    assert (
        result["explanations"][0]["heatmap"]["width"],
        result["explanations"][0]["heatmap"]["height"],
    ) == (300, 240)


def test_only_the_engine_holds_the_gpu(cuda_server: LiveServer) -> None:
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("nvidia-smi cannot list compute processes here")
    if not listed:
        pytest.skip("nvidia-smi lists no processes (a container without the host's PIDs)")
    holders = {int(pid) for pid in listed}
    assert set(cuda_server.engine_pids()) <= holders
    assert not holders & set(cuda_server.worker_pids())


def test_server_with_cuda_graphs(cuda_server: LiveServer, live_server: ServerFactory) -> None:
    graphed = live_server(device="cuda", cuda_graphs="on")
    body: dict[str, Any] = {
        "images": [encode(phantom_png(seed, 200, 160)) for seed in range(3)],
        "heatmap": {"format": "array", "size": "layer"},
    }
    answers = [
        requests.post(f"{live.url}/v1/explain", json=body, timeout=60)
        for live in (cuda_server, graphed)
    ]
    assert all(a.status_code == 200 for a in answers), answers[1].text
    for x, y in zip(*(a.json()["results"] for a in answers), strict=True):
        assert [p["label"] for p in x["predictions"]] == [p["label"] for p in y["predictions"]]
        a = np.array(x["explanations"][0]["heatmap"]["values"])
        b = np.array(y["explanations"][0]["heatmap"]["values"])
        assert np.abs(a - b).max() <= 1e-3
    text = requests.get(f"{graphed.url}/metrics", timeout=10).text
    assert metric_value(text, "gradcam_cuda_graph_replays_total", '{model="phantom"}') >= 1
    assert metric_value(text, "gradcam_cuda_graph_fallbacks_total", '{model="phantom"}') == 0
