"""The command line as a user runs it: the installed gradcam-service in a process of its
own; explain --request is the HTTP contract, and body writes what a server answers (the
commands in-process: tests/unit/cli/)."""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests

from service.contract.errors import ErrorResponse
from service.contract.responses import ExplainResponse
from tests.helpers import EXAMPLES, REPO, LiveServer, encode, phantom_png, pydicom_file


def _cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    # The installed console script, as a user runs it.
    command = [str(Path(sys.executable).with_name("gradcam-service")), *args]
    return subprocess.run(command, input=stdin, capture_output=True, timeout=120, check=False)


def test_explain_request_prints_the_response(tmp_path: Path) -> None:
    request = {
        "images": [encode(phantom_png(3, 200, 150))],
        "targets": [["mass", "tube"]],
        "heatmap": {"format": "overlay", "size": "original"},
        "method": "layercam",
    }
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    done = _cli("explain", "--request", str(path))
    assert done.returncode == 0, done.stderr.decode()
    response = ExplainResponse.model_validate_json(done.stdout)
    assert response.method == "layercam"
    [result] = response.results
    assert [e.target.label for e in result.explanations] == ["mass", "tube"]
    assert all(e.heatmap.width == 200 and e.heatmap.height == 150 for e in result.explanations)


def test_explain_request_error_prints_the_error_envelope(tmp_path: Path) -> None:
    path = tmp_path / "request.json"
    path.write_text(json.dumps({"images": ["aGk="], "model": "nope"}))
    done = _cli("explain", "--request", str(path))
    assert done.returncode == 1
    error = ErrorResponse.model_validate_json(done.stdout)
    assert error.error.code == "unknown_model"


def test_bad_models_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[models.x]\narch = "resnet18"\nchannels = 7\n')
    done = _cli("layers", "--models", str(path))
    assert done.returncode == 2
    assert b"model 'x'" in done.stderr and b"channels" in done.stderr


def test_body_prints_a_request_a_server_answers(server: LiveServer, tmp_path: Path) -> None:
    import requests

    out = tmp_path / "body.json"
    images = [str(EXAMPLES / "phantom_mass_tube.png"), str(EXAMPLES / "phantom_nodule.png")]
    done = _cli(
        "body",
        *images,
        "--target",
        "tube",
        "--target",
        "1",
        "--format",
        "overlay",
        "--size",
        "input",
        "-o",
        str(out),
    )
    assert done.returncode == 0, done.stderr.decode()
    body = json.loads(out.read_bytes())
    assert body["targets"] == [["tube", 1], ["tube", 1]]
    assert body["heatmap"] == {"format": "overlay", "size": "input"}
    assert body["images"][0] == encode((EXAMPLES / "phantom_mass_tube.png").read_bytes())
    # What curl --data-binary @body.json sends.
    answer = requests.post(
        f"{server.url}/v1/explain",
        data=out.read_bytes(),
        timeout=60,
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 200, answer.text
    labels = [[e["target"]["label"] for e in r["explanations"]] for r in answer.json()["results"]]
    assert labels == [["tube", "mass"], ["tube", "mass"]]
    # stdout, and stdin as an image
    piped = _cli("body", "-", stdin=(EXAMPLES / "phantom_nodule.png").read_bytes())
    assert json.loads(piped.stdout)["images"] == [body["images"][1]]


@pytest.mark.parametrize(
    "args,message",
    [
        (["nope.png"], b"nope.png: No such file"),
        ([str(EXAMPLES / "phantom_nodule.png"), "--top-k", "0"], b"top_k"),
        ([str(EXAMPLES.parent / "README.md")], b"README.md: not an image the service reads"),
    ],
)
def test_body_refuses_what_no_server_would_take(args: list[str], message: bytes) -> None:
    done = _cli("body", *args)
    assert done.returncode == 2 and message in done.stderr and not done.stdout


def test_version() -> None:
    done = _cli("--version")
    assert done.returncode == 0
    assert done.stdout.decode().strip() == f"gradcam-service {version('gradcam-service')}"


@pytest.mark.parametrize(
    "heatmap",
    [{"format": "array", "size": "input"}, {"format": "dicom-sc"}, {"format": "dicom-pm"}],
    ids=["array", "dicom-sc", "dicom-pm"],
)
def test_the_cli_and_the_server_answer_one_request_alike(
    server: LiveServer, tmp_path: Path, heatmap: dict[str, str]
) -> None:
    """``explain --request`` and ``POST /v1/explain`` run one pipeline: the same scores,
    the same heatmap arrays, DICOM objects with the same pixels (only their new UIDs and
    creation times differ)."""
    # A CT: it has the Frame of Reference a Parametric Map needs.
    dicom = encode(pydicom_file("CT_small.dcm").read_bytes())
    png = encode(phantom_png(4, 150, 120))
    images = [dicom, png] if heatmap["format"] == "array" else [dicom]
    body: dict[str, Any] = {
        "images": images,
        "targets": [["nodule", 0]] * len(images),
        "heatmap": heatmap,
    }
    path = tmp_path / "request.json"
    path.write_text(json.dumps(body))
    done = _cli("explain", "--request", str(path))
    assert done.returncode == 0, done.stderr.decode()
    from_cli = ExplainResponse.model_validate_json(done.stdout)
    answered = requests.post(f"{server.url}/v1/explain", json=body, timeout=60)
    assert answered.status_code == 200, answered.text
    from_http = ExplainResponse.model_validate_json(answered.content)
    for a, b in zip(from_cli.results, from_http.results, strict=True):
        assert [p.index for p in a.predictions] == [p.index for p in b.predictions]
        assert np.allclose(
            [p.score for p in a.predictions], [p.score for p in b.predictions], atol=1e-6
        )
        for x, y in zip(a.explanations, b.explanations, strict=True):
            assert x.target == y.target or abs(x.target.score - y.target.score) <= 1e-6
            if heatmap["format"] == "array":
                assert x.heatmap.values is not None and y.heatmap.values is not None
                assert np.abs(x.heatmap.values - y.heatmap.values).max() <= 1e-6
                continue
            assert x.heatmap.data and y.heatmap.data, (x.heatmap.reason, y.heatmap.reason)
            one, other = (
                pydicom.dcmread(io.BytesIO(base64.b64decode(h.data)))  # type: ignore[arg-type]
                for h in (x.heatmap, y.heatmap)
            )
            assert one.SOPClassUID == other.SOPClassUID
            assert one.SOPInstanceUID != other.SOPInstanceUID
            assert np.array_equal(one.pixel_array, other.pixel_array)


def test_the_readmes_explain_command_runs_twice_in_a_row(tmp_path: Path) -> None:
    """The README's command, as a user copies it, run twice into one folder: the second
    run replaces the first one's files (it used to stop, exit code 3), and a log of it
    (stderr not a terminal) holds no progress bar's carriage returns."""
    readme = (REPO / "README.md").read_text()
    [shown] = re.findall(r"`(gradcam-service explain examples/\*\.png --out out)`", readme)
    words = shlex.split(shown)[1:]
    # The shell's work: the glob, from the repository; "out" in a folder of the test's.
    images = sorted(str(p) for p in REPO.glob(words[1]))
    assert len(images) >= 5  # enough for a progress bar, were stderr a terminal
    out = tmp_path / "out"
    args = [words[0], *images, *words[2:-1], str(out)]
    runs = [_cli(*args) for _ in range(2)]
    for done in runs:
        assert done.returncode == 0, done.stderr.decode()
        assert b"\r" not in done.stderr
    assert runs[1].stdout.decode().count("→") == len(images)
    assert (
        len(list(out.glob("*.overlay.png"))) == len(list(out.glob("*.heatmap.png"))) == len(images)
    )


def test_the_demo_model_is_explained_without_importing_torchvision(tmp_path: Path) -> None:
    """torchvision imports torch._dynamo and sympy (~0.8 s of a 2-3 s explain on 2
    cores): imported for torchvision's own models only."""
    script = (
        "import sys; from service.cli import main; "
        f"code = main(['explain', {str(EXAMPLES / 'phantom_nodule.png')!r}, "
        f"'--out', {str(tmp_path)!r}]); "
        "print(code, sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=120, check=False
    )
    assert done.stdout.decode().splitlines()[-1] == "0 []", done.stderr.decode()


@pytest.mark.parametrize("command", [[], ["explain"], ["body"], ["layers"], ["serve"]])
def test_help_is_plain_text(command: list[str]) -> None:
    done = _cli(*command, "--help")
    assert done.returncode == 0
    text = done.stdout.decode()
    assert "usage: gradcam-service" in text
    for markup in ("``", "::", "**", ".. "):
        assert markup not in text, f"reStructuredText {markup!r} in {command} --help"
