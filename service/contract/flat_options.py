"""The options of ``POST /v1/explain``'s image doors, and the request they make.

An image sent as the whole body, or as the file parts of a form, comes without a JSON
body around it: its options come as query parameters, a small flat mapping onto
``ExplainRequest``'s fields (or, in a form, as one JSON object in its ``options`` field,
the JSON body's fields less ``images``):

=========  ==================  ====================================================
query      request field       value
=========  ==================  ====================================================
model      model               a model of the models file
method     method              gradcam, gradcam++, xgradcam, layercam, hirescam
layer      layer               a layer name
target     targets             a class index or label, for every image; repeated:
                               several classes (one explanation each)
top_k      top_k               a whole number
frame      frame               a whole number, for every image
format     heatmap.format      array, png, overlay, gray, none, dicom-sc, ...
size       heatmap.size        original, input, layer
encoding   heatmap.encoding    png, jpeg, webp
=========  ==================  ====================================================

Values arrive as text: whole numbers become numbers and everything else stays text, so
``top_k=abc`` meets the JSON door's own 422 for ``top_k``. The request is then validated
by the one model a JSON body is (``requests.py``): every value, limit and error is the
JSON door's (its ``field`` the request's field), and a message names the query parameter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from service.contract.errors import InvalidField
from service.contract.request_parsing import invalid_field
from service.contract.requests import ExplainRequest, target_ref
from service.contract.suggestions import close_matches, did_you_mean

# Each query parameter but ``target``, and the request field it sets (a path).
QUERY_FIELDS: dict[str, tuple[str, ...]] = {
    "model": ("model",),
    "method": ("method",),
    "layer": ("layer",),
    "top_k": ("top_k",),
    "frame": ("frame",),
    "format": ("heatmap", "format"),
    "size": ("heatmap", "size"),
    "encoding": ("heatmap", "encoding"),
}
TARGET = "target"
QUERY_NAMES: tuple[str, ...] = (*QUERY_FIELDS, TARGET)
_NUMBERS = frozenset({"top_k", "frame"})
_WHOLE_NUMBER = re.compile(r"-?[0-9]{1,30}")
# The form field holding the options as JSON (``server/image_doors.py``).
OPTIONS_FIELD = "options"


def flat_request(
    images: list[bytes],
    query: Mapping[str, Sequence[str]],
    options: Mapping[str, Any] | None = None,
) -> ExplainRequest:
    """The request for ``images`` (files, in order) with the options of ``query`` (each
    parameter's values in order) or of a form's ``options`` object: one or the other,
    since two places for one option would need a rule for which wins."""
    if options is not None and query:
        raise InvalidField(
            f"The options come in the form's '{OPTIONS_FIELD}' field or in the query string, "
            f"not both; this request has both (query: {', '.join(sorted(query))}).",
            field=OPTIONS_FIELD,
        )
    fields = dict(options) if options is not None else query_fields(query, len(images))
    if "images" in fields:
        raise InvalidField(
            f"The images are the request's files; '{OPTIONS_FIELD}' may not hold 'images'.",
            field="images",
        )
    try:
        return ExplainRequest.model_validate({**fields, "images": images})
    except ValidationError as error:
        problem = invalid_field(error)
    raise _named_as_sent(problem, query)


def refuse_query_beside_json(query: Mapping[str, Sequence[str]]) -> None:
    """A JSON body carries its options itself: a query parameter beside it would be ignored
    (``format=overlay`` would not give an overlay), so it is a 422 naming it."""
    for name in query:
        raise InvalidField(
            f"Query parameter '{name}' is not read beside a JSON body, which carries its "
            "options itself (the query is for an image file or a form sent as the body); "
            "move it into the body.",
            field=name,
        )


def query_fields(query: Mapping[str, Sequence[str]], count: int) -> dict[str, Any]:
    """The request fields a query string sets, as a JSON body would hold them, for
    ``count`` images; a 422 for a parameter the mapping lacks (with the close matches), or
    one given twice (all but ``target``)."""
    fields: dict[str, Any] = {}
    for name, values in query.items():
        if name == TARGET:
            refs = [target_ref(value) for value in values]
            fields["targets"] = [refs[0] if len(refs) == 1 else refs] * count
            continue
        path = QUERY_FIELDS.get(name)
        if path is None:
            close = close_matches(name, QUERY_NAMES)
            raise InvalidField(
                f"There is no query parameter '{name}'; they are "
                f"{', '.join(QUERY_NAMES)}.{did_you_mean(close)}",
                field=name,
                suggestions=close,
            )
        if len(values) != 1:
            raise InvalidField(
                f"Query parameter '{name}' is given {len(values)} times; give it once.",
                field=name,
            )
        value: Any = values[0]
        if name in _NUMBERS and _WHOLE_NUMBER.fullmatch(value):
            value = int(value)
        *parents, leaf = path
        holder = fields
        for parent in parents:
            holder = holder.setdefault(parent, {})
        holder[leaf] = value
    return fields


def _named_as_sent(problem: InvalidField, query: Mapping[str, Sequence[str]]) -> InvalidField:
    """A field's error told as the query parameter that set it ("Query parameter 'format'
    (heatmap.format): ..."); the error's ``field`` stays the request's field."""
    for name, path in QUERY_FIELDS.items():
        field = ".".join(path)
        if name in query and problem.field == field:
            told = f"'{name}'" if name == field else f"'{name}' ({field})"
            problem.message = problem.message.replace(
                f"Field '{field}'", f"Query parameter {told}", 1
            )
    return problem
