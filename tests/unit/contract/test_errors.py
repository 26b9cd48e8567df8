"""One list of error codes (``service.contract.errors.ErrorCode``): each code has one status, the
service names codes only through the list, and docs/api.md and ``openapi.yaml`` list
exactly these codes, each in its status's row."""

from __future__ import annotations

import ast
import re

import yaml

from service.contract import errors
from service.contract.errors import ErrorCode, ServiceError
from service.server.security import Unauthorized
from tests.helpers import REPO

ROOT = REPO


def _subclasses(kind: type[ServiceError]) -> list[type[ServiceError]]:
    found = [kind]
    for sub in kind.__subclasses__():
        found += _subclasses(sub)
    return found


def test_each_error_class_has_a_default_code_of_its_own_status() -> None:
    assert Unauthorized in _subclasses(ServiceError)
    for kind in _subclasses(ServiceError):
        assert isinstance(kind.default_code, ErrorCode), kind
        assert kind.default_code.status == kind.status, kind


def test_the_service_names_no_code_outside_the_list() -> None:
    # A code written as a string (code="...", default_code = "...", {"code": "..."})
    # would escape the list; the enum members are what the service must use.
    strays = []
    for path in sorted((ROOT / "service").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.keyword)
                and node.arg == "code"
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                strays.append(f"{path.name}:{node.value.lineno} code={node.value.value!r}")
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if (
                        isinstance(key, ast.Constant)
                        and key.value == "code"
                        and isinstance(value, ast.Constant)
                        and isinstance(value.value, str)
                    ):
                        strays.append(f"{path.name}:{value.lineno} 'code': {value.value!r}")
            if (
                isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "default_code" for t in node.targets)
                and isinstance(node.value, ast.Constant)
            ):
                strays.append(f"{path.name}:{node.lineno} default_code = {node.value.value!r}")
    assert strays == []


def test_a_code_crosses_the_process_boundary_as_itself() -> None:
    for code in ErrorCode:
        error = ServiceError.from_wire({"status": code.status, "code": code.value, "message": "m"})
        assert error.code is code
        assert error.status == code.status or type(error) is ServiceError
    broken = ServiceError.from_wire({"status": 422, "code": "made_up", "message": "m"})
    assert broken.code is ErrorCode.INTERNAL
    assert errors._CODES["overloaded"] is ErrorCode.OVERLOADED


def test_the_readme_lists_every_code_in_its_status_row() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    table = text[text.index("| status | codes |") :]
    table = table[: table.index("\n\n")]
    listed: dict[str, int] = {}
    for row in table.splitlines()[2:]:
        status = int(row.split("|")[1])
        for code in re.findall(r"`([a-z0-9_]+)`", row.split("|", 2)[2]):
            if code in {c.value for c in ErrorCode}:
                listed.setdefault(code, status)
    assert set(listed) == {c.value for c in ErrorCode}
    assert {code: status for code, status in listed.items()} == {
        c.value: c.status for c in ErrorCode
    }


def test_openapi_lists_exactly_the_codes() -> None:
    spec = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    schemas = spec["components"]["schemas"]
    body = schemas["ErrorResponse"]["properties"]["error"]["$ref"].rsplit("/", 1)[1]
    code = schemas[body]["properties"]["code"]["$ref"].rsplit("/", 1)[1]
    assert sorted(schemas[code]["enum"]) == sorted(c.value for c in ErrorCode)
    # Each code with its status and its meaning, as the enum says.
    assert schemas[code]["x-status"] == {c.value: c.status for c in ErrorCode}
    for c in ErrorCode:
        assert f"`{c.value}` ({c.status}): {c.meaning}" in schemas[code]["description"]
