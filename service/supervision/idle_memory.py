"""What serve's processes hold with no request in flight, recorded in the memory budget.

The supervisor makes the budget file (``service.memory``) and, about once a second,
has ``IdleMemoryRecorder`` measure its processes (engines at their peak) and record
that as the budget's fixed part, only while no request holds a reservation. The
first recording is logged: the budget, what the idle service holds, and what is
left for requests, or an error if nothing is.
"""

from __future__ import annotations

import logging
import os

from service.memory import MB, MemoryBudget, held_bytes

logger = logging.getLogger(__name__)


class IdleMemoryRecorder:
    """Records the idle processes' memory in ``memory``; logs the first recording."""

    def __init__(self, memory: MemoryBudget) -> None:
        self.memory = memory
        self._logged = False

    def record(self, gunicorn_pid: int | None, engine_pids: list[int]) -> None:
        """Record what the processes hold with no request in flight (engines: their peak,
        since batches come and go) as the budget's fixed part."""
        fixed = held_bytes(os.getpid(), gunicorn_pid, engine_pids)
        if not self.memory.set_fixed(fixed, only_when_idle=True) or self._logged:
            return
        self._logged = True
        budget = self.memory.budget_bytes
        if fixed >= budget:
            logger.error(
                "memory budget %d MB: the idle service already holds %d MB; every "
                "request will be refused (raise GRADCAM_MEMORY_BUDGET_MB)",
                budget // MB,
                fixed // MB,
            )
        else:
            logger.info(
                "memory budget %d MB: %d MB held idle, %d MB for requests",
                budget // MB,
                fixed // MB,
                (budget - fixed) // MB,
            )
