"""The Docker image, built for real and run: ready, answers an explain request, stops
cleanly on SIGTERM. Opt-in (GRADCAM_TEST_DOCKER=1; several minutes and ~7 GB of
disk): ``deploy/docker/build-local.sh`` builds it with podman first.

    GRADCAM_TEST_DOCKER=1 .venv/bin/python -m pytest tests/process/deploy/test_docker.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import REPO, answering, wait_until

TAG = "localhost/gradcam-service:0.1.0"
LIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(
        not os.environ.get("GRADCAM_TEST_DOCKER"),
        reason="opt-in: GRADCAM_TEST_DOCKER=1 (builds a ~7 GB image)",
    ),
]


def _podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", "--runtime", "runc", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_the_image_builds_runs_answers_and_stops() -> None:
    assert shutil.which("podman"), "apt-get install podman runc debootstrap"
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    lint = subprocess.run(
        [hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert lint.returncode == 0, lint.stdout
    started = time.monotonic()
    built = subprocess.run(
        ["bash", str(REPO / "deploy/docker/build-local.sh"), TAG],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    print(f"built in {time.monotonic() - started:.0f} s")
    name = f"gradcam-test-{os.getpid()}"
    port = 18000 + os.getpid() % 1000
    run = _podman(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        *LIMITS,
        "-e",
        f"GRADCAM_PORT={port}",
        "-e",
        "GRADCAM_HOST=127.0.0.1",
        TAG,
    )
    assert run.returncode == 0, run.stderr
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(
            answering(f"{url}/readyz"),
            120,
            "the container ready",
            detail=lambda: _podman("logs", name).stdout[-3000:],
        )
        body = subprocess.run(
            [
                str(Path(sys.executable).with_name("gradcam-service")),
                "body",
                str(REPO / "examples/phantom_nodule.png"),
                "--target",
                "nodule",
            ],
            capture_output=True,
            check=True,
        ).stdout
        answer = requests.post(
            f"{url}/v1/explain", data=body, timeout=60, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 200, answer.text
        assert json.loads(answer.content)["results"][0]["predictions"][0]["label"] == "nodule"
        # The web page's files are in the installed package (not an editable checkout).
        page = requests.get(f"{url}/", timeout=10)
        assert page.status_code == 200 and "page/page.js" in page.text
        assert requests.get(f"{url}/page/page.js", timeout=10).status_code == 200
        # Its examples too, copied into the image (not part of the package).
        example = requests.get(f"{url}/page/examples/phantom_nodule.png", timeout=10)
        assert example.status_code == 200 and example.content.startswith(b"\x89PNG")
        user = _podman("exec", name, "id", "-u").stdout.strip()
        assert user == "10001"
        init = _podman("exec", name, "cat", "/proc/1/cmdline").stdout
        assert init.startswith("tini")
        stopped = _podman("stop", "-t", "60", name, timeout=90)
        assert stopped.returncode == 0
        code = _podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
        logs = _podman("logs", name).stdout + _podman("logs", name).stderr
        assert code == "0", logs[-3000:]
        assert "engine stopped" in logs
    finally:
        _podman("rm", "-f", name)
    size = _podman("image", "inspect", TAG, "--format", "{{.Size}}").stdout.strip()
    print(f"image size {int(size) / 1e9:.2f} GB")
