#!/usr/bin/env bash
# The GPU checks in one call (< 8 minutes on one H100/H200): the batched engine's equivalence
# tests on CUDA, the benchmark, and both README commands' study end to end on the GPU. Run on the
# device machine from the repo root, with .whl/ carried (scripts/gpu_wheels.sh fills it):
#   bash scripts/gpu_check.sh
# Each step has its own time limit; a failed step is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
status=0
step() { echo "== $1"; shift; "$@" || { echo "!! failed ($?): $*"; status=1; }; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, optuna; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'optuna', optuna.__version__)"
step "equivalence on cuda (per-epoch validation MSE vs train.py, 1e-4 relative; repeats: the mean of train.py's seeds)" \
  env SINSTUDY_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_batched.py tests/test_repeats.py -k "equivalence or mean_of_train_py or fixed_capacity"
step "the same on this image's torch, on the CPU (the private kernels the engine calls)" \
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_batched.py tests/test_repeats.py tests/test_train.py -k "equivalence or repeat or train"
step "raw engine (1,024 mixed models vs train.py, eager and as CUDA graphs), then a 1,000-trial study: batched, TPE + Hyperband, <= 200 epochs, SQLite" \
  timeout 170 python3 scripts/bench.py --device cuda --raw 1024 --space default --n-trials 1000 --max-epochs 200 --engines batched
step "the same study on fixed-capacity stacks, each stack's epoch one CUDA graph" \
  timeout 170 python3 scripts/bench.py --device cuda --raw 0 --space default --n-trials 1000 --max-epochs 200 --engines batched --stacks fixed
step "standard vs batched, same budget" \
  timeout 120 python3 scripts/bench.py --device cuda --raw 0 --n-trials 64 --max-epochs 30
tmp=$(mktemp -d)
step "sinstudy run + plot on the GPU (default device auto)" bash -c "cd $tmp && timeout 90 python3 -m study run --n-trials 40 --max-epochs 50 --no-progress && timeout 60 python3 -m study plot >/dev/null && ls storage/plots/sinstudy | wc -l"
exit $status
