"""Answers that say when they mean nothing, through the real server: a CT slice sent
to the chest demo model is a 422 naming both (the default, ``GRADCAM_OUT_OF_DOMAIN``
refuse), by the JSON door and as a raw DICOM body; a model without weights says so in
its listing, in each answer's ``random_weights`` and in a header, picture answers too."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pydicom.data import get_testdata_file

from tests.helpers import LiveServer, ServerFactory, encode, phantom_png

DEMO = Path(__file__).resolve().parents[3] / "service" / "demo"


@pytest.fixture(scope="module")
def served(
    module_live_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("domain")
    models = (
        (DEMO / "models.toml")
        .read_text()
        .replace(
            'weights = "phantom_net.safetensors"', f'weights = "{DEMO / "phantom_net.safetensors"}"'
        )
        .replace('labels = "labels.txt"', f'labels = "{DEMO / "labels.txt"}"')
    )
    models += textwrap.dedent(
        """
        [models.untrained]
        arch = "resnet18"
        num_classes = 3
        input_size = [64, 64]
        """
    )
    (folder / "models.toml").write_text(models)
    yield module_live_server(
        models_file=folder / "models.toml", env={"GRADCAM_OUT_OF_DOMAIN": "refuse"}
    )


def _ct_slice() -> bytes:
    return Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()


def test_a_ct_slice_to_the_chest_model_is_a_422(served: LiveServer) -> None:
    by_json = requests.post(
        f"{served.url}/v1/explain", json={"images": [encode(_ct_slice())]}, timeout=60
    )
    raw = requests.post(
        f"{served.url}/v1/explain",
        data=_ct_slice(),
        headers={"Content-Type": "application/dicom"},
        timeout=60,
    )
    for answer in (by_json, raw):
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["code"] == "out_of_domain"
        assert "modality is CT, the model's CR, DX" in error["message"]


def test_the_listing_says_what_each_model_is_for(served: LiveServer) -> None:
    listed = {
        m["name"]: m for m in requests.get(f"{served.url}/v1/models", timeout=30).json()["models"]
    }
    assert listed["phantom"]["modalities"] == ["CR", "DX"]
    assert listed["phantom"]["body_parts"] == ["CHEST"]
    assert listed["phantom"]["random_weights"] is False
    assert listed["untrained"]["random_weights"] is True


def test_a_model_without_weights_says_so_in_every_answer(served: LiveServer) -> None:
    image = phantom_png(3)
    answer = requests.post(
        f"{served.url}/v1/explain",
        json={"model": "untrained", "images": [encode(image)]},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["random_weights"] is True
    assert answer.headers["X-Gradcam-Random-Weights"] == "true"
    picture = requests.post(
        f"{served.url}/v1/explain?model=untrained&format=overlay",
        data=image,
        headers={"Content-Type": "image/png"},
        timeout=60,
    )
    assert picture.headers["Content-Type"] == "image/png"
    assert picture.headers["X-Gradcam-Random-Weights"] == "true"
    trained = requests.post(
        f"{served.url}/v1/explain", json={"images": [encode(image)]}, timeout=60
    )
    assert trained.json()["random_weights"] is False
    assert "X-Gradcam-Random-Weights" not in trained.headers
