"""The access log line of one answered request.

The path only, never the query string: it may carry a token (``?access_token=``)
or other data. Cut to ``LOGGED_PATH_BYTES``: enough for any route.
"""

from __future__ import annotations

import logging
import time

import h11

from service import metrics
from service.server.wsgi import Answer

LOGGED_PATH_BYTES = 256


def log_access(log: logging.Logger, peer: str, request: h11.Request | None, answer: Answer) -> None:
    target = (
        bytes(request.target).partition(b"?")[0][:LOGGED_PATH_BYTES].decode("latin-1")
        if request is not None
        else "-"
    )
    method = metrics.http_method(request.method.decode("ascii")) if request else "-"
    milliseconds = round((time.monotonic() - answer.started) * 1000)
    log.info(
        '%s "%s %s" %s %s %sms id=%s',
        peer,
        method,
        target,
        answer.status,
        len(answer.body),
        milliseconds,
        answer.request_id,
    )
