#!/usr/bin/env bash
# Set up a virtual environment in .venv with PyTorch (the CPU build where there is no NVIDIA GPU)
# and everything sinstudy and its tests need. Idempotent: a second run only checks. GPU users: see README "GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate

# pip, quietly: its own notices (a local index it cannot read, setuptools' editable-install
# warning box) are shown only when the install fails.
pipq() {
  local log
  log=$(mktemp)
  if ! python -m pip "$@" >"$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}

pipq install -q --upgrade pip
# torch first, the build chosen for this machine (scripts/install_torch.sh): a bare `torch`
# requirement would pull PyPI's several-GB CUDA build onto a machine without a GPU.
PYTHON=python bash scripts/install_torch.sh
pipq install -q -e ".[test]"
python -c "import torch, optuna; print(f'sinstudy environment ready: torch {torch.__version__}, optuna {optuna.__version__}')"
