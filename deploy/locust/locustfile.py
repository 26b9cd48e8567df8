"""Load test for gradcam-service with locust: a realistic mix of explain requests.

    locust -f deploy/locust/locustfile.py --host http://127.0.0.1:8000 \\
        --headless --users 16 --spawn-rate 4 --run-time 2m --csv out/gradcam

Environment:
    GRADCAM_LOCUST_IMAGES  a glob of images to send (default: the repository's examples/*.png)
    GRADCAM_TOKEN          a bearer token, when the server has authentication on

Each simulated user sends, by weight: a small ``array`` heatmap at layer size (what
a backend that post-processes maps asks for), a colour PNG and an overlay at the
image's size (what a viewer shows), and a request of four images with two targets
each (a batch client). A 503 (``overloaded``: the service shedding load) is
reported as a failure named by its code, so the CSV shows how much was shed.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import random
from pathlib import Path

from locust import HttpUser, between, task

_DEFAULT = str(Path(__file__).resolve().parents[2] / "examples" / "*.png")
_IMAGES = [
    base64.b64encode(Path(name).read_bytes()).decode("ascii")
    for name in sorted(glob.glob(os.environ.get("GRADCAM_LOCUST_IMAGES", _DEFAULT)))
]
if not _IMAGES:
    raise SystemExit("no images: set GRADCAM_LOCUST_IMAGES to a glob of image files")


def _body(images: list[str], **fields: object) -> bytes:
    return json.dumps({"images": images, **fields}).encode()


class ExplainUser(HttpUser):
    wait_time = between(0.0, 0.2)

    def on_start(self) -> None:
        self.client.headers["Content-Type"] = "application/json"
        token = os.environ.get("GRADCAM_TOKEN")
        if token:
            self.client.headers["Authorization"] = f"Bearer {token}"

    def _explain(self, name: str, body: bytes) -> None:
        with self.client.post("/v1/explain", data=body, name=name, catch_response=True) as response:
            if response.status_code == 200:
                response.success()
            else:
                try:
                    code = response.json()["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = "no JSON error"
                response.failure(f"{response.status_code} {code}")

    @task(4)
    def array_at_layer_size(self) -> None:
        self._explain(
            "array/layer",
            _body([random.choice(_IMAGES)], heatmap={"format": "array", "size": "layer"}),
        )

    @task(3)
    def png_at_image_size(self) -> None:
        self._explain("png/original", _body([random.choice(_IMAGES)]))

    @task(2)
    def overlay_at_image_size(self) -> None:
        self._explain(
            "overlay/original", _body([random.choice(_IMAGES)], heatmap={"format": "overlay"})
        )

    @task(1)
    def four_images_two_targets(self) -> None:
        images = random.choices(_IMAGES, k=4)
        self._explain(
            "4 images × 2 targets", _body(images, targets=[[0, 1]] * 4, heatmap={"format": "gray"})
        )
