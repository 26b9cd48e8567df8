"""openapi.yaml: a valid OpenAPI 3.1 document, in sync with the app (the server obeys it:
tests/process/server/test_openapi.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from openapi_spec_validator import validate

from service.contract.flat_options import OPTIONS_FIELD, QUERY_NAMES
from service.contract.openapi import main, render
from service.engine.runtime import Runtime
from service.server.app import create_app
from service.server.image_doors import FORM_TYPE, IMAGE_PARTS, RAW_TYPES
from service.server.pictures import PICTURE_HEADERS
from tests.helpers import REPO

SPEC_PATH = REPO / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())


def test_the_document_is_valid_openapi() -> None:
    validate(SPEC)
    assert SPEC["openapi"].startswith("3.1")


def test_the_schemas_are_generated_from_the_models() -> None:
    """components.schemas is what `python -m service.contract.openapi` makes of the
    contract's models: change a model without regenerating, and this fails."""
    assert render(SPEC_PATH.read_text()) == SPEC_PATH.read_text(), (
        "openapi.yaml is stale: run python -m service.contract.openapi"
    )
    assert main([str(SPEC_PATH), "--check"]) == 0


def test_the_check_finds_a_stale_document(tmp_path: Path) -> None:
    stale = SPEC_PATH.read_text().replace("A sentence for a person.", "Words.")
    (tmp_path / "openapi.yaml").write_text(stale)
    assert main([str(tmp_path / "openapi.yaml"), "--check"]) == 1
    assert main([str(tmp_path / "openapi.yaml")]) == 0
    assert (tmp_path / "openapi.yaml").read_text() == SPEC_PATH.read_text()


def test_every_schema_the_routes_name_exists() -> None:
    refs = re.findall(r"#/components/schemas/(\w+)", yaml.safe_dump(SPEC["paths"]))
    assert refs and set(refs) <= set(SPEC["components"]["schemas"])


def test_routes_match_the_app(runtime: Runtime) -> None:
    app = create_app(engine=runtime)
    ours = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        ours |= {(path, m.lower()) for m in (rule.methods or set()) - {"HEAD", "OPTIONS"}}
    documented = {
        (path, method)
        for path, item in SPEC["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    assert ours == documented


def test_the_explain_doors_and_their_query_are_the_apps() -> None:
    """The body types, query parameters and picture headers of POST /v1/explain are the
    ones the image doors take and the picture answer sends."""
    explain = SPEC["paths"]["/v1/explain"]["post"]
    bodies = set(explain["requestBody"]["content"])
    assert bodies == {"application/json", FORM_TYPE, *RAW_TYPES}
    assert set(explain["requestBody"]["content"][FORM_TYPE]["schema"]["properties"]) == {
        *IMAGE_PARTS,
        OPTIONS_FIELD,
    }
    assert {p["name"] for p in explain["parameters"] if p["in"] == "query"} == set(QUERY_NAMES)
    answer = explain["responses"]["200"]
    assert set(answer["headers"]) == set(PICTURE_HEADERS)
    assert {
        "application/json",
        "image/png",
        "image/jpeg",
        "image/webp",
        "application/gzip",
    } == set(answer["content"])
