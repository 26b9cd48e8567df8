"""Load benchmark: the real server against the forward-pass limit and a naive baseline.

    python tests/benchmarks/load.py [--duration 12] [--concurrency 1 4 16]
                                    [--workers N] [--threads T] [--torch-threads K]
                                    [--device cuda] [--client hey] [--skip-naive]

One run, side by side, on 127.0.0.1:

1. the plain forward pass of the same model (resnet50, seeded weights) in a
   separate process, ``torch.inference_mode()``, at ``--forward-batch`` and batch 1,
   with the engine's torch thread count;
2. ``gradcam-service serve`` with that model (its default layout unless
   ``--workers``/``--threads`` say otherwise), hit by a closed-loop client at each
   concurrency, first ``{format: array, size: layer}`` on a 224×224 JPEG, then
   ``{format: overlay, size: original}`` on a 1024×1024 JPEG; the mean batch size
   and the engine's time per batch come from ``/metrics``;
3. the naive baseline (``naive_app.py``: Flask + pytorch-grad-cam, one image per
   request) under gunicorn, 2 sync workers × 1 torch thread, same client;
4. with ``--compare-with CHECKOUT``, this checkout's serve and that checkout's
   (run with ``PYTHONPATH=CHECKOUT``), started alternately under the same load.

``--peer`` runs only the peer comparison instead (``peer_litserve.py``: LitServe +
torchcam, batched, what a user writes in an afternoon; ``pip install -e .[bench]``):
resnet50 with 10 classes (seeded weights), one 224×224 JPEG (quality 90) per request,
``top_k`` 5, ``{format: array, size: layer}``, ``--concurrency`` closed-loop clients
(default 16) for ``--duration`` s after a 4 s warm-up; ``--pairs N`` alternating
pairs (ours, then the peer, each freshly started), the paired median ratio; with
``--neighbour`` a core-bound process (``while True: pass``) runs beside both arms.
Also our p50 at concurrency 1 against the plain forward at batch 1.

The client: ``python`` (default: one thread per connection, bodies encoded once,
responses not parsed; enough for the CPU's tens of requests per second) or
``hey`` (Debian's Go load generator, for the thousands a GPU serves; on PATH or
``--hey PATH``). Throughput counts the requests that *complete* inside the
measured window, whenever they started (counting only those that also started
inside it undercounts by about p50 / duration).

Prints req/s, p50, p99, mean batch size, and the ratios the targets are set on.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import torch
import torchvision
from PIL import Image
from serving import descendants, free_port, processes, stop

from service.demo.phantom import sample_phantom
from service.imaging.values import to_uint8

REPO = Path(__file__).resolve().parents[2]

_FORWARD = """
import statistics, sys, time, torch, torchvision
threads, device, batch = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
autocast = sys.argv[4] == "1"
torch.set_num_threads(threads)
torch.backends.cudnn.benchmark = True
torch.manual_seed(0)
m = torchvision.models.resnet50().eval().to(device)
xb, x1 = torch.randn(batch, 3, 224, 224, device=device), torch.randn(1, 3, 224, 224, device=device)
def run(x):
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device, dtype=torch.float16, enabled=autocast):
        m(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
for _ in range(3):
    run(xb); run(x1)
tb = [run(xb) for _ in range(7)]
t1 = [run(x1) for _ in range(15)]
print(batch / statistics.median(tb), statistics.median(t1))
"""


def _jpeg(size: int) -> str:
    gray = to_uint8(sample_phantom(np.random.default_rng(3), size, size).image)
    buffer = io.BytesIO()
    Image.fromarray(gray).convert("RGB").save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# The servers' output (access lines included) goes to a file per server, whose end
# is printed when a run fails: on a remote GPU machine that is the only trace.
_LOGS: dict[int, Path] = {}


def _start(command: list[str], env: dict[str, str], url: str, probe: str) -> subprocess.Popen:
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115
        prefix="gradcam-load-server-", suffix=".log", delete=False
    )
    process = subprocess.Popen(
        command,
        env={**os.environ, **env},
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    _LOGS[process.pid] = Path(log.name)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(url + probe, timeout=2).status_code in (200, 405):
                return process
        except requests.RequestException:
            time.sleep(0.3)
    stop(process)
    raise RuntimeError(f"{command[0]} did not come up:\n{_log_tail(process)}")


def _log_tail(process: subprocess.Popen, chars: int = 6000) -> str:
    """The end of a server's output, without its access lines."""
    path = _LOGS.get(process.pid)
    if path is None or not path.exists():
        return ""
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(line for line in lines if '"POST /v1/' not in line and '"GET /' not in line)[
        -chars:
    ]


# (answered req/s, p50 ms, p99 ms, share refused with 503): 503 is the service
# shedding load on purpose, reported; any other failure stops the benchmark.
LoadResult = tuple[float, float, float, float]


def _closed_loop(
    url: str, body: bytes, concurrency: int, duration_s: float, warmup_s: float = 2.0
) -> LoadResult:
    """The requests completed in ``duration_s`` after ``warmup_s``."""
    latencies: list[float] = []
    failures: list[int] = []
    refused = 0
    lock = threading.Lock()
    start = time.monotonic()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    def client() -> None:
        nonlocal refused
        session = requests.Session()
        headers = {"Content-Type": "application/json"}
        while True:
            sent = time.monotonic()
            if sent >= stop_at:
                return
            response = session.post(url, data=body, headers=headers, timeout=300)
            done = time.monotonic()
            with lock:
                if not measure_from <= done <= stop_at:
                    continue
                if response.status_code == 503:
                    refused += 1
                elif response.status_code != 200:
                    failures.append(response.status_code)
                else:
                    latencies.append(done - sent)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests: {sorted(set(failures))}")
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return (
        len(latencies) / duration_s,
        statistics.median(latencies) * 1000,
        p99 * 1000,
        refused / max(1, refused + len(latencies)),
    )


def _hey(
    hey: str, url: str, body: bytes, concurrency: int, duration_s: float, warmup_s: float = 2.0
) -> LoadResult:
    """The same figures from ``hey`` (a warm-up run first, then the measured one; its
    percentiles include any 503s)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        handle.write(body)
        handle.flush()
        command = [
            hey,
            "-m",
            "POST",
            "-T",
            "application/json",
            "-D",
            handle.name,
            "-c",
            str(concurrency),
            "-t",
            "300",
        ]
        subprocess.run([*command, "-z", f"{warmup_s}s", url], capture_output=True, check=True)
        out = subprocess.run(
            [*command, "-z", f"{duration_s}s", url], capture_output=True, text=True, check=True
        ).stdout
    statuses = {
        code: int(count) for code, count in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)
    }
    if set(statuses) - {"200", "503"} or "Error distribution" in out:
        raise RuntimeError(f"hey saw failures: {statuses}\n{out[-2000:]}")
    completed = sum(statuses.values())

    def seconds(pattern: str) -> float:
        found = re.search(pattern, out)
        if found is None:
            raise RuntimeError(f"no '{pattern}' in hey's output:\n{out}")
        return float(found.group(1))

    # hey stops sending at -z and waits for what is in flight: completions per second.
    total_s = seconds(r"Total:\s+([0-9.]+) secs")
    p50 = seconds(r"50%+ in ([0-9.]+) secs")
    # Under 100 requests hey prints no 99th percentile: the slowest stands in for it.
    p99 = (
        seconds(r"99%+ in ([0-9.]+) secs")
        if completed >= 100
        else seconds(r"Slowest:\s+([0-9.]+) secs")
    )
    answered = statuses.get("200", 0)
    return answered / total_s, p50 * 1000, p99 * 1000, 1 - answered / max(1, completed)


def _warm_up(url: str, image: str, max_batch: int) -> None:
    """One request of k images for each k up to the largest batch, twice: each batch size
    the engine meets first (cuDNN's algorithm search, with ``cudnn.benchmark``) then
    again. Prints both sweeps' times, so that the cold start shows."""
    for sweep in ("first", "second"):
        times = []
        for k in range(1, max_batch + 1):
            body = {"images": [image] * k, "heatmap": {"format": "array", "size": "layer"}}
            started = time.perf_counter()
            requests.post(url + "/v1/explain", json=body, timeout=300).raise_for_status()
            times.append(time.perf_counter() - started)
        slowest = max(range(max_batch), key=times.__getitem__)
        print(
            f"warm-up, {sweep} sweep (one request of k images, k = 1..{max_batch}): "
            f"{sum(times):.1f} s, slowest k = {slowest + 1} {times[slowest] * 1000:.0f} ms; "
            f"ms: {' '.join(f'{t * 1000:.0f}' for t in times)}",
            flush=True,
        )


def _forward(args: argparse.Namespace, threads: int) -> tuple[float, float]:
    """Plain forward in a separate process: (img/s at the forward batch, batch-1 seconds)."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _FORWARD,
            str(threads),
            args.device,
            str(args.forward_batch),
            "1" if args.autocast else "0",
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the plain forward failed:\n{done.stderr[-4000:]}")
    out = done.stdout.split()
    return float(out[0]), float(out[1])


def _batch_counts(url: str) -> tuple[float, float, float]:
    """Images in batches, batches, and engine seconds in batches, so far."""
    text = requests.get(url + "/metrics", timeout=10).text

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name} ([0-9.e+]+)$", text, re.M))

    return (
        total("gradcam_batch_size_images_sum"),
        total("gradcam_batch_size_images_count"),
        total("gradcam_batch_duration_seconds_sum"),
    )


_NEIGHBOUR = "while True: pass"


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """A process's user and system CPU seconds so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


class _WindowCPU(threading.Thread):
    """CPU seconds spent by each process of a server's tree and by this process (the
    client) inside the measured window: sampled when it opens and when it closes."""

    def __init__(
        self, root: int, roles: dict[int, str], warmup_s: float, duration_s: float
    ) -> None:
        super().__init__(daemon=True)
        self.root, self.roles, self.warmup_s, self.duration_s = root, roles, warmup_s, duration_s
        self.spent: dict[str, float] = {}

    @staticmethod
    def _sample(pids: list[int]) -> dict[int, float]:
        seconds = {}
        for pid in pids:
            with contextlib.suppress(OSError):
                seconds[pid] = sum(_cpu_seconds(pid))
        return seconds

    def run(self) -> None:
        time.sleep(self.warmup_s)
        pids = descendants(self.root)
        before, client = self._sample(pids), time.process_time()
        time.sleep(self.duration_s)
        after, client_after = self._sample(pids), time.process_time()
        for pid, seconds in after.items():
            role = self.roles.get(pid, "other")
            self.spent[role] = self.spent.get(role, 0.0) + seconds - before.get(pid, seconds)
        self.spent["client"] = client_after - client


def _peer_comparison(args: argparse.Namespace) -> None:
    """Ours against the LitServe + torchcam peer, alternating pairs (module text)."""
    folder = Path(tempfile.mkdtemp(prefix="gradcam-peer-"))
    torch.manual_seed(0)
    weights = folder / "resnet50.pt"
    torch.save(torchvision.models.resnet50(num_classes=10).state_dict(), weights)
    extra = "".join(f"{key} = {value}\n" for key, value in (args.model_option or []))
    (folder / "models.toml").write_text(
        f'[models.resnet50]\narch = "resnet50"\nnum_classes = 10\nweights = "{weights}"\n{extra}'
    )
    body = json.dumps(
        {"images": [_jpeg(224)], "top_k": 5, "heatmap": {"format": "array", "size": "layer"}}
    ).encode()
    concurrency = max(args.concurrency) if args.concurrency != [1, 4, 16] else 16
    forward_ips, forward_1_s = _forward(args, args.torch_threads)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores; resnet50 (10 classes), 224² "
        f"JPEG, array/layer, top_k 5, {concurrency} clients, {args.duration:g} s after 4 s; "
        f"neighbour: {'yes' if args.neighbour else 'no'}; models file options: "
        f"{extra.strip() or 'none'}"
    )
    print(
        f"plain forward, {args.torch_threads} torch threads: batch {args.forward_batch} "
        f"{forward_ips:.1f} img/s, batch 1 {forward_1_s * 1000:.1f} ms",
        flush=True,
    )

    def ours() -> tuple[subprocess.Popen, str]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {"GRADCAM_TORCH_THREADS": str(args.torch_threads)}
        return _start(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--models",
                str(folder / "models.toml"),
                "--port",
                str(port),
            ],
            env,
            url,
            "/readyz",
        ), url

    def peer() -> tuple[subprocess.Popen, str]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            "PEER_WEIGHTS": str(weights),
            "PEER_PORT": str(port),
            "PEER_CLASSES": "10",
            "PEER_TORCH_THREADS": str(args.torch_threads),
        }
        return _start(
            [sys.executable, str(REPO / "tests" / "benchmarks" / "peer_litserve.py")],
            env,
            url,
            "/health",
        ), url

    neighbour = subprocess.Popen([sys.executable, "-c", _NEIGHBOUR]) if args.neighbour else None
    results: dict[str, list[LoadResult]] = {"ours": [], "peer": []}
    p50_1: list[float] = []
    cpu: tuple[list[float], list[float]] = ([], [])  # our engine's user, system (cores)
    spent: dict[str, list[dict[str, float]]] = {"ours": [], "peer": []}  # CPU s per request
    try:
        for pair in range(args.pairs):
            for name, start in (("ours", ours), ("peer", peer)):
                server, url = start()
                try:
                    engine = processes(server.pid).get("engine") if name == "ours" else None
                    before = _cpu_seconds(engine) if engine else (0.0, 0.0)
                    roles = {
                        pid: ("http workers" if role.startswith("worker") else role)
                        for role, pid in processes(server.pid).items()
                    }
                    window = _WindowCPU(
                        server.pid, roles if name == "ours" else {}, 4.0, args.duration
                    )
                    window.start()
                    started = time.monotonic()
                    result = _closed_loop(
                        url + "/v1/explain", body, concurrency, args.duration, warmup_s=4.0
                    )
                    window.join()
                    results[name].append(result)
                    served = max(1.0, result[0] * args.duration)
                    spent[name].append(
                        {role: seconds / served for role, seconds in window.spent.items()}
                    )
                    if engine:
                        after, took = _cpu_seconds(engine), time.monotonic() - started
                        cpu[0].append((after[0] - before[0]) / took)
                        cpu[1].append((after[1] - before[1]) / took)
                    if name == "ours" and not args.neighbour:
                        p50_1.append(
                            _closed_loop(url + "/v1/explain", body, 1, 5.0, warmup_s=1.0)[1]
                        )
                finally:
                    stop(server)
                print(
                    f"  pair {pair + 1}, {name}: {result[0]:.2f} req/s, p50 {result[1]:.0f} ms, "
                    f"p99 {result[2]:.0f} ms, 503s {result[3]:.0%}",
                    flush=True,
                )
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    ratios = [a[0] / b[0] for a, b in zip(results["ours"], results["peer"], strict=True)]
    print("\n| pair | ours req/s | peer req/s | ours / peer |\n|---|---|---|---|")
    for i, (a, b, r) in enumerate(zip(results["ours"], results["peer"], ratios, strict=True)):
        print(f"| {i + 1} | {a[0]:.2f} | {b[0]:.2f} | {r:.2f}× |")
    print(
        f"\npaired median: ours / peer = **{statistics.median(ratios):.2f}×** "
        f"({len(ratios)} pairs, {concurrency} clients"
        f"{', beside a core-bound neighbour' if args.neighbour else ''})"
    )
    if cpu[0]:
        user, system = statistics.median(cpu[0]), statistics.median(cpu[1])
        print(
            f"our engine's CPU under load (median): user {user:.0%}, system {system:.0%} of "
            f"one core; system {system / max(1e-9, user + system):.0%} of its CPU"
        )

    def server_ms(runs: list[dict[str, float]]) -> float:
        return (
            statistics.median(sum(s for r, s in run.items() if r != "client") for run in runs)
            * 1000
        )

    print("\nCPU per request inside the window (core-ms, medians over the pairs):")
    for name, runs in spent.items():
        roles = sorted({role for run in runs for role in run})
        print(
            f"  {name}: "
            + ", ".join(
                f"{role} {statistics.median(run.get(role, 0.0) for run in runs) * 1000:.0f}"
                for role in roles
            )
            + f"; server total {server_ms(runs):.0f}"
        )
    if p50_1:
        bound = 1.2 * forward_1_s * 1000 + 15
        print(
            f"ours at concurrency 1: p50 {statistics.median(p50_1):.0f} ms against the target "
            f"1.2 × {forward_1_s * 1000:.0f} + 15 = {bound:.0f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--workers", type=int, help="HTTP workers (default: serve's)")
    parser.add_argument("--threads", type=int, help="threads per worker (default: serve's)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="the engine's (and the plain forward's) torch threads",
    )
    parser.add_argument("--client", choices=["python", "hey"], default="python")
    parser.add_argument(
        "--compare-with",
        type=Path,
        metavar="CHECKOUT",
        help="another checkout of this repository (e.g. a git worktree of "
        "the last release): its serve under the same load, alternately",
    )
    parser.add_argument("--hey", default="hey", help="path of the hey binary")
    parser.add_argument(
        "--compare-request",
        type=int,
        choices=[0, 1],
        default=0,
        help="--compare-with: 0 = the 224² array request, 1 = the overlay",
    )
    parser.add_argument(
        "--overlay-size", type=int, default=1024, help="side of the overlay request's JPEG"
    )
    parser.add_argument(
        "--arch", default="resnet50", help="torchvision model served (seeded random weights)"
    )
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--autocast", action="store_true", help="float16 forward (CUDA)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--forward-batch", type=int, default=8)
    parser.add_argument(
        "--warm-up",
        action="store_true",
        help="before measuring, one request of k images for each k up to "
        "--max-batch-size (twice, timed)",
    )
    parser.add_argument(
        "--paired-repeats",
        type=int,
        default=3,
        help="forward/service pairs at the top concurrency for the median ratio",
    )
    parser.add_argument(
        "--peer",
        action="store_true",
        help="only ours against the LitServe + torchcam peer (module text)",
    )
    parser.add_argument(
        "--pairs", type=int, default=3, help="--peer and --compare-with: alternating pairs"
    )
    parser.add_argument(
        "--neighbour", action="store_true", help="--peer: a core-bound process beside both arms"
    )
    parser.add_argument(
        "--model-option",
        nargs=2,
        action="append",
        metavar=("KEY", "VALUE"),
        help="--peer: a models-file option for ours, e.g. precision '\"bf16\"'",
    )
    args = parser.parse_args()
    if args.peer:
        _peer_comparison(args)
        return
    total_threads = args.torch_threads
    hey = shutil.which(args.hey) if args.client == "hey" else None
    if args.client == "hey" and hey is None:
        parser.error(f"--client hey: no '{args.hey}' binary found")

    def load(url: str, body: bytes, concurrency: int) -> LoadResult:
        if hey is not None:
            return _hey(hey, url, body, concurrency, args.duration)
        return _closed_loop(url, body, concurrency, args.duration)

    folder = Path(tempfile.mkdtemp(prefix="gradcam-load-"))
    torch.manual_seed(0)
    weights = folder / f"{args.arch}.pt"
    torch.save(getattr(torchvision.models, args.arch)().state_dict(), weights)
    (folder / "models.toml").write_text(
        f'[models.{args.arch}]\narch = "{args.arch}"\nweights = "{weights}"\n'
    )
    payloads = {
        "array/layer, 224² JPEG": {
            "images": [_jpeg(224)],
            "heatmap": {"format": "array", "size": "layer"},
        },
        f"overlay/original, {args.overlay_size}² JPEG": {
            "images": [_jpeg(args.overlay_size)],
            "heatmap": {"format": "overlay", "size": "original"},
        },
    }
    bodies = {name: json.dumps(p).encode() for name, p in payloads.items()}

    forward_ips, forward_1_s = _forward(args, total_threads)
    paired: list[float] = []
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    layout = (
        f"{args.workers or 'default'} worker(s) × {args.threads or 'default'} threads, "
        f"engine with {args.torch_threads} torch threads"
    )
    print(
        f"torch {torch.__version__} on {device}{' with autocast' if args.autocast else ''}; "
        f"service: {layout}, max batch {args.max_batch_size}; {os.cpu_count()} cores; "
        f"client: {args.client}"
    )
    print(
        f"plain forward, resnet50, {total_threads} torch threads: batch {args.forward_batch} "
        f"**{forward_ips:.1f} img/s**, batch 1 {forward_1_s * 1000:.1f} ms\n"
    )

    rows: dict[tuple[str, str, int], tuple[float, float, float, float, float, float]] = {}

    def start_service(checkout: Path | None = None) -> tuple[subprocess.Popen, str]:
        """``serve`` from this checkout, or from another one (``--compare-with``)."""
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        flags = [
            flag
            for name, value in (("--workers", args.workers), ("--threads", args.threads))
            if value
            for flag in (name, str(value))
        ]
        env = {
            "GRADCAM_TORCH_THREADS": str(args.torch_threads),
            "GRADCAM_AUTOCAST": "true" if args.autocast else "false",
            "GRADCAM_MAX_BATCH_SIZE": str(args.max_batch_size),
        }
        if checkout is not None:
            env["PYTHONPATH"] = str(checkout)
        server = _start(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--models",
                str(folder / "models.toml"),
                "--port",
                str(port),
                *flags,
                "--device",
                args.device,
            ],
            env,
            url,
            "/readyz",
        )
        return server, url

    server, url = start_service()
    failed = True
    try:
        if args.warm_up:
            _warm_up(url, payloads["array/layer, 224² JPEG"]["images"][0], args.max_batch_size)
        for name, body in bodies.items():
            for concurrency in args.concurrency:
                before = _batch_counts(url)
                result = load(url + "/v1/explain", body, concurrency)
                after = _batch_counts(url)
                batches = max(1.0, after[1] - before[1])
                mean_batch = (after[0] - before[0]) / batches
                batch_ms = (after[2] - before[2]) / batches * 1000
                rows[("service", name, concurrency)] = (*result, mean_batch, batch_ms)
                # As it comes, so that a later failure leaves the figures so far.
                print(
                    f"  {name}, concurrency {concurrency}: {result[0]:.1f} req/s, p50 "
                    f"{result[1]:.0f} ms, p99 {result[2]:.0f} ms, 503s {result[3]:.0%}, "
                    f"mean batch {mean_batch:.1f}, engine {batch_ms:.1f} ms per batch",
                    flush=True,
                )
        graphs = [
            line
            for line in requests.get(url + "/metrics", timeout=10).text.splitlines()
            if line.startswith("gradcam_cuda_graph_")
        ]
        if graphs:  # GRADCAM_CUDA_GRAPHS: were the batches replayed, or did they fall back?
            print("  " + "\n  ".join(graphs), flush=True)
        # The forward figure drifts between runs on a small machine: pair it with
        # the service at the top concurrency, alternately, and take the median ratio.
        top = max(args.concurrency)
        first_body = next(iter(bodies.values()))
        for _ in range(args.paired_repeats):
            forward_r = _forward(args, total_threads)[0]
            service_r = load(url + "/v1/explain", first_body, top)[0]
            paired.append(service_r / forward_r)
        failed = False
    finally:
        stop(server)
        if failed:
            print(f"server output, without access lines:\n{_log_tail(server)}", file=sys.stderr)
        else:
            _LOGS.pop(server.pid).unlink(missing_ok=True)

    compared: dict[str, list[float]] = {}
    if args.compare_with:
        # Another checkout (say, the previous release) under the same load, alternately.
        first_body = bodies[list(bodies)[args.compare_request]]
        top = max(args.concurrency)
        for _ in range(args.pairs):
            for label, checkout in (
                ("this checkout", None),
                (str(args.compare_with), args.compare_with),
            ):
                other, other_url = start_service(checkout)
                try:
                    load(other_url + "/v1/explain", first_body, top)  # warm-up
                    compared.setdefault(label, []).append(
                        load(other_url + "/v1/explain", first_body, top)[0]
                    )
                finally:
                    stop(other)

    if not args.skip_naive:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        naive = _start(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-w",
                "2",
                "-b",
                f"127.0.0.1:{port}",
                "--pythonpath",
                str(REPO / "tests" / "benchmarks"),
                "--timeout",
                "300",
                "naive_app:app",
            ],
            {"NAIVE_WEIGHTS": str(weights), "NAIVE_TORCH_THREADS": "1"},
            url,
            "/v1/explain",
        )
        try:
            for name, body in bodies.items():
                for concurrency in args.concurrency:
                    result = load(url + "/v1/explain", body, concurrency)
                    rows[("naive", name, concurrency)] = (*result, 1.0, float("nan"))
        finally:
            stop(naive)

    print(
        "| server | request | concurrency | req/s | p50 ms | p99 ms | 503s | mean batch | "
        "engine ms per batch |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (system, name, concurrency), (rps, p50, p99, shed, batch, batch_ms) in rows.items():
        print(
            f"| {system} | {name} | {concurrency} | {rps:.1f} | {p50:.0f} | {p99:.0f} | "
            f"{shed:.0%} | {batch:.1f} | {batch_ms:.1f} |"
        )
    print()
    if paired:
        ratios = ", ".join(f"{r:.2f}" for r in paired)
        print(
            f"{next(iter(bodies))}, concurrency {max(args.concurrency)}, {len(paired)} paired "
            f"repeats (forward, then service): service / forward = {ratios}; "
            f"median **{statistics.median(paired):.2f}×**"
        )
    if compared:
        (mine, theirs) = compared.values()
        ratios = [a / b for a, b in zip(mine, theirs, strict=True)]
        print(
            f"{list(bodies)[args.compare_request]} ({args.arch}), concurrency "
            f"{max(args.concurrency)}: this checkout "
            f"{', '.join(f'{r:.1f}' for r in mine)} req/s, {args.compare_with} "
            f"{', '.join(f'{r:.1f}' for r in theirs)} req/s; ratio median "
            f"**{statistics.median(ratios):.2f}×**"
        )
    for name in bodies:
        top = max(args.concurrency)
        service = rows[("service", name, top)][0]
        line = f"{name}, concurrency {top}: service / forward = **{service / forward_ips:.2f}×**"
        if ("naive", name, top) in rows:
            line += f", service / naive = **{service / rows[('naive', name, top)][0]:.1f}×**"
        print(line)
        if 1 in args.concurrency:
            p50 = rows[("service", name, 1)][1]
            bound = 1.2 * forward_1_s * 1000 + 15
            print(
                f"{name}, concurrency 1: p50 {p50:.0f} ms against the target "
                f"1.2 × {forward_1_s * 1000:.0f} + 15 = {bound:.0f} ms"
            )


if __name__ == "__main__":
    main()
