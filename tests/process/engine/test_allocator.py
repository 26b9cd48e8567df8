"""The engines' allocator in a real serve: the engine runs with the one chosen, the HTTP
workers do not (the choice itself: tests/unit/supervision/test_allocator.py)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import ServerFactory


def test_the_engine_runs_with_it_and_the_workers_do_not(live_server: ServerFactory) -> None:
    live = live_server(engine_allocator="glibc")
    [engine] = live.engine_pids()
    environ = Path(f"/proc/{engine}/environ").read_bytes().split(b"\0")
    # (glibc rewrites the variable in place as it parses it: its start remains.)
    assert any(
        entry.startswith(b"GLIBC_TUNABLES=glibc.malloc.mmap_threshold=") for entry in environ
    )
    for worker in live.worker_pids():
        assert not any(
            entry.startswith(b"GLIBC_TUNABLES=")
            for entry in Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
        )
