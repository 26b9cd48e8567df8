"""What the server benchmarks share: start ``serve`` from a checkout, stop it, and read
the memory of its processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from service.memory import children

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def serve(
    checkout: Path = REPO,
    *,
    workers: int = 1,
    threads: int | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """``gradcam-service serve`` on the CPU from ``checkout`` (its own code: it runs
    there, with it first on the path), once ``/readyz`` answers 200."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--device",
        "cpu",
    ]
    if threads:
        command += ["--threads", str(threads)]
    process = subprocess.Popen(
        command,
        cwd=checkout,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(checkout), **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except requests.RequestException:
            pass
        time.sleep(0.3)
    stop(process)
    raise RuntimeError(f"{checkout}: serve did not become ready")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the whole process group, SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    found, frontier = [root], [root]
    while frontier:
        frontier = [child for pid in frontier for child in children(pid)]
        found += frontier
    return found


def processes(root: int) -> dict[str, int]:
    """serve's processes by role: supervisor, engine, master, worker 0, worker 1, …"""
    roles = {"supervisor": root}
    for child in children(root):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"engine.process" in cmdline:
            roles["engine"] = child
        elif b"gunicorn" in cmdline:
            roles["master"] = child
            for n, worker in enumerate(sorted(children(child))):
                roles[f"worker {n}"] = worker
    return roles
