"""Logging with a request id on every line, and nothing from a request in any line.

Image bytes, tokens, query strings and DICOM header values can be patient data or
secrets, and an exception's text or a library's warning may quote any of them
(pydicom's "Unable to convert '1911-11-11' to 'DA'" quotes a birth date). So:

- failures are logged by ``log_failure``: the exception's type, the service's error
  code and where it happened (file, line, function of each frame), never its text;
- Python warnings go through ``_withheld_warning``: category and place, never the text;
- records of the DICOM libraries' loggers (pydicom, highdicom) keep their logger
  name and level, and lose their text (``LibraryTextFilter``).

Two line formats, chosen by ``GRADCAM_LOG_FORMAT``: ``text`` (``LOG_FORMAT``) or
``json``, one object per line with ``time``, ``level``, ``pid``, ``request_id``,
``logger``, ``message`` (and ``exception``), for log collectors.
"""

from __future__ import annotations

import contextvars
import logging
import os
import traceback
import warnings
from datetime import UTC, datetime

import orjson

from service.contract.errors import ConfigError
from service.contract.settings import Settings

# Set per request by the app; "-" outside a request (start-up, the batcher thread).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] [%(request_id)s] %(name)s: %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` so formats can print it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


# Libraries whose log messages quote the values they read (DICOM header values).
QUOTING_LIBRARIES = ("pydicom", "highdicom")


class LibraryTextFilter(logging.Filter):
    """Replaces the text of a DICOM library's record with a notice (handler filter:
    it sees the records of every logger below those names)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in QUOTING_LIBRARIES:
            record.msg = "message withheld (a DICOM library's text may quote header values)"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


def where(error: BaseException) -> str:
    """Where ``error`` was raised, as ``file:line in function`` frames, innermost last;
    code locations only (no values, no message)."""
    frames = traceback.extract_tb(error.__traceback__)[-6:]
    return (
        " <- ".join(
            f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in reversed(frames)
        )
        or "-"
    )


def log_failure(
    log: logging.Logger, what: str, error: BaseException, level: int = logging.ERROR
) -> None:
    """``what`` failed with ``error``: its type, code and place, never its text."""
    code = getattr(error, "code", None)
    cause = error.__cause__ or error.__context__
    log.log(
        level,
        "%s: %s%s at %s%s",
        what,
        type(error).__name__,
        f" ({code})" if isinstance(code, str) else "",
        where(error),
        f"; caused by {type(cause).__name__} at {where(cause)}" if cause is not None else "",
    )


def _withheld_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    logging.getLogger("py.warnings").warning(
        "%s at %s:%d (text withheld: it may quote request data)",
        category.__name__,
        os.path.basename(filename),
        lineno,
    )


def withhold_warning_text() -> None:
    """Python warnings are logged by category and place only (see the module text)."""
    warnings.showwarning = _withheld_warning


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
    """Whether the settings (``GRADCAM_LOG_FORMAT``) ask for JSON lines: read where every
    other setting is read, so a value means the same everywhere."""
    try:
        return Settings.from_env().log_format == "json"
    except ConfigError:
        return False  # the settings' own check stops the process, naming the variable


def configure(level: str = "INFO") -> None:
    """Root logging for a process that gunicorn's log config does not cover (CLI, tests)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.addFilter(LibraryTextFilter())
    withhold_warning_text()
    handler.setFormatter(JsonFormatter() if json_lines() else logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Their warnings are about a client's file, which the answer already speaks of.
    for name in QUOTING_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
