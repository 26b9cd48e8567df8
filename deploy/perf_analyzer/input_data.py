"""perf_analyzer's input data for gradcam-service: image files as the ``image`` tensor.

    python deploy/perf_analyzer/input_data.py examples/*.png > out/perf_data.json
    perf_analyzer -m phantom -u 127.0.0.1:8000 -i http --input-data out/perf_data.json \\
        --shape image:1 --concurrency-range 1:16:15

One entry per file; perf_analyzer cycles through them. perf_analyzer sends a BYTES
tensor's ``b64`` data as it is, so each entry is the serialised one-element tensor (the
file's length as 4 little-endian bytes, then the file), in base64. Standard library only.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
from pathlib import Path


def entry(path: Path) -> dict[str, dict[str, str]]:
    data = path.read_bytes()
    tensor = struct.pack("<I", len(data)) + data
    return {"image": {"b64": base64.b64encode(tensor).decode("ascii")}}


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    json.dump({"data": [entry(Path(p)) for p in paths]}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
