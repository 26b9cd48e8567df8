"""Settings (``GRADCAM_*`` environment variables) and the models file (TOML).

Both are validated once, at start-up: a mistake raises ``ConfigError`` with a
message that names the setting, or the model and key, at fault.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    SecretStr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from service.contract.errors import ConfigError
from service.contract.terms import LayoutSetting, MemoryFormat, Precision, ResizeMode

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

    arch: Annotated[StrictStr, Field(min_length=1)]
    weights: Annotated[StrictStr, Field(min_length=1)] | None = None
    labels: Annotated[StrictStr, Field(min_length=1)] | None = None
    num_classes: Annotated[StrictInt, Field(gt=0)] | None = None
    multilabel: StrictBool = False
    channels: Annotated[StrictInt, Field(ge=1, le=3)] = 3
    # [height, width] of the model input, as torch orders a tensor's last two dims.
    input_size: tuple[Annotated[StrictInt, Field(ge=8)], Annotated[StrictInt, Field(ge=8)]] = (
        224,
        224,
    )
    mean: tuple[StrictFloat | StrictInt, ...] | None = None
    std: tuple[StrictFloat | StrictInt, ...] | None = None
    layer: Annotated[StrictStr, Field(min_length=1)] | None = None
    resize: ResizeMode = "stretch"
    # What the model returns: raw "logits" (the service applies softmax/sigmoid), or
    # "probabilities" (its head ends in one; Grad-CAM still takes the score before it).
    output: Literal["logits", "probabilities"] = "logits"
    # How it runs (engine/tuning.py): bfloat16 autocast if asked for ("auto": where the
    # hardware has it), after a fidelity check; NHWC if a timed probe finds it faster.
    precision: Precision | Literal["auto"] = "fp32"
    memory_format: MemoryFormat | Literal["auto"] = "auto"
    # Batch norms folded into the convolutions before them at load (engine/folding.py).
    fold_batch_norm: StrictBool = True
    # How its layers' outputs hold their feature maps (engine/layouts.py): "auto" knows
    # torchvision's CNNs, ViT and Swin; the others declare a model that "auto" does not know.
    layout: LayoutSetting = "auto"
    # With layout = "tokens": the tokens before the grid (class, distillation, register).
    prefix_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    # Class label -> its code in DICOM Segmentations and SR reports (dicom_codes.py);
    # a class without one gets the service's own scheme, 99GRADCAM.
    codes: dict[StrictStr, ClassCode] = Field(default_factory=dict)
    default: StrictBool = False

    @model_validator(mode="after")
    def _check_normalisation(self) -> ModelSpec:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and len(values) != self.channels:
                raise ValueError(f"{key} has {len(values)} values but channels = {self.channels}")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError("std values must be positive")
        if self.prefix_tokens is not None and self.layout != "tokens":
            raise ValueError('prefix_tokens is only read with layout = "tokens"')
        return self


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


Device = Literal["auto", "cpu", "cuda"]


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota
    (a container limited to 2 CPUs on a 64-core host has 2, not 64)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, int(quota + 0.5)))
    return max(1, cores)


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max``, or v1 CFS quota/period), if limited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


class Settings(BaseModel):
    """Service settings; ``Settings.from_env()`` reads them from ``GRADCAM_*`` variables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models_file: Path | None = None
    device: Device = "auto"
    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    # 0 = sized for the machine: HTTP workers one per core, engines one per visible
    # GPU (else one), torch threads the cores shared among the engines.
    workers: Annotated[int, Field(ge=0)] = 0
    threads: Annotated[int, Field(ge=0)] = 0
    engines: Annotated[int, Field(ge=0)] = 0
    torch_threads: Annotated[int, Field(ge=0)] = 0
    # float16 autocast for the forward pass on CUDA (ignored on the CPU).
    autocast: bool = False
    # Micro-batching (engine/batching.py): images per engine call, an optional extra
    # wait for a fuller batch, the queue bounds (full → 503: requests waiting, or
    # seconds of work ahead at the measured pace) and the deadline (→ 504).
    max_batch_size: PositiveInt = 16
    max_batch_delay_s: Annotated[float, Field(ge=0, le=10)] = 0.0
    # Batches padded up to a few fixed sizes (1, 2, 4, … max): one shape per bucket for
    # cuDNN and CUDA graphs. Off until measured on a GPU; on a CPU padding is waste.
    batch_buckets: Literal["on", "off"] = "off"
    # CUDA graphs of forward + gradient + CAM (engine/cuda_graphs.py): "auto" on a CUDA
    # device, "on" everywhere it can (a CPU falls back to eager). Both bucket batches.
    # Off until measured on a GPU.
    cuda_graphs: Literal["auto", "on", "off"] = "off"
    max_queue: PositiveInt = 256
    max_queue_wait_s: Annotated[float, Field(ge=0)] = 5.0
    request_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    # Slow clients (server/worker.py): the headers must arrive within this, and a body
    # or an answer may not stall for longer (each within request_timeout_s in all).
    client_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # Supervision (supervisor.py): engine crashes in a row (each up less than a
    # minute) before serve gives up and exits non-zero; the drain allowed on SIGTERM.
    engine_max_restarts: Annotated[int, Field(ge=0)] = 5
    # A hung engine (heartbeat.py): past the first, workers answer 503 at once and fail
    # what waits on it; past the second, the supervisor kills and restarts it.
    engine_heartbeat_timeout_s: Annotated[float, Field(ge=0.5)] = 1.5
    engine_hang_restart_s: Annotated[float, Field(gt=0)] = 10.0
    shutdown_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    # The engines' memory allocator (supervisor.py): tcmalloc where installed, else glibc's
    # malloc tuned to keep its pages; "system": as the environment says.
    engine_allocator: Literal["auto", "tcmalloc", "glibc", "system"] = "auto"
    # What the whole process tree may use (memory.py); 0 = 90 % of the cgroup's memory
    # limit, else 75 % of the machine's RAM.
    memory_budget_mb: Annotated[int, Field(ge=0)] = 0
    # What one request may cost (budgets.py; docs/reliability.md): checked before the work.
    max_images_per_request: PositiveInt = 32
    max_explanations_per_request: PositiveInt = 128
    # include "faithfulness": 39 forward passes per explanation (engine/faithfulness.py).
    max_faithfulness_per_request: PositiveInt = 32
    max_image_pixels: PositiveInt = 25_000_000
    max_image_side: PositiveInt = 16384
    max_request_pixels: PositiveInt = 100_000_000
    max_output_pixels: PositiveInt = 64_000_000
    max_array_values: PositiveInt = 4 * 1024 * 1024
    max_request_bytes: PositiveInt = 64 * 1024 * 1024
    # Access (server/security.py): bearer tokens (off while none is set), the paths
    # open without one, the web origins allowed to call (CORS; none by default).
    auth_tokens: SecretStr = SecretStr("")
    auth_tokens_file: Path | None = None
    auth_exempt: str = "/healthz,/readyz,/v2/health/live,/v2/health/ready"
    cors_origins: str = ""
    # /metrics on its own port (served by serve's supervisor) instead of the API's.
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0
    log_format: Literal["text", "json"] = "text"
    # The web page at / (server/webpage.py): static files, open without a token.
    web_page: bool = True
    # DICOMweb servers requests may name (dicomweb.py): base URLs; none by default.
    dicomweb_servers: str = ""

    @model_validator(mode="after")
    def _hang_after_heartbeat(self) -> Settings:
        if self.engine_hang_restart_s <= self.engine_heartbeat_timeout_s:
            raise ValueError("engine_hang_restart_s must be longer than engine_heartbeat_timeout_s")
        return self

    @field_validator("dicomweb_servers")
    @classmethod
    def _servers_parse(cls, value: str) -> str:
        for url in value.replace(",", " ").split():
            try:
                parts = urlsplit(url)
                _ = parts.port  # raises for a port out of range or not a number
                valid = bool(parts.scheme.lower() in ("http", "https") and parts.hostname)
            except ValueError:
                valid = False
            if not valid:
                raise ValueError(
                    f"'{url}' is not an http(s) base URL (scheme, host, optional "
                    "port from 1 to 65535, path)"
                )
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``GRADCAM_<FIELD>`` variables, then ``overrides`` (e.g. CLI flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name in cls.model_fields:
            env_name = f"GRADCAM_{name.upper()}"
            if env_name in environ and environ[env_name] != "":
                values[name] = environ[env_name]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            problems = "; ".join(
                f"GRADCAM_{str(item['loc'][0]).upper()}: {item['msg']}" for item in error.errors()
            )
            raise ConfigError(f"invalid settings: {problems}") from None

    def models_config(self) -> ModelsFile:
        """The configured models file, or the bundled demo model's."""
        return load_models_file(self.models_file or DEMO_MODELS_FILE)
