#!/usr/bin/env bash
# GPU checks, on a machine with a CUDA GPU and torch (2.11 or newer) but not the
# service's other dependencies: those come as wheels in ./wheels, made beforehand
# on a machine with an index:
#   pip download -d wheels flask gunicorn pydantic orjson safetensors tqdm \
#       prometheus-client pydicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg \
#       pylibjpeg-rle requests pytest pyyaml --python-version 3.<minor> --only-binary=:all:
# Then: bash tests/benchmarks/gpu_check.sh      (under 10 minutes on one H100/H200)
# It runs the tests marked gpu, then the load benchmark on CUDA with and without
# autocast, batches up to 32, and prints the figures for the README.
set -euo pipefail
cd "$(dirname "$0")/../.."

# A venv that sees the machine's torch and adds only the wheels.
python3 -m venv --system-site-packages /tmp/gradcam-gpu
/tmp/gradcam-gpu/bin/pip install --quiet --no-index --find-links wheels \
    flask gunicorn pydantic orjson safetensors tqdm prometheus-client pydicom pylibjpeg \
    pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle requests pytest pyyaml
# The package itself from the working tree (no build step needed).
export PYTHONPATH="$PWD"
PY=/tmp/gradcam-gpu/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

timeout 240 $PY -m pytest -q -s -m gpu tests/test_gpu.py

for autocast in "" "--autocast"; do
    timeout 150 $PY tests/benchmarks/load.py --device cuda $autocast --skip-naive \
        --duration 8 --concurrency 1 4 16 32 --threads 32 --max-batch-size 32 \
        --forward-batch 32 --torch-threads 4
done
