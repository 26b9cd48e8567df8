"""Fixtures every test may use: the demo model's runtime. Shared code is in ``helpers.py``;
the fixtures that start servers are in ``process/conftest.py``, for the tests below it."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from service.contract.settings import Settings
from service.engine.runtime import Runtime

# Tests run on the CPU, on the 2 cores of the CI machine.
torch.set_num_threads(2)
# The DICOM tests feed the chest demo model CT, MR, ultrasound and secondary-capture
# files to test the DICOM machinery itself: those images are explained and marked out
# of the model's domain rather than refused (the CLI and every server a test starts read
# this). Tests of the refusal, the default, set "refuse" themselves (test_domain.py).
os.environ.setdefault("GRADCAM_OUT_OF_DOMAIN", "mark")

PROCESS = Path(__file__).resolve().parent / "process"


@pytest.fixture(scope="session")
def runtime() -> Iterator[Runtime]:
    """The demo model's runtime, as the CLI and each server worker start it."""
    rt = Runtime(Settings(device="cpu", out_of_domain="mark")).start()
    yield rt
    rt.close()


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Everything below tests/process/ has the ``process`` marker: a ``-m`` that leaves it out
    (the loop's ``not slow and not process and not gpu``) selects nothing there, so those
    modules are not even imported."""
    if collection_path == PROCESS and _leaves_out_process(config.option.markexpr):
        return True
    return None


def _leaves_out_process(markexpr: str) -> bool:
    """Whether ``markexpr`` is false for every test marked ``process``, whatever its other
    markers (each combination of the names it uses is tried)."""
    if not markexpr:
        return False
    from _pytest.mark.expression import Expression

    try:
        expression = Expression.compile(markexpr)
    except SyntaxError:
        return False  # pytest says so itself, once it evaluates it
    others = sorted(set(re.findall(r"[\w.+-]+", markexpr)) - {"and", "or", "not", "process"})
    for values in itertools.product((False, True), repeat=len(others)):
        marks = {**dict(zip(others, values, strict=True)), "process": True}
        if expression.evaluate(_matcher(marks)):
            return False
    return True


def _matcher(marks: dict[str, bool]) -> Callable[..., bool]:
    """``-m``'s matcher for a test with exactly ``marks``."""

    def matches(name: str, /, **_: str | int | bool | None) -> bool:
        return marks.get(name, False)

    return matches
