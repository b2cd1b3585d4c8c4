#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that the GPU machine lacks (its image has torch,
# numpy, matplotlib, scikit-learn, tensorboard, tqdm, pytest, but not Optuna and friends) into
# .whl/ (git-ignored), for scripts/gpu_check.sh. Python 3.12, x86-64 manylinux.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for spec in optuna==5.0.0 optuna-dashboard==0.21.0 alembic mako colorlog sqlalchemy greenlet bottle plotly; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$spec"
done
ls .whl
