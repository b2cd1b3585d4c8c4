#!/usr/bin/env bash
# Install PyTorch into the environment of $PYTHON (default: python), choosing the build:
#   SINSTUDY_TORCH_BUILD=auto (default)  keep a torch that is installed; else the CUDA build where
#                                        nvidia-smi lists a GPU, the CPU build where it does not
#   SINSTUDY_TORCH_BUILD=cpu | cuda      that build, replacing an installed torch of the other one
#   SINSTUDY_TORCH=2.13.0                the version (inside pyproject.toml's tested range)
# The CPU build comes from PyTorch's own CPU wheel index (https://download.pytorch.org/whl/cpu, as
# PyTorch's install guide says), about 190 MB; PyPI's default torch wheel for Linux is the CUDA
# build (about 550 MB, plus several GB of NVIDIA libraries), so it is used for the CPU build only as
# the fallback when that index cannot be reached, with a notice. Where pip is set up with a local
# wheel folder holding the CPU wheel (these project's CI machines), the first attempt finds it there
# at once. Prints one line saying what is installed.
set -euo pipefail
PY=${PYTHON:-python}
VERSION=${SINSTUDY_TORCH:-2.13.0}
BUILD=${SINSTUDY_TORCH_BUILD:-auto}
CPU_INDEX=${SINSTUDY_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
INDEX_TIMEOUT_S=${SINSTUDY_TORCH_INDEX_TIMEOUT:-15}  # per network read; a dead index fails fast

case "$BUILD" in
  auto | cpu | cuda) ;;
  *)
    echo "install_torch: SINSTUDY_TORCH_BUILD=$BUILD is not a build; use auto, cpu or cuda" >&2
    exit 2
    ;;
esac

# "cpu 2.13.0+cpu" / "cuda 2.11.0+cu130", or nothing when torch does not import
installed() {
  "$PY" -c "import torch; print('cuda' if torch.version.cuda else 'cpu', torch.__version__)" \
    2>/dev/null || true
}

gpu_present() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '
}

# pip, quietly: its log is shown only when the install fails (a failed CPU-index attempt is
# followed by the fallback, so its log is not shown).
pip_install() {
  local log status=0
  log=$(mktemp)
  "$PY" -m pip install -q "$@" >"$log" 2>&1 || status=$?
  [ "$status" = 0 ] || [ -n "${QUIET_FAILURE:-}" ] || grep -v '^WARNING: Location' "$log" >&2
  rm -f "$log"
  return "$status"
}

now=$(installed)
want=$BUILD
if [ "$BUILD" = auto ]; then
  if [ -n "$now" ]; then
    echo "torch: keeping the installed ${now#* } (${now%% *} build)"
    exit 0
  fi
  if gpu_present; then want=cuda; else want=cpu; fi
elif [ -n "$now" ] && [ "${now%% *}" = "$BUILD" ]; then
  echo "torch: keeping the installed ${now#* } ($BUILD build)"
  exit 0
fi

if [ -n "$now" ]; then  # the other build: pip would take it as satisfying torch==VERSION
  echo "torch: replacing the installed ${now#* } (${now%% *} build) with the $want build"
  "$PY" -m pip uninstall -q -y torch >/dev/null
fi
if [ "$want" = cpu ]; then
  if ! QUIET_FAILURE=1 pip_install --index-url "$CPU_INDEX" --timeout "$INDEX_TIMEOUT_S" --retries 0 \
    "torch==$VERSION"; then
    echo "torch: PyTorch's CPU index ($CPU_INDEX) was not reachable; installing torch" \
      "$VERSION from the default index (on Linux that is the CUDA build, several GB)" >&2
    pip_install "torch==$VERSION"
  fi
else
  pip_install "torch==$VERSION"
fi
now=$(installed)
if [ -z "$now" ]; then
  echo "install_torch: torch $VERSION was installed but does not import; see pip's output" >&2
  exit 1
fi
echo "torch: installed ${now#* } (${now%% *} build)"
