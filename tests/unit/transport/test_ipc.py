"""The engine wire format's framing (``service/transport/ipc.py``) without a socket:
a stream that hands out its bytes in whatever pieces the test chooses."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import orjson
import pytest

from service.transport import ipc
from service.transport.interface import Job, JobResult


class Stream:
    """Stands in for a non-blocking socket: ``recv_into`` gives at most the next piece's
    size, then ``BlockingIOError`` until more is fed; 0 once closed and drained."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.pieces: list[int] = []
        self.closed = False

    def feed(self, data: bytes, pieces: list[int] | None = None) -> None:
        self.data += data
        self.pieces += pieces or [len(data)]

    def recv_into(self, view: memoryview) -> int:
        if not self.data:
            if self.closed:
                return 0
            raise BlockingIOError
        size = min(len(view), self.pieces[0], len(self.data))
        view[:size] = self.data[:size]
        del self.data[:size]
        self.pieces[0] -= size
        if self.pieces[0] == 0:
            self.pieces.pop(0)
        return size


def _wire(header: dict[str, Any], frames: list[np.ndarray]) -> bytes:
    return b"".join(bytes(b) for b in ipc.encode(header, frames))


FRAMES: list[np.ndarray] = [
    np.arange(60, dtype=np.uint8).reshape(3, 4, 5),
    np.linspace(0, 1, 7, dtype=np.float32),
    np.zeros((0, 3), dtype=np.uint8),  # an empty frame: no bytes on the wire
    np.full((2, 2), 7.5, dtype=np.float32),
]


def _same(message: ipc.Message, header: dict[str, Any], frames: list[np.ndarray]) -> None:
    got_header, got_frames = message
    assert {k: v for k, v in got_header.items() if k != "frames"} == header
    assert len(got_frames) == len(frames)
    for got, sent in zip(got_frames, frames, strict=True):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        np.testing.assert_array_equal(got, sent)


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, 10_000])
def test_a_message_split_anywhere_is_reassembled(piece: int) -> None:
    header: dict[str, Any] = {"op": "explain", "id": 3}
    wire = _wire(header, FRAMES)
    stream, reader, done = Stream(), ipc.MessageReader(), []
    for start in range(0, len(wire), piece):
        stream.feed(wire[start : start + piece])
        done += reader.read(stream)  # type: ignore[arg-type]
        if start + piece < len(wire):
            assert not done  # nothing before the last byte
    assert len(done) == 1 and not reader.eof
    _same(done[0], header, FRAMES)


def test_many_messages_in_random_pieces_come_out_in_order() -> None:
    rng = random.Random(7)
    sent: list[tuple[dict[str, Any], list[np.ndarray]]] = [
        ({"id": i}, FRAMES[: i % 5]) for i in range(40)
    ]
    wire = b"".join(_wire(h, f) for h, f in sent)
    stream, reader, done = Stream(), ipc.MessageReader(), []
    position = 0
    while position < len(wire):
        size = rng.choice([1, 5, 17, 300, 5000])
        stream.feed(wire[position : position + size], [max(1, size // 2), size])
        position += size
        done += reader.read(stream)  # type: ignore[arg-type]
    assert [h["id"] for h, _ in done] == list(range(40))
    for message, (header, frames) in zip(done, sent, strict=True):
        _same(message, header, frames)


def test_a_peer_that_closes_mid_message_is_eof_not_a_message() -> None:
    wire = _wire({"id": 1}, FRAMES)
    stream, reader = Stream(), ipc.MessageReader()
    stream.feed(wire[: len(wire) // 2])
    stream.closed = True
    assert reader.read(stream) == []  # type: ignore[arg-type]
    assert reader.eof


def _prefixed(header: bytes, frames: int) -> bytes:
    return ipc.PREFIX.pack(len(header), frames) + header


@pytest.mark.parametrize(
    "wire, says",
    [
        (ipc.PREFIX.pack(ipc.MAX_HEADER_BYTES + 1, 0), "header of"),
        (ipc.PREFIX.pack(10, ipc.MAX_FRAMES + 1), "frames"),
        (_prefixed(b"{not json", 0), "not JSON"),
        (_prefixed(b"[1, 2]", 0), "not a JSON object"),
        (_prefixed(orjson.dumps({"frames": [["uint8", [2]]]}), 0), "does not describe"),
        (_prefixed(orjson.dumps({"frames": [["int64", [2]]]}), 1), "bad frame description"),
        (_prefixed(orjson.dumps({"frames": [["uint8", [-1]]]}), 1), "bad frame description"),
        (_prefixed(orjson.dumps({"frames": [["float32", [2**20, 2**20]]]}), 1), "message of"),
    ],
)
def test_garbage_is_a_protocol_error_before_any_allocation(wire: bytes, says: str) -> None:
    stream, reader = Stream(), ipc.MessageReader()
    stream.feed(wire)
    with pytest.raises(ipc.ProtocolError, match=says):
        reader.read(stream)  # type: ignore[arg-type]


def test_a_job_survives_the_wire() -> None:
    job = Job(
        "phantom",
        "features",
        [np.ones((5, 4, 1), np.uint8), np.full((3, 3, 3), 0.5, np.float32)],
        [None, (1, 0, 4, 3)],
        [[None], [2, 0]],
        ["gradcam", "layercam"],
        [False, True],
    )
    stream, reader = Stream(), ipc.MessageReader()
    stream.feed(b"".join(bytes(b) for b in ipc.encode_job(9, job, deadline=123.5)))
    ((header, frames),) = reader.read(stream)  # type: ignore[arg-type]
    assert header["id"] == 9 and header["deadline"] == 123.5
    back = ipc.decode_job(header, frames)
    assert (
        back.model,
        back.layer,
        back.boxes,
        back.targets,
        back.methods,
        back.faithfulness,
    ) == (job.model, job.layer, job.boxes, job.targets, job.methods, job.faithfulness)
    for a, b in zip(back.images, job.images, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("with_curves", [False, True])
def test_a_result_survives_the_wire(with_curves: bool) -> None:
    curves = [[np.arange(42, dtype=np.float32).reshape(2, 21)] * 2, []] if with_curves else []
    result = JobResult(
        scores=np.full((2, 4), 0.25, np.float32),
        logits=np.arange(8, dtype=np.float32).reshape(2, 4),
        targets=[[1, 3], [0]],
        maps=[[np.ones((2, 2), np.float32)] * 2, [np.zeros((2, 2), np.float32)]],
        curves=curves,
    )
    stream, reader = Stream(), ipc.MessageReader()
    stream.feed(b"".join(bytes(b) for b in ipc.encode_result(7, result)))
    ((header, frames),) = reader.read(stream)  # type: ignore[arg-type]
    back = ipc.decode_result(header, frames)
    assert back.targets == result.targets
    np.testing.assert_array_equal(back.logits, result.logits)
    assert [len(m) for m in back.maps] == [2, 1]
    assert [len(c) for c in back.curves] == [len(c) for c in curves]
    for got, sent in zip(back.curves, curves, strict=True):
        for a, b in zip(got, sent, strict=True):
            np.testing.assert_array_equal(a, b)
