"""The peer for the load benchmark: what a user writes in an afternoon with LitServe and
torchcam (ours, from their documentation; benchmark-only dependencies, ``.[bench]``).

LitServe batches up to 8 requests for 10 ms in one worker on the CPU; torchcam's
``GradCAM(model, "layer4")`` explains the top-1 class of each image from the logits
of one forward pass; Pillow decodes and resizes per request; the answer is the top-5
softmax scores and the 7×7 map as a JSON list (the request's ``heatmap`` asks for
``{format: array, size: layer}``). Run by ``load.py --peer``:

    PEER_WEIGHTS=w.pt PEER_PORT=8001 PEER_TORCH_THREADS=2 python tests/benchmarks/peer_litserve.py
"""

import base64
import io
import os

import litserve as ls
import torch
import torchvision
from PIL import Image
from torchcam.methods import GradCAM

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


class GradCamAPI(ls.LitAPI):
    def setup(self, device):
        torch.set_num_threads(int(os.environ.get("PEER_TORCH_THREADS", "2")))
        self.model = torchvision.models.resnet50(
            num_classes=int(os.environ.get("PEER_CLASSES", "1000"))
        )
        self.model.load_state_dict(torch.load(os.environ["PEER_WEIGHTS"], weights_only=True))
        self.model.eval()
        self.cam = GradCAM(self.model, "layer4")

    def decode_request(self, request):
        image = Image.open(io.BytesIO(base64.b64decode(request["images"][0]))).convert("RGB")
        pixels = torch.frombuffer(
            bytearray(image.resize((224, 224)).tobytes()), dtype=torch.uint8
        ).view(224, 224, 3)
        return (pixels.permute(2, 0, 1).float() / 255 - MEAN) / STD

    def batch(self, inputs):
        return torch.stack(inputs)

    def predict(self, x):
        logits = self.model(x)
        top1 = logits.argmax(dim=1).tolist()
        (maps,) = self.cam(top1, logits)  # (N, 7, 7) for layer4
        scores = torch.softmax(logits.detach(), dim=1)
        top = scores.topk(min(5, scores.shape[1]), dim=1)
        return [
            {
                "predictions": [
                    {"index": int(i), "score": float(s)}
                    for i, s in zip(top.indices[n], top.values[n], strict=True)
                ],
                "heatmap": maps[n].tolist(),
            }
            for n in range(x.shape[0])
        ]

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output


if __name__ == "__main__":
    api = GradCamAPI(max_batch_size=8, batch_timeout=0.01, api_path="/v1/explain")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(
        port=int(os.environ.get("PEER_PORT", "8001")), host="127.0.0.1", generate_client_file=False
    )
