"""The shared memory budget (``service/memory.py``), in one process and across two."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from service.contract.errors import Overloaded, PayloadTooLarge
from service.memory import MB, MemoryBudget, RequestMemory


def test_reservations_fit_under_the_budget_minus_what_is_held(tmp_path: Path) -> None:
    budget = MemoryBudget(str(tmp_path / "budget"), 100 * MB)
    budget.set_fixed(30 * MB)
    assert budget.try_reserve(50 * MB)
    assert not budget.try_reserve(21 * MB)  # 30 + 50 + 21 > 100
    assert budget.try_reserve(21 * MB, force=True)  # already in use: counted anyway
    assert budget.reserved_bytes() == 71 * MB
    budget.release(71 * MB)
    assert budget.reserved_bytes() == 0
    # The fixed part is recorded only while nothing is reserved, when asked so.
    budget.try_reserve(MB)
    assert not budget.set_fixed(10 * MB, only_when_idle=True) and budget.fixed_bytes == 30 * MB


def _reserve_and_die(path: str) -> None:
    MemoryBudget(path).try_reserve(60 * MB)


def test_a_dead_process_leaves_nothing_reserved(tmp_path: Path) -> None:
    path = str(tmp_path / "budget")
    budget = MemoryBudget(path, 100 * MB)
    child = multiprocessing.get_context("spawn").Process(target=_reserve_and_die, args=(path,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    # Its slot names a pid that is gone: reclaimed at the next look.
    assert budget.reserved_bytes() == 0
    assert budget.try_reserve(90 * MB)


def test_a_request_waits_then_503_or_413_at_once(tmp_path: Path) -> None:
    budget = MemoryBudget(str(tmp_path / "budget"), 100 * MB)
    budget.set_fixed(20 * MB)
    with RequestMemory(budget, wait_s=0.3) as first:
        first.need(50 * MB)
        first.need(60 * MB)  # grows by the difference
        assert budget.reserved_bytes() == 60 * MB
        started = time.monotonic()
        with pytest.raises(Overloaded) as busy:
            RequestMemory(budget, wait_s=0.3).need(30 * MB)
        assert time.monotonic() - started >= 0.3 and busy.value.retry_after_s
        with pytest.raises(PayloadTooLarge) as never:
            RequestMemory(budget, wait_s=5).need(81 * MB)  # more than 100 - 20, ever
        assert never.value.code == "over_memory_budget"
    assert budget.reserved_bytes() == 0  # released on the way out
    RequestMemory(None).need(10**15)  # no budget (tests, the CLI): nothing checked
