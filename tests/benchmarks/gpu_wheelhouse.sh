#!/usr/bin/env bash
# Makes .whl/ (git-ignored) for tests/benchmarks/gpu_check.sh: the wheels the
# GPU machine lacks, for its Python (CPython 3.12, x86-64, with torch, numpy,
# pillow, prometheus-client, requests, pytest, pyyaml and tqdm already there;
# highdicom and its pyjpegls are not),
# at the versions this checkout's venv is tested with, and Debian's `hey`
# (a static Go binary: it needs only libc) as the load client.
#   bash tests/benchmarks/gpu_wheelhouse.sh        # here, where pip and apt reach
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
NEEDED='flask|blinker|itsdangerous|werkzeug|gunicorn|pydantic|pydantic-core|annotated-types'
NEEDED+='|typing-inspection|typing-extensions|orjson|fpng|lazy-loader|pydicom|pylibjpeg'
NEEDED+='|pylibjpeg-libjpeg|pylibjpeg-openjpeg|pylibjpeg-rle|safetensors|h11|highdicom|pyjpegls'
pins=$($PY -m pip freeze | grep -i -E "^(${NEEDED//-/[-_]})==")
rm -rf .whl && mkdir -p .whl
platforms=()
for n in 2_35 2_34 2_31 2_28 2_27 2_24 2_17 2_5; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# shellcheck disable=SC2086
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl $pins
(cd .whl && apt-get download hey >/dev/null && dpkg -x hey_*.deb hey && rm hey_*.deb)
ls .whl
du -sh .whl
