"""The audit's resumable log: ``audit.jsonl`` in the audit's folder, a first line of the
settings its records were computed with, then one flushed line per finished image (an
``ImageRecord``). A run that stops is resumed from it; a last line cut short is dropped
and its image done again; other settings into the same log are refused."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from service.transport.interface import ModelInfo
from service.trust.audit_inputs import AuditUsage
from service.trust.audit_records import ImageRecord, Thresholds

LOG_NAME = "audit.jsonl"
LOG_VERSION = 1


@dataclass(frozen=True)
class AuditSettings:
    """What an audit's records are computed with (its log's first line, with the model and
    layer): an audit with other settings may not append to the log."""

    method: str = "gradcam"
    target: str | None = None  # as given: a class index or label; None: top-1
    faithfulness: bool = False
    boxes: Path | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)

    def line(self, model: ModelInfo, layer: str) -> dict[str, Any]:
        return {
            "audit": LOG_VERSION,
            "model": model.name,
            "arch": model.arch,
            "layer": layer,
            "method": self.method,
            "target": self.target,
            "faithfulness": self.faithfulness,
            "boxes": str(self.boxes.resolve()) if self.boxes else None,
            "thresholds": asdict(self.thresholds),
        }


def read_log(path: Path) -> tuple[dict[str, Any] | None, list[ImageRecord]]:
    """The settings line and the records of a log (a last line cut short by an
    interruption is dropped: its image is done again)."""
    if not path.exists():
        return None, []
    lines = path.read_bytes().splitlines()
    records: list[ImageRecord] = []
    settings: dict[str, Any] | None = None
    for number, raw in enumerate(lines):
        try:
            data = json.loads(raw)
        except ValueError:
            if number == len(lines) - 1:
                break
            raise AuditUsage(
                f"{path}: line {number + 1} is not JSON; --restart starts over"
            ) from None
        if number == 0:
            settings = data
        else:
            records.append(ImageRecord(**data))
    return settings, records


class AuditLog:
    """The append-only log: one flushed line per finished image."""

    def __init__(self, path: Path, settings: dict[str, Any], fresh: bool) -> None:
        if fresh:
            path.write_text(json.dumps(settings) + "\n")
        else:
            self._trim_partial_line(path)
        self._file = path.open("a")

    @staticmethod
    def _trim_partial_line(path: Path) -> None:
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])

    def add(self, record: ImageRecord) -> None:
        self._file.write(json.dumps(asdict(record), separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
