"""The bytes an HTTP worker holds for its clients, bounded.

Bodies being received and answers being sent live in the worker's memory until
they are handled or sent. Two bounds apply to them together: the worker's own
buffer budget (4 × ``max_request_bytes``) and, where one is set, the service's
memory budget (``service.memory``), which the engines and the other workers share.
Past either, a new request is refused (503) instead of growing the worker.

Each connection holds one ``Reservation``: it grows as its body arrives and shrinks
to nothing when the answer has been sent or the connection closes.
"""

from __future__ import annotations

from service.memory import MemoryBudget


class BufferBudget:
    """A worker's bytes held for clients: at most ``limit``, and within ``memory``."""

    def __init__(self, limit: int, memory: MemoryBudget | None = None) -> None:
        self.limit = limit
        self.memory = memory
        self.held = 0

    def reservation(self) -> Reservation:
        return Reservation(self)


class Reservation:
    """One connection's share of a ``BufferBudget``."""

    def __init__(self, budget: BufferBudget) -> None:
        self._budget = budget
        self.size = 0

    def grow_to(self, size: int, force: bool = False) -> bool:
        """Hold ``size`` bytes in all (more only: a smaller size keeps what is held);
        False, holding nothing more, if the budget has no room. ``force``: the bytes
        already exist (an answer that is made), so they are counted regardless."""
        budget, extra = self._budget, max(0, size - self.size)
        if not extra:
            return True
        if not force and budget.held + extra > budget.limit:
            return False
        if budget.memory is not None and not budget.memory.try_reserve(extra, force):
            return False
        budget.held += extra
        self.size += extra
        return True

    def release(self) -> None:
        """Give back everything held."""
        budget = self._budget
        if budget.memory is not None:
            budget.memory.release(self.size)
        budget.held -= self.size
        self.size = 0
