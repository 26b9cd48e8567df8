"""The app's error answers through Flask's test client (the real app on the demo
model's runtime): a wrong method names the right one, an unknown route the nearest,
and a body's problems are all told."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from service.contract.errors import ErrorResponse
from service.contract.inference_protocol import ProtocolError
from service.contract.settings import Settings
from service.engine.runtime import Runtime
from service.server.app import create_app


@pytest.fixture
def client(runtime: Runtime) -> FlaskClient:
    return create_app(Settings(device="cpu"), engine=runtime).test_client()


def _error(answer: object) -> ErrorResponse:
    return ErrorResponse.model_validate_json(answer.get_data())  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_a_wrong_method_says_to_use_post(client: FlaskClient, method: str) -> None:
    answer = client.open("/v1/explain", method=method)
    assert answer.status_code == 405 and answer.mimetype == "application/json"
    assert "POST" in answer.headers["Allow"].split(", ")
    error = _error(answer).error
    assert error.code == "method_not_allowed"
    assert error.message == f"The route /v1/explain does not accept {method}; use POST."


@pytest.mark.parametrize(
    "method, path, nearest",
    [
        ("POST", "/explain", "/v1/explain"),
        ("POST", "/v1/explain/", "/v1/explain"),
        ("GET", "/helthz", "/healthz"),
        ("GET", "/v1/models/phantom/layer", "/v1/models/phantom/layers"),
    ],
)
def test_an_unknown_route_suggests_the_nearest(
    client: FlaskClient, method: str, path: str, nearest: str
) -> None:
    answer = client.open(path, method=method)
    assert answer.status_code == 404 and answer.mimetype == "application/json"
    error = _error(answer).error
    assert error.code == "not_found" and error.suggestions
    assert error.suggestions[0] == nearest
    assert error.message.startswith(f"There is no route {path}. Did you mean '{nearest}'")


def test_an_unknown_route_far_from_any_suggests_nothing(client: FlaskClient) -> None:
    error = _error(client.get("/nothing/like/a/route")).error
    assert error.message == "There is no route /nothing/like/a/route." and not error.suggestions
    long = "/v1/" + "x" * 5000
    assert _error(client.get(long)).error.suggestions is None


def test_the_protocol_routes_keep_their_shape(client: FlaskClient) -> None:
    answer = client.post("/v2/models/phantom/infr", json={})
    assert answer.status_code == 404
    error = ProtocolError.model_validate_json(answer.get_data()).error
    assert "Did you mean '/v2/models/phantom/infer'" in error


def test_every_problem_of_a_body_is_told(client: FlaskClient) -> None:
    answer = client.post("/v1/explain", json={"image": ["aGk="], "top_k": 10**30})
    assert answer.status_code == 422
    error = _error(answer).error
    assert error.code == "invalid_field" and error.field == "image"
    assert error.message == (
        "Field 'image': unknown field. Did you mean 'images'? Also, field 'top_k': "
        "1e+30 is out of range: it must be a whole number of at least 1."
    )
