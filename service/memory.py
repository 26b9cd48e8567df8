"""The service's memory budget, kept together by all its processes through one file.

``GRADCAM_MEMORY_BUDGET_MB`` (default: 90 % of the container's cgroup memory limit,
else 75 % of the machine's RAM) is what the whole process tree may use. Its parts:

- **fixed**: what the processes hold with no request in flight. The supervisor
  measures it about once a second: the engines' peak resident size (``VmHWM``: their
  batches come and go), the other processes' resident size, sampled only while no
  request holds a reservation (else their requests would be counted twice);
- **reserved**: what the requests in flight may still need. An HTTP worker reserves
  each request's estimated cost (``budgets.RequestBudget``: body, the decode of its
  largest image, the pictures kept, its largest heatmap drawn, the answer's copies)
  before that work, and the bytes its event loop buffers (bodies being received,
  answers being sent); released when done.

A request's reservation that does not fit under ``budget - fixed - reserved`` waits
for others to finish, up to ``max_queue_wait_s``, then is refused: 503 ``overloaded``
with ``Retry-After``; or at once 413 ``over_memory_budget`` if it could not fit even
alone. (The event loop's reservations for bodies do not wait: 503 at once.)

The file (``GRADCAM_MEMORY_BUDGET_FILE``, in serve's runtime folder) holds a header
(magic, budget, fixed) and one slot per process (pid, bytes reserved), changed under
``flock``; a slot whose process has died is reclaimed, so a killed worker's
reservations are not lost for ever. Without the file (tests, the CLI) nothing is
checked.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import threading
import time
from pathlib import Path
from types import TracebackType

from service.contract.errors import ErrorCode, Overloaded, PayloadTooLarge

BUDGET_FILE_ENV = "GRADCAM_MEMORY_BUDGET_FILE"
MB = 1 << 20
# The default budget: a share of the cgroup's limit (the kernel's own use of the
# cgroup, page cache included, needs the rest), else of the machine's memory.
CGROUP_SHARE = 0.9
RAM_SHARE = 0.75

_MAGIC = 0x4743_414D_4D45_4D31  # "GCAMMEM1"
_HEADER = struct.Struct("<QQQ")  # magic, budget bytes, fixed bytes
_SLOT = struct.Struct("<QQ")  # pid, bytes reserved
_SLOTS = 256
_SIZE = _HEADER.size + _SLOTS * _SLOT.size
_WAIT_STEP_S = 0.05


def _cgroup_limit_bytes() -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max``, or v1), if any."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            text = Path(path).read_text().strip()
            if text == "max":
                return None
            value = int(text)
            return value if value < (1 << 60) else None  # v1 writes "no limit" as huge
    return None


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget_bytes() -> int:
    limit = _cgroup_limit_bytes()
    return int(limit * CGROUP_SHARE) if limit is not None else int(_ram_bytes() * RAM_SHARE)


def resident_bytes(pid: int, peak: bool = False) -> int:
    """A process's resident size (``VmRSS``), or its peak (``VmHWM``); 0 if gone."""
    key = "VmHWM:" if peak else "VmRSS:"
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (gunicorn's workers)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def held_bytes(supervisor: int, master: int | None, engines: list[int]) -> int:
    """What serve's processes hold now: each resident size, the engines at their peak
    (``VmHWM``: their batches come and go)."""
    pids = [supervisor] + ([master, *children(master)] if master is not None else [])
    return sum(resident_bytes(pid) for pid in pids) + sum(
        resident_bytes(pid, peak=True) for pid in engines
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_OPENED: dict[str, MemoryBudget] = {}
_OPENED_LOCK = threading.Lock()


class MemoryBudget:
    """The shared budget file: created by the supervisor, opened by each HTTP worker."""

    def __init__(self, path: str, budget_bytes: int | None = None) -> None:
        self.path = path
        create = budget_bytes is not None
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        # flock excludes other processes; threads of this one take this lock first.
        self._lock = threading.Lock()
        if create:
            _HEADER.pack_into(self._map, 0, _MAGIC, budget_bytes, 0)
        elif _HEADER.unpack_from(self._map, 0)[0] != _MAGIC:
            raise ValueError(f"{path} is not a memory budget file")
        self._slot: int | None = None

    @classmethod
    def from_env(cls) -> MemoryBudget | None:
        """This process's view of serve's budget file (one per process), or None."""
        path = os.environ.get(BUDGET_FILE_ENV)
        if not path:
            return None
        with _OPENED_LOCK:
            if path not in _OPENED:
                _OPENED[path] = cls(path)
            return _OPENED[path]

    @property
    def budget_bytes(self) -> int:
        return int(_HEADER.unpack_from(self._map, 0)[1])

    @property
    def fixed_bytes(self) -> int:
        return int(_HEADER.unpack_from(self._map, 0)[2])

    @property
    def measured(self) -> bool:
        """The fixed part has been recorded (until then it reads 0: nothing checked)."""
        return self.fixed_bytes > 0

    @contextlib.contextmanager
    def _locked(self):  # type: ignore[no-untyped-def]
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _slots(self) -> list[tuple[int, int, int]]:
        """(index, pid, reserved) of every used slot; dead processes' slots are freed."""
        used = []
        for index in range(_SLOTS):
            offset = _HEADER.size + index * _SLOT.size
            pid, reserved = _SLOT.unpack_from(self._map, offset)
            if pid == 0:
                continue
            if pid != os.getpid() and not _alive(pid):
                _SLOT.pack_into(self._map, offset, 0, 0)
                continue
            used.append((index, pid, reserved))
        return used

    def _own_slot(self, used: list[tuple[int, int, int]]) -> int:
        pid = os.getpid()
        for index, owner, _ in used:
            if owner == pid:
                if self._slot != index:
                    # Left by a dead process that had this pid: its bytes are not ours.
                    _SLOT.pack_into(self._map, _HEADER.size + index * _SLOT.size, pid, 0)
                    self._slot = index
                return index
        taken = {index for index, _, _ in used}
        free = next((i for i in range(_SLOTS) if i not in taken), None)
        if free is None:
            raise RuntimeError("the memory budget file has no free slot")
        _SLOT.pack_into(self._map, _HEADER.size + free * _SLOT.size, pid, 0)
        self._slot = free
        return free

    def reserved_bytes(self) -> int:
        """Bytes reserved by all live processes."""
        with self._locked():
            return sum(reserved for _, _, reserved in self._slots())

    def set_fixed(self, fixed_bytes: int, only_when_idle: bool = False) -> bool:
        """Record what the processes hold; with ``only_when_idle``, only while nothing is
        reserved (True if recorded)."""
        with self._locked():
            if only_when_idle and any(reserved for _, _, reserved in self._slots()):
                return False
            magic, budget, _ = _HEADER.unpack_from(self._map, 0)
            _HEADER.pack_into(self._map, 0, magic, budget, max(0, fixed_bytes))
            return True

    def try_reserve(self, nbytes: int, force: bool = False) -> bool:
        """Reserve ``nbytes`` for this process if they fit (or regardless, with ``force``:
        memory already in use)."""
        if nbytes <= 0:
            return True
        with self._locked():
            used = self._slots()
            _, budget, fixed = _HEADER.unpack_from(self._map, 0)
            if not force and fixed + sum(r for _, _, r in used) + nbytes > budget:
                return False
            index = self._own_slot(used)
            offset = _HEADER.size + index * _SLOT.size
            pid, reserved = _SLOT.unpack_from(self._map, offset)
            _SLOT.pack_into(self._map, offset, pid, reserved + nbytes)
            return True

    def release(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        with self._locked():
            index = self._own_slot(self._slots())
            offset = _HEADER.size + index * _SLOT.size
            pid, reserved = _SLOT.unpack_from(self._map, offset)
            _SLOT.pack_into(self._map, offset, pid, max(0, reserved - nbytes))


class RequestMemory:
    """One request's reservation, grown as its estimated cost becomes known."""

    def __init__(self, budget: MemoryBudget | None, wait_s: float = 0.0) -> None:
        self.budget = budget
        self.wait_s = wait_s
        self.reserved = 0

    def need(self, total_bytes: int) -> None:
        """The request's estimated peak is now ``total_bytes``: reserve the difference,
        or refuse the request (503 now, or 413 if it could never fit)."""
        extra = total_bytes - self.reserved
        if self.budget is None or extra <= 0:
            return
        room = self.budget.budget_bytes - self.budget.fixed_bytes
        give_up = time.monotonic() + self.wait_s
        while total_bytes <= room:
            if self.budget.try_reserve(extra):
                self.reserved = total_bytes
                return
            if time.monotonic() >= give_up:
                break
            time.sleep(_WAIT_STEP_S)  # others' requests finish and release theirs
        if total_bytes > room:
            raise PayloadTooLarge(
                f"This request would need about {total_bytes // MB} MB of memory; the server "
                f"has {max(0, room) // MB} MB for requests (GRADCAM_MEMORY_BUDGET_MB). Send "
                "fewer or smaller images, or ask for smaller heatmaps.",
                code=ErrorCode.OVER_MEMORY_BUDGET,
            )
        raise Overloaded(
            f"The server's memory budget is taken by other requests (this one "
            f"needs about {total_bytes // MB} MB); retry shortly.",
            retry_after_s=2,
        )

    def release(self) -> None:
        if self.budget is not None and self.reserved:
            self.budget.release(self.reserved)
        self.reserved = 0

    def __enter__(self) -> RequestMemory:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
