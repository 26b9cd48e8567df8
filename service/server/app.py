"""The Flask application factory: wiring, error handlers, request ids.

gunicorn calls ``create_app()`` inside each HTTP worker (no ``preload_app``).
The worker never loads torch: its engine is an ``EnginePool`` of connections to
the engine processes that ``gradcam-service serve`` started. Tests and embedders
may pass any ``interface.Engine`` instead, such as an in-process ``Runtime``.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from service import logs, metrics
from service.contract.errors import (
    ErrorBody,
    ErrorCode,
    ErrorResponse,
    InsufficientMemory,
    ServiceError,
)
from service.contract.inference_protocol import ProtocolError
from service.contract.settings import Settings
from service.contract.suggestions import close_matches, did_you_mean
from service.memory import MemoryBudget
from service.server.environ import thread_wait
from service.server.protocol_routes import protocol
from service.server.routes import api, json_response
from service.server.security import AccessPolicy, Unauthorized
from service.server.webpage import ASSETS_PREFIX, PAGE_PATH, page
from service.transport.engine_client import EnginePool
from service.transport.interface import Engine

logger = logging.getLogger(__name__)

# Werkzeug's own errors, in the same envelope with stable codes.
_HTTP_CODES = {
    400: ErrorCode.BAD_REQUEST,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.REQUEST_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Methods every route takes, never worth naming in a 405's advice.
_IMPLIED = ("HEAD", "OPTIONS")
# Past this, a path is not a typo of a route: no suggestion (difflib's cost grows with it).
_LONGEST_PATH_MATCHED = 200
# How long a starting worker waits for an engine's greeting before it serves anyway.
_ENGINE_GREETING_S = 5.0


def _error_response(body: ErrorBody, status: int) -> Response:
    """Our error envelope, or on the Open Inference Protocol's routes its own shape
    (``{"error": message}``), which its clients read."""
    if metrics.protocol(request.path) == "open_inference":
        return json_response(ProtocolError(error=body.message), status=status)
    return json_response(ErrorResponse(error=body), status=status)


def _service_error(error: ServiceError) -> Response:
    metrics.ERRORS.labels(error.code).inc()
    response = _error_response(error.to_response().error, error.status)
    retry_after = getattr(error, "retry_after_s", None)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    if isinstance(error, Unauthorized):
        response.headers["WWW-Authenticate"] = error.www_authenticate
    if error.status >= 500:
        # The code, not the message: messages may name what the request sent.
        logger.warning("answered %s %s", error.status, error.code)
    return response


def _nearest_routes(path: str, method: str) -> list[str]:
    """The routes closest to ``path``, those that take ``method`` first considered: each
    route's variable parts filled from ``path`` (``/v2/models/phantom/infer``)."""
    if len(path) > _LONGEST_PATH_MATCHED:
        return []
    given = path.strip("/").split("/")
    routes: dict[str, bool] = {}  # route → whether it takes the method
    for rule in current_app.url_map.iter_rules():
        # Flask's static route has no file behind it; the page's files are no API.
        if rule.endpoint == "static" or rule.rule.startswith(ASSETS_PREFIX):
            continue
        parts = rule.rule.strip("/").split("/")
        filled = [
            given[i] if part.startswith("<") and i < len(given) else part
            for i, part in enumerate(parts)
        ]
        route = "/" + "/".join(filled)
        routes[route] = routes.get(route, False) or method in (rule.methods or ())
    taking = [route for route, takes in routes.items() if takes]
    return close_matches(path, taking) or close_matches(path, routes)


def _http_error(error: HTTPException) -> Response:
    status = error.code or 500
    # Werkzeug raises these for what a client sends; any other 4xx is still a bad request.
    code = _HTTP_CODES.get(status, ErrorCode.BAD_REQUEST if status < 500 else ErrorCode.INTERNAL)
    close = _nearest_routes(request.path, request.method) if status == 404 else []
    allowed = [m for m in getattr(error, "valid_methods", None) or () if m not in _IMPLIED]
    messages = {
        404: f"There is no route {request.path}.{did_you_mean(close)}",
        405: f"The route {request.path} does not accept {request.method}; "
        f"use {' or '.join(allowed) or 'another method'}.",
        413: f"The request body is larger than the limit of {request.max_content_length} bytes.",
    }
    body = ErrorBody(code=code, message=messages.get(status, error.description or ""))
    if close:
        body.suggestions = close
    metrics.ERRORS.labels(code).inc()
    response = _error_response(body, status)
    # Keep Werkzeug's headers that matter (Allow on 405).
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def _unexpected_error(error: Exception) -> Response:
    if isinstance(error, HTTPException):
        return _http_error(error)
    if isinstance(error, MemoryError):
        # Too little memory for this request now: the server's fault, and a retry
        # (here, later, or on another replica) may well succeed.
        logger.error("out of memory on a request")
        return _service_error(
            InsufficientMemory(
                "The server ran out of memory on this request; retry later or send less per "
                "request.",
                retry_after_s=5,
            )
        )
    logs.log_failure(logger, "unexpected error", error)
    metrics.ERRORS.labels(ErrorCode.INTERNAL).inc()
    body = ErrorBody(
        code=ErrorCode.INTERNAL,
        message="The server failed to handle this "
        f"request (request id {logs.request_id.get()}); it has been logged.",
    )
    return _error_response(body, 500)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> Flask:
    """The app, on ``engine`` if given, else on the engine processes named by the
    environment (``GRADCAM_ENGINE_SOCKETS``, set by ``gradcam-service serve``)."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["gradcam_settings"] = settings
    app.extensions["gradcam_engine"] = engine if engine is not None else _engine_pool(settings)
    # serve's memory budget, shared with the other processes (None outside serve).
    app.extensions["gradcam_memory"] = MemoryBudget.from_env()
    app.register_blueprint(api)
    app.register_blueprint(protocol)
    # The page's files hold no data: a browser loads them before it can send a token.
    if settings.web_page:
        app.register_blueprint(page)
        policy = AccessPolicy(settings, open_paths=(PAGE_PATH,), open_prefixes=(ASSETS_PREFIX,))
    else:
        policy = AccessPolicy(settings)
    app.extensions["gradcam_policy"] = policy
    if not settings.metrics_port:  # else the supervisor serves it on its own port
        app.add_url_rule("/metrics", "metrics", _metrics_view)
    app.register_error_handler(ServiceError, _service_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    app.before_request(_start)
    app.after_request(_finish)
    app.teardown_request(_reset)
    return app


def _engine_pool(settings: Settings) -> EnginePool:
    """The engine processes of ``serve``, as one engine."""
    pool = EnginePool.from_env(settings.engine_heartbeat_timeout_s)
    # A worker (re)started under load accepts requests only once it can pass them
    # on: else its first requests would get 503s while its connection is greeted.
    if not pool.wait_connected(_ENGINE_GREETING_S):
        logger.warning(
            "no engine greeted this worker within %.0f s; it answers 503 until one does",
            _ENGINE_GREETING_S,
        )
    return pool


def _policy() -> AccessPolicy:
    policy: AccessPolicy = current_app.extensions["gradcam_policy"]
    return policy


def _metrics_view() -> Response:
    body, content_type = metrics.scrape()
    return Response(body, content_type=content_type)


def _start() -> Response | None:
    """Before each request: its clocks and id, a CORS preflight answered, access checked."""
    g.started = time.perf_counter()
    g.started_monotonic = time.monotonic()
    g.thread_wait_s = 0.0
    wait = thread_wait(request.environ)
    if wait is not None:
        # The deadline counts from when the request queued for a thread.
        g.started_monotonic, g.thread_wait_s = wait
        metrics.STAGE_DURATION.labels("thread_wait").observe(g.thread_wait_s)
    metrics.IN_FLIGHT.inc()
    given = request.headers.get("X-Request-ID", "")
    g.request_id = given if _SAFE_REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
    g.request_id_token = logs.request_id.set(g.request_id)
    policy = _policy()
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        # A CORS preflight: browsers send it without credentials.
        preflight = Response(status=204)
        preflight.headers.update(policy.cors_headers(request.headers.get("Origin"), True))
        return preflight
    policy.check_origin(
        request.method, request.mimetype, request.headers.get("Origin"), request.host
    )
    policy.check(request.path, request.headers.get("Authorization"))
    return None


def _finish(response: Response) -> Response:
    """After each request: its id, CORS and nosniff headers, and its latency metric."""
    response.headers["X-Request-ID"] = g.get("request_id", "-")
    # Browsers take each answer as what its Content-Type says, never a guess.
    response.headers["X-Content-Type-Options"] = "nosniff"
    if request.method != "OPTIONS":
        response.headers.update(_policy().cors_headers(request.headers.get("Origin"), False))
    # The route template, never the raw path: label values stay bounded.
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    metrics.REQUEST_DURATION.labels(
        metrics.protocol(request.path),
        route,
        metrics.http_method(request.method),
        str(response.status_code),
    ).observe(time.perf_counter() - g.get("started", time.perf_counter()))
    return response


def _reset(_: BaseException | None) -> None:
    if "started" in g:
        metrics.IN_FLIGHT.dec()
    token = g.pop("request_id_token", None)
    if token is not None:
        logs.request_id.reset(token)
