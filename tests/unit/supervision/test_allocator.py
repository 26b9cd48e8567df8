"""The engines' allocator (``GRADCAM_ENGINE_ALLOCATOR``): tcmalloc where installed, else
glibc's malloc told to keep its pages; what the environment sets is kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.contract.errors import ConfigError
from service.supervision import allocator
from tests.helpers import LiveServer


def test_auto_prefers_tcmalloc_then_tuned_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "tcmalloc_path", lambda: "/usr/lib/libtcmalloc.so.4")
    assert allocator.engine_allocator_env("auto", {}) == {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}
    assert allocator.engine_allocator_env("glibc", {}) == {
        "GLIBC_TUNABLES": allocator.GLIBC_KEEP_PAGES
    }
    monkeypatch.setattr(allocator, "tcmalloc_path", lambda: None)
    assert allocator.engine_allocator_env("auto", {}) == {
        "GLIBC_TUNABLES": allocator.GLIBC_KEEP_PAGES
    }
    with pytest.raises(ConfigError, match="libtcmalloc-minimal4"):
        allocator.engine_allocator_env("tcmalloc", {})
    # What the environment says wins; "system" adds nothing.
    assert allocator.engine_allocator_env("auto", {"LD_PRELOAD": "/x.so"}) == {}
    assert allocator.engine_allocator_env("auto", {"GLIBC_TUNABLES": "a=1"}) == {}
    assert allocator.engine_allocator_env("system", {}) == {}


def test_the_engine_runs_with_it_and_the_workers_do_not() -> None:
    live = LiveServer(env={"GRADCAM_ENGINE_ALLOCATOR": "glibc"})
    try:
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
    finally:
        live.stop()
