"""The HTTP worker's parts without a socket: a connection's requests (``incoming``),
the bytes held for clients (``buffers``), the WSGI adapter (``wsgi``), the access log.

The live server's tests (``tests/process/server/test_http.py``, ``tests/process/reliability/``)
cover the event loop that drives them; these feed bytes the way a network does: in pieces,
too many, wrong.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import h11
import orjson
import pytest

from service.contract.errors import ErrorCode
from service.memory import MemoryBudget
from service.server.access_log import LOGGED_PATH_BYTES, log_access
from service.server.buffers import BufferBudget
from service.server.environ import DRAINING, draining, thread_wait
from service.server.incoming import (
    HEADER_LIMIT_BYTES,
    TARGET_LIMIT_BYTES,
    Incoming,
    Refusal,
    Step,
)
from service.server.wsgi import Answer, Peer, environ_for, run_app

MAX_BODY = 1000


def _incoming(limit: int = 4 * MAX_BODY) -> Incoming:
    return Incoming(MAX_BODY, BufferBudget(limit).reservation())


def _post(body: bytes, *extra: bytes) -> bytes:
    return (
        b"POST /v1/explain?x=1 HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
        + b"".join(extra)
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def _feed(incoming: Incoming, data: bytes) -> list[Step | Refusal]:
    incoming.receive(data)
    steps: list[Step | Refusal] = []
    while True:
        step = incoming.next_step()
        steps.append(step)
        if step is not Step.HEADERS:
            return steps


def test_a_request_in_one_byte_pieces() -> None:
    incoming, data = _incoming(), _post(b'{"images": []}')
    seen: list[Step | Refusal] = []
    for i in range(len(data)):
        seen += _feed(incoming, data[i : i + 1])
    assert seen.count(Step.HEADERS) == 1 and seen[-1] is Step.COMPLETE
    assert set(seen) == {Step.NEED_DATA, Step.HEADERS, Step.COMPLETE}
    assert incoming.request is not None and incoming.request.target == b"/v1/explain?x=1"
    assert incoming.take_body() == b'{"images": []}' and incoming.body == b""


def test_a_client_that_stalls_mid_body_leaves_it_waiting() -> None:
    incoming = _incoming()
    assert _feed(incoming, _post(b"0123456789")[:-4]) == [Step.HEADERS, Step.NEED_DATA]
    assert incoming.next_step() is Step.NEED_DATA  # no clock here: the loop's sweep has it
    assert incoming.reservation.size == 10  # its declared body is held until it closes
    assert _feed(incoming, b"6789") == [Step.COMPLETE]


@pytest.mark.parametrize(
    "data, code",
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40), ErrorCode.BAD_REQUEST),  # TLS
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost\r\n\r\n", ErrorCode.BAD_REQUEST),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", ErrorCode.HTTP_VERSION_NOT_SUPPORTED),
        (
            b"GET /" + b"a" * TARGET_LIMIT_BYTES + b" HTTP/1.1\r\nHost: a\r\n\r\n",
            ErrorCode.URI_TOO_LONG,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * HEADER_LIMIT_BYTES + b"\r\n\r\n",
            ErrorCode.HEADERS_TOO_LARGE,
        ),
        (_post(b"{}", b"Transfer-Encoding: chunked\r\n"), ErrorCode.BAD_REQUEST),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            ErrorCode.UNSUPPORTED_TRANSFER_ENCODING,
        ),
        (_post(b"x" * (MAX_BODY + 1)), ErrorCode.REQUEST_TOO_LARGE),
    ],
)
def test_garbage_and_oversize_are_refused_with_the_envelope(data: bytes, code: ErrorCode) -> None:
    steps = _feed(_incoming(), data)
    refusal = steps[-1]
    assert isinstance(refusal, Refusal) and refusal.code == code, steps
    # The answer a client reads: valid HTTP, the code's status, the JSON envelope.
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    client.receive_data(refusal.response())
    response = client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == code.status
    assert (b"connection", b"close") in response.headers
    body = client.next_event()
    assert isinstance(body, h11.Data)
    assert orjson.loads(body.data)["error"]["code"] == code


def test_a_declared_oversize_body_is_refused_before_it_is_sent() -> None:
    incoming = _incoming()
    headers = _post(b"x" * (MAX_BODY + 1))[: -(MAX_BODY + 1)]
    (refusal,) = _feed(incoming, headers)
    assert isinstance(refusal, Refusal) and refusal.code == ErrorCode.REQUEST_TOO_LARGE
    assert incoming.reservation.size == 0  # nothing was held for it


def test_a_chunked_body_is_counted_as_it_grows() -> None:
    incoming = _incoming()
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert _feed(incoming, head) == [Step.HEADERS, Step.NEED_DATA]
    chunk = b"1f4\r\n" + b"x" * 500 + b"\r\n"
    assert _feed(incoming, chunk) == [Step.NEED_DATA]
    assert incoming.reservation.size == 500
    (refusal,) = _feed(incoming, chunk + chunk)
    assert isinstance(refusal, Refusal) and refusal.code == ErrorCode.REQUEST_TOO_LARGE


def test_a_full_budget_refuses_with_retry_after() -> None:
    budget = BufferBudget(1500)
    first = Incoming(MAX_BODY, budget.reservation())
    assert _feed(first, _post(b"x" * 900)) == [Step.HEADERS, Step.COMPLETE]
    second = Incoming(MAX_BODY, budget.reservation())
    (refusal,) = _feed(second, _post(b"y" * 900))
    assert isinstance(refusal, Refusal) and refusal.code == ErrorCode.OVERLOADED
    assert refusal.retry_after_s == 1 and b"Retry-After: 1\r\n" in refusal.response()
    first.reservation.release()  # the first answer has gone: room again
    third = Incoming(MAX_BODY, budget.reservation())
    assert _feed(third, _post(b"z" * 900)) == [Step.HEADERS, Step.COMPLETE]


def test_100_continue_only_for_a_client_that_waits() -> None:
    waiting = _incoming()
    head = _post(b"{}", b"Expect: 100-continue\r\n")[:-2]
    assert _feed(waiting, head) == [Step.HEADERS, Step.NEED_DATA]
    assert waiting.continue_100().startswith(b"HTTP/1.1 100 ")
    plain = _incoming()
    _feed(plain, _post(b"{}")[:-2])
    assert plain.continue_100() == b""


def test_pipelined_requests_come_one_after_the_other() -> None:
    incoming = _incoming()
    steps = _feed(incoming, _post(b"1") + _post(b"22"))
    assert steps[-1] is Step.COMPLETE and incoming.take_body() == b"1"
    incoming.http.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
    incoming.http.send(h11.EndOfMessage())
    incoming.http.start_next_cycle()
    incoming.next_request()
    # The second request was already buffered: no more bytes are needed for it.
    step = incoming.next_step()
    assert step is Step.HEADERS and incoming.next_step() is Step.COMPLETE
    assert incoming.take_body() == b"22"


# --- buffers -----------------------------------------------------------------------


def test_reservations_grow_release_and_obey_both_budgets(tmp_path: Path) -> None:
    memory = MemoryBudget(str(tmp_path / "budget"), 600)  # the service's, shared by processes
    budget = BufferBudget(1000, memory)
    a, b = budget.reservation(), budget.reservation()
    assert a.grow_to(400) and a.grow_to(300) and a.size == 400  # never shrinks by growing
    assert not b.grow_to(300)  # the worker has room (600 left), the service has 200
    assert b.size == 0 and budget.held == 400
    assert b.grow_to(300, force=True)  # an answer already made is counted regardless
    assert budget.held == 700 and memory.reserved_bytes() == 700
    a.release()
    b.release()
    assert budget.held == 0 and memory.reserved_bytes() == 0 and a.size == b.size == 0


# --- the WSGI adapter ----------------------------------------------------------------

PEER = Peer("10.0.0.7", 51234, "127.0.0.1", "8000")


def _request(target: bytes, *headers: tuple[bytes, bytes]) -> h11.Request:
    return h11.Request(method="POST", target=target, headers=[(b"Host", b"h"), *headers])


def test_the_environ_of_a_request() -> None:
    request = _request(
        b"http://example.org/v1/a%20b?k=v&x",
        (b"Content-Type", b"text/x"),
        (b"X-Thing", b"1"),
        (b"X-Thing", b"2"),
        (b"X_Sneaky", b"no"),
    )
    environ = environ_for(request, bytearray(b"body"), PEER)
    assert environ["PATH_INFO"] == "/v1/a b" and environ["QUERY_STRING"] == "k=v&x"
    assert environ["CONTENT_TYPE"] == "text/x" and environ["CONTENT_LENGTH"] == "4"
    assert environ["HTTP_X_THING"] == "1,2"
    assert not any(key.startswith("HTTP_X_SNEAKY") for key in environ)
    assert environ["wsgi.input"].read() == b"body" and environ["wsgi.input_terminated"]
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("10.0.0.7", "51234")


def test_run_app_collects_the_answer_and_the_thread_wait() -> None:
    closed, waits = threading.Event(), []

    class Result(list[bytes]):
        def close(self) -> None:
            closed.set()

    def app(environ: dict[str, Any], start_response: Any) -> Result:
        waits.append(thread_wait(environ))
        start_response("201 Created", [("X-Request-Id", "r1"), ("Content-Type", "a/b")])
        return Result([b"one", b"two"])

    environ = environ_for(_request(b"/"), b"", PEER)
    answer = run_app(app, environ, queued=0.0)
    assert (answer.status, answer.reason, answer.body, answer.request_id) == (
        201,
        b"Created",
        b"onetwo",
        "r1",
    )
    assert closed.is_set() and waits[0] is not None and waits[0][0] == 0.0
    assert thread_wait(environ) is None  # the environ is cleared after the request


def test_the_app_reads_the_workers_state_from_the_environ_only() -> None:
    stopping = threading.Event()
    environ: dict[str, Any] = {DRAINING: stopping.is_set}
    assert not draining(environ)
    stopping.set()
    assert draining(environ)
    assert not draining({}) and thread_wait({}) is None  # another WSGI server


def test_an_app_that_fails_outside_its_handlers_still_answers(caplog) -> None:  # type: ignore[no-untyped-def]
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise MemoryError("a native library's panic")

    answer = run_app(app, environ_for(_request(b"/"), b"", PEER), queued=0.0)
    assert answer.status == 500
    assert orjson.loads(answer.body)["error"]["code"] == ErrorCode.INTERNAL
    assert "failed outside its error handlers" in caplog.text


def test_the_access_log_keeps_no_query_and_cuts_long_paths(caplog) -> None:  # type: ignore[no-untyped-def]
    log = logging.getLogger("test.access")
    answer = Answer(200, b"OK", [], b"12345", started=0.0, request_id="abc")
    with caplog.at_level(logging.INFO, logger="test.access"):
        log_access(log, "10.0.0.7", _request(b"/v1/x?access_token=secret"), answer)
        log_access(log, "10.0.0.7", _request(b"/" + b"p" * 1000), answer)
    first, second = (record.getMessage() for record in caplog.records)
    assert "secret" not in first and '"POST /v1/x" 200 5 ' in first and "id=abc" in first
    assert "p" * (LOGGED_PATH_BYTES - 1) in second and "p" * LOGGED_PATH_BYTES not in second
