"""A request body read as JSON, within bounds that hold before and while it is parsed.

The transport limits a body's bytes (``GRADCAM_MAX_REQUEST_BYTES``); what those bytes
become is another matter. Each JSON value is a Python object of 24 to 64 bytes and a
pointer, so ``[{},{},…]`` parses into about 25 times its size; and pydantic reports one
error per bad item, each a dict of several hundred bytes once ``errors()`` builds it,
so a 2 MB list of a million wrong items once took a worker to 2.9 GB and 13 s. A request
needs few values (its images, their targets, a handful of options), so the bounds are
fixed, far above any real request and far below any harm:

- **values**: at most ``JSON_MAX_VALUES``. Counted on the bytes before parsing, as
  commas plus opening brackets plus one: every value but the first of a container
  follows a comma, and the first one of each container follows its bracket, so this
  never undercounts (characters inside strings only make it larger; base64 has none).
  100 000 values parse into a few MB at most.
- **keys**: no object has more than ``JSON_MAX_KEYS`` members (the largest object of the
  contract has a dozen fields), so no model reports more than that many unknown fields.
- **depth**: ``JSON_MAX_DEPTH`` levels, orjson's own limit (a request needs 4).

Past either of the first two the request is a 413 ``json_too_complex`` before any of it
is validated; the models then stop at the first bad item of a list (``fail_fast``
in ``requests.py`` and ``inference_protocol.py``), so the error report is bounded too.
What is left, the parsed values and their validated copies, is reserved from the memory
budget before parsing (``JSON_BYTES_PER_VALUE`` each, an upper bound of what
``tests/benchmarks/json_cost.py`` measures: 32 bytes a number, 170 a short label, parsed
and validated).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from service.contract.errors import BadRequest, ErrorCode, InvalidField, PayloadTooLarge

# orjson refuses deeper nesting itself: no parse can recurse away.
JSON_MAX_DEPTH = 1024
JSON_MAX_VALUES = 100_000
JSON_MAX_KEYS = 256
JSON_BYTES_PER_VALUE = 192


def json_object(body: bytes, reserve: Callable[[int], None] | None = None) -> dict[str, Any]:
    """A body as a JSON object: 400 when it is not JSON (or nests too deep), 413 when it
    holds more values or keys than any request needs, 422 when it is JSON but not an
    object. ``reserve`` is called with the bytes parsing and validating may take before
    either starts (it raises to refuse). Both doors (/v1 and /v2) read their bodies here."""
    commas = body.count(b",")
    values = commas + body.count(b"[") + body.count(b"{") + 1
    if values > JSON_MAX_VALUES:
        raise PayloadTooLarge(
            f"The body holds up to {values} JSON values (counted by its commas and "
            f"brackets); a request may hold {JSON_MAX_VALUES}.",
            code=ErrorCode.JSON_TOO_COMPLEX,
        )
    if reserve is not None:
        reserve(values * JSON_BYTES_PER_VALUE)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        if "depth limit" in str(error):
            raise BadRequest(
                f"The body nests JSON deeper than {JSON_MAX_DEPTH} levels.",
                code=ErrorCode.JSON_TOO_DEEP,
            ) from None
        raise BadRequest(
            f"The body is not valid JSON: {error}.", code=ErrorCode.INVALID_JSON
        ) from None
    if not isinstance(data, dict):
        raise InvalidField("The body must be a JSON object.", code=ErrorCode.INVALID_BODY)
    if commas >= JSON_MAX_KEYS:  # fewer commas: no object can have too many keys
        _check_keys(data)
    return data


def _check_keys(data: dict[str, Any]) -> None:
    """413 if any object in ``data`` has more than ``JSON_MAX_KEYS`` members (a loop over
    its containers, at most ``JSON_MAX_VALUES``, not recursion)."""
    pending: list[dict[str, Any] | list[Any]] = [data]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            if len(value) > JSON_MAX_KEYS:
                raise PayloadTooLarge(
                    f"An object of the body has {len(value)} keys; a request's objects "
                    f"have at most {JSON_MAX_KEYS}.",
                    code=ErrorCode.JSON_TOO_COMPLEX,
                )
            value = list(value.values())
        pending += [item for item in value if type(item) in _CONTAINERS]


_CONTAINERS = (dict, list)  # what orjson makes of objects and arrays
