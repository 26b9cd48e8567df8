"""The ``POST /v1/explain`` request parsed: the one parser of a body, and how the
problems pydantic finds in a request are told, as one 422 that lists them.

The HTTP route, the image doors (``flat_options.py``), the Open Inference Protocol and
the CLI's ``explain --request`` parse requests here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from service.contract.errors import InvalidField
from service.contract.json_body import json_object
from service.contract.requests import (
    DicomSeriesImage,
    DicomWebImage,
    DicomWebInstance,
    ExplainRequest,
    HeatmapOptions,
)
from service.contract.suggestions import close_matches, did_you_mean


def parse_explain_request(
    body: bytes, reserve: Callable[[int], None] | None = None
) -> ExplainRequest:
    """Parse and validate a request body; errors become 400 (not JSON), 413 (too many
    values) or 422 (invalid field). ``reserve``: as ``json_body.json_object``'s."""
    data = json_object(body, reserve)
    try:
        return ExplainRequest.model_validate(data)
    except ValidationError as error:
        raise invalid_field(error) from None


# The problems an answer spells out, each whole; past these, only how many more.
_SHOWN_PROBLEMS = 3
# The whole numbers a JSON body can carry here: orjson reads larger ones as floats.
_JSON_INTS = (-(2**63), 2**64 - 1)
_RANGE_ERRORS = ("greater_than_equal", "greater_than", "less_than_equal", "less_than")


@dataclass(frozen=True)
class _Problem:
    """One problem of a request, as the client reads it."""

    field: str
    image: int | None
    sentence: str
    suggestions: list[str]


def invalid_field(error: ValidationError) -> InvalidField:
    """Every problem pydantic found as one 422: the first few problems each whole and how
    many more, the field, image and close matches those of the first. Of a union, only
    the problems of the member that got furthest are told (each member refuses the value
    its own way). A required field that is missing because its name was misspelt
    ("imges") is one problem, told as the misspelling."""
    problems = _misspellings_first(error.errors())
    deepest: dict[str, tuple[int, str]] = {}  # union place → (depth, member)
    for item in problems:
        place, depth = _path(item, through_unions=False), len(item["loc"])
        if depth > deepest.get(place, (-1, ""))[0]:  # a tie: the first member's
            deepest[place] = (depth, _member(item))
    found: dict[str, _Problem] = {}
    for item in problems:
        if _member(item) == deepest[_path(item, through_unions=False)][1]:
            problem = _problem(item)
            found.setdefault(problem.field, problem)
    first, *rest = found.values()
    shown = rest[: _SHOWN_PROBLEMS - 1]
    message = first.sentence + "".join(f" Also, f{p.sentence[1:]}" for p in shown)
    if len(rest) > len(shown):
        message += f" And {len(rest) - len(shown)} more problem(s)."
    return InvalidField(
        message, field=first.field, image=first.image, suggestions=first.suggestions
    )


def _misspellings_first(problems: list[ErrorDetails]) -> list[ErrorDetails]:
    """``problems`` with each missing required field replaced, in its place, by an unknown
    field whose name is close to it (the misspelling that explains it)."""
    ordered: list[ErrorDetails] = []
    used: list[ErrorDetails] = []
    for problem in problems:
        if problem["type"] == "missing":
            wanted = str(problem["loc"][-1])
            problem = next(
                (
                    p
                    for p in problems
                    if p["type"] == "extra_forbidden"
                    and p["loc"][:-1] == problem["loc"][:-1]
                    and close_matches(str(p["loc"][-1]), [wanted])
                ),
                problem,
            )
            used.append(problem)
        elif any(problem is p for p in used):
            continue
        ordered.append(problem)
    return ordered


def _known_names() -> set[str]:
    return (
        set(ExplainRequest.model_fields)
        | set(HeatmapOptions.model_fields)
        | set(DicomWebImage.model_fields)
        | set(DicomWebInstance.model_fields)
        | set(DicomSeriesImage.model_fields)
    )


def _member(problem: ErrorDetails) -> str:
    """The union member that reported ``problem`` (its type name in ``loc``), or ""."""
    known = _known_names()
    loc = problem["loc"]
    return next(
        (
            str(part)
            for position, part in enumerate(loc)
            if isinstance(part, str)
            and part not in known
            and not (problem["type"] == "extra_forbidden" and position == len(loc) - 1)
        ),
        "",
    )


def _path(problem: ErrorDetails, through_unions: bool = True) -> str:
    """The problem's place as a JSON path (``targets[0][1]``, ``heatmap.format``); a
    union member's type name in ``loc`` is no part of it: skipped, or where the path
    stops (``through_unions=False``: the place all of a union's members report)."""
    loc = problem["loc"]
    known = _known_names()
    path = ""
    for position, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in known or (problem["type"] == "extra_forbidden" and position == len(loc) - 1):
            path += f".{part}"
        elif not through_unions:
            break
    return path.lstrip(".") or "body"


def _problem(problem: ErrorDetails) -> _Problem:
    loc = problem["loc"]
    field = _path(problem)
    image = (
        loc[1]
        if len(loc) > 1 and loc[0] in ("images", "targets") and isinstance(loc[1], int)
        else None
    )
    message, close = problem["msg"], []
    value = problem.get("input")
    if problem["type"] == "missing":
        message = "missing, and required"
    elif problem["type"] == "extra_forbidden":
        message = "unknown field"
        model = HeatmapOptions if field.startswith("heatmap.") else ExplainRequest
        close = close_matches(str(loc[-1]), set(model.model_fields))
    elif problem["type"] == "literal_error" and isinstance(value, str):
        # A method, format, size, encoding or include value with a typo.
        expected = re.findall(r"'([^']*)'", str(problem.get("ctx", {}).get("expected", "")))
        close = close_matches(value, expected)
    elif _out_of_range(problem):
        message = f"{value!r} is out of range: it must be {_int_range(str(loc[0]))}"
    sentence = f"Field '{field}': {message}.{did_you_mean(close)}".replace("?.", "?")
    return _Problem(field, image, sentence, close)


def _out_of_range(problem: ErrorDetails) -> bool:
    """A whole number past a bound, or too large for JSON to carry as one (``1e30``,
    which the parser made a float)."""
    value = problem.get("input")
    if problem["type"] in _RANGE_ERRORS:
        return isinstance(value, int)
    return (
        problem["type"] == "int_type"
        and isinstance(value, float)
        and math.isfinite(value)
        and value == int(value)
    )


@cache
def _int_range(name: str) -> str:
    """A field's whole numbers in words: a bound that is only what JSON carries here
    (18446744073709551615) is no limit a person should be told of."""
    low, high = _int_bounds(name)
    if high == _JSON_INTS[1]:
        return f"a whole number of at least {low}"
    if low == _JSON_INTS[0]:
        return f"a whole number of at most {high}"
    return f"a whole number from {low} to {high}"


def _int_bounds(name: str) -> tuple[int, int]:
    """The range of a top-level field's whole numbers, as its schema states them, within
    what JSON carries here."""
    low, high = _JSON_INTS
    pending = [ExplainRequest.model_json_schema()["properties"].get(name, {})]
    while pending:
        schema = pending.pop()
        if schema.get("type") == "integer":
            return max(low, schema.get("minimum", low)), min(high, schema.get("maximum", high))
        pending.extend(schema.get("anyOf", []))
        if isinstance(schema.get("items"), dict):
            pending.append(schema["items"])
    return low, high
