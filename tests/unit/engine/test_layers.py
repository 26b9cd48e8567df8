"""The probe (service/engine/layers.py): what it offers, and what it refuses with the
reason ``gradcam-service layers`` prints (the defaults of a dozen architectures:
test_gradcam.py; transformers: test_transformers.py and layouts/)."""

from __future__ import annotations

import torch

from service.engine.layers import probe_layers, survey_layers
from tests.helpers import seeded_model
from tests.tiny_transformers import tiny_vit


def test_a_layer_that_runs_twice_is_refused_with_the_count() -> None:
    model = seeded_model("resnet18")
    survey = survey_layers(model, 3, (64, 64))
    assert survey.offered == probe_layers(model, 3, (64, 64))
    reasons = {r.name: (r.kind, r.reason) for r in survey.refused}
    # ResNet's blocks apply their one ReLU twice.
    assert reasons["layer4.1.relu"] == ("ReLU", "runs 2 times per forward pass")
    # The head and the pooled vector have no room for a map: not worth a line.
    assert "fc" not in reasons and "fc" not in {i.name for i in survey.offered}
    assert set(reasons) == {f"layer{i}.{j}.relu" for i in range(1, 5) for j in range(2)}


def test_a_tuple_outside_hugging_face_is_not_read() -> None:
    """torch's MultiheadAttention returns (output, weights): not a map the service reads
    (a Hugging Face layer's tuple is, test_hf_models.py)."""
    survey = survey_layers(tiny_vit(), 3, (32, 32))
    reasons = {r.name: r.reason for r in survey.refused}
    assert reasons == {
        f"encoder.layers.encoder_layer_{i}.self_attention": "returns a tuple of 2, not a tensor"
        for i in range(2)
    }


def test_the_probe_leaves_no_hooks() -> None:
    model = seeded_model("resnet18")
    survey_layers(model, 3, (64, 64))
    assert not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)
