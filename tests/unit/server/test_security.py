"""Which POSTs from another origin are refused: those a page can send without a CORS
preflight (no Content-Type, text/plain, a form's), the image doors' multipart form among
them; an image body is preflighted by browsers, so CORS, not this check, decides it."""

from __future__ import annotations

import pytest

from service.contract.errors import Forbidden
from service.contract.settings import Settings
from service.server.image_doors import FORM_TYPE, RAW_TYPES
from service.server.pictures import PICTURE_HEADERS
from service.server.security import AccessPolicy

HOST = "127.0.0.1:8000"
OTHER = "https://evil.example"


@pytest.mark.parametrize(
    "content_type",
    ["", "text/plain", "application/x-www-form-urlencoded", FORM_TYPE],
)
def test_a_post_a_page_sends_unasked_from_another_origin_is_refused(content_type: str) -> None:
    policy = AccessPolicy(Settings())
    with pytest.raises(Forbidden):
        policy.check_origin("POST", content_type, OTHER, HOST)
    for origin in (None, f"http://{HOST}"):  # no Origin (not a browser), or this server's
        policy.check_origin("POST", content_type, origin, HOST)
    listed = AccessPolicy(Settings(cors_origins=OTHER))
    listed.check_origin("POST", content_type, OTHER, HOST)


@pytest.mark.parametrize("content_type", [*RAW_TYPES, "application/json"])
def test_a_body_browsers_preflight_is_left_to_cors(content_type: str) -> None:
    """A page can send these only after asking (their types are not CORS-safelisted), and an
    origin that is not listed gets no Access-Control-Allow-Origin to its question."""
    policy = AccessPolicy(Settings())
    policy.check_origin("POST", content_type, OTHER, HOST)
    assert policy.cors_headers(OTHER, preflight=True) == {}


def test_a_listed_page_may_read_a_picture_answers_headers() -> None:
    headers = AccessPolicy(Settings(cors_origins=OTHER)).cors_headers(OTHER, preflight=False)
    exposed = {name.strip() for name in headers["Access-Control-Expose-Headers"].split(",")}
    assert set(PICTURE_HEADERS) | {"X-Request-ID", "Retry-After"} <= exposed
