"""``openapi.yaml``'s schemas, generated from the contract's models.

The routes, the prose and the shared responses of ``openapi.yaml`` are written by hand
at its top; everything under ``components.schemas`` (every request, response and
error body, and the error codes) is generated here from the pydantic models that the
server parses and answers with, so the document cannot drift from the code. After
changing a model run::

    python -m service.contract.openapi            # rewrites openapi.yaml's schemas
    python -m service.contract.openapi --check    # exit 1 if the file is stale (CI's test)

Why generate this part and not the routes: a schema is code (the models validate and
serialise with it); a route's summary and examples are prose for people, kept beside
the rest of the document.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from service.contract.catalog_responses import Layers, ModelDetail, ModelList, Status
from service.contract.errors import ErrorCode, ErrorResponse
from service.contract.inference_protocol import (
    InferRequest,
    InferResponse,
    ModelConfig,
    ModelMetadata,
    ModelReady,
    ProtocolError,
    ServerLive,
    ServerMetadata,
    ServerReady,
)
from service.contract.requests import ExplainRequest
from service.contract.responses import ExplainResponse

# The line above the generated part; everything after it is rewritten.
MARKER = (
    "  # Generated from service/contract by `python -m service.contract.openapi`: "
    "edit the models, not what follows.\n"
)
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "openapi.yaml"

_MODELS: tuple[tuple[type[BaseModel], JsonSchemaMode], ...] = (
    (ExplainRequest, "validation"),
    (ExplainResponse, "serialization"),
    (ModelList, "serialization"),
    (ModelDetail, "serialization"),
    (Layers, "serialization"),
    (Status, "serialization"),
    (ErrorResponse, "serialization"),
    (InferRequest, "validation"),
    (InferResponse, "serialization"),
    (ModelMetadata, "serialization"),
    (ModelConfig, "serialization"),
    (ModelReady, "serialization"),
    (ServerLive, "serialization"),
    (ServerMetadata, "serialization"),
    (ServerReady, "serialization"),
    (ProtocolError, "serialization"),
)


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]  # PyYAML ships no type hints
    """Multi-line descriptions as literal blocks, as a person would write them."""


def _text(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _text)


def _tidy(node: Any) -> Any:
    """Drop what pydantic adds for its own sake: titles derived from names, and the null
    default of fields that are left out of the JSON instead (``responses.Absent``)."""
    if isinstance(node, list):
        return [_tidy(item) for item in node]
    if not isinstance(node, dict):
        return node
    tidy = {key: _tidy(value) for key, value in node.items()}
    if isinstance(tidy.get("title"), str):
        del tidy["title"]
    if isinstance(tidy.get("description"), str):
        # Docstrings mark code as reStructuredText; OpenAPI reads Markdown.
        tidy["description"] = tidy["description"].replace("``", "`")
    nullable = tidy.get("type") == "null" or any(
        isinstance(option, dict) and option.get("type") == "null"
        for option in tidy.get("anyOf", [])
    )
    if "default" in tidy and tidy["default"] is None and not nullable:
        del tidy["default"]
    return tidy


def _error_codes() -> dict[str, Any]:
    """The error-code enum, each code with its HTTP status and meaning."""
    lines = [f"- `{code.value}` ({code.status}): {code.meaning}" for code in ErrorCode]
    return {
        "description": (
            "A stable machine code; each code has one HTTP status "
            "(service/contract/errors.py, ErrorCode, is the source of this list):\n"
            + "\n".join(lines)
        ),
        "type": "string",
        "enum": [code.value for code in ErrorCode],
        "x-status": {code.value: code.status for code in ErrorCode},
    }


def schemas() -> dict[str, Any]:
    """``components.schemas``: every body the API takes or gives, by name."""
    _, document = models_json_schema(_MODELS, ref_template="#/components/schemas/{model}")
    found: dict[str, Any] = _tidy(document["$defs"])
    found["ErrorCode"] = _error_codes()
    return dict(sorted(found.items()))


def render(current: str) -> str:
    """``current`` (the document's text) with its generated part made anew."""
    if MARKER not in current:
        raise ValueError(f"openapi.yaml has no line {MARKER.strip()!r} to generate below")
    head = current[: current.index(MARKER) + len(MARKER)]
    body = yaml.dump(
        {"schemas": schemas()},
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        width=88,
        indent=2,
    )
    return head + "".join(f"  {line}\n" if line else "\n" for line in body.splitlines())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.contract.openapi",
        description="Regenerate openapi.yaml's schemas from the contract's models.",
    )
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if stale")
    args = parser.parse_args(argv)
    current = args.path.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print(f"{args.path} is stale: run python -m service.contract.openapi", file=sys.stderr)
            return 1
        return 0
    args.path.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
