"""serve's checks before it starts anything, as a user meets them: gradcam-service serve
with each mistake stops within a second, with one line (the checks themselves:
tests/unit/supervision/test_preflight.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import free_port
from tests.unit.supervision.test_preflight import DEMO, _models


def test_serve_stops_within_a_second_on_each_mistake(tmp_path: Path) -> None:
    """As a user meets them: one line on stderr, exit code 2, before any engine starts."""
    serve = [str(Path(sys.executable).with_name("gradcam-service")), "serve"]
    (tmp_path / "w.pt").write_text("not a checkpoint")
    bad = _models(
        tmp_path,
        (DEMO / "models.toml")
        .read_text()
        .replace('weights = "phantom_net.safetensors"', 'weights = "w.pt"')
        .replace('labels = "labels.txt"', f'labels = "{DEMO / "labels.txt"}"'),
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for args, said in (
            (["--port", port], f"port {port} on 127.0.0.1 is in use"),
            (["--models", str(tmp_path / "nope.toml")], "nope.toml does not exist"),
            (["--models", str(bad), "--port", str(free_port())], "w.pt is not a checkpoint"),
        ):
            started = time.monotonic()
            done = subprocess.run(serve + args, capture_output=True, text=True, timeout=60)
            took = time.monotonic() - started
            assert done.returncode == 2, done.stderr
            assert done.stderr.count("\n") == 1 and said in done.stderr, done.stderr
            # Generous for a loaded 2-core machine; ~0.4 s when idle (no torch, no engine).
            assert took < 3, f"{args}: {took:.1f} s"
