"""No function in ``service/`` is longer than 80 lines: a reader takes one in at a glance,
and a longer one has parts that want names (ruff keeps complexity, statements and
arguments in bounds; it has no rule for length)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "service"
MOST_LINES = 80


def _functions() -> list[tuple[str, int]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                found.append(
                    (f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}", lines)
                )
    return found


def test_every_function_is_read_at_a_glance() -> None:
    functions = _functions()
    assert len(functions) > 500  # the walk found the package
    too_long = [(where, lines) for where, lines in functions if lines > MOST_LINES]
    assert not too_long, f"over {MOST_LINES} lines: {too_long}"


def test_the_rule_sees_a_long_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "service").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MOST_LINES))
    (tmp_path / "service" / "long.py").write_text(f"def long() -> None:\n{body}\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path / "service")
    assert _functions() == [("service/long.py:1 long", MOST_LINES + 1)]
