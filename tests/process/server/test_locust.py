"""The shipped locustfile, headless for a few seconds against a real server: every
task ran, and every answer was a 200."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, LiveServer

LOCUSTFILE = REPO / "deploy" / "locust" / "locustfile.py"
TASKS = {"array/layer", "png/original", "overlay/original", "4 images × 2 targets"}


@pytest.mark.slow
def test_the_locustfile_runs_clean_against_a_live_server(
    server: LiveServer, tmp_path: Path
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--host",
            server.url,
            "--headless",
            "--users",
            "4",
            "--spawn-rate",
            "4",
            "--run-time",
            "6s",
            "--csv",
            str(tmp_path / "run"),
            "--only-summary",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with (tmp_path / "run_stats.csv").open(newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    assert rows.keys() >= TASKS, rows.keys()
    for name in TASKS:
        assert int(rows[name]["Request Count"]) > 0, name
        assert int(rows[name]["Failure Count"]) == 0, (name, rows[name])
    assert int(rows["Aggregated"]["Failure Count"]) == 0
