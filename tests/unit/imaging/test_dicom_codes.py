"""Class codes from the models file (``[models.<name>.codes]``): a Segmentation's segment
types and an SR report's finding types carry the code the file gives a class (e.g.
SNOMED CT), a class without one the service's own scheme 99GRADCAM, and the objects stay
valid (dciodvfy). A code naming no label of the model, or one DICOM cannot hold, stops
the load with a message that names it; the codes cross the engine socket unchanged."""

from __future__ import annotations

import base64
import io
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from service.contract.errors import ConfigError
from service.contract.models_file import DEMO_MODELS_FILE, load_models_file
from service.contract.requests import ExplainRequest
from service.contract.settings import Settings
from service.engine.loading.models import load_model
from service.engine.runtime import Runtime
from service.pipeline.explain import explain
from service.transport.interface import ModelInfo
from tests.helpers import REPO, as_json, dciodvfy_errors, encode

EXAMPLES = REPO / "examples"
CR = EXAMPLES / "phantom_nodule.dcm"
DEMO = DEMO_MODELS_FILE.parent
NODULE = ("SCT", "27925004", "Nodule")
MASS = ("SCT", "4147007", "Mass")


def _models_file(folder: Path, codes: str) -> Path:
    """The demo model (its own weights and labels) with ``codes`` (TOML lines)."""
    path = folder / "models.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [models.phantom]
            arch = "service.demo.model:phantom_net"
            weights = "{DEMO / "phantom_net.safetensors"}"
            labels = "{DEMO / "labels.txt"}"
            multilabel = true
            channels = 1
            input_size = [128, 128]
            mean = [0.37]
            std = [0.21]
            layer = "features"
            memory_format = "channels_last"

            [models.phantom.codes]
            """
        )
        + textwrap.dedent(codes)
    )
    return path


CODES = """\
    nodule = { scheme = "SCT", value = "27925004", meaning = "Nodule" }
    mass = { scheme = "SCT", value = "4147007", meaning = "Mass" }
    """


@pytest.fixture(scope="module")
def coded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    path = _models_file(tmp_path_factory.mktemp("models"), CODES)
    runtime = Runtime(Settings(device="cpu", models_file=path)).start()
    yield runtime
    runtime.close()


def _objects(runtime: Runtime, targets: list[str]) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """The Segmentation and the SR report of the CR phantom for ``targets``."""
    request = ExplainRequest.model_validate(
        {
            "images": [encode(CR.read_bytes())],
            "targets": [targets],
            "heatmap": {"format": "dicom-seg"},
            "report": "dicom-sr",
        }
    )
    result = as_json(explain(request, runtime, runtime.settings))["results"][0]
    return tuple(  # type: ignore[return-value]
        pydicom.dcmread(io.BytesIO(base64.b64decode(result[key]["data"])))
        for key in ("segmentation", "report")
    )


def _code(item: pydicom.Dataset) -> tuple[str, str, str]:
    return (item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning)


def _finding_types(report: pydicom.Dataset) -> list[tuple[str, str, str]]:
    """Each measurement group's Finding (DCM 121071), in order."""
    found = []
    for item in report.ContentSequence:
        for group in item.get("ContentSequence", []):
            for node in group.get("ContentSequence", []):
                if node.ConceptNameCodeSequence[0].CodeValue == "121071":
                    found.append(_code(node.ConceptCodeSequence[0]))
    return found


def _valid(dataset: pydicom.Dataset, tmp_path: Path) -> None:
    path = tmp_path / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path)
    errors, report = dciodvfy_errors(path)
    assert not errors, report


def test_coded_classes_carry_their_codes_and_the_others_the_own_scheme(
    coded: Runtime, tmp_path: Path
) -> None:
    seg, sr = _objects(coded, ["nodule", "opacity"])
    types = [_code(s.SegmentedPropertyTypeCodeSequence[0]) for s in seg.SegmentSequence]
    own = ("99GRADCAM", "2", "opacity")  # opacity is the model's third output
    assert types == [NODULE, own]
    assert _finding_types(sr) == [NODULE, own]
    # 99GRADCAM is used, so each object identifies it.
    for dataset in (seg, sr):
        (scheme,) = dataset.CodingSchemeIdentificationSequence
        assert scheme.CodingSchemeDesignator == "99GRADCAM"
        _valid(dataset, tmp_path)


def test_objects_of_coded_classes_only_do_not_name_the_own_scheme(
    coded: Runtime, tmp_path: Path
) -> None:
    seg, sr = _objects(coded, ["nodule", "mass"])
    assert [_code(s.SegmentedPropertyTypeCodeSequence[0]) for s in seg.SegmentSequence] == [
        NODULE,
        MASS,
    ]
    assert _finding_types(sr) == [NODULE, MASS]
    for dataset in (seg, sr):
        assert "CodingSchemeIdentificationSequence" not in dataset
        _valid(dataset, tmp_path)


def test_without_codes_every_class_is_in_the_own_scheme(runtime: Runtime) -> None:
    seg, sr = _objects(runtime, ["nodule"])
    assert _code(seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]) == (
        "99GRADCAM",
        "0",
        "nodule",
    )
    assert _finding_types(sr) == [("99GRADCAM", "0", "nodule")]


@pytest.mark.parametrize(
    ("codes", "named"),
    [
        (
            'nodules = { scheme = "SCT", value = "1", meaning = "N" }\n',
            ["model 'phantom'", "key 'codes'", "'nodules'", "nodule, mass"],
        ),
        ('nodule = { scheme = "SCT", value = "1" }\n', ["key 'codes'", "meaning"]),
        (
            'nodule = { scheme = "SCT", value = "1", meaning = "a\\\\b" }\n',
            ["key 'codes'", "meaning"],
        ),
        ('nodule = { scheme = "SCT", value = "1", meaning = "N", x = 1 }\n', ["key 'codes'"]),
    ],
    ids=["unknown-label", "no-meaning", "backslash", "extra-key"],
)
def test_a_wrong_code_stops_the_load_and_is_named(
    tmp_path: Path, codes: str, named: list[str]
) -> None:
    path = _models_file(tmp_path, codes)
    with pytest.raises(ConfigError) as raised:
        load_model("phantom", load_models_file(path))
    for text in named:
        assert text in str(raised.value), str(raised.value)


def test_the_codes_cross_the_engine_socket(tmp_path: Path) -> None:
    info = load_model("phantom", load_models_file(_models_file(tmp_path, CODES))).info()
    assert info.codes == {"nodule": NODULE, "mass": MASS}
    assert ModelInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
