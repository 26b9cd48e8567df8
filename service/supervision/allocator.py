"""The engines' memory allocator (``GRADCAM_ENGINE_ALLOCATOR``), chosen by ``serve``.

An engine allocates and frees a batch's activations (tens of MB each) every batch.
glibc's malloc served them with fresh ``mmap``s and returned them at once: the
engine spent up to 44 % of a core in the kernel on page faults (docs/performance.md).
tcmalloc keeps them; where it is not installed, glibc is told to.
"""

from __future__ import annotations

from pathlib import Path

from service.contract.errors import ConfigError

# glibc's malloc, told to keep what it has: a batch's activations (tens of MB) come
# from the heap instead of fresh mmaps (the largest threshold glibc allows, 32 MB),
# freed memory stays for the next batch (trim at 4 GB) and the heap grows in 256 MB
# steps. Without it the engine spent 22-27 % of its CPU in page faults (docs/performance.md);
# the memory budget counts the engine at its peak in any case.
GLIBC_KEEP_PAGES = (
    "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold="
    "4294967296:glibc.malloc.top_pad=268435456"
)
TCMALLOC = "libtcmalloc_minimal.so.4"


def tcmalloc_path() -> str | None:
    """The installed tcmalloc (Debian's libtcmalloc-minimal4), if any."""
    for folder in (
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
    ):
        candidate = Path(folder) / TCMALLOC
        if candidate.exists():
            return str(candidate)
    return None


def engine_allocator_env(choice: str, env: dict[str, str]) -> dict[str, str]:
    """The variables that give the engines ``choice`` of allocator; what the environment
    already sets (LD_PRELOAD, GLIBC_TUNABLES) is kept."""
    if choice == "system" or "LD_PRELOAD" in env or "GLIBC_TUNABLES" in env:
        return {}
    found = tcmalloc_path() if choice in ("auto", "tcmalloc") else None
    if found is not None:
        return {"LD_PRELOAD": found}
    if choice == "tcmalloc":
        raise ConfigError(
            f"GRADCAM_ENGINE_ALLOCATOR=tcmalloc: {TCMALLOC} is not installed "
            "(Debian: apt-get install libtcmalloc-minimal4)"
        )
    return {"GLIBC_TUNABLES": GLIBC_KEEP_PAGES}
