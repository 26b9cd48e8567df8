"""The engines' allocator (``GRADCAM_ENGINE_ALLOCATOR``): tcmalloc where installed, else
glibc's malloc told to keep its pages; what the environment sets is kept."""

from __future__ import annotations

import pytest

from service.contract.errors import ConfigError
from service.supervision import allocator


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
