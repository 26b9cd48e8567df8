"""What a model is for (service/pipeline/domain.py): the chest demo model refuses an
axial CT slice (it scored opacity, mass and nodule 1.000 on one), explains its own chest
radiograph, marks rather than refuses where the setting says so, and takes images that
say nothing (a PNG, a DICOM file without a body part) as they come."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from service.contract.errors import ErrorCode, InvalidField
from service.contract.requests import ExplainRequest
from service.contract.responses import to_json
from service.contract.settings import Settings
from service.engine.runtime import Runtime
from service.pipeline.domain import DomainPolicy
from service.pipeline.explain import explain
from tests.helpers import encode, phantom_png

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "phantom_nodule.dcm"


def _ct_slice() -> bytes:
    return Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()


def _with(data: bytes, **attributes: str) -> bytes:
    """``data``, a DICOM file, with ``attributes`` set (None-valued: removed)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in attributes.items():
        if value:
            setattr(ds, keyword, value)
        elif keyword in ds:
            delattr(ds, keyword)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _explain(runtime: Runtime, data: bytes, policy: DomainPolicy) -> object:
    settings = Settings(device="cpu", out_of_domain=policy)
    request = ExplainRequest.model_validate({"images": [encode(data)]})
    return explain(request, runtime, settings)


def test_a_ct_slice_is_refused_naming_what_the_model_is_for(runtime: Runtime) -> None:
    with pytest.raises(InvalidField) as refused:
        _explain(runtime, _ct_slice(), "refuse")
    assert refused.value.code == ErrorCode.OUT_OF_DOMAIN and refused.value.status == 422
    message = str(refused.value)
    assert "its modality is CT, the model's CR, DX" in message
    assert "GRADCAM_OUT_OF_DOMAIN=mark" in message


def test_marked_it_is_explained_with_the_reason(runtime: Runtime) -> None:
    answer = _explain(runtime, _ct_slice(), "mark")
    reason = answer.results[0].out_of_domain  # type: ignore[attr-defined]
    assert reason is not None and "modality is CT" in reason
    # In the JSON only where there is a reason: never null (openapi.yaml says a string).
    assert json.loads(to_json(answer))["results"][0]["out_of_domain"] == reason  # type: ignore[arg-type]
    inside = _explain(runtime, EXAMPLE.read_bytes(), "mark")
    assert "out_of_domain" not in json.loads(to_json(inside))["results"][0]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("attributes", "refused"),
    [
        ({}, False),  # the demo's own: CR, CHEST
        ({"BodyPartExamined": "KNEE"}, True),
        ({"BodyPartExamined": "chest"}, False),  # capitals or not
        ({"BodyPartExamined": ""}, False),  # says nothing: not refused for it
        ({"Modality": "DX"}, False),
        ({"Modality": "MR"}, True),
    ],
)
def test_modality_and_body_part(
    runtime: Runtime, attributes: dict[str, str], refused: bool
) -> None:
    data = _with(EXAMPLE.read_bytes(), **attributes)
    if refused:
        with pytest.raises(InvalidField):
            _explain(runtime, data, "refuse")
    else:
        answer = _explain(runtime, data, "refuse")
        assert answer.results[0].out_of_domain is None  # type: ignore[attr-defined]


def test_an_image_that_says_nothing_is_taken_as_it_comes(runtime: Runtime) -> None:
    answer = _explain(runtime, phantom_png(3), "refuse")
    assert answer.results[0].out_of_domain is None  # type: ignore[attr-defined]
    assert answer.random_weights is False  # type: ignore[attr-defined]
