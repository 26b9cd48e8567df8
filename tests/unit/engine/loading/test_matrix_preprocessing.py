"""Every model of the matrix (tests/model_matrix.py) is fed what its library feeds it:
the tensor the service makes of the matrix's picture (the HTTP side's fitting, the
engine's normalisation) equals, to float rounding, timm's ``create_transform``, the
Hugging Face image processor's (PIL) or MONAI's [0, 1] of the same picture.

The server test of the matrix checks scores, which a random net may barely move with
its input (MobileViT's fed ImageNet statistics in the wrong channel order scored within
2e-4): here the pixels themselves are compared."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.contract.models_file import load_models_file
from service.engine.loading.models import load_model
from tests.model_matrix import ENTRIES, Entry, build_reference, matrix_image, preprocess, write
from tests.unit.engine.loading.test_libraries import _our_input

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("entry", ENTRIES, ids=[entry.name for entry in ENTRIES])
def test_the_input_is_the_library_s_own(tmp_path: Path, entry: Entry) -> None:
    reference = build_reference(entry)
    (tmp_path / "models.toml").write_text(write(entry, reference, tmp_path))
    model = load_model(entry.name, load_models_file(tmp_path / "models.toml"))
    image = matrix_image(entry)
    theirs = preprocess(entry, reference, image, tmp_path)
    ours = _our_input(model, image)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())
