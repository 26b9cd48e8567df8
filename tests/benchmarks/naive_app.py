"""The naive baseline for the load benchmark: Flask + pytorch-grad-cam, no batching.

What a quick hand-rolled explanation endpoint looks like: one image per request,
pytorch-grad-cam's GradCAM on resnet50 ``layer4``, stdlib JSON, Pillow's
default PNG settings. Run under gunicorn by ``load.py``:
``NAIVE_WEIGHTS=w.pt gunicorn -w 2 tests.benchmarks.naive_app:app``.
"""

import base64
import io
import os

import numpy as np
import torch
import torchvision
from flask import Flask, jsonify, request
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image

torch.set_num_threads(int(os.environ.get("NAIVE_TORCH_THREADS", "1")))
model = torchvision.models.resnet50()
model.load_state_dict(torch.load(os.environ["NAIVE_WEIGHTS"], weights_only=True))
model.eval()
cam = GradCAM(model=model, target_layers=[model.layer4])
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
app = Flask(__name__)


@app.post("/v1/explain")
def explain():  # deliberately plain: a quick hand-rolled endpoint
    body = request.get_json()
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB")
    pixels = np.asarray(image.resize((224, 224)), dtype=np.float32) / 255
    x = (torch.from_numpy(pixels).permute(2, 0, 1) - MEAN) / STD
    heat = cam(x[None], None)[0]  # (224, 224), top-1 class
    scores = torch.softmax(cam.outputs[0].detach(), 0)
    out = {"index": int(scores.argmax()), "score": float(scores.max())}
    if body.get("heatmap", {}).get("format") == "overlay":
        big = np.asarray(Image.fromarray(np.uint8(heat * 255)).resize(image.size)) / 255
        overlay = show_cam_on_image(np.asarray(image, dtype=np.float32) / 255, big)
        buffer = io.BytesIO()
        Image.fromarray(overlay).save(buffer, format="PNG")
        out["data"] = base64.b64encode(buffer.getvalue()).decode()
    else:
        out["values"] = heat.tolist()
    return jsonify(out)
