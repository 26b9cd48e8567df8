"""The coded concepts the service's Segmentations and reports use, each defined once.

Standard codes where DICOM has one: DCM 130403 "Gradient-weighted class activation" (the
kind of map, for every method: they all weight a layer's activations by the class
score's gradient) and DCM 122157 "Probability". An explained class has the code the
models file gives it (``[models.<name>.codes]``, e.g. SNOMED CT); one without is coded in
a scheme of our own, ``99GRADCAM`` (PS3.16 8.2: designators starting "99" are private):
the code value is the class's index among the model's outputs, the meaning its label,
and the model is named beside it (algorithm parameters). Each object that uses that
scheme identifies it in its Coding Scheme Identification Sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service import package_version

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.sr.coding import Code

MANUFACTURER = "gradcam-service"
SCHEME = "99GRADCAM"


@dataclass(frozen=True)
class Explained:
    """How the maps of one image were made: the method, the layer and the model."""

    method: str
    layer: str
    model: str
    # The model's class codes from the models file: label -> (scheme, value, meaning).
    codes: Mapping[str, tuple[str, str, str]] = field(default_factory=dict)

    def parameters(self) -> dict[str, str]:
        """As algorithm parameters (``name=value``)."""
        return {"method": self.method, "layer": self.layer, "model": self.model}

    def class_code(self, index: int, label: str) -> Code:
        """The explained class's code: the models file's, else ``99GRADCAM``'s."""
        from pydicom.sr.coding import Code

        given = self.codes.get(label)
        if given is None:
            return _own_code(index, label)
        scheme, value, meaning = given
        return Code(value, scheme, meaning)

    def uses_own_scheme(self, labels: Iterable[str]) -> bool:
        """Whether any of ``labels`` is coded in ``99GRADCAM`` (no code of its own)."""
        return any(label not in self.codes for label in labels)


def version() -> str:
    return package_version(fallback="0")


def _text(value: str, limit: int) -> str:
    """``value`` as an LO/SH value: no backslash (the value separator), no control
    characters, at most ``limit`` characters. Labels come from the models file."""
    cleaned = "".join(c if c.isprintable() else " " for c in value.replace("\\", "/"))
    return cleaned.strip()[:limit] or "?"


def _own_code(index: int, label: str) -> Code:
    """The explained class as a code of the ``99GRADCAM`` scheme (module text)."""
    from pydicom.sr.coding import Code

    return Code(str(index), SCHEME, _text(label, 64))


def gradient_weighted_class_activation() -> Code:
    from pydicom.sr.coding import Code

    return Code("130403", "DCM", "Gradient-weighted class activation")


def probability() -> Code:
    from pydicom.sr.coding import Code

    return Code("122157", "DCM", "Probability")


def coding_scheme_identification() -> Dataset:
    """The Coding Scheme Identification Sequence item that names ``99GRADCAM``."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "gradcam-service class codes: index and label of a model's output"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    return item


def label_text(label: str, limit: int = 64) -> str:
    """A class label as it may be written into an LO (64) or SH (16) value."""
    return _text(label, limit)
