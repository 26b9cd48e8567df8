"""Who may call the API: bearer tokens, and which web origins may (CORS).

Authentication is off until a token is configured (``GRADCAM_AUTH_TOKENS``,
``GRADCAM_AUTH_TOKENS_FILE``: one token per line, ``#`` comments), so the local
demo works as it always did; the deploy files turn it on. Several tokens may be
valid at once, for rotation: add the new one, move the clients, drop the old
one. The file is re-read when it changes (a Kubernetes Secret updated in place),
at most every few seconds. A token is compared with every configured token in
constant time, so neither timing nor order tells an attacker anything.

Paths in ``GRADCAM_AUTH_EXEMPT`` (default ``/healthz,/readyz`` and the Open Inference
Protocol's ``/v2/health/live,/v2/health/ready``, for probes that carry no token) are
open; ``/metrics`` needs a token on the API port unless it is exempted or served on its
own port (``GRADCAM_METRICS_PORT``).

CORS is off by default (no ``Access-Control-*`` header, so browsers allow same
origin only); ``GRADCAM_CORS_ORIGINS`` lists the origins a web page may call from.
Preflight requests are answered before authentication, as browsers send them
without credentials. CORS only hides the answer from a page, though: a POST with no
Content-Type, or a form's, reaches the server without a preflight, and with auth off it
would make the engine work for any page a user opens. So such a POST from another
origin (its ``Origin`` is neither this server nor a listed one) is refused, 403.
Tokens are never logged.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

from service.contract.errors import ConfigError, ErrorCode, Forbidden, ServiceError
from service.contract.settings import Settings
from service.server.pictures import PICTURE_HEADERS, RANDOM_WEIGHTS_HEADER

# The shortest token accepted: guessing must be hopeless, not just slow.
MIN_TOKEN_LENGTH = 16
_RELOAD_EVERY_S = 5.0
_CORS_METHODS = "GET, POST, OPTIONS"
_CORS_HEADERS = "Authorization, Content-Type, X-Request-ID"
# The content types a browser sends to another origin without a preflight ("" for none).
_UNASKED_CONTENT_TYPES = frozenset(
    {"", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"}
)


class Unauthorized(ServiceError):
    """401: no valid bearer token (``WWW-Authenticate`` says how to send one)."""

    default_code = ErrorCode.UNAUTHORIZED

    def __init__(self, message: str, *, invalid: bool) -> None:
        super().__init__(message)
        # RFC 6750: error="invalid_token" only when a token was sent and refused.
        error = ', error="invalid_token"' if invalid else ""
        self.www_authenticate = f'Bearer realm="gradcam-service"{error}'


def _split(text: str) -> list[str]:
    return [item for item in text.replace(",", " ").split() if item]


def _read_tokens_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConfigError(f"GRADCAM_AUTH_TOKENS_FILE {path}: {error.strerror}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _checked(tokens: list[str], where: str) -> tuple[bytes, ...]:
    short = [t for t in tokens if len(t) < MIN_TOKEN_LENGTH]
    if short:
        raise ConfigError(
            f"{where}: {len(short)} token(s) shorter than {MIN_TOKEN_LENGTH} "
            "characters; use long random tokens (e.g. `openssl rand -hex 32`)"
        )
    return tuple(t.encode("utf-8") for t in tokens)


class AccessPolicy:
    """The tokens, open paths and CORS origins of one worker."""

    def __init__(
        self,
        settings: Settings,
        open_paths: Iterable[str] = (),
        open_prefixes: tuple[str, ...] = (),
    ) -> None:
        self._env_tokens = _checked(
            _split(settings.auth_tokens.get_secret_value()), "GRADCAM_AUTH_TOKENS"
        )
        self._file = settings.auth_tokens_file
        self._file_tokens: tuple[bytes, ...] = ()
        self._file_mtime: float | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()
        if self._file is not None:
            self._reload(force=True)
        self.exempt = frozenset(_split(settings.auth_exempt)) | frozenset(open_paths)
        self.open_prefixes = open_prefixes
        self.cors_origins = frozenset(_split(settings.cors_origins))

    @property
    def enabled(self) -> bool:
        return bool(self._env_tokens or self._file is not None)

    def _reload(self, force: bool = False) -> None:
        """Re-read the tokens file if it changed (a failed re-read keeps the old tokens)."""
        assert self._file is not None
        now = time.monotonic()
        if not force and now - self._checked_at < _RELOAD_EVERY_S:
            return
        with self._lock:
            self._checked_at = now
            try:
                mtime = os.stat(self._file).st_mtime
            except OSError:
                if force:
                    raise ConfigError(
                        f"GRADCAM_AUTH_TOKENS_FILE {self._file} does not exist"
                    ) from None
                return
            if mtime == self._file_mtime:
                return
            try:
                self._file_tokens = _checked(
                    _read_tokens_file(self._file), f"GRADCAM_AUTH_TOKENS_FILE {self._file}"
                )
            except ConfigError:
                if force:
                    raise
                return
            self._file_mtime = mtime

    def check(self, path: str, authorization: str | None) -> None:
        """Raise ``Unauthorized`` unless ``path`` is open or the header carries a valid token."""
        if not self.enabled or path in self.exempt or path.startswith(self.open_prefixes):
            return
        if self._file is not None:
            self._reload()
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(
                "This server needs a bearer token: send the header "
                "'Authorization: Bearer <token>'.",
                invalid=False,
            )
        given = token.strip().encode("utf-8", "replace")
        matched = False
        for known in self._env_tokens + self._file_tokens:
            # Every token is compared, each in constant time: no early exit to time.
            matched |= hmac.compare_digest(given, known)
        if not matched:
            raise Unauthorized("The bearer token is not valid.", invalid=True)

    def check_origin(self, method: str, content_type: str, origin: str | None, host: str) -> None:
        """Raise ``Forbidden`` for a POST that a page on another origin could send without
        a preflight (``content_type``: the media type alone, lower case)."""
        if method != "POST" or not origin or content_type not in _UNASKED_CONTENT_TYPES:
            return
        if urllib.parse.urlsplit(origin).netloc == host or self.allowed_origin(origin):
            return
        raise Forbidden(
            f"A page on another origin ({origin[:100]}) may not send this request without "
            "asking first: send it with Content-Type application/json (browsers then ask), "
            "or list that origin in GRADCAM_CORS_ORIGINS."
        )

    def allowed_origin(self, origin: str | None) -> str | None:
        """The value for ``Access-Control-Allow-Origin``, or None for no CORS headers."""
        if not origin or not self.cors_origins:
            return None
        if "*" in self.cors_origins:
            return "*"
        return origin if origin in self.cors_origins else None

    def cors_headers(self, origin: str | None, preflight: bool) -> dict[str, str]:
        allowed = self.allowed_origin(origin)
        if allowed is None:
            return {}
        headers = {
            "Access-Control-Allow-Origin": allowed,
            "Vary": "Origin",
            # A page reads a picture answer's scores from its headers too.
            "Access-Control-Expose-Headers": ", ".join(
                ("X-Request-ID", "Retry-After", RANDOM_WEIGHTS_HEADER, *PICTURE_HEADERS)
            ),
        }
        if preflight:
            headers.update(
                {
                    "Access-Control-Allow-Methods": _CORS_METHODS,
                    "Access-Control-Allow-Headers": _CORS_HEADERS,
                    "Access-Control-Max-Age": "600",
                }
            )
        return headers
