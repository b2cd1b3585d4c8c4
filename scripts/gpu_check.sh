#!/usr/bin/env bash
# The GPU checks in one call (< 5 minutes on one H100/H200): the batched engine's equivalence
# tests on CUDA, then the benchmark. Run on the device machine from the repo root, with .whl/
# carried (scripts/gpu_wheels.sh fills it):  bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
echo "== equivalence on cuda (per-epoch validation MSE vs train.py, 1e-4 relative)"
SINSTUDY_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_batched.py -k equivalence
echo "== raw engine (1,024 mixed models vs train.py), then a 1,000-trial study: batched, TPE + Hyperband, <= 200 epochs, SQLite"
timeout 170 python3 scripts/bench.py --device cuda --raw 1024 --space default --n-trials 1000 --max-epochs 200 --engines batched
echo "== standard vs batched, same budget"
timeout 130 python3 scripts/bench.py --device cuda --raw 0 --n-trials 64 --max-epochs 30
