"""What parsing and validating a request body costs: time and peak memory per body.

Each body is parsed in a fresh interpreter (``parse_explain_request`` or
``parse_infer_request``, as the routes call them), with the peak of the Python objects it
makes (``tracemalloc``: the parsed values, the validated copies, the errors) and the
growth of the interpreter's peak resident size (which moves only past the imports').
Valid bodies near the value bound (``contract/json_body.py``) give the bytes per value
that ``JSON_BYTES_PER_VALUE`` must cover; hostile ones (a million items, unknown keys,
wrong items) show the bounds at work.

    python tests/benchmarks/json_cost.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
import tracemalloc

N = 99_000  # values, just under JSON_MAX_VALUES


def _join(prefix: bytes, item: bytes, count: int, suffix: bytes) -> bytes:
    return prefix + b",".join([item] * count) + suffix


BODIES = {
    # valid or near-valid, under the bound: what the reservation per value must cover
    "99k ints (valid)": _join(b'{"images":["A"],"targets":[[', b"7", N, b"]]}"),
    "99k labels (valid)": b'{"images":["A"],"targets":[['
    + b",".join(b'"l%d"' % i for i in range(N))
    + b"]]}",
    "49k one-item lists (valid)": _join(b'{"images":["A"],"targets":[', b"[1]", N // 2, b"]}"),
    "49k objects": _join(b'{"images":[', b"{}", N // 2, b"]}"),
    "33k two-key objects": _join(b'{"images":["A"],"targets":[', b'{"a":1,"b":2}', N // 3, b"]}"),
    # hostile: over the bounds, or a long list of wrong items
    "a million numbers (2 MB)": _join(b'{"images":["AAAA",', b"0", 10**6, b"]}"),
    "200k float targets": _join(b'{"images":["A"],"targets":[', b"[1.5]", 200_000, b"]}"),
    "40k float targets": _join(b'{"images":["A"],"targets":[', b"[1.5]", 40_000, b"]}"),
    "a million unknown keys": b'{"images":["A"],'
    + b",".join(b'"k%d":0' % i for i in range(10**6))
    + b"}",
    "v2 200 wrong parameters": json.dumps(
        {
            "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["A"]}],
            "parameters": {f"p{i}": [i] for i in range(200)},
        }
    ).encode(),
}


def _measure(name: str) -> None:
    from service.contract.request_parsing import parse_explain_request
    from service.pipeline.protocol import parse_infer_request

    body = BODIES[name]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    started = time.perf_counter()
    try:
        (parse_infer_request if body.startswith(b'{"inputs"') else parse_explain_request)(body)
        outcome = "valid"
    except Exception as error:  # the outcome is the point: print it
        outcome = f"{type(error).__name__} {getattr(error, 'code', '')}"
    took = time.perf_counter() - started
    objects = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    values = body.count(b",") + body.count(b"[") + body.count(b"{") + 1
    print(
        f"{name:28s} {len(body) / 1e6:5.2f} MB body {values:8d} counted {took * 1e3:8.1f} ms"
        f"  objects {objects / 1e6:6.1f} MB ({objects / values:4.0f} B/value)"
        f"  peak RSS +{grew / 1e6:6.0f} MB  {outcome}",
        flush=True,
    )


def main() -> None:
    if len(sys.argv) > 1:
        _measure(sys.argv[1])
        return
    for name in BODIES:
        subprocess.run([sys.executable, __file__, name], check=True)


if __name__ == "__main__":
    main()
