"""Settings (``GRADCAM_*`` environment variables), and the machine's usable cores.

Validated once, at start-up: a mistake raises ``ConfigError`` with a message that names
the setting at fault. The models file they point to is ``models_file.py``'s.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from service.contract.errors import ConfigError
from service.contract.models_file import DEMO_MODELS_FILE, ModelsFile, load_models_file

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
    # Voxels of a request's volumes together (one CT of 512 × 512 × 1024 slices); the
    # memory budget is what usually decides.
    max_volume_voxels: PositiveInt = 512 * 512 * 1024
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
    # The web page at / (server/webpage.py): static files, open without a token; the
    # folder of examples it offers ("": the source checkout's examples/, where there is one).
    web_page: bool = True
    examples_dir: str = ""
    # DICOMweb servers requests may name (dicomweb.py): base URLs; none by default.
    dicomweb_servers: str = ""
    # A DICOM image outside the model's declared modalities or body parts
    # (pipeline/domain.py): refused with a 422, or explained and marked in its result.
    out_of_domain: Literal["refuse", "mark"] = "refuse"

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

    def to_env(self, names: Iterable[str]) -> dict[str, str]:
        """The named settings as the ``GRADCAM_*`` variables ``from_env`` reads back: what
        ``serve`` hands the processes it starts (``{"GRADCAM_PORT": "8000", ...}``)."""
        env = {}
        for name in names:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"GRADCAM_{name.upper()}"] = str(value)
        return env

    def models_config(self) -> ModelsFile:
        """The configured models file, or the bundled demo model's."""
        return load_models_file(self.models_file or DEMO_MODELS_FILE)
