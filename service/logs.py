"""Logging with a request id on every line (never image bytes or tokens: they can be
patient data or secrets).

Two line formats, chosen by ``GRADCAM_LOG_FORMAT``: ``text`` (``LOG_FORMAT``) or
``json``, one object per line with ``time``, ``level``, ``pid``, ``request_id``,
``logger``, ``message`` (and ``exception``), for log collectors.
"""

from __future__ import annotations

import contextvars
import logging
import os
from datetime import UTC, datetime

import orjson

# Set per request by the app; "-" outside a request (start-up, the batcher thread).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] [%(request_id)s] %(name)s: %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` so formats can print it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "pid": record.process,
            "request_id": getattr(record, "request_id", "-"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def json_lines() -> bool:
    """Whether ``GRADCAM_LOG_FORMAT`` asks for JSON lines (validated by the settings)."""
    return os.environ.get("GRADCAM_LOG_FORMAT", "text").strip().lower() == "json"


def configure(level: str = "INFO") -> None:
    """Root logging for a process that gunicorn's log config does not cover (CLI, tests)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if json_lines() else logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
