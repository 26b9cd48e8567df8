"""Each model's pace (``engine/pace.py``): learnt from its own steps, smoothed, and a
model not timed yet taken as slow as the slowest."""

from __future__ import annotations

import pytest

from service.engine.pace import Pace


def test_each_model_keeps_its_own_pace() -> None:
    pace = Pace()
    assert not pace.known and pace.of("any") == 0.0
    pace.learn("volumes", seconds=2.0, work=4)
    pace.learn("images", seconds=0.04, work=8)
    assert pace.known
    assert pace.of("volumes") == pytest.approx(0.5)
    assert pace.of("images") == pytest.approx(0.005)
    assert pace.of("new") == pytest.approx(0.5)  # untimed: as slow as the slowest


def test_one_odd_step_moves_the_estimate_a_fifth_of_the_way() -> None:
    pace = Pace()
    pace.learn("m", seconds=1.0, work=10)
    pace.learn("m", seconds=2.0, work=10)
    assert pace.of("m") == pytest.approx(0.8 * 0.1 + 0.2 * 0.2)
    pace.learn("m", seconds=5.0, work=0)  # no images: nothing learnt
    assert pace.of("m") == pytest.approx(0.12)
