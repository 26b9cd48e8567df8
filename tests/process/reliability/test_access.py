"""Bearer tokens, CORS, /metrics on its own port and JSON logs, through a real server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import LiveServer, ServerFactory, encode, phantom_png, wait_until

TOKEN_ENV = "env-token-0123456789abcdef"
TOKEN_FILE = "file-token-0123456789abcdef"
ORIGIN = "https://viewer.example"
MARKER = "SECRET-IMAGE-BYTES-MARKER"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "tokens"
    path.write_text(f"# rotated monthly\n{TOKEN_FILE}\n\n")
    return path


@pytest.fixture(scope="module")
def locked(module_live_server: ServerFactory, tokens_file: Path) -> tuple[LiveServer, int]:
    metrics_port = _free_port()
    live = module_live_server(
        auth_tokens=TOKEN_ENV,
        auth_tokens_file=tokens_file,
        cors_origins=ORIGIN,
        metrics_port=metrics_port,
        log_format="json",
    )
    return live, metrics_port


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_probes_are_open_and_the_api_needs_a_token(locked: tuple[LiveServer, int]) -> None:
    server, _ = locked
    assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
    assert requests.get(f"{server.url}/readyz", timeout=5).status_code == 200
    missing = requests.get(f"{server.url}/v1/models", timeout=5)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="gradcam-service"'
    assert missing.json()["error"]["code"] == "unauthorized"
    wrong = requests.get(f"{server.url}/v1/models", headers=_bearer("x" * 26), timeout=5)
    assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    basic = requests.get(f"{server.url}/v1/models", auth=("user", TOKEN_ENV), timeout=5)
    assert basic.status_code == 401
    # Unknown routes too: nothing is learnt without a token.
    assert requests.get(f"{server.url}/v9/nothing", timeout=5).status_code == 401
    for token in (TOKEN_ENV, TOKEN_FILE):
        assert (
            requests.get(f"{server.url}/v1/models", headers=_bearer(token), timeout=5).status_code
            == 200
        )
    body: dict[str, Any] = {
        "images": [encode(phantom_png(1, 64, 64))],
        "heatmap": {"format": "none"},
    }
    assert (
        requests.post(
            f"{server.url}/v1/explain", json=body, timeout=30, headers=_bearer(TOKEN_FILE)
        ).status_code
        == 200
    )


def test_a_rotated_tokens_file_is_picked_up(
    locked: tuple[LiveServer, int], tokens_file: Path
) -> None:
    server, _ = locked
    rotated = "rotated-token-0123456789abcdef"
    tokens_file.write_text(f"{rotated}\n")
    os.utime(tokens_file, (time.time() + 5, time.time() + 5))
    wait_until(
        lambda: (
            requests.get(f"{server.url}/v1/models", headers=_bearer(rotated), timeout=5).status_code
            == 200
        ),
        15,
        "the rotated token accepted",
    )
    assert (
        requests.get(f"{server.url}/v1/models", headers=_bearer(TOKEN_FILE), timeout=5).status_code
        == 401
    )
    assert (
        requests.get(f"{server.url}/v1/models", headers=_bearer(TOKEN_ENV), timeout=5).status_code
        == 200
    )


def test_cors_only_for_the_listed_origin(locked: tuple[LiveServer, int]) -> None:
    server, _ = locked
    preflight = requests.options(
        f"{server.url}/v1/explain",
        timeout=5,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    other = requests.options(
        f"{server.url}/v1/explain",
        timeout=5,
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "Access-Control-Allow-Origin" not in other.headers
    simple = requests.get(
        f"{server.url}/v1/models", headers={**_bearer(TOKEN_ENV), "Origin": ORIGIN}, timeout=5
    )
    assert simple.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert simple.headers["Vary"] == "Origin"


def test_metrics_on_their_own_port(locked: tuple[LiveServer, int]) -> None:
    server, metrics_port = locked
    assert (
        requests.get(f"{server.url}/metrics", headers=_bearer(TOKEN_ENV), timeout=5).status_code
        == 404
    )
    scrape = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
    assert scrape.status_code == 200
    assert "gradcam_requests_total" in scrape.text or "gradcam_request_duration" in scrape.text


def test_logs_are_json_lines_without_tokens_or_image_bytes(locked: tuple[LiveServer, int]) -> None:
    server, _ = locked
    requests.post(
        f"{server.url}/v1/explain",
        timeout=30,
        headers=_bearer(TOKEN_ENV),
        json={"images": [MARKER], "model": MARKER},
    )
    requests.get(f"{server.url}/v1/models", headers=_bearer("wrong-" + TOKEN_ENV), timeout=5)
    log = server.read_log()
    for secret in (TOKEN_ENV, TOKEN_FILE, MARKER):
        assert secret not in log
    lines = [line for line in log.splitlines() if line.startswith("{")]
    assert len(lines) > 5
    for line in lines:
        record = json.loads(line)
        assert {"time", "level", "pid", "request_id", "logger", "message"} <= record.keys()


def test_a_short_token_stops_serve_with_its_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(_free_port())],
        env={**os.environ, "GRADCAM_AUTH_TOKENS": "short"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "shorter than 16 characters" in result.stderr


def test_a_page_on_another_origin_cannot_make_the_engine_work(server: LiveServer) -> None:
    """With auth off, a page a user opens could POST to the service without asking (no
    Content-Type, or a form's: no CORS preflight); such a POST from another origin is a
    403. The server's own page, a listed origin and clients that send no Origin (Triton's
    client sends no Content-Type either) are served."""
    infer = f"{server.url}/v2/models/phantom/infer"
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [encode(phantom_png(1, 64, 64))],
                }
            ]
        }
    )
    for origin in ("https://evil.example", "null", "http://127.0.0.1:1"):
        for kind in ({}, {"Content-Type": "text/plain"}):
            answer = requests.post(infer, data=body, headers={"Origin": origin, **kind}, timeout=30)
            assert answer.status_code == 403, (origin, kind, answer.text)
            assert "GRADCAM_CORS_ORIGINS" in answer.json()["error"]
    own = requests.post(infer, data=body, headers={"Origin": server.url}, timeout=30)
    assert own.status_code == 200, own.text
    assert requests.post(infer, data=body, timeout=30).status_code == 200
    form = requests.post(
        f"{server.url}/v1/explain",
        data={"images": "x"},
        headers={"Origin": "https://evil.example"},
        timeout=30,
    )
    assert form.status_code == 403
    assert form.json()["error"]["code"] == "forbidden"


def test_a_listed_origin_may_post_without_asking(locked: tuple[LiveServer, int]) -> None:
    server, _ = locked
    answer = requests.post(
        f"{server.url}/v2/models/phantom/infer",
        data=json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1],
                        "datatype": "BYTES",
                        "data": [encode(phantom_png(1, 64, 64))],
                    }
                ]
            }
        ),
        headers={"Origin": ORIGIN, **_bearer(TOKEN_ENV)},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
