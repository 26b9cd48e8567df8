#!/usr/bin/env bash
# The GPU checks in one call (about 6 minutes on one H100/H200).
#
# Prepare once where pip and apt reach (makes the git-ignored .whl/ of ~22 MB):
#   bash tests/benchmarks/gpu_wheelhouse.sh
# Then on the GPU machine, from the repository root, carrying .whl:
#   bash tests/benchmarks/gpu_check.sh
# Its python3 is a venv that already holds torch: the missing wheels go to
# /tmp/site with `pip install --target` and reach Python through PYTHONPATH
# (a `venv --system-site-packages` made from that venv would not see its torch).
#
# Prints, in order: the card, the gpu-marked tests, the engine alone against the
# eager forward (batch 1, 8, 32), the load benchmark with hey (224² JPEG arrays
# and 1024² overlays at concurrency 1 to 128, with the engine's time per batch
# under load, after a timed warm-up of every batch size: cuDNN searches its
# algorithms once per new shape), then the same load with CUDA graphs (step graphs:
# GRADCAM_CUDA_GRAPHS=on, which also turns on the batch buckets); step autocast (not
# in the default set) runs the top concurrency with float16 autocast.
# Logs also go to $OUT (the device tool brings them back).
#
# Dry run on a CPU machine, to check the plumbing (not the figures):
#   PY=.venv/bin/python SKIP_INSTALL=1 DEVICE=cpu DURATION=3 REPEATS=2 BATCHES=1 \
#       CONCURRENCY="1 4" FORWARD_BATCH=2 bash tests/benchmarks/gpu_check.sh
# STEPS (default "tests engine load graphs"; also "autocast") runs only the steps named, e.g. a
# rerun of a failed one; BATCHES, CONCURRENCY and FORWARD_BATCH shrink a dry run.
# The steps' timeouts add up to 10 minutes (SIGINT, so that servers are stopped and
# their logs printed); the default steps usually take about 6.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
DURATION=${DURATION:-5}
OUT=${OUT:-/tmp/gpu-check}
STEPS=${STEPS:-tests engine load graphs}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
step() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1
started=$(date +%s)
elapsed() { echo "[$(($(date +%s) - started)) s] $*"; }

if [ -z "${SKIP_INSTALL:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -x .whl/hey/usr/bin/hey ] && export PATH="$PWD/.whl/hey/usr/bin:$PATH"
command -v hey >/dev/null || { echo "no hey: run tests/benchmarks/gpu_wheelhouse.sh"; exit 1; }

if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    top=128
else
    top=16
fi
CONCURRENCY=${CONCURRENCY:-1 32 64 $top}
top=${CONCURRENCY##* }
FORWARD_BATCH=${FORWARD_BATCH:-32}
$PY -c "import torch, gunicorn, pydantic, fpng, pydicom, highdicom, service.cli; \
from importlib.metadata import version; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'devices', torch.cuda.device_count(), '| flask', version('flask'), \
'gunicorn', gunicorn.__version__, 'highdicom', highdicom.__version__)" || exit 1

status=0
if step tests; then
    elapsed "gpu tests"
    timeout -s INT -k 15 200 $PY -m pytest -q -s -ra -m gpu tests/unit/engine/test_gpu.py tests/process/server/test_gpu.py \
        -p no:cacheprovider -o addopts="" --durations=5 2>&1 | tee "$OUT/test_gpu.log" || status=1
fi

if step engine; then
    elapsed "engine alone against the eager forward"
    # shellcheck disable=SC2086
    timeout -s INT -k 15 60 $PY tests/benchmarks/engine.py --device "$DEVICE" --archs resnet50 \
        --batches ${BATCHES:-1 8 32} --repeats "${REPEATS:-20}" --no-reference --threads 4 \
        2>&1 | tee "$OUT/engine.log" || status=1
fi

# The load benchmark with the flags every load step shares: run_load LOG LIMIT_S [FLAG ...].
run_load() {
    local log=$1 limit=$2
    shift 2
    timeout -s INT -k 15 "$limit" $PY tests/benchmarks/load.py --device "$DEVICE" --client hey \
        --skip-naive --duration "$DURATION" --max-batch-size 32 \
        --forward-batch "$FORWARD_BATCH" --torch-threads 4 --warm-up "$@" 2>&1 \
        | tee "$OUT/$log" || status=1
}

if step load; then
    elapsed "load: float32"
    # shellcheck disable=SC2086
    run_load load.log 170 --concurrency $CONCURRENCY --paired-repeats 1
fi

if [ "$DEVICE" = cuda ] && step graphs; then
    elapsed "load: float32, CUDA graphs"
    export GRADCAM_CUDA_GRAPHS=on  # the server inherits it
    # shellcheck disable=SC2086
    run_load load_graphs.log 170 --concurrency $CONCURRENCY --paired-repeats 0
    unset GRADCAM_CUDA_GRAPHS
fi

if [ "$DEVICE" = cuda ] && step autocast; then
    elapsed "load: float16 autocast"
    run_load load_autocast.log 110 --concurrency "$top" --paired-repeats 0 --autocast
fi
elapsed "done (status $status)"
exit $status
