"""Round-trip cost of client → engine → client transports, side by side in one run.

    python tests/benchmarks/transport.py [--trips 300] [--warmup 30]
                                         [--sndbuf 0 262144] [--threads 8]
                                         [--threaded-sndbuf 0]

A client process (this one) sends a request of numpy arrays to an "echo engine"
process, started with multiprocessing's ``spawn`` context (a fresh interpreter, no
torch), which replies with arrays of the size a classifier would return. Transports:

* ``unix``: exactly what the service ships, ``service.transport.ipc``: ``encode`` (``<II``
  prefix, orjson header, raw frames), ``send_message`` (one ``sendmsg`` of
  memoryviews) and ``MessageReader`` (``recv_into`` straight into ``np.empty``
  arrays) after ``select.poll`` says readable, on non-blocking sockets on both
  sides. The echo engine replies inline (the real one has a send thread). One row
  per ``SO_SNDBUF``, set on both ends: 0 = kernel default, 256 KiB = the service's
  (``SOCKET_BUFFER_BYTES``, ``service/transport/ipc.py``); the effective value (the
  kernel doubles it, capped at ``net.core.wmem_max``) is in the row's name.
* ``zmq ipc``: ZeroMQ DEALER → ROUTER over ``ipc://``, a msgpack header frame plus
  raw frames, ``send_multipart(copy=False)`` (pyzmq still copies frames under its
  64 KiB ``copy_threshold``), ``recv_multipart(copy=False)`` and ``np.frombuffer``.
* ``shm slot``: the arrays are copied into a ``multiprocessing.shared_memory`` slot
  (one each way) and one byte on a Unix socket notifies the other side. The engine
  reads the request in place; the client copies the reply out (the slot is reused).
* ``mp.Queue``: ``multiprocessing.Queue`` of pickled arrays, as a baseline.

Cases (request → reply): 1. one 224×224×3 uint8 image → 1000 float32 logits + a 7×7
map; 2. a batch of 32 such images → 32×1000 logits + 32 7×7 maps; 3. one 1×512×512
float32 image → 14 logits + a 16×16 map.

Per transport and case: warm up, verify one trip, time ``--trips`` round trips
(case 2 drops to no fewer than 50 if it would take more than ~3 s), verify one
more. A verify trip sends fresh random arrays; the engine returns the crc32 of
every frame it received and a reply generated from those crcs, which the client
recomputes and compares bit for bit, so no transport passes with stale or truncated
data. The engine reads no payload otherwise: the numbers are transport cost only.
Prints a Markdown table of p50/p99 round-trip ms and "MB/s in" = request bytes
(10⁶) / p50, then, per ``--threaded-sndbuf``, the throughput of case 1 from 1 and
from ``--threads`` threads sharing ONE ``service.transport.ipc`` socket (a lock around
``send_message``, a polling reader thread resolving futures by request id, as the
worker's ``EngineConnection``). Progress goes to stderr, results to stdout. Takes
about 10 s; needs the service installed (``pip install -e .``), pyzmq and msgpack.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import platform
import select
import shutil
import socket
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt
import zmq

from service.transport import ipc

Array = npt.NDArray[Any]
Spec = tuple[tuple[int, ...], str]
Reply = tuple[list[Array], list[int] | None]  # reply arrays, engine crcs if verify


@dataclass(frozen=True)
class Case:
    label: str
    request: tuple[Spec, ...]
    reply: tuple[Spec, ...]
    reducible: bool = False  # may time fewer trips (>= MIN_TRIPS) when slow


CASES: tuple[Case, ...] = (
    Case(
        "1: 224×224×3 u8 → 1000 + 7×7 f32",
        (((224, 224, 3), "uint8"),),
        (((1000,), "float32"), ((7, 7), "float32")),
    ),
    Case(
        "2: 32×224×224×3 u8 → 32×(1000 + 7×7) f32",
        (((32, 224, 224, 3), "uint8"),),
        (((32, 1000), "float32"), ((32, 7, 7), "float32")),
        reducible=True,
    ),
    Case(
        "3: 1×512×512 f32 → 14 + 16×16 f32",
        (((1, 512, 512), "float32"),),
        (((14,), "float32"), ((16, 16), "float32")),
    ),
)

# What the service sets on both ends (service/engine/process.py imports torch, so copied).
from service.transport.ipc import SOCKET_BUFFER_BYTES  # noqa: E402

SEND_TIMEOUT_S = 10.0  # as the service's send loops
RECV_TIMEOUT_S = 60.0
META_BYTES = 64  # id + crcs at the start of each shared-memory slot
ALIGN = 64
SHM_STOP = 0x7F  # notification byte: case index | verify << 7; this one stops the engine
MIN_TRIPS = 50
REDUCE_ABOVE_S = 3.0
ENGINE_START_TIMEOUT_S = 60.0


def _nbytes(spec: Spec) -> int:
    return int(np.prod(spec[0])) * np.dtype(spec[1]).itemsize


def _static_reply(case: Case) -> list[Array]:
    """The engine's ordinary reply: allocated once, reused every trip."""
    return [np.full(shape, 0.5, dtype=dtype) for shape, dtype in case.reply]


def _reply_pattern(case: Case, crcs: Sequence[int]) -> list[Array]:
    """The reply to a verify trip: derived from the crcs of what the engine received."""
    rng = np.random.default_rng(list(crcs))
    return [rng.standard_normal(shape).astype(dtype) for shape, dtype in case.reply]


def _echo(
    case_index: int, verify: bool, frames: Sequence[Array], replies: Sequence[list[Array]]
) -> tuple[list[int] | None, list[Array]]:
    """The engine's answer to a request: (crcs of the frames if verify, reply arrays)."""
    if not verify:
        return None, replies[case_index]
    crcs = [zlib.crc32(f) for f in frames]
    return crcs, _reply_pattern(CASES[case_index], crcs)


def _random_request(case: Case, rng: np.random.Generator) -> list[Array]:
    return [
        rng.integers(0, 256, size=shape, dtype=dtype)
        if np.dtype(dtype).kind == "u"
        else rng.standard_normal(shape).astype(dtype)
        for shape, dtype in case.request
    ]


def _shm_buf(shm: shared_memory.SharedMemory) -> memoryview:
    if shm.buf is None:
        raise RuntimeError(f"shared memory {shm.name} is closed")
    return shm.buf


def _tune(sock: socket.socket, sndbuf: int) -> str:
    """Set SO_SNDBUF (0: keep the kernel default); a label with the effective value."""
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    effective = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 1024
    return f"SO_SNDBUF {f'{sndbuf // 1024} KiB' if sndbuf else 'default'} (eff. {effective} KiB)"


def _accept_once(path: str, ready: Event) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    ready.set()
    conn, _ = server.accept()
    server.close()
    os.unlink(path)
    return conn


# --- engines (run in spawned processes) -------------------------------------------------------


def _unix_engine(ready: Event, path: str, sndbuf: int) -> None:
    conn = _accept_once(path, ready)
    conn.setblocking(False)
    _tune(conn, sndbuf)
    replies = [_static_reply(case) for case in CASES]
    reader, poller = ipc.MessageReader(), select.poll()
    poller.register(conn, select.POLLIN)
    with conn:
        while not reader.eof:
            poller.poll()
            for header, frames in reader.read(conn):
                crcs, reply = _echo(header["c"], header["v"], frames, replies)
                try:
                    ipc.send_message(
                        conn, ipc.encode({"id": header["id"], "crc": crcs}, reply), SEND_TIMEOUT_S
                    )
                except ipc.PeerGone:
                    return


def _zmq_engine(ready: Event, address: str) -> None:
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind(address)
    ready.set()
    replies = [_static_reply(case) for case in CASES]
    while True:
        identity, raw_header, *parts = sock.recv_multipart(copy=False)
        header = msgpack.unpackb(raw_header.bytes)
        if header.get("stop"):
            break
        frames = [
            np.frombuffer(p.buffer, dtype=d).reshape(s)
            for p, (_, d, s) in zip(parts, header["f"], strict=True)
        ]
        crcs, reply = _echo(header["c"], header["v"], frames, replies)
        out = {
            "id": header["id"],
            "crc": crcs,
            "f": [[a.nbytes, a.dtype.str, list(a.shape)] for a in reply],
        }
        sock.send_multipart([identity, msgpack.packb(out), *reply], copy=False)
    sock.close()
    context.term()


def _padded(spec: Spec) -> int:
    return -(-_nbytes(spec) // ALIGN) * ALIGN


def _slot_views(shm: shared_memory.SharedMemory, specs: Sequence[Spec]) -> list[Array]:
    offsets = itertools.accumulate(map(_padded, specs), initial=META_BYTES)
    return [
        np.ndarray(shape, dtype=dtype, buffer=_shm_buf(shm), offset=offset)
        for (shape, dtype), offset in zip(specs, offsets, strict=False)
    ]


def _shm_engine(ready: Event, path: str, request_name: str, reply_name: str) -> None:
    request_shm = shared_memory.SharedMemory(name=request_name)
    reply_shm = shared_memory.SharedMemory(name=reply_name)
    request_meta = np.ndarray((8,), np.uint64, buffer=_shm_buf(request_shm))
    reply_meta = np.ndarray((8,), np.uint64, buffer=_shm_buf(reply_shm))
    request_views = [_slot_views(request_shm, case.request) for case in CASES]
    reply_views = [_slot_views(reply_shm, case.reply) for case in CASES]
    replies = [_static_reply(case) for case in CASES]
    with _accept_once(path, ready) as conn:
        while True:
            note = conn.recv(1)
            if not note or note[0] == SHM_STOP:
                break
            case_index, verify = note[0] & 0x7F, note[0] >> 7
            crcs, reply = _echo(case_index, bool(verify), request_views[case_index], replies)
            if crcs is not None:
                reply_meta[1] = len(crcs)
                reply_meta[2 : 2 + len(crcs)] = crcs
            for dst, src in zip(reply_views[case_index], reply, strict=True):
                np.copyto(dst, src)
            reply_meta[0] = request_meta[0]
            conn.sendall(note)
    del request_meta, reply_meta, request_views, reply_views  # release the exported buffers
    request_shm.close()
    reply_shm.close()


def _queue_engine(ready: Event, requests: Queue[Any], replies_out: Queue[Any]) -> None:
    replies = [_static_reply(case) for case in CASES]
    ready.set()
    while (message := requests.get()) is not None:
        request_id, case_index, verify, frames = message
        crcs, reply = _echo(case_index, verify, frames, replies)
        replies_out.put((request_id, crcs, reply))


# --- clients ----------------------------------------------------------------------------------

SPAWN = mp.get_context("spawn")


def _spawn(target: Callable[..., None], *args: Any) -> BaseProcess:
    ready = SPAWN.Event()
    process = SPAWN.Process(target=target, args=(ready, *args), daemon=True)
    process.start()
    deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
    while not ready.wait(0.05):
        if not process.is_alive() or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"engine {target.__name__} did not start")
    return process


def _stop(process: BaseProcess) -> None:
    process.join(10)
    if process.is_alive():
        process.kill()
        process.join()


class UnixTransport:
    def __init__(self, workdir: str, sndbuf: int) -> None:
        path = os.path.join(workdir, f"unix-{sndbuf}.sock")
        self.process = _spawn(_unix_engine, path, sndbuf)
        self.sock = ipc.connect(path)
        self.name = f"unix (service.transport.ipc), {_tune(self.sock, sndbuf)}"
        self.reader, self.poller = ipc.MessageReader(), select.poll()
        self.poller.register(self.sock, select.POLLIN)
        self.ids = itertools.count()

    def roundtrip(self, case_index: int, frames: Sequence[Array], verify: bool) -> Reply:
        request_id = next(self.ids)
        header = {"id": request_id, "c": case_index, "v": verify}
        ipc.send_message(self.sock, ipc.encode(header, frames), SEND_TIMEOUT_S)
        messages: list[ipc.Message] = []
        while not messages:
            if self.reader.eof:
                raise ConnectionError("engine closed the socket")
            if not self.poller.poll(RECV_TIMEOUT_S * 1000):
                raise TimeoutError("no reply from the engine")
            messages = self.reader.read(self.sock)
        [(reply_header, reply)] = messages
        if reply_header["id"] != request_id:
            raise RuntimeError("reply to another request")
        return reply, reply_header.get("crc")

    def close(self) -> None:
        self.sock.close()
        _stop(self.process)


class ZmqTransport:
    name = "zmq ipc (DEALER/ROUTER)"

    def __init__(self, workdir: str) -> None:
        address = f"ipc://{os.path.join(workdir, 'zmq.sock')}"
        self.process = _spawn(_zmq_engine, address)
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(address)
        self.ids = itertools.count()

    def roundtrip(self, case_index: int, frames: Sequence[Array], verify: bool) -> Reply:
        request_id = next(self.ids)
        header = {
            "id": request_id,
            "c": case_index,
            "v": verify,
            "f": [[a.nbytes, a.dtype.str, list(a.shape)] for a in frames],
        }
        self.sock.send_multipart([msgpack.packb(header), *frames], copy=False)
        raw_header, *parts = self.sock.recv_multipart(copy=False)
        reply_header = msgpack.unpackb(raw_header.bytes)
        if reply_header["id"] != request_id:
            raise RuntimeError("reply to another request")
        reply = [
            np.frombuffer(p.buffer, dtype=d).reshape(s)
            for p, (_, d, s) in zip(parts, reply_header["f"], strict=True)
        ]
        return reply, reply_header.get("crc")

    def close(self) -> None:
        self.sock.send(msgpack.packb({"stop": True}))
        _stop(self.process)
        self.sock.close()
        self.context.term()


class ShmTransport:
    name = "shm slot + unix byte"

    def __init__(self, workdir: str) -> None:
        path = os.path.join(workdir, "shm.sock")
        request_size = META_BYTES + max(sum(map(_padded, c.request)) for c in CASES)
        reply_size = META_BYTES + max(sum(map(_padded, c.reply)) for c in CASES)
        self.request_shm = shared_memory.SharedMemory(create=True, size=request_size)
        self.reply_shm = shared_memory.SharedMemory(create=True, size=reply_size)
        self.request_meta = np.ndarray((8,), np.uint64, buffer=_shm_buf(self.request_shm))
        self.reply_meta = np.ndarray((8,), np.uint64, buffer=_shm_buf(self.reply_shm))
        self.request_views = [_slot_views(self.request_shm, c.request) for c in CASES]
        self.reply_views = [_slot_views(self.reply_shm, c.reply) for c in CASES]
        self.process = _spawn(_shm_engine, path, self.request_shm.name, self.reply_shm.name)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # blocking, one byte
        self.sock.connect(path)
        self.ids = itertools.count(1)

    def roundtrip(self, case_index: int, frames: Sequence[Array], verify: bool) -> Reply:
        request_id = next(self.ids)
        for dst, src in zip(self.request_views[case_index], frames, strict=True):
            np.copyto(dst, src)
        self.request_meta[0] = request_id
        note = bytes([case_index | (verify << 7)])
        self.sock.sendall(note)
        if self.sock.recv(1) != note:
            raise ConnectionError("engine closed or answered out of turn")
        if int(self.reply_meta[0]) != request_id:
            raise RuntimeError("reply to another request")
        reply = [view.copy() for view in self.reply_views[case_index]]
        count = int(self.reply_meta[1])
        return reply, [int(c) for c in self.reply_meta[2 : 2 + count]] if verify else None

    def close(self) -> None:
        self.sock.sendall(bytes([SHM_STOP]))
        _stop(self.process)
        self.sock.close()
        del self.request_meta, self.reply_meta, self.request_views, self.reply_views
        for shm in (self.request_shm, self.reply_shm):
            shm.close()
            shm.unlink()


class QueueTransport:
    name = "mp.Queue (pickle)"

    def __init__(self) -> None:
        self.requests: Queue[Any] = SPAWN.Queue()
        self.replies: Queue[Any] = SPAWN.Queue()
        self.process = _spawn(_queue_engine, self.requests, self.replies)
        self.ids = itertools.count()

    def roundtrip(self, case_index: int, frames: Sequence[Array], verify: bool) -> Reply:
        request_id = next(self.ids)
        self.requests.put((request_id, case_index, verify, list(frames)))
        reply_id, crcs, reply = self.replies.get(timeout=60)
        if reply_id != request_id:
            raise RuntimeError("reply to another request")
        return reply, crcs

    def close(self) -> None:
        self.requests.put(None)
        _stop(self.process)


# Each has name, roundtrip(case_index, frames, verify) -> (reply arrays, engine crcs if verify)
# and close().
Transport = UnixTransport | ZmqTransport | ShmTransport | QueueTransport


class ThreadedUnixClient:
    """Many threads, ONE ipc socket: a lock around send_message, a polling reader."""

    def __init__(self, path: str, sndbuf: int) -> None:
        self.sock = ipc.connect(path)
        self.label = _tune(self.sock, sndbuf)
        self.send_lock = threading.Lock()
        self.pending: dict[int, Future[list[Array]]] = {}
        self.ids = itertools.count()
        self.reader = threading.Thread(target=self._read, name="reply-reader", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        reader, poller = ipc.MessageReader(), select.poll()
        poller.register(self.sock, select.POLLIN)
        failure: Exception = ConnectionError("engine closed the socket")
        try:
            while not reader.eof:
                poller.poll()
                for header, frames in reader.read(self.sock):
                    self.pending.pop(header["id"]).set_result(frames)
        except ipc.ProtocolError as error:
            failure = error
        for future in list(self.pending.values()):
            future.set_exception(failure)

    def request(self, case_index: int, frames: Sequence[Array]) -> list[Array]:
        request_id = next(self.ids)
        future: Future[list[Array]] = Future()
        self.pending[request_id] = future
        buffers = ipc.encode({"id": request_id, "c": case_index, "v": False}, frames)
        with self.send_lock:
            ipc.send_message(self.sock, buffers, SEND_TIMEOUT_S)
        return future.result(timeout=60)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.reader.join(10)
        self.sock.close()


# --- measurement ------------------------------------------------------------------------------


def _verify(transport: Transport, case_index: int, rng: np.random.Generator) -> None:
    case = CASES[case_index]
    frames = _random_request(case, rng)
    sent = [zlib.crc32(f) for f in frames]
    reply, received = transport.roundtrip(case_index, frames, True)
    if received != sent:
        raise RuntimeError(f"{transport.name}, case {case.label}: crc {received} != {sent}")
    _check_reply(transport.name, case, reply, _reply_pattern(case, sent))


def _check_reply(name: str, case: Case, reply: Sequence[Array], expected: Sequence[Array]) -> None:
    for got, want in zip(reply, expected, strict=True):
        if got.shape != want.shape or got.dtype != want.dtype or not np.array_equal(got, want):
            raise RuntimeError(f"{name}, case {case.label}: reply differs from what was sent")


def bench_case(
    transport: Transport, case_index: int, trips: int, warmup: int, rng: np.random.Generator
) -> str:
    """One row of the Markdown table."""
    case = CASES[case_index]
    frames = _random_request(case, rng)
    started = time.perf_counter()
    for _ in range(warmup):
        transport.roundtrip(case_index, frames, False)
    per_trip = (time.perf_counter() - started) / max(warmup, 1)
    if case.reducible and per_trip * trips > REDUCE_ABOVE_S:
        trips = max(MIN_TRIPS, int(REDUCE_ABOVE_S / per_trip))
    _verify(transport, case_index, rng)
    times = np.empty(trips)
    reply: list[Array] = []
    for i in range(trips):
        started = time.perf_counter()
        reply, _ = transport.roundtrip(case_index, frames, False)
        times[i] = time.perf_counter() - started
    _check_reply(transport.name, case, reply, _static_reply(case))
    _verify(transport, case_index, rng)
    p50, p99 = np.percentile(times, [50, 99])
    print(f"{transport.name} | {case.label}: p50 {p50 * 1e3:.3f} ms", file=sys.stderr)
    return (
        f"| {transport.name} | {case.label} (n={trips}) | {p50 * 1e3:.3f} | {p99 * 1e3:.3f}"
        f" | {sum(map(_nbytes, case.request)) / p50 / 1e6:,.0f} |"
    )


def bench_threaded(workdir: str, threads: int, trips: int, sndbuf: int) -> list[str]:
    """Round trips/s of case 1 through one shared socket, with 1 and with `threads` threads."""
    path = os.path.join(workdir, f"threaded-{sndbuf}.sock")
    process = _spawn(_unix_engine, path, sndbuf)
    client = ThreadedUnixClient(path, sndbuf)
    frames = _random_request(CASES[0], np.random.default_rng(1))
    lines: list[str] = []

    def worker(out: list[float], barrier: threading.Barrier) -> None:
        for _ in range(10):
            client.request(0, frames)
        barrier.wait()
        for _ in range(trips):
            started = time.perf_counter()
            client.request(0, frames)
            out.append(time.perf_counter() - started)

    try:
        for count in (1, threads):
            latencies: list[list[float]] = [[] for _ in range(count)]
            barrier = threading.Barrier(count + 1)
            workers = [threading.Thread(target=worker, args=(out, barrier)) for out in latencies]
            for w in workers:
                w.start()
            barrier.wait()
            started = time.perf_counter()
            for w in workers:
                w.join()
            elapsed = time.perf_counter() - started
            p50, p99 = np.percentile(np.concatenate(latencies), [50, 99]) * 1e3
            lines.append(
                f"threaded unix (service.transport.ipc, {client.label}), case 1,"
                f" {count} thread(s) × {trips} trips, one socket + reader thread:"
                f" **{count * trips / elapsed:,.0f} round trips/s** total"
                f" (per request p50 {p50:.3f} ms, p99 {p99:.3f} ms)"
            )
    finally:
        client.close()
        _stop(process)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trips", type=int, default=300, help="timed round trips per case")
    parser.add_argument("--warmup", type=int, default=30, help="untimed round trips first")
    parser.add_argument(
        "--sndbuf",
        type=int,
        nargs="+",
        default=[0, SOCKET_BUFFER_BYTES],
        help="SO_SNDBUF values for the unix rows (0 = kernel default)",
    )
    parser.add_argument(
        "--threaded-sndbuf",
        type=int,
        nargs="+",
        default=[0],
        help="SO_SNDBUF values for the threaded-client lines",
    )
    parser.add_argument("--threads", type=int, default=8, help="threads sharing one socket")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    workdir = tempfile.mkdtemp(prefix="transport-bench-")
    factories: list[Callable[[], Transport]] = [
        *(lambda s=s: UnixTransport(workdir, s) for s in args.sndbuf),
        lambda: ZmqTransport(workdir),
        lambda: ShmTransport(workdir),
        QueueTransport,
    ]
    rows: list[str] = []
    started = time.perf_counter()
    try:
        for factory in factories:
            transport = factory()
            try:
                rows += [
                    bench_case(transport, case_index, args.trips, args.warmup, rng)
                    for case_index in range(len(CASES))
                ]
            finally:
                transport.close()
        threaded = [
            line
            for sndbuf in args.threaded_sndbuf
            for line in bench_threaded(workdir, args.threads, args.trips, sndbuf)
        ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"Python {platform.python_version()}, numpy {np.__version__}, pyzmq {zmq.__version__},"
        f" {os.cpu_count()} CPUs, Linux {platform.release()}; all replies verified by crc32;"
        f" run took {time.perf_counter() - started:.0f} s\n"
    )
    print("| transport | case | p50 ms | p99 ms | MB/s in |")
    print("|---|---|---:|---:|---:|")
    print("\n".join([*rows, "", *threaded]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
