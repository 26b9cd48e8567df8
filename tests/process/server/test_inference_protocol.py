"""The Open Inference Protocol door (/v2) of the real server, driven by Triton's own client
(tritonclient.http, which parses the binary tensor extension independently of our code) and
by KServe's REST client; the answers equal /v1's for the same image (the door in-process:
tests/unit/server/test_inference_protocol.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.helpers import LiveServer, encode, metric_value, phantom_png
from tests.unit.server.test_inference_protocol import MODEL


def test_tritons_http_client_against_the_real_server(server: LiveServer) -> None:
    url = server.url.removeprefix("http://")
    with triton.InferenceServerClient(url, concurrency=2) as tc:
        assert tc.is_server_live() and tc.is_server_ready() and tc.is_model_ready(MODEL)
        assert tc.get_model_metadata(MODEL)["outputs"][0]["name"] == "probabilities"
        assert tc.get_model_config(MODEL)["max_batch_size"] == 0
        image = phantom_png(5, 128, 128)
        v1 = server_v1(server, image)
        for binary in (True, False):
            sent = triton.InferInput("image", [1], "BYTES")
            if binary:
                sent.set_data_from_numpy(np.array([image], dtype=np.object_))
            else:  # JSON has no bytes: base64 text, as the README says
                sent.set_data_from_numpy(np.array([encode(image)], dtype=np.object_), False)
            wanted = [
                triton.InferRequestedOutput(name, binary_data=binary)
                for name in ("probabilities", "heatmap", "labels")
            ]
            result = tc.infer(MODEL, [sent], outputs=wanted, parameters={"method": "gradcam"})
            scores = result.as_numpy("probabilities")
            for prediction in v1["predictions"]:
                assert scores[0, prediction["index"]] == pytest.approx(
                    prediction["score"], abs=1e-6
                )
            np.testing.assert_allclose(
                result.as_numpy("heatmap")[0],
                v1["explanations"][0]["heatmap"]["values"],
                atol=1e-6,
            )
        # Requests in flight together (gevent's greenlets), answered in their own order.
        pending = []
        for seed in range(4):
            sent = triton.InferInput("image", [1], "BYTES")
            sent.set_data_from_numpy(np.array([phantom_png(seed, 96, 96)], dtype=np.object_))
            pending.append(tc.async_infer(MODEL, [sent], request_id=str(seed)))
        assert [p.get_result().get_response()["id"] for p in pending] == ["0", "1", "2", "3"]
        with pytest.raises(InferenceServerException, match="no model"):
            tc.infer("nope", [sent])
    # The door's requests in the same latency family, labelled by protocol.
    scrape = requests.get(f"{server.url}/metrics", timeout=10).text
    labels = (
        '{method="POST",protocol="open_inference",route="/v2/models/<name>/infer",status="200"}'
    )
    assert metric_value(scrape, "gradcam_request_duration_seconds_count", labels) >= 6


def server_v1(server: LiveServer, image: bytes) -> dict[str, Any]:
    answer = requests.post(
        f"{server.url}/v1/explain",
        json={
            "images": [encode(image)],
            "top_k": 4,
            "heatmap": {"format": "array", "size": "input"},
        },
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()["results"][0]
    return result


def test_kserves_rest_client_against_the_real_server(server: LiveServer) -> None:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    image = phantom_png(6, 128, 128)
    v1 = server_v1(server, image)

    async def ask() -> list[dict[str, np.ndarray]]:
        client = InferenceRESTClient(config=RESTConfig(protocol="v2", retries=0, timeout=60))
        try:
            assert await client.is_server_ready(server.url)
            assert await client.is_model_ready(server.url, MODEL)
            as_text = InferInput("image", [1], "BYTES", data=[encode(image)])
            as_bytes = InferInput("image", [1], "BYTES")
            as_bytes.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
            answers = []
            for sent, binary in ((as_text, False), (as_bytes, True)):
                request = InferRequest(
                    model_name=MODEL,
                    infer_inputs=[sent],
                    request_outputs=[
                        RequestedOutput(name, parameters={"binary_data": binary})
                        for name in ("probabilities", "heatmap")
                    ],
                )
                response = await client.infer(server.url, request, model_name=MODEL)
                answers.append({o.name: o.as_numpy() for o in response.outputs})
            return answers
        finally:
            await client.close()

    for outputs in asyncio.run(ask()):
        for prediction in v1["predictions"]:
            score = outputs["probabilities"][0, prediction["index"]]
            assert score == pytest.approx(prediction["score"], abs=1e-6)
        np.testing.assert_allclose(
            outputs["heatmap"][0], v1["explanations"][0]["heatmap"]["values"], atol=1e-6
        )
