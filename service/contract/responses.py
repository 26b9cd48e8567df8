"""What the service answers: the pydantic models of every JSON body it returns, and the
one serialiser.

The server, the web page's requests and the CLI build these models and nothing else
(``to_json``); ``openapi.yaml``'s response schemas are generated from them
(``python -m service.contract.openapi``), so the descriptions below are what API users
read. Error bodies are ``errors.ErrorResponse``.

A field that does not apply is absent from the JSON, not null: optional fields are
typed ``X | Absent`` and left unset, and ``to_json`` writes only the fields that were
set (``dicom`` is the exception: asked for and not DICOM, it is a real null).
Heatmap arrays stay numpy arrays until orjson writes them (a 1024² map as a list of
Python floats would cost more than drawing it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema

from service.contract.terms import (
    HeatmapEncoding,
    HeatmapFormat,
    Method,
    Precision,
    ResizeMode,
)

# A field left out of the JSON when it does not apply (never written as null).
Absent = SkipJsonSchema[None]
Count = Annotated[int, Field(ge=1)]
# A 4×4 affine matrix, rows of four numbers.
Affine = Annotated[
    list[Annotated[list[float], Field(min_length=4, max_length=4)]],
    Field(min_length=4, max_length=4),
]
_Base64 = Annotated[str, WithJsonSchema({"type": "string", "contentEncoding": "base64"})]


def _grid(value: Any) -> np.ndarray:
    """A heatmap array: the engine's float array as it is, or rows (a volume's slices of
    rows) read back from JSON."""
    grid = value if isinstance(value, np.ndarray) else np.asarray(value, dtype=np.float32)
    if grid.ndim not in (2, 3):
        raise ValueError(
            f"a heatmap array has rows (or slices of rows) of values, not {grid.ndim} dimensions"
        )
    return grid


HeatmapValues = Annotated[
    np.ndarray,
    PlainValidator(_grid),
    PlainSerializer(lambda grid: grid.tolist(), when_used="json"),
    WithJsonSchema(
        {
            "type": "array",
            "items": {
                "type": "array",
                "items": {
                    "anyOf": [
                        {"type": "number", "minimum": 0, "maximum": 1},
                        {
                            "type": "array",
                            "items": {"type": "number", "minimum": 0, "maximum": 1},
                        },
                    ]
                },
            },
        }
    ),
]


class Answer(BaseModel):
    """The base of every answer model (``catalog_responses.py``'s too)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Prediction(Answer):
    """A class and the model's score for it (softmax, or sigmoid for multi-label models)."""

    index: int = Field(ge=0)
    label: str
    score: float = Field(ge=0, le=1)


class DicomUids(Answer):
    study: str
    series: str
    instance: str


class StoreOutcome(Answer):
    ok: bool
    message: str


class DicomObject(Answer):
    """A DICOM object made for one image (its ``segmentation`` or ``report``): ``data``
    and ``uids``, or a ``reason`` why it cannot be made for this image."""

    data: _Base64 | Absent = Field(
        default=None, description="A base64 DICOM Part 10 file (application/dicom)."
    )
    reason: str | Absent = Field(
        default=None, description="Why this object cannot be made for this image."
    )
    uids: DicomUids | Absent = Field(
        default=None, description="The object's study, series and instance UIDs."
    )
    stored: StoreOutcome | Absent = Field(
        default=None, description="With store: whether the DICOMweb server took the object."
    )


class VolumePeak(Answer):
    """A volume map's highest voxel: its index on the map's grid and its centre in RAS+
    millimetres."""

    voxel: Annotated[list[int], Field(min_length=3, max_length=3)]
    mm: Annotated[list[float], Field(min_length=3, max_length=3)]


class Heatmap(Answer):
    """A heatmap: ``values`` (format ``array``) or ``data`` (a base64 picture in
    ``encoding``, or a DICOM Part 10 file for ``dicom-sc``/``dicom-pm``), or neither
    (``none``; ``dicom-seg``, whose one object per image is the result's
    ``segmentation``; or a ``reason`` why that format cannot be made for this image)."""

    format: HeatmapFormat
    width: Count
    height: Count
    raw_max: float = Field(
        ge=0,
        description=(
            "The map's maximum before min-max normalisation (in units of the score's "
            "gradient times the activation): 0 means the map was all zero."
        ),
    )
    depth: Count | Absent = Field(
        default=None,
        description=(
            "Volumes: the map's first axis. A volume's map is depth × height × width in its "
            "array order (a NIfTI file's i, j, k), on the grid `affine` places."
        ),
    )
    affine: Affine | Absent = Field(
        default=None,
        description=(
            "Volumes: the 4×4 affine of the map's grid, voxel index (a, b, c, 1) to RAS+ "
            "millimetres, as NIfTI and MONAI write it (the layer's, the input's or the file's "
            "grid, after `size`)."
        ),
    )
    peak: VolumePeak | Absent = Field(
        default=None, description="Volumes: where the map is highest."
    )
    values: HeatmapValues | Absent = Field(
        default=None,
        description="format array: rows of floats in [0, 1] (a volume's: slices of rows).",
    )
    encoding: HeatmapEncoding | Absent = Field(
        default=None, description="format png, overlay, gray: how `data` is encoded."
    )
    data: _Base64 | Absent = Field(
        default=None,
        description=(
            "format png, overlay, gray: the base64 picture, in `encoding`; dicom-sc, "
            "dicom-pm: a base64 DICOM Part 10 file (application/dicom); nifti: a base64 "
            ".nii.gz (application/gzip)."
        ),
    )
    reason: str | Absent = Field(
        default=None,
        description=(
            "dicom-sc, dicom-pm, dicom-seg: why that object cannot be made for this image."
        ),
    )
    uids: DicomUids | Absent = Field(
        default=None,
        description="dicom-sc, dicom-pm: the object's study, series and instance UIDs.",
    )
    segment: Annotated[int, Field(ge=1)] | Absent = Field(
        default=None,
        description=(
            "dicom-seg: this class's segment number in the result's `segmentation` (the "
            "pixels where its normalised map is at least 0.5)."
        ),
    )
    stored: StoreOutcome | Absent = Field(
        default=None, description="With store: whether the DICOMweb server took the object."
    )


_Curve = Annotated[list[Annotated[float, Field(ge=0, le=1)]], Field(min_length=21, max_length=21)]


class Faithfulness(Answer):
    """How faithful the heatmap is to the model (RISE deletion and insertion, Petsiuk et
    al. 2018; the definition is in docs/trust.md): the explained class's score while the
    pixels the heatmap ranks highest are replaced by a blurred copy of the image
    (deletion), or put back into the blurred copy (insertion), in 20 steps of 5 %."""

    deletion_auc: float = Field(
        ge=0, le=1, description="Area under the deletion curve: lower is more faithful."
    )
    insertion_auc: float = Field(
        ge=0, le=1, description="Area under the insertion curve: higher is more faithful."
    )
    deletion: _Curve = Field(
        description="The score after replacing 0 %, 5 %, … 100 % of the pixels (21 values)."
    )
    insertion: _Curve = Field(
        description="The score after putting back 0 %, 5 %, … 100 % of the pixels (21 values)."
    )


class Explanation(Answer):
    target: Prediction
    heatmap: Heatmap
    faithfulness: Faithfulness | Absent = Field(
        default=None, description='With include "faithfulness".'
    )


class VolumeGeometry(Answer):
    """How a volume was fitted to a volume model's input (MONAI's Orientation, Spacing,
    ScaleIntensityRange and Resize): the input's grid and the file's, each by its affine."""

    kind: Literal["volume"] = Field(description="Always 'volume': not an image's geometry.")
    orientation: str = Field(description="The input's axes, e.g. RAS.")
    input_shape: Annotated[list[int], Field(min_length=3, max_length=3)]
    input_spacing: Annotated[list[float], Field(min_length=3, max_length=3)] = Field(
        description="The input's voxel size in mm, along its three axes."
    )
    input_affine: Affine = Field(description="The model input's voxel index → RAS+ mm.")
    affine: Affine = Field(description="The file's own voxel index → RAS+ mm.")


class Geometry(Answer):
    """How the image was fitted to the model input."""

    resize: ResizeMode
    input_width: Count
    input_height: Count
    box: Annotated[list[float], Field(min_length=4, max_length=4)] = Field(
        description=(
            "The part of the image (x0, y0, x1, y1 in its pixels, possibly beyond its edges "
            "for letterbox) that the model input covers."
        )
    )


class Picture(Answer):
    """include "image": the image as overlays are drawn on it (its original pixel grid,
    8-bit, after EXIF orientation, DICOM rescale, window and MONOCHROME1 inversion),
    encoded like the heatmaps (heatmap.encoding). A volume's: the volume in 8 bits after
    the model's window, on the heatmaps' grid (the same `affine`), as a .nii.gz (encoding
    nifti), so a viewer lays a map over it voxel for voxel."""

    width: Count
    height: Count
    depth: Count | Absent = Field(default=None, description="Volumes: the first axis.")
    encoding: HeatmapEncoding | Literal["nifti"]
    data: _Base64


class ImageResult(Answer):
    """One image's answer: its size, how it was fitted, the top classes, and one
    explanation per target. A volume's size is depth × height × width in its array
    order (a NIfTI file's i, j, k)."""

    width: Count
    height: Count
    depth: Count | Absent = Field(default=None, description="Volumes: the first axis.")
    geometry: Geometry | VolumeGeometry
    predictions: list[Prediction]
    explanations: Annotated[list[Explanation], Field(min_length=1)]
    image: Picture | Absent = None
    out_of_domain: str | Absent = Field(
        default=None,
        description=(
            "With GRADCAM_OUT_OF_DOMAIN=mark: why this DICOM image is not one the model is "
            "for (its modality or body part against the model's declared ones)."
        ),
    )
    segmentation: DicomObject | Absent = Field(
        default=None,
        description=(
            "heatmap.format dicom-seg: the image's DICOM Segmentation (BINARY), one segment "
            "per explanation (its heatmap's `segment`), or the reason it cannot be made."
        ),
    )
    report: DicomObject | Absent = Field(
        default=None,
        description=(
            "report dicom-sr: the image's DICOM SR Measurement Report (TID 1500), or the "
            "reason it cannot be made."
        ),
    )
    dicom: dict[str, Any] | None = Field(
        default=None,
        description=(
            'include "dicom": the DICOM attributes read (PatientName, PatientID, StudyDate, '
            "Modality, Rows, Columns, ... by DICOM keyword, those the file has), "
            "TransferSyntax, frame, and window (source file / voi_lut / full_range, with "
            "center and width from the file); null for other formats."
        ),
    )


class ExplainResponse(Answer):
    """Body of a 200 answer to ``POST /v1/explain``: one result per image, in the order
    of ``images``."""

    model: str
    method: Method
    layer: str
    precision: Precision = Field(
        description=(
            "What computed the answer: float32, or bfloat16 autocast (the model's "
            "`precision` in the models file, after its check against float32 at load)."
        )
    )
    results: list[ImageResult]
    random_weights: bool = Field(
        default=False,
        description=(
            "True when the model runs on random weights (the models file gives none): its "
            "scores and maps mean nothing. Also the header X-Gradcam-Random-Weights."
        ),
    )


def _set_fields(answer: Any) -> dict[str, Any]:
    """orjson's fallback for our models: the fields that were set, in declared order."""
    if isinstance(answer, BaseModel):
        chosen = answer.model_fields_set
        return {name: value for name, value in answer.__dict__.items() if name in chosen}
    raise TypeError(f"{type(answer).__name__} is not part of the contract")


def to_json(answer: BaseModel) -> bytes:
    """The one way a response becomes bytes (numpy arrays written by orjson directly)."""
    return orjson.dumps(answer, default=_set_fields, option=orjson.OPT_SERIALIZE_NUMPY)
