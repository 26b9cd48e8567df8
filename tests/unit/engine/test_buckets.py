"""Batches padded to fixed buckets (``GRADCAM_BATCH_BUCKETS=on``, for cuDNN and CUDA
graphs): the bucket choice, and answers equal to unpadded ones."""

from __future__ import annotations

import time

import numpy as np

from service.contract.settings import Settings
from service.engine.buckets import bucket_for, bucket_sizes, pad_job
from service.engine.runtime import Runtime
from service.transport.interface import Job


def test_bucket_sizes_are_powers_of_two_and_the_largest_batch() -> None:
    assert bucket_sizes(16) == (1, 2, 4, 8, 16)
    assert bucket_sizes(12) == (1, 2, 4, 8, 12)
    assert bucket_sizes(1) == (1,)
    assert [bucket_for(n, bucket_sizes(12)) for n in (1, 2, 3, 5, 8, 9, 12, 13)] == [
        1,
        2,
        4,
        8,
        8,
        12,
        12,
        13,
    ]


def _job(n: int) -> Job:
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (128, 128, 1), dtype=np.uint8) for _ in range(n)]
    boxes: list[tuple[int, int, int, int] | None] = [None, (10, 0, 118, 128), None]
    targets: list[list[int | None]] = [[None], [0, 2], [3]]
    return Job(
        "phantom",
        "features",
        images,
        boxes[:n],
        targets[:n],
        ["gradcam", "layercam", "gradcam++"][:n],
    )


def test_a_padded_job_has_blank_top1_images_after_the_real_ones() -> None:
    job = pad_job(_job(3), 8)
    assert len(job.images) == 8 and job.targets[3:] == [[None]] * 5
    assert all(not image.any() for image in job.images[3:])
    assert job.methods[3:] == ["gradcam"] * 5 and job.boxes[3:] == [None] * 5
    unpadded = _job(3)
    assert pad_job(unpadded, 3) is unpadded


def test_bucketed_answers_equal_unpadded_ones() -> None:
    plain = Runtime(Settings(device="cpu")).start()
    padded = Runtime(Settings(device="cpu", batch_buckets="on", max_batch_size=8)).start()
    try:
        for n in (1, 2, 3):
            a = plain.run(_job(n), time.monotonic() + 60)
            b = padded.run(_job(n), time.monotonic() + 60)
            assert len(b.targets) == n and b.targets == a.targets
            np.testing.assert_allclose(b.scores, a.scores, atol=1e-5)
            for maps_a, maps_b in zip(a.maps, b.maps, strict=True):
                for x, y in zip(maps_a, maps_b, strict=True):
                    np.testing.assert_allclose(y, x, atol=1e-4 * max(1.0, float(x.max())))
    finally:
        plain.close()
        padded.close()


# --- CUDA graphs (engine/cuda_graphs.py): what the CPU can test -------------------------


class EagerGraph:
    """Stands in for a CUDA graph on the CPU: ``replay`` runs the captured step again and
    writes into the outputs ``capture`` returned, as a graph replay does."""

    def __init__(self, device: object) -> None:
        self.outputs: tuple = ()

    def capture(self, step):  # type: ignore[no-untyped-def]
        self.step = step
        self.outputs = step()
        return self.outputs

    def replay(self) -> None:
        for static, fresh in zip(self.outputs, self.step(), strict=True):
            static.copy_(fresh)


class WrongGraph(EagerGraph):
    """A capture whose replay computes something else: the check must catch it."""

    def replay(self) -> None:
        super().replay()
        self.outputs[1].copy_(self.outputs[1].flip(-1) + 1)


def _graphed_runtime(graph: type | None) -> Runtime:
    runtime = Runtime(Settings(device="cpu", cuda_graphs="on", max_batch_size=4))
    if graph is not None:
        runtime._make_graph = graph
    return runtime.start()


def _same_answers(a: Runtime, b: Runtime) -> None:
    for n in (1, 2, 3):
        job = _job(n)
        one_each: list[list[int | None]] = [[None], [2], [1]]
        job = Job(
            job.model, job.layer, job.images, job.boxes, one_each[:n], ["gradcam"] * n
        )  # one target, one method
        x, y = (rt.run(job, time.monotonic() + 60) for rt in (a, b))
        assert x.targets == y.targets
        np.testing.assert_allclose(x.scores, y.scores, atol=1e-5)
        for maps_x, maps_y in zip(x.maps, y.maps, strict=True):
            np.testing.assert_allclose(maps_y[0], maps_x[0], atol=1e-4 * max(1.0, maps_x[0].max()))


def test_graphs_replay_the_eager_answer() -> None:
    plain = Runtime(Settings(device="cpu")).start()
    graphed = _graphed_runtime(EagerGraph)
    try:
        _same_answers(plain, graphed)
        assert graphed._graphs is not None and graphed._graphs.replays >= 3
        # Several targets or methods in a job: eager, same answers.
        job = _job(3)
        x, y = (rt.run(job, time.monotonic() + 60) for rt in (plain, graphed))
        assert x.targets == y.targets
    finally:
        plain.close()
        graphed.close()


def test_a_failed_capture_or_check_falls_back_to_eager(caplog) -> None:  # type: ignore[no-untyped-def]
    from service import metrics

    before = metrics.CUDA_GRAPH_FALLBACKS.labels("phantom")._value.get()
    plain = Runtime(Settings(device="cpu")).start()
    failing = _graphed_runtime(None)  # the real CudaGraph: no CUDA here, capture fails
    wrong = _graphed_runtime(WrongGraph)  # captured, but the check does not hold
    try:
        _same_answers(plain, failing)
        _same_answers(plain, wrong)
        assert failing._graphs is not None and failing._graphs.replays == 0
        assert wrong._graphs is not None and wrong._graphs.replays == 0
        assert metrics.CUDA_GRAPH_FALLBACKS.labels("phantom")._value.get() >= before + 4
        assert "no CUDA graph, eager instead" in caplog.text
    finally:
        plain.close()
        failing.close()
        wrong.close()
