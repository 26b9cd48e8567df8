"""deploy/kserve/: the InferenceService, checked against KServe's own API types.

KServe's Python SDK ships its API as generated models (``V1beta1InferenceService`` and
below, down to Kubernetes' ``V1Container``), each with the type of every field and
its JSON name. The manifest is walked against them: every key must be a field of its
type (a misspelt ``scaleMetrc`` or a probe on the wrong level fails) and every value
of the field's type. Then what the service needs of it: the protocol's health routes
as probes, on the container's port, autoscaling on concurrency, a GPU and a memory
limit.
"""

from __future__ import annotations

import re
from typing import Any

import kserve.models
import kubernetes.client
import pytest
import yaml

from service.contract.settings import Settings
from service.engine.runtime import Runtime
from service.server.app import create_app
from tests.helpers import REPO

MANIFEST = REPO / "deploy/kserve/inferenceservice.yaml"
_LIST = re.compile(r"^[Ll]ist\[(.+)\]$")
_DICT = re.compile(r"^(?:dict\(str, (.+)\)|Dict\[str, (.+)\])$")
_QUANTITY = re.compile(r"^[0-9.]+([eE][0-9]+|[KMGTPE]i?|m|k)?$")


def _model(name: str) -> Any:
    for module in (kserve.models, kubernetes.client):
        found = getattr(module, name, None)
        if found is not None:
            return found
    raise AssertionError(f"no API type {name}")


def _problems(value: Any, kind: str, path: str) -> list[str]:
    """Where ``value`` is not of the API type ``kind`` (as the SDKs name types)."""
    if kind == "object":  # IntOrString and free-form fields
        return []
    if kind == "ResourceQuantity":
        ok = isinstance(value, int | float) or bool(_QUANTITY.match(str(value)))
        return [] if ok else [f"{path}: {value!r} is not a quantity"]
    simple: dict[str, type | tuple[type, ...]] = {
        "str": str,
        "int": int,
        "bool": bool,
        "float": (int, float),
    }
    if kind in simple:
        wrong = not isinstance(value, simple[kind]) or (kind == "int" and value is True)
        return [f"{path}: {value!r} is not {kind}"] if wrong else []
    listed = _LIST.match(kind)
    if listed:
        if not isinstance(value, list):
            return [f"{path}: not a list"]
        return [
            p for i, item in enumerate(value) for p in _problems(item, listed[1], f"{path}[{i}]")
        ]
    mapped = _DICT.match(kind)
    if mapped:
        if not isinstance(value, dict):
            return [f"{path}: not a map"]
        inner = mapped[1] or mapped[2]
        return [p for k, v in value.items() for p in _problems(v, inner, f"{path}.{k}")]
    if kind == "V1ResourceRequirements" and isinstance(value, dict):
        # The Kubernetes SDK types these as strings; the API server wants quantities.
        value = dict(value)
        for key in ("limits", "requests"):
            for name, amount in value.pop(key, {}).items():
                problems = _problems(amount, "ResourceQuantity", f"{path}.{key}.{name}")
                if problems:
                    return problems
    model = _model(kind)
    if not isinstance(value, dict):
        return [f"{path}: not an object ({kind})"]
    fields = {json_name: name for name, json_name in model.attribute_map.items()}
    problems = []
    for key, item in value.items():
        if key not in fields:
            problems.append(f"{path}.{key}: not a field of {kind}")
        else:
            problems += _problems(item, model.openapi_types[fields[key]], f"{path}.{key}")
    return problems


def _manifest() -> dict[str, Any]:
    found: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
    return found


def test_the_inference_service_is_of_kserves_api_types() -> None:
    manifest = _manifest()
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1"
    assert manifest["kind"] == "InferenceService"
    assert _problems(manifest, "V1beta1InferenceService", "") == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda m: m["spec"]["predictor"].update(scaleMetrc="concurrency"), "not a field"),
        (lambda m: m["spec"]["predictor"].update(minReplicas="one"), "is not int"),
        (
            lambda m: m["spec"]["predictor"]["containers"][0].update(readinessProbes={}),
            "not a field of V1Container",
        ),
        (
            lambda m: m["spec"]["predictor"]["containers"][0]["resources"]["limits"].update(
                memory="lots"
            ),
            "not a quantity",
        ),
    ],
)
def test_the_check_finds_a_broken_manifest(change: Any, problem: str) -> None:
    manifest = _manifest()
    change(manifest)
    found = _problems(manifest, "V1beta1InferenceService", "")
    assert found and problem in found[0], found


def test_the_predictor_is_what_the_service_needs(runtime: Runtime) -> None:
    predictor = _manifest()["spec"]["predictor"]
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] >= 1
    [container] = predictor["containers"]
    [port] = container["ports"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["GRADCAM_HOST"] == "0.0.0.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert env["GRADCAM_DEVICE"] == "cuda"
    assert "memory" in container["resources"]["limits"]
    app = create_app(Settings(device="cpu"), engine=runtime).test_client()
    for probe, path in (
        ("startupProbe", "/v2/health/ready"),
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
    ):
        check = container[probe]["httpGet"]
        assert check == {"path": path, "port": port["containerPort"]}
        assert app.get(check["path"]).status_code == 200
    # serve listens on 8000 unless told otherwise.
    assert port["containerPort"] == Settings().port
