#!/usr/bin/env bash
# Set up a virtual environment in .venv with the CPU build of PyTorch and everything sinstudy
# and its tests need. Idempotent: a second run only checks. GPU users: see README "GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
# torch first and pinned: a bare `torch` requirement would pull a several-GB CUDA build.
# A CUDA build already installed (GPU users) is kept.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==${SINSTUDY_TORCH:-2.13.0}" 2>&1 | grep -v '^WARNING: Location' || true
fi
python -m pip install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
python -c "import torch, optuna; print(f'sinstudy environment ready: torch {torch.__version__}, optuna {optuna.__version__}')"
