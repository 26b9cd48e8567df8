"""The command line: ``explain --request`` is the HTTP contract; file mode writes PNGs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from service.cli import main
from service.schemas import ErrorResponse, ExplainResponse
from tests.helpers import LiveServer, encode, phantom_png


def _cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    # The installed console script, as a user runs it.
    command = [str(Path(sys.executable).with_name("gradcam-service")), *args]
    return subprocess.run(command, input=stdin, capture_output=True, timeout=120, check=False)


def test_explain_request_prints_the_response(tmp_path: Path) -> None:
    request = {"images": [encode(phantom_png(3, 200, 150))], "targets": [["mass", "tube"]],
               "heatmap": {"format": "overlay", "size": "original"}, "method": "layercam"}
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


def test_explain_files_writes_overlays_at_image_size(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    images = []
    for seed, (w, h) in [(2, (300, 300)), (3, (517, 389))]:
        path = tmp_path / f"p{seed}.png"
        path.write_bytes(phantom_png(seed, w, h))
        images.append(path)
    broken = tmp_path / "notes.png"
    broken.write_text("not an image at all")
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"
    code = main(["explain", str(images[0]), str(broken), str(missing), str(images[1]),
                 "--out", str(out), "--target", "nodule", "--target", "2"])
    captured = capsys.readouterr()
    assert code == 1  # some inputs failed ...
    error_lines = captured.err.strip().splitlines()
    assert any(str(broken) in line and "not in a supported image format" in line
               for line in error_lines)
    assert any(str(missing) in line for line in error_lines)
    # ... and the good ones were still explained, one overlay + heatmap per target.
    for path, size in [(images[0], (300, 300)), (images[1], (517, 389))]:
        for label in ("nodule", "opacity"):
            for kind in ("overlay", "heatmap"):
                png = Image.open(out / f"{path.stem}.{label}.{kind}.png")
                assert png.size == size and png.mode == "RGB"
        assert f"{path}: " in captured.out


def test_layers_lists_shapes_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers"]) == 0
    out = capsys.readouterr().out
    assert "* features " in out and "128×16×16" in out
    assert "features.stage2" in out


def test_bad_models_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[models.x]\narch = "resnet18"\nchannels = 7\n')
    done = _cli("layers", "--models", str(path))
    assert done.returncode == 2
    assert b"model 'x'" in done.stderr and b"channels" in done.stderr


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_body_prints_a_request_a_server_answers(server: LiveServer, tmp_path: Path) -> None:
    import requests

    out = tmp_path / "body.json"
    images = [str(EXAMPLES / "phantom_mass_tube.png"), str(EXAMPLES / "phantom_nodule.png")]
    done = _cli("body", *images, "--target", "tube", "--target", "1", "--format", "overlay",
                "--size", "input", "-o", str(out))
    assert done.returncode == 0, done.stderr.decode()
    body = json.loads(out.read_bytes())
    assert body["targets"] == [["tube", 1], ["tube", 1]]
    assert body["heatmap"] == {"format": "overlay", "size": "input"}
    assert body["images"][0] == encode((EXAMPLES / "phantom_mass_tube.png").read_bytes())
    # What curl --data-binary @body.json sends.
    answer = requests.post(f"{server.url}/v1/explain", data=out.read_bytes(), timeout=60,
                           headers={"Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text
    labels = [[e["target"]["label"] for e in r["explanations"]] for r in answer.json()["results"]]
    assert labels == [["tube", "mass"], ["tube", "mass"]]
    # stdout, and stdin as an image
    piped = _cli("body", "-", stdin=(EXAMPLES / "phantom_nodule.png").read_bytes())
    assert json.loads(piped.stdout)["images"] == [body["images"][1]]


@pytest.mark.parametrize("args,message", [
    (["nope.png"], b"nope.png: No such file"),
    ([str(EXAMPLES / "phantom_nodule.png"), "--top-k", "0"], b"top_k"),
])
def test_body_refuses_what_no_server_would_take(args: list[str], message: bytes) -> None:
    done = _cli("body", *args)
    assert done.returncode == 2 and message in done.stderr and not done.stdout
