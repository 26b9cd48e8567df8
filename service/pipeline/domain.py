"""What a model is for, checked against what arrived: a DICOM image whose modality or
body part is not among those the models file declares for the model (``modalities``,
``body_parts``) is refused with a 422 ``out_of_domain``, or, with
``GRADCAM_OUT_OF_DOMAIN=mark``, explained with the reason in its result.

Why: a model answers whatever it is given. The chest X-ray demo model given an axial CT
slice scored opacity, mass and nodule 1.000 and put its heatmap on the spine. Only
DICOM says what an image is; a PNG or JPEG is taken as it comes (its channels are
fitted to the model's), and a DICOM file that does not say (no Body Part Examined) is
not refused for what it does not say.
"""

from __future__ import annotations

from typing import Any, Literal

from service.contract.errors import ErrorCode, InvalidField
from service.transport.interface import ModelInfo

DomainPolicy = Literal["refuse", "mark"]


def outside_domain(header: Any, model: ModelInfo) -> str | None:
    """Why the DICOM file whose header is ``header`` is outside ``model``'s declared
    domain, or None if it is inside (or says nothing the model declares)."""
    found = []
    for keyword, what, declared in (
        ("Modality", "modality", model.modalities),
        ("BodyPartExamined", "body part", model.body_parts),
    ):
        value = _attribute(header, keyword)
        if declared and value and value not in declared:
            found.append(f"its {what} is {value}, the model's {', '.join(declared)}")
    if not found:
        return None
    return f"Model '{model.name}' is not for this image: {'; '.join(found)}."


def _attribute(header: Any, keyword: str) -> str:
    """A code string in capitals; "" where the file has none or a value pydicom cannot
    read (a damaged header says nothing, and is not refused for it)."""
    try:
        return str(header.get(keyword, "") or "").strip().upper()
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
        return ""


def check_domain(header: Any, model: ModelInfo, index: int, policy: DomainPolicy) -> str | None:
    """The reason to mark image ``index`` with (policy "mark"), or a 422 (``refuse``)."""
    reason = outside_domain(header, model)
    if reason is None or policy == "mark":
        return reason
    raise InvalidField(
        f"Image {index}: {reason} Send it to a model made for it (GET /v1/models), or set "
        "GRADCAM_OUT_OF_DOMAIN=mark to have it explained and marked.",
        code=ErrorCode.OUT_OF_DOMAIN,
        field=f"images[{index}]",
    )
