"""The engine process across its socket, and serve's supervision of it.

The protocol tests talk to a real engine process (``python -m
service.engine``) through the HTTP workers' own client (``EnginePool``);
the supervision tests run a real ``gradcam-service serve`` and kill, stop and
overload it. A second model, a random-weight resnet50 ("slow"), keeps the engine
busy for a while when a test needs a queue.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import requests
from PIL import Image
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from service.contract.errors import DeadlineExceeded, Overloaded, ServiceError
from service.engine.runtime import Runtime
from service.transport.engine_client import EnginePool
from service.transport.interface import Job, engine_command
from tests.helpers import REPO, LiveServer, ServerFactory, encode, phantom_png, wait_until

T = TypeVar("T")
DEMO_MODELS = REPO / "service" / "demo" / "models.toml"


@pytest.fixture(scope="module")
def models_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model (default) plus "slow": resnet50 with random weights, 224²."""
    path = tmp_path_factory.mktemp("models") / "models.toml"
    demo = DEMO_MODELS.read_text().replace(
        '"phantom_net.safetensors"', f'"{DEMO_MODELS.parent / "phantom_net.safetensors"}"'
    )
    demo = demo.replace('"labels.txt"', f'"{DEMO_MODELS.parent / "labels.txt"}"')
    path.write_text(demo + '\n[models.slow]\narch = "resnet50"\nnum_classes = 10\n')
    return path


class EngineProcess:
    """One engine process started as serve starts it, on a socket of the test's."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.socket = str(folder / "engine.sock")
        self.metrics_dir = folder / "metrics"
        self.metrics_dir.mkdir()
        read_fd, write_fd = os.pipe()
        self.process = subprocess.Popen(
            engine_command(self.socket, "cpu", write_fd),
            pass_fds=(write_fd,),
            cwd=REPO,
            env={
                **os.environ,
                "GRADCAM_TORCH_THREADS": "2",
                "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
                **env,
            },
        )
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as ready:
            line = ready.readline()  # blocks until ready (or EOF if it died)
        assert line.startswith(b"ready cpu"), line
        self.pool = EnginePool([self.socket])
        assert self.pool.connections[0].wait_connected(10)

    def batches(self) -> float:
        return self._metric("gradcam_batch_size_images_count")

    def queue_depth(self) -> float:
        """Jobs waiting for the model loop (not the batch it runs)."""
        return self._metric("gradcam_queue_depth")

    def _metric(self, name: str) -> float:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir))  # type: ignore[no-untyped-call]
        return sum(
            sample.value
            for metric in registry.collect()
            for sample in metric.samples
            if sample.name == name
        )

    def stop(self) -> None:
        self.pool.close()
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(30) == 0


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, models_file: Path) -> Iterator[EngineProcess]:
    process = EngineProcess(
        tmp_path_factory.mktemp("engine"),
        {"GRADCAM_MODELS_FILE": str(models_file), "GRADCAM_MAX_QUEUE": "3"},
    )
    yield process
    process.stop()
    assert not Path(process.socket).exists()  # removed on a clean stop


def _phantom_pixels(seed: int) -> np.ndarray:
    image = Image.open(io.BytesIO(phantom_png(seed, 200, 160))).convert("L")
    return np.asarray(image.resize((128, 128), Image.Resampling.BILINEAR))[:, :, None]


def _phantom_job(n: int = 2) -> Job:
    images = [_phantom_pixels(seed) for seed in range(2, 2 + n)]
    targets: list[list[int | None]] = [[None], [0, 2]]
    return Job(
        "phantom",
        "features",
        images,
        [None] * n,
        targets[:n] * (n // 2 or 1),
        ["gradcam", "layercam"][:n] * (n // 2 or 1),
    )


def _slow_job(n: int = 8) -> Job:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]
    return Job("slow", "layer4", images, [None] * n, [[None]] * n, ["gradcam"] * n)


def test_a_round_trip_equals_the_in_process_engine(engine: EngineProcess, runtime: Runtime) -> None:
    fine = np.linspace(0, 1, 128 * 128, dtype=np.float32).reshape(128, 128, 1)
    letterboxed = _phantom_pixels(5).copy()
    letterboxed[:20] = 0
    job = Job(
        "phantom",
        "features",
        [_phantom_pixels(2), fine, letterboxed],
        [None, None, (0, 20, 128, 128)],
        [[None], [0, 2], [3]],
        ["gradcam", "layercam", "gradcam++"],
    )
    deadline = time.monotonic() + 30
    remote, local = engine.pool.run(job, deadline), runtime.run(job, deadline)
    assert remote.targets == local.targets
    assert np.allclose(remote.scores, local.scores, rtol=1e-6, atol=1e-7)
    for remote_maps, local_maps in zip(remote.maps, local.maps, strict=True):
        for a, b in zip(remote_maps, local_maps, strict=True):
            assert a.dtype == np.float32 and np.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert engine.pool.catalog().models["phantom"] == runtime.catalog().models["phantom"]
    assert engine.pool.ready()


def test_a_job_past_its_deadline_is_refused_before_compute(engine: EngineProcess) -> None:
    before = engine.batches()
    future = engine.pool.connections[0].submit(_phantom_job(), time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        future.result(10)
    assert engine.batches() == before


def test_a_full_queue_answers_503_at_once(engine: EngineProcess) -> None:
    connection = engine.pool.connections[0]
    deadline = time.monotonic() + 60
    futures = [connection.submit(_slow_job(), deadline) for _ in range(6)]
    outcomes = []
    for future in futures:
        try:
            future.result(60)
            outcomes.append("ok")
        except Overloaded as error:
            assert error.status == 503 and error.retry_after_s >= 1
            outcomes.append("503")
    # One computing, three queued (GRADCAM_MAX_QUEUE=3): the others were refused.
    assert outcomes.count("503") >= 1 and outcomes.count("ok") >= 4, outcomes


def test_a_cancelled_job_is_skipped(engine: EngineProcess) -> None:
    connection = engine.pool.connections[0]
    deadline = time.monotonic() + 60
    before = engine.batches()
    busy = connection.submit(_slow_job(), deadline)
    gone = connection.submit(_phantom_job(), deadline)
    wait_until(lambda: engine.queue_depth() == 1, 10, "the job queued behind the slow batch")
    assert gone.cancel()  # what a request does when its client leaves
    busy.result(60)
    engine.pool.run(_phantom_job(), deadline)
    # The slow batch and the last one; the cancelled job never ran.
    assert engine.batches() - before == 2


def test_one_bad_job_in_a_batch_fails_alone(engine: EngineProcess) -> None:
    connection = engine.pool.connections[0]
    deadline = time.monotonic() + 60
    busy = connection.submit(_slow_job(), deadline)
    good = connection.submit(_phantom_job(), deadline)
    wrong = Job(
        "phantom", "features", [np.zeros((64, 64, 1), np.uint8)], [None], [[None]], ["gradcam"]
    )
    bad = connection.submit(wrong, deadline)
    also_good = connection.submit(_phantom_job(), deadline)
    # The three wait together behind the slow batch: one batch of them, the bad one in it.
    wait_until(lambda: engine.queue_depth() == 3, 10, "three jobs queued behind the slow batch")
    busy.result(60)
    assert good.result(30).scores.shape == (2, 4)
    assert also_good.result(30).scores.shape == (2, 4)
    with pytest.raises(ServiceError) as info:
        bad.result(30)
    assert info.value.status == 500 and "(128, 128" in info.value.message


# --- serve: supervision ------------------------------------------------------------


def _explain(
    url: str, body: dict[str, Any], timeout: float = 60
) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    response = requests.post(f"{url}/v1/explain", json=body, timeout=timeout)
    return response.status_code, response.json(), time.monotonic() - started


SMALL = {
    "images": [encode(phantom_png(2, 96, 96))],
    "heatmap": {"format": "array", "size": "layer"},
}


def _concurrently(
    url: str, body: dict[str, Any], count: int
) -> list[tuple[int, dict[str, Any], float]]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: _explain(url, body), range(count)))


def _sampling(sample: Callable[[], list[float]], work: Callable[[], T]) -> tuple[T, list[float]]:
    """``work()``'s result, and what ``sample()`` read every 50 ms while it ran."""
    samples: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            samples.extend(sample())
            time.sleep(0.05)  # a sampling period: time itself passes between samples

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        return work(), samples
    finally:
        stop.set()
        watcher.join()


def _ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/readyz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.slow
def test_an_engine_killed_under_load_gives_503s_then_200s_without_a_restart_of_serve(
    live_server: ServerFactory,
) -> None:
    live = live_server(workers=2)
    [engine_pid] = live.engine_pids()
    statuses: list[tuple[int, str, float]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, body, took = _explain(live.url, SMALL)
            statuses.append((status, body.get("error", {}).get("code", ""), took))

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(client)
        wait_until(lambda: any(s == 200 for s, _, _ in statuses), 30, "answers")
        os.kill(engine_pid, signal.SIGKILL)
        wait_until(lambda: not _ready(live.url), 5, "/readyz to turn 503")
        wait_until(lambda: _ready(live.url), 60, "the engine to come back")
        served = len(statuses)
        wait_until(lambda: any(s == 200 for s, _, _ in statuses[served:]), 30, "answers after it")
        stop.set()
    assert live.process.poll() is None  # serve itself never restarted
    [new_pid] = live.engine_pids()
    assert new_pid != engine_pid
    codes = {code for status, code, _ in statuses if status != 200}
    assert codes == {"engine_unavailable"}, codes
    # Refused at once while the engine was down, never left hanging to a deadline.
    assert max(took for status, _, took in statuses if status == 503) < 1.0
    assert statuses[-1][0] == 200 and sum(s == 200 for s, _, _ in statuses) > 10
    restarts = requests.get(f"{live.url}/metrics", timeout=10).text
    assert "gradcam_engine_restarts_total 1.0" in restarts
    assert "Traceback" not in live.read_log()


def _answered_since(outcomes: list[tuple[float, float, int, str]], since: float) -> bool:
    """A request started after ``since`` (``time.monotonic()``) was answered 200."""
    return any(status == 200 and started > since for started, _, status, _ in list(outcomes))


def _timed_load(
    url: str, clients: int, stop: threading.Event, out: list[tuple[float, float, int, str]]
) -> ThreadPoolExecutor:
    """``clients`` threads posting SMALL until ``stop``: (started, ended, status, code)."""

    def client() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                status, body, _ = _explain(url, SMALL, timeout=90)
                code = body.get("error", {}).get("code", "")
            except requests.RequestException as error:
                status, code = 0, type(error).__name__
            out.append((started, time.monotonic(), status, code))
            if status != 200:
                time.sleep(0.05)  # a client's pause before it tries again: time, not a wait

    pool = ThreadPoolExecutor(clients)
    for _ in range(clients):
        pool.submit(client)
    return pool


@pytest.mark.slow
def test_a_stopped_engine_fails_fast_and_is_replaced(live_server: ServerFactory) -> None:
    """SIGSTOP keeps the engine's socket open: its heartbeat tells the workers, who
    answer 503 at once, and the supervisor, who kills and restarts it."""
    live = live_server(workers=2, engine_hang_restart_s=4)
    stop = threading.Event()
    outcomes: list[tuple[float, float, int, str]] = []
    try:
        [engine_pid] = live.engine_pids()
        pool = _timed_load(live.url, 4, stop, outcomes)
        wait_until(lambda: _answered_since(outcomes, 0.0), 30, "answers")
        os.kill(engine_pid, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_until(lambda: not _ready(live.url), 3, "/readyz to turn 503")
        unready_after = time.monotonic() - stopped
        wait_until(
            lambda: live.engine_pids() and live.engine_pids() != [engine_pid],
            15,
            "the supervisor to replace the stopped engine",
        )
        wait_until(lambda: _ready(live.url), 30, "the new engine")
        back = time.monotonic()
        wait_until(lambda: _answered_since(outcomes, back), 30, "answers from the new engine")
        stop.set()
        pool.shutdown(wait=True)
        assert live.process.poll() is None
        assert unready_after < 2.5, unready_after
        failed = [o for o in outcomes if o[2] != 200]
        assert failed and {code for *_, code in failed} == {"engine_unavailable"}, failed[:5]
        # Whatever waited on the stopped engine, and whatever came after, was answered
        # within 2 s of the stop or at once: never held to a deadline.
        for started, ended, _, _ in failed:
            assert ended - max(started, stopped) < 2.0, (started - stopped, ended - stopped)
        after = [o for o in outcomes if o[0] > stopped + 2.0 and o[1] < stopped + 4.0]
        assert after and all(
            status == 503 and ended - started < 0.5 for started, ended, status, _ in after
        )
        assert outcomes[-1][2] == 200
        assert "has not run for" in live.read_log()
    finally:
        stop.set()
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine_pid, signal.SIGCONT)


@pytest.mark.slow
def test_repeated_kills_of_a_loading_engine_do_not_grow_the_outage(
    live_server: ServerFactory,
) -> None:
    """Five kill -9 of the engine, 3 s apart, under load: kills of an engine still
    loading are not a crash loop, so it is back one load time after the last kill."""
    live = live_server(workers=2)
    stop = threading.Event()
    outcomes: list[tuple[float, float, int, str]] = []
    try:
        pool = _timed_load(live.url, 4, stop, outcomes)
        wait_until(lambda: _answered_since(outcomes, 0.0), 30, "answers")
        for _ in range(5):
            os.kill(live.engine_pids()[0], signal.SIGKILL)
            last_kill = time.monotonic()
            time.sleep(3.0)  # the scenario: kills 3 s apart, each of an engine still loading
        wait_until(lambda: _ready(live.url), 30, "the engine after the last kill")
        back_after = time.monotonic() - last_kill
        wait_until(
            lambda: _answered_since(outcomes, last_kill + back_after), 30, "answers after it"
        )
        stop.set()
        pool.shutdown(wait=True)
        assert live.process.poll() is None  # serve did not give up
        log = live.read_log()
        print(
            f"back {back_after:.1f} s after the last kill; "
            f"{log.count('while loading; restarting it now')} kill(s) while loading"
        )
        # One engine load (~4 s here) after the last kill, never a grown back-off.
        assert back_after < 10.0, back_after
        assert {code for *_, status, code in outcomes if status != 200} <= {"engine_unavailable"}
    finally:
        stop.set()


@pytest.mark.slow
def test_serve_gives_up_after_repeated_engine_crashes(live_server: ServerFactory) -> None:
    live = live_server(engine_max_restarts=1)
    os.kill(live.engine_pids()[0], signal.SIGKILL)
    wait_until(lambda: _ready(live.url), 60, "the first restart")
    os.kill(live.engine_pids()[0], signal.SIGKILL)
    assert live.process.wait(60) == 1
    assert "giving up" in live.read_log()
    assert not live.engine_pids() and not live.children("gunicorn")


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight_then_stops_everything(
    live_server: ServerFactory, models_file: Path
) -> None:
    live = live_server(models_file=models_file)
    slow = {
        "model": "slow",
        "images": [encode(phantom_png(s, 224, 224)) for s in range(8)],
        "heatmap": {"format": "none"},
    }
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(_explain, live.url, slow) for _ in range(2)]
        wait_until(
            lambda: live.metric("gradcam_requests_in_flight") >= 2,
            30,
            "two requests in flight",
        )
        live.process.send_signal(signal.SIGTERM)
        results = [future.result() for future in running]
    assert [status for status, _, _ in results] == [200, 200]
    assert live.process.wait(60) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{live.url}/healthz", timeout=2)
    log = live.read_log()
    assert "stopping (HTTP first, then the engines)" in log and "engine stopped" in log
    socket_path = next(
        line.split("engine serving on ")[1].split(" ")[0]
        for line in log.splitlines()
        if "engine serving on " in line
    )
    assert not Path(socket_path).parent.exists()  # the socket folder is gone


def test_sigterm_while_the_engine_still_loads_stops_everything(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        start_new_session=True,
    )
    assert process.stdout is not None
    lines = []
    # A gate, not a sleep: once the engine is starting it is far from ready (torch).
    for raw in process.stdout:
        lines.append(raw.decode())
        if "engine 0 starting" in lines[-1]:
            break
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    log = "".join(lines) + process.stdout.read().decode()
    pid = next(
        line.split("pid ")[1].rstrip(")")
        for line in log.splitlines()
        if "engine 0 starting" in line
    )
    assert not Path(f"/proc/{pid}").exists(), log  # the engine went too


def test_a_broken_models_file_stops_serve_with_its_message(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[models.x]\narch = "resnet18"\nchannels = 7\n')
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--models", str(path), "--port", "1"],
        capture_output=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 2
    assert b"model 'x'" in done.stderr and b"channels" in done.stderr
    assert b"gunicorn" not in done.stderr


@pytest.fixture(scope="module")
def busy_server(module_live_server: ServerFactory, models_file: Path) -> LiveServer:
    return module_live_server(workers=2, threads=16, models_file=models_file, max_queue=3)


@pytest.mark.slow
def test_overload_is_a_quick_503_and_shows_in_the_queue_depth(busy_server: LiveServer) -> None:
    # Small images (the model input is 224² anyway): what a refusal costs is then the
    # queue's answer, not decoding on two cores the engine keeps busy.
    slow = {
        "model": "slow",
        "images": [encode(phantom_png(s, 64, 64)) for s in range(4)],
        "heatmap": {"format": "none"},
    }

    def depth() -> list[float]:
        text = requests.get(f"{busy_server.url}/metrics", timeout=10).text
        return [
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("gradcam_queue_depth ")
        ]

    results, depths = _sampling(depth, lambda: _concurrently(busy_server.url, slow, 12))
    refused = [(body, took) for status, body, took in results if status == 503]
    summary = [(status, round(took, 2)) for status, _, took in results]
    assert refused and any(status == 200 for status, _, _ in results), summary
    assert all(body["error"]["code"] == "overloaded" for body, _ in refused), refused
    assert max(took for _, took in refused) < 1.0, summary
    assert max(depths) >= 2, depths  # the backlog is where the metric shows it


@pytest.mark.slow
def test_a_client_that_leaves_is_answered_499_and_not_computed(busy_server: LiveServer) -> None:
    url = busy_server.url
    slow = {
        "model": "slow",
        "images": [encode(phantom_png(s, 224, 224)) for s in range(8)],
        "heatmap": {"format": "none"},
    }
    metrics_before = requests.get(f"{url}/metrics", timeout=10).text

    def queued() -> float:
        text = requests.get(f"{url}/metrics", timeout=10).text
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("gradcam_queue_depth ")
        )

    with ThreadPoolExecutor(2) as pool:
        # Two slow requests that cannot share a batch (other layers): once one waits
        # behind the other, the engine has work for a while (a gate, not a guess of how
        # long the first one takes to arrive).
        busy = [
            pool.submit(_explain, url, {**slow, "layer": layer}) for layer in ("layer4", "layer3")
        ]
        wait_until(lambda: queued() >= 1, 30, "a slow request queued behind the other")
        # A client that sends its request and hangs up while it waits in the queue.
        body = json.dumps(SMALL).encode()
        with socket.create_connection(("127.0.0.1", busy_server.port)) as sock:
            sock.sendall(
                b"POST /v1/explain HTTP/1.1\r\nHost: x\r\nContent-Type: "
                b"application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            # It waits in the engine's queue (behind the slow one there) when it hangs up.
            wait_until(lambda: queued() >= 2, 30, "the leaving client's request queued")
        assert [b.result()[0] for b in busy] == [200, 200]

    def closed(text: str) -> float:
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith('gradcam_errors_total{code="client_closed"}')
        )

    def explained(text: str) -> float:
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith('gradcam_images_explained_total{model="phantom"}')
        )

    wait_until(
        lambda: closed(requests.get(f"{url}/metrics", timeout=10).text) > closed(metrics_before),
        10,
        "the 499",
    )
    assert explained(requests.get(f"{url}/metrics", timeout=10).text) == explained(metrics_before)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
def test_two_engines_share_the_work_and_cover_for_each_other(
    live_server: ServerFactory, models_file: Path
) -> None:
    live = live_server(workers=2, engines=2, torch_threads=1, models_file=models_file)
    engines = live.engine_pids()
    assert len(engines) == 2
    before = [_cpu_seconds(pid) for pid in engines]
    slow = {
        "model": "slow",
        "images": [encode(phantom_png(s, 224, 224)) for s in range(2)],
        "heatmap": {"format": "none"},
    }
    with ThreadPoolExecutor(4) as pool:
        assert {s for s, _, _ in pool.map(lambda _: _explain(live.url, slow), range(12))} == {200}
    used = [_cpu_seconds(pid) - b for pid, b in zip(engines, before, strict=True)]
    assert min(used) > 0.2 * max(used), used  # both did real work
    os.kill(engines[0], signal.SIGKILL)
    # Each of the two workers sees the EOF (at once) and says so.
    wait_until(
        lambda: live.read_log().count(": disconnected (") >= 2,
        10,
        "both workers disconnected from the killed engine",
        detail=live.read_log,
    )
    statuses = [_explain(live.url, SMALL)[0] for _ in range(5)]
    assert statuses == [200] * 5  # the other engine answers meanwhile


@pytest.mark.slow
def test_requests_waiting_for_a_worker_thread_are_counted_and_refused_in_time(
    live_server: ServerFactory, models_file: Path
) -> None:
    live = live_server(workers=1, threads=2, models_file=models_file, max_queue_wait_s=0.5)
    slow = {
        "model": "slow",
        "images": [encode(phantom_png(s, 224, 224)) for s in range(8)],
        "heatmap": {"format": "none"},
    }

    def waiting() -> list[float]:
        # /metrics needs a thread too: read the files as a scrape would aggregate them.
        return [live.metric("gradcam_requests_waiting_for_thread")]

    results, samples = _sampling(waiting, lambda: _concurrently(live.url, slow, 8))
    statuses = [status for status, _, _ in results]
    assert 200 in statuses and 503 in statuses, statuses
    assert {body["error"]["code"] for status, body, _ in results if status == 503} == {"overloaded"}
    assert max(samples) >= 2
    text = requests.get(f"{live.url}/metrics", timeout=10).text
    assert 'gradcam_stage_duration_seconds_count{stage="thread_wait"}' in text
