"""The models file (TOML): which models a service serves and how each is loaded.

``[models.<name>]`` tables, validated once at start-up (``load_models_file``): a mistake
raises ``ConfigError`` with a message that names the model and key at fault. The engine
loads what they describe (``engine/loading/``); preflight checks their files first.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from service.contract.archives import (
    EXPORT_LIBRARY,
    SHIP_INSTEAD,
    TORCHSCRIPT_NAMES,
    WHY_NOT_TORCHSCRIPT,
)
from service.contract.errors import ConfigError
from service.contract.terms import (
    IMAGE_INTERPOLATIONS,
    VOLUME_INTERPOLATIONS,
    Interpolation,
    LayoutSetting,
    Library,
    MemoryFormat,
    Precision,
    ResizeMode,
)

# A keyword argument of an architecture's factory, as TOML writes it.
InputSize2D = tuple[Annotated[StrictInt, Field(ge=8)], Annotated[StrictInt, Field(ge=8)]]
InputSize3D = tuple[
    Annotated[StrictInt, Field(ge=4)],
    Annotated[StrictInt, Field(ge=4)],
    Annotated[StrictInt, Field(ge=4)],
]
PositiveNumber = Annotated[StrictFloat | StrictInt, Field(gt=0)]
# The models file keys only a volume model reads.
VOLUME_KEYS = ("window", "spacing", "orientation")
ArgValue = StrictBool | StrictInt | StrictFloat | StrictStr | list[Any] | dict[str, Any]
# The keys of how an image becomes the input, each taken from the models file, else the
# library's config, else its default here; the model detail says which (``sources``).
PREPROCESSING_KEYS = (
    "channels",
    "input_size",
    "mean",
    "std",
    "resize",
    "crop_pct",
    "interpolation",
)

DEMO_MODELS_FILE = Path(__file__).resolve().parents[1] / "demo" / "models.toml"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ClassCode(BaseModel):
    """A coded concept for one class (``[models.<name>.codes]``), as DICOM Segmentations
    and SR reports write the class: e.g. SNOMED CT ``{scheme = "SCT", value =
    "27925004", meaning = "Nodule"}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Coding Scheme Designator (SH), Code Value (SH, or a Long Code Value up to 64) and
    # Code Meaning (LO): no backslash, the DICOM value separator.
    scheme: Annotated[StrictStr, Field(min_length=1, max_length=16, pattern=r"^[^\\]+$")]
    value: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[^\\]+$")]
    meaning: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[^\\]+$")]


class ModelSpec(BaseModel):
    """One ``[models.<name>]`` table of the models file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Where the architecture comes from, and its name there: a torchvision model name (or
    # "package.module:factory"), a timm.create_model name, a Hugging Face save_pretrained
    # folder or hub id, a MONAI network class, a torch.export archive (``.pt2``, relative
    # to the models file); ``arch_args``: keyword arguments for it.
    library: Library = "torchvision"
    arch: Annotated[StrictStr, Field(min_length=1)]
    arch_args: dict[StrictStr, ArgValue] = Field(default_factory=dict)
    weights: Annotated[StrictStr, Field(min_length=1)] | None = None
    labels: Annotated[StrictStr, Field(min_length=1)] | None = None
    num_classes: Annotated[StrictInt, Field(gt=0)] | None = None
    multilabel: StrictBool = False
    channels: Annotated[StrictInt, Field(ge=1, le=3)] = 3
    # How an image becomes the model's input. Each key the file leaves out is taken from
    # the library's own config where it has one (timm's data config, the Hugging Face
    # image processor), else from the defaults here (``PREPROCESSING_KEYS``).
    # [height, width] of the model input, as torch orders a tensor's last two dims; three
    # numbers make a volume model, its input's spatial shape in the array order of the
    # volume once oriented (MONAI's spatial_size: x, y, z for "RAS").
    input_size: InputSize2D | InputSize3D = (224, 224)
    mean: tuple[StrictFloat | StrictInt, ...] | None = None
    std: tuple[StrictFloat | StrictInt, ...] | None = None
    resize: ResizeMode = "stretch"
    # The share of the resized image the model sees (timm's crop_pct): it is resized to
    # input_size / crop_pct (the shorter side for "crop", each side for "stretch"), then
    # its centre cut to input_size.
    crop_pct: Annotated[StrictFloat | StrictInt, Field(gt=0, le=1)] = 1.0
    interpolation: Interpolation = "bilinear"
    # A volume's way to the input, as MONAI's standard pipeline (imaging/volume_fitting.py):
    # Orientation to ``orientation``, Spacing to ``spacing`` mm (if given), the ``window``
    # [low, high] mapped to [0, 1] and clipped (ScaleIntensityRange; HU for CT), then
    # Resize to ``input_size``.
    window: tuple[StrictFloat | StrictInt, StrictFloat | StrictInt] | None = None
    spacing: tuple[PositiveNumber, PositiveNumber, PositiveNumber] | None = None
    orientation: Annotated[StrictStr, Field(pattern=r"^[LRAPSI]{3}$")] = "RAS"
    layer: Annotated[StrictStr, Field(min_length=1)] | None = None
    # What the model returns: raw "logits" (the service applies softmax/sigmoid), or
    # "probabilities" (its head ends in one; Grad-CAM still takes the score before it).
    output: Literal["logits", "probabilities"] = "logits"
    # Where the logits are in what the forward pass returns, when it is not a tensor and
    # they cannot be found: a key of a dict or attribute of an output object ("logits"),
    # or an index of a tuple (0).
    logits: StrictStr | Annotated[StrictInt, Field(ge=0)] | None = None
    # How it runs (engine/tuning.py): bfloat16 autocast if asked for ("auto": where the
    # hardware has it), after a fidelity check; NHWC if a timed probe finds it faster.
    precision: Precision | Literal["auto"] = "fp32"
    memory_format: MemoryFormat | Literal["auto"] = "auto"
    # Batch norms folded into the convolutions before them at load (engine/folding.py).
    fold_batch_norm: StrictBool = True
    # How its layers' outputs hold their feature maps (engine/layouts/): "auto" knows
    # CNNs and the transformers of torchvision, timm and Hugging Face; the others declare
    # a model that "auto" does not know.
    layout: LayoutSetting = "auto"
    # With layout = "tokens": the tokens before the grid (class, distillation, register).
    prefix_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    # Class label -> its code in DICOM Segmentations and SR reports (dicom_codes.py);
    # a class without one gets the service's own scheme, 99GRADCAM.
    codes: dict[StrictStr, ClassCode] = Field(default_factory=dict)
    # What the model is for (pipeline/domain.py): DICOM Modality codes ("CR", "DX") and
    # Body Part Examined values ("CHEST"); a DICOM image outside them is refused.
    modalities: tuple[Annotated[StrictStr, Field(min_length=1)], ...] = ()
    body_parts: tuple[Annotated[StrictStr, Field(min_length=1)], ...] = ()
    default: StrictBool = False

    @field_validator("modalities", "body_parts")
    @classmethod
    def _dicom_codes_in_capitals(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # DICOM writes both in capitals (CS values); "chest" must match "CHEST".
        return tuple(code.strip().upper() for code in value)

    @field_validator("library", mode="before")
    @classmethod
    def _torchscript_is_refused(cls, value: object) -> object:
        if isinstance(value, str) and value.lower() in TORCHSCRIPT_NAMES:
            raise ValueError(f"TorchScript is not served: {WHY_NOT_TORCHSCRIPT}. {SHIP_INSTEAD}")
        return value

    @model_validator(mode="after")
    def _check_archive(self) -> ModelSpec:
        if self.library != EXPORT_LIBRARY:
            return self
        for key in ("weights", "arch_args"):
            if getattr(self, key):
                raise ValueError(
                    f"a torch.export archive holds the model and its weights: {key} is not "
                    f'read with library = "{EXPORT_LIBRARY}"; leave it out'
                )
        return self

    @model_validator(mode="after")
    def _check_normalisation(self) -> ModelSpec:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        for key in ("mean", "std"):
            values = getattr(self, key)
            # Without channels, a library's model may take its own count (MONAI's
            # in_channels): then a value for each, or one for all, is checked at load.
            known = self.given("channels") or self.library == "torchvision"
            if values is not None and known and len(values) != self.channels:
                raise ValueError(f"{key} has {len(values)} values but channels = {self.channels}")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError("std values must be positive")
        if self.prefix_tokens is not None and self.layout != "tokens":
            raise ValueError('prefix_tokens is only read with layout = "tokens"')
        if self.crop_pct < 1 and self.resize == "letterbox":
            raise ValueError('crop_pct cuts the image: it goes with resize "crop" or "stretch"')
        if self.library not in ("torchvision", EXPORT_LIBRARY) and ":" in self.arch:
            raise ValueError(
                f"arch '{self.arch}' is a factory (package.module:factory), which is read with "
                f'library = "torchvision" (the default), not "{self.library}"'
            )
        return self

    @model_validator(mode="after")
    def _check_volume(self) -> ModelSpec:
        if not self.is_volume:
            given = [key for key in VOLUME_KEYS if self.given(key)]
            if given:
                verb = "applies" if len(given) == 1 else "apply"
                raise ValueError(
                    f"{', '.join(given)} {verb} only to a volume model (input_size of three "
                    "numbers)"
                )
            if self.interpolation not in IMAGE_INTERPOLATIONS:
                raise ValueError(
                    f'interpolation "{self.interpolation}" is for volumes; an image model '
                    f"takes one of {', '.join(IMAGE_INTERPOLATIONS)}"
                )
            return self
        if self.given("interpolation") and self.interpolation not in VOLUME_INTERPOLATIONS:
            raise ValueError(
                f'interpolation "{self.interpolation}" is for images; a volume model takes '
                f"one of {', '.join(VOLUME_INTERPOLATIONS)} (as MONAI's Resize)"
            )
        if self.resize != "stretch" or self.crop_pct != 1:
            raise ValueError(
                "a volume is resized to input_size whole (MONAI's Resize): resize and "
                "crop_pct are for images"
            )
        if self.given("channels") and self.channels != 1:
            raise ValueError("a volume model takes one channel (channels = 1)")
        if self.window is not None and not self.window[0] < self.window[1]:
            raise ValueError(f"window must be [low, high] with low < high, not {list(self.window)}")
        axes = {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}
        if len({axes[letter] for letter in self.orientation}) != 3:
            raise ValueError(
                f'orientation "{self.orientation}" must name each axis once: one of L/R, '
                'one of A/P, one of S/I (e.g. "RAS", "LPS")'
            )
        return self

    @property
    def is_volume(self) -> bool:
        """A 3-D model: its input_size has three numbers."""
        return len(self.input_size) == 3

    def given(self, key: str) -> bool:
        """Whether the models file sets ``key`` (else a library's config or a default)."""
        return key in self.model_fields_set


class ModelsFile(BaseModel):
    """The whole models file: ``[models.<name>]`` tables, in file order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelSpec] = Field(min_length=1)
    # Where relative paths in the file are resolved from.
    base_dir: Path = Path(".")

    @field_validator("models")
    @classmethod
    def _names_are_path_segments(cls, models: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        # A name is a segment of /v1/models/<name> and /v2/models/<name>/infer, and a
        # Triton or KServe model name: "a/b" would load and be unreachable there.
        for name in models:
            if not MODEL_NAME.fullmatch(name):
                raise ValueError(
                    f"model name {name!r} is not one path segment: use letters, digits, "
                    "'_', '-' and '.', starting with a letter or digit, up to 64 characters"
                )
        return models

    @property
    def default_model(self) -> str:
        defaults = [name for name, spec in self.models.items() if spec.default]
        return defaults[0] if defaults else next(iter(self.models))

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path


def _describe_validation_error(error: ValidationError, path: Path) -> str:
    lines = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        if len(loc) >= 2 and loc[0] == "models":
            where = f"model '{loc[1]}'"
            if len(loc) > 2:
                where += f", key '{loc[2]}'"
            if len(loc) > 3:
                where += f" item {'.'.join(loc[3:])}"
        else:
            where = f"key '{'.'.join(loc)}'" if loc else "the file"
        lines.append(f"{where}: {item['msg']}")
    return f"models file {path}: " + "; ".join(lines)


def parse_models_file(data: Mapping[str, object], path: Path) -> ModelsFile:
    """Validate parsed TOML ``data``; relative paths resolve against ``path``'s folder."""
    defaults = [
        name
        for name, table in (data.get("models") or {}).items()  # type: ignore[attr-defined]
        if isinstance(table, Mapping) and table.get("default") is True
    ]
    if len(defaults) > 1:
        raise ConfigError(
            f"models file {path}: more than one model has default = true: {', '.join(defaults)}"
        )
    try:
        return ModelsFile.model_validate({**data, "base_dir": path.resolve().parent})
    except ValidationError as error:
        raise ConfigError(_describe_validation_error(error, path)) from None


def load_models_file(path: Path | str) -> ModelsFile:
    """Read and validate a models file; every mistake is a ``ConfigError``."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(
            f"models file {path} does not exist (--models or GRADCAM_MODELS_FILE; leave both "
            "unset for the bundled demo model)"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"models file {path} is not valid TOML: {error}") from None
    if "base_dir" in data:
        raise ConfigError(f"models file {path}: key 'base_dir' is not allowed at the top level")
    return parse_models_file(data, path)
