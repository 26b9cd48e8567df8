"""Under concurrent load through a real gunicorn with 2 workers: batching and metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from service.demo.phantom import FINDINGS
from tests.helpers import LiveServer, ServerFactory, encode, metric_value, missing_tool, phantom_png


@pytest.fixture(scope="module")
def metrics_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("metrics")
    (path / "counter_99999.db").write_bytes(b"stale")  # must be wiped at start
    return path


@pytest.fixture(scope="module")
def two_workers(module_live_server: ServerFactory, metrics_dir: Path) -> LiveServer:
    return module_live_server(
        workers=2, torch_threads=1, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    )


def _explain(server: LiveServer, body: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(f"{server.url}/v1/explain", json=body, timeout=120)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_concurrent_requests_each_get_their_own_heatmap(two_workers: LiveServer) -> None:
    bodies = [
        {
            "images": [encode(phantom_png(seed, 96 + seed, 80 + seed))],
            "targets": [FINDINGS[seed % 4]],
            "method": ("gradcam", "layercam", "hirescam", "gradcam++")[seed % 4],
            "heatmap": {"format": "array", "size": "layer"},
        }
        for seed in range(32)
    ]
    alone = [_explain(two_workers, body) for body in bodies]
    before = requests.get(f"{two_workers.url}/metrics", timeout=10).text
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda b: _explain(two_workers, b), bodies))
    for single, concurrent in zip(alone, together, strict=True):
        a = single["results"][0]["explanations"][0]
        b = concurrent["results"][0]["explanations"][0]
        assert a["target"]["label"] == b["target"]["label"]
        assert np.allclose(a["heatmap"]["values"], b["heatmap"]["values"], atol=1e-4)
        assert single["method"] == concurrent["method"]
    after = requests.get(f"{two_workers.url}/metrics", timeout=10).text
    # Batches of more than one image happened under that load.
    batched = [
        metric_value(t, "gradcam_batch_size_images_count")
        - metric_value(t, "gradcam_batch_size_images_bucket", '{le="1.0"}')
        for t in (before, after)
    ]
    assert batched[1] > batched[0]


def test_metrics_move_and_aggregate_both_workers(
    two_workers: LiveServer, metrics_dir: Path
) -> None:
    url = two_workers.url
    before = requests.get(f"{url}/metrics", timeout=10).text
    # Both workers report their model info, model load time and warm-up.
    assert len(re.findall(r'^gradcam_model_info\{.*model="phantom".*\} 1\.0$', before, re.M)) >= 1
    for _ in range(6):
        _explain(two_workers, {"images": [encode(phantom_png(2, 64, 64))] * 2})
    requests.post(f"{url}/v1/explain", json={"images": ["@@"]}, timeout=10)
    requests.get(f"{url}/v1/nothing", timeout=10)
    after = requests.get(f"{url}/metrics", timeout=10).text
    assert (
        metric_value(after, "gradcam_images_explained_total", '{model="phantom"}')
        - metric_value(before, "gradcam_images_explained_total", '{model="phantom"}')
        == 12
    )
    route = '{method="POST",protocol="gradcam",route="/v1/explain",status="200"}'
    assert (
        metric_value(after, "gradcam_request_duration_seconds_count", route)
        - metric_value(before, "gradcam_request_duration_seconds_count", route)
        == 6
    )
    assert metric_value(after, "gradcam_errors_total", '{code="invalid_base64"}') >= 1
    assert metric_value(after, "gradcam_errors_total", '{code="not_found"}') >= 1
    assert 'route="unmatched"' in after and "/v1/nothing" not in after
    for stage in ("decode", "queue_wait", "compute", "render"):
        assert (
            metric_value(after, "gradcam_stage_duration_seconds_count", f'{{stage="{stage}"}}') > 0
        )
    assert metric_value(after, "gradcam_queue_depth") == 0
    # Both workers write their own files (one scrape sums them); the stale file is gone.
    pids = {path.stem.rsplit("_", 1)[1] for path in metrics_dir.glob("*.db")}
    assert len(pids) >= 2 and "99999" not in pids
    # Each worker loaded the model once: the warm-ups of both are in the counts.
    assert metric_value(after, "gradcam_batch_size_images_count") >= 2


def test_promtool_accepts_a_real_scrape(two_workers: LiveServer) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing_tool("promtool", "prometheus")
    _explain(two_workers, {"images": [encode(phantom_png(3, 64, 64))]})
    scrape = requests.get(f"{two_workers.url}/metrics", timeout=10)
    assert scrape.headers["Content-Type"].startswith("text/plain; version=")
    done = subprocess.run(
        [promtool, "check", "metrics"],
        input=scrape.content,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    assert not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr
