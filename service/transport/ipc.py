"""The engine's wire format: a JSON header and raw array frames over a Unix socket.

A message is::

    prefix   8 bytes, struct "<II": header length, number of frames
    header   a JSON object (orjson); its "frames" key lists each frame as
             [dtype, shape], dtype "uint8" or "float32"
    frames   each array's bytes in C order, back to back

Arrays are written with one ``sendmsg`` over memoryviews (no join of large
buffers) and read with ``recv_into`` straight into freshly allocated numpy
arrays (no copy after the kernel's). Measured against ZeroMQ, shared memory and
``multiprocessing.Queue`` by ``tests/benchmarks/transport.py`` (docs/performance.md).
A plain stream socket also tells each side at once when the
other has died (EOF), which is how a worker fails its waiting requests with
``engine_unavailable`` within milliseconds of an engine crash.

The explain messages themselves (a job out, its result or error back) are
encoded and decoded at the end of this module, each encoder beside its decoder.

Both sides use non-blocking sockets: ``MessageReader`` reassembles messages from
whatever arrives, ``send_message`` waits for room with ``poll`` up to a timeout
(a peer that stops reading is a broken peer, not a reason to hang).
"""

from __future__ import annotations

import math
import select
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from service.contract.errors import ErrorCode, ServiceError
from service.transport.interface import Job, JobResult, JobTimings

PREFIX = struct.Struct("<II")
# Generous bounds that still stop a corrupt stream from allocating absurd memory.
MAX_HEADER_BYTES = 64 * 2**20
MAX_FRAMES = 4096
MAX_MESSAGE_BYTES = 8 * 2**30
_DTYPES: dict[str, np.dtype[Any]] = {"uint8": np.dtype(np.uint8), "float32": np.dtype(np.float32)}
# dtype.char → wire name: a dict lookup, where dtype.name costs microseconds per call.
_NAMES = {dtype.char: name for name, dtype in _DTYPES.items()}
_ITEMSIZES = {name: dtype.itemsize for name, dtype in _DTYPES.items()}
# sendmsg takes at most IOV_MAX (1024 on Linux) buffers per call.
_MAX_IOV = 512

# Both ends of an engine socket: its buffers, so that requests and replies of a few
# hundred KiB go in one write (tests/benchmarks/transport.py: 256 KiB took 7-20 % off a
# 4.6 MiB batch), and how long a send may not progress before the other end counts as
# stuck or gone (a peer that reads nothing for 10 s is not just busy).
SOCKET_BUFFER_BYTES = 256 * 1024
SEND_TIMEOUT_S = 10.0

Message = tuple[dict[str, Any], list[np.ndarray]]


class ProtocolError(Exception):
    """The byte stream is not a valid message: the connection must be dropped."""


class PeerGone(Exception):
    """The other side closed the connection or stopped reading."""


def encode(header: dict[str, Any], frames: Sequence[np.ndarray] = ()) -> list[memoryview]:
    """The buffers of one message (``header`` gains the ``frames`` description)."""
    arrays = [np.ascontiguousarray(frame) for frame in frames]
    specs = []
    for array in arrays:
        name = _NAMES.get(array.dtype.char)
        if name is None:
            raise ValueError(f"frames must be uint8 or float32, not {array.dtype}")
        specs.append([name, list(array.shape)])
    described = {**header, "frames": specs}
    head = orjson.dumps(described)
    buffers = [memoryview(PREFIX.pack(len(head), len(arrays))), memoryview(head)]
    buffers += [_bytes_view(a) for a in arrays if a.nbytes]
    return buffers


def _bytes_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy."""
    return memoryview(array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def send_message(sock: socket.socket, buffers: Sequence[memoryview], timeout_s: float) -> None:
    """Write every buffer to the non-blocking ``sock``; ``PeerGone`` on failure, or when
    the peer reads nothing for ``timeout_s``."""
    pending = [b for b in buffers if len(b)]
    deadline = time.monotonic() + timeout_s
    poller = select.poll()
    try:
        poller.register(sock, select.POLLOUT)
    except (ValueError, OSError):  # closed meanwhile (fileno -1)
        raise PeerGone("the socket is closed") from None
    while pending:
        try:
            sent = sock.sendmsg(pending[:_MAX_IOV])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except (OSError, ValueError) as error:
            raise PeerGone(f"send failed: {error}") from None
        if sent:
            deadline = time.monotonic() + timeout_s  # progress: the peer is reading
        while sent and pending:
            if sent >= len(pending[0]):
                sent -= len(pending[0])
                pending.pop(0)
            else:
                pending[0] = pending[0][sent:]
                sent = 0
        if pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerGone(f"the peer read nothing for {timeout_s:.0f} s")
            poller.poll(min(remaining, 1.0) * 1000)


class MessageReader:
    """Reassembles messages from a non-blocking stream, however the bytes are split."""

    def __init__(self) -> None:
        self.eof = False
        self._start_prefix()

    def _start_prefix(self) -> None:
        self._stage = "prefix"
        self._buffer = bytearray(PREFIX.size)
        self._view = memoryview(self._buffer)
        self._filled = 0
        self._header: dict[str, Any] = {}
        self._frames: list[np.ndarray] = []
        self._current: np.ndarray = np.empty(0, dtype=np.uint8)
        self._frame_count = 0

    def read(self, sock: socket.socket) -> list[Message]:
        """Every message completed by what ``sock`` has now; sets ``eof`` when it closed."""
        done: list[Message] = []
        while not self.eof:
            try:
                got = sock.recv_into(self._view[self._filled :])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.eof = True
                break
            if got == 0:
                if len(self._view) == self._filled:  # an empty frame target: nothing to read
                    got = 0
                else:
                    self.eof = True
                    break
            self._filled += got
            while self._filled == len(self._view):
                message = self._advance()
                if message is not None:
                    done.append(message)
                    break
        return done

    def _advance(self) -> Message | None:
        """The current target is full: move to the next one; a message when complete."""
        if self._stage == "prefix":
            header_len, self._frame_count = PREFIX.unpack(self._buffer)
            if header_len > MAX_HEADER_BYTES or self._frame_count > MAX_FRAMES:
                raise ProtocolError(f"header of {header_len} bytes, {self._frame_count} frames")
            self._stage = "header"
            self._buffer = bytearray(header_len)
            self._view = memoryview(self._buffer)
            self._filled = 0
            return None
        if self._stage == "header":
            self._header = _parse_header(bytes(self._buffer), self._frame_count)
            self._stage = "frames"
        else:
            self._frames.append(self._current)
        specs = self._header["frames"]
        while len(self._frames) < len(specs):
            dtype, shape = specs[len(self._frames)]
            array: np.ndarray = np.empty(tuple(shape), dtype=_DTYPES[dtype])
            if array.nbytes == 0:
                self._frames.append(array)
                continue
            self._current = array
            self._view = _bytes_view(array)
            self._filled = 0
            return None
        message = (self._header, self._frames)
        self._start_prefix()
        return message


def _parse_header(raw: bytes, frame_count: int) -> dict[str, Any]:
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise ProtocolError(f"header is not JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise ProtocolError("header is not a JSON object")
    header: dict[str, Any] = parsed
    specs = header.get("frames")
    if not isinstance(specs, list) or len(specs) != frame_count:
        raise ProtocolError("header does not describe its frames")
    total = 0
    for spec in specs:
        if (
            not isinstance(spec, list)
            or len(spec) != 2
            or spec[0] not in _DTYPES
            or not isinstance(spec[1], list)
            or not all(isinstance(d, int) and d >= 0 for d in spec[1])
        ):
            raise ProtocolError(f"bad frame description {spec!r}")
        total += math.prod(spec[1]) * _ITEMSIZES[spec[0]]
    if total > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {total} bytes")
    return header


def connect(path: str) -> socket.socket:
    """A non-blocking connection to the engine listening at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


# --- the messages of an explain job, each encoder beside its decoder ------------


def encode_job(request_id: int, job: Job, deadline: float) -> list[memoryview]:
    """A worker's request: the job, its id and its deadline (``time.monotonic()``)."""
    header = {
        "op": "explain",
        "id": request_id,
        "model": job.model,
        "layer": job.layer,
        "deadline": deadline,
        "targets": job.targets,
        "methods": job.methods,
        "boxes": job.boxes,
        "faithfulness": job.faithfulness,
    }
    return encode(header, job.images)


def decode_job(header: dict[str, Any], frames: Sequence[np.ndarray]) -> Job:
    boxes = [tuple(box) if box is not None else None for box in header["boxes"]]
    return Job(
        model=str(header["model"]),
        layer=str(header["layer"]),
        images=list(frames),
        boxes=boxes,
        targets=[list(t) for t in header["targets"]],
        methods=[str(m) for m in header["methods"]],
        faithfulness=[bool(f) for f in header.get("faithfulness", [])],
    )


def encode_result(request_id: int, result: JobResult) -> list[memoryview]:
    """The reply buffers for a finished job."""
    maps = [m for per_image in result.maps for m in per_image]
    timings = result.timings
    header = {
        "id": request_id,
        "targets": result.targets,
        "counts": [len(per_image) for per_image in result.maps],
        "timings": [timings.queue_wait_s, timings.compute_s, timings.batch_images],
        "curve_counts": [len(per_image) for per_image in result.curves],
    }
    frames = [
        np.ascontiguousarray(result.scores, dtype=np.float32),
        np.ascontiguousarray(result.logits, dtype=np.float32),
        np.stack(maps).astype(np.float32, copy=False),
    ]
    curves = [c for per_image in result.curves for c in per_image]
    if curves:
        frames.append(np.stack(curves).astype(np.float32, copy=False))
    return encode(header, frames)


def decode_result(header: dict[str, Any], frames: Sequence[np.ndarray]) -> JobResult:
    scores, logits, stacked, *rest = frames
    queue_wait_s, compute_s, batch_images = header["timings"]
    return JobResult(
        scores=scores,
        logits=logits,
        targets=[list(t) for t in header["targets"]],
        maps=_split(stacked, header["counts"]),
        timings=JobTimings(float(queue_wait_s), float(compute_s), int(batch_images)),
        curves=_split(rest[0], header["curve_counts"]) if rest else [],
    )


def _split(stacked: np.ndarray, counts: Sequence[int]) -> list[list[np.ndarray]]:
    """Per image, its ``counts[i]`` arrays of one stacked frame."""
    out: list[list[np.ndarray]] = []
    offset = 0
    for count in counts:
        out.append(list(stacked[offset : offset + count]))
        offset += count
    return out


def _internal(error: BaseException) -> dict[str, Any]:
    message = (
        f"The model failed on this request ({type(error).__name__}: {error}); it has been logged."
    )
    return {"status": 500, "code": ErrorCode.INTERNAL, "message": message}


def encode_error(request_id: int, error: BaseException) -> list[memoryview]:
    wire = error.to_wire() if isinstance(error, ServiceError) else _internal(error)
    return encode({"id": request_id, "error": wire})
