"""An engine's heartbeat: a small file beside its socket that its receive loop
rewrites several times a second, read by the HTTP workers and the supervisor.

A stopped, swapped-out or wedged engine keeps its socket open, so a worker would
go on sending it work that nobody answers until each request's deadline. Instead:

- the engine's receive loop (the thread that takes every message) writes the time
  of its last turn, and how many jobs it has answered, every ``BEAT_EVERY_S``;
- a worker that finds the beat older than ``engine_heartbeat_timeout_s``, and has had
  no reply from the engine for as long (an engine that answers is alive, whatever
  delayed its beat), answers new requests 503 ``engine_unavailable`` at once and
  fails the ones waiting on that engine (``/readyz`` is 503 too); a beat or a reply
  that comes back makes it usable again;
- the supervisor kills an engine whose beat is older than ``engine_hang_restart_s``
  and restarts it, as a liveness probe would, without one.

The file holds two little-endian unsigned 64-bit numbers: the beat in
``CLOCK_MONOTONIC`` nanoseconds (one clock for every process of the machine) and the
jobs answered. Each is written with one aligned 8-byte store through ``mmap``.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

# How often the engine's receive loop writes its beat (its select wakes this often).
BEAT_EVERY_S = 0.2
_FIELD = struct.Struct("<Q")
_SIZE = 16


def heartbeat_path(socket_path: str) -> str:
    return socket_path + ".beat"


class Heartbeat:
    """One engine's heartbeat file: written by the engine, read by anyone."""

    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        # Never truncated: a worker may still map the file of a predecessor engine, and
        # reading a mapping past the end of its file is a SIGBUS.
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        try:
            if create and os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        if create:
            self.beat(0)

    @classmethod
    def open(cls, path: str) -> Heartbeat | None:
        """The heartbeat at ``path``, or None while its engine has not made it."""
        try:
            return cls(path)
        except (OSError, ValueError):
            return None

    def beat(self, answered: int) -> None:
        _FIELD.pack_into(self._map, 8, answered)
        _FIELD.pack_into(self._map, 0, time.monotonic_ns())

    def age_s(self) -> float:
        """Seconds since the last beat."""
        (beat,) = _FIELD.unpack_from(self._map, 0)
        return max(0.0, (time.monotonic_ns() - int(beat)) / 1e9)

    def answered(self) -> int:
        """Jobs the engine has answered since it started."""
        (count,) = _FIELD.unpack_from(self._map, 8)
        return int(count)

    def close(self) -> None:
        self._map.close()
