#!/usr/bin/env bash
# The GPU check in one call (about 5 minutes on one GPU):
#   bash bench/gpu_check.sh                       # on a machine with a CUDA GPU
#   bash bench/gpu_check.sh --device cpu --quick  # the same steps, small, on the CPU (< 4 min)
# Steps: pytest -m cuda (real CUDA tests), bench/data_path.py at 128x96 and 224x224 (resnet18, bf16,
# channels_last), a 6-trial hpo.run with --trials-per-gpu 2, export-best with its ONNX check. One
# table is printed and written to $OUT/gpu_check.md when $OUT is set (see bench/gpu_check.py).
#
# A GPU machine without the Optuna stack and without network: on a machine with the package index
# run `bash ../shared/tools/gpu-wheels.sh` (it fills .whl/ with wheels for Python 3.12), carry .whl
# along; this script installs them into /tmp/site when optuna is missing. PYTHON picks the
# interpreter (default: .venv/bin/python when present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
if ! "$python" -c "import optuna" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: optuna is missing and there is no .whl/ folder to install it from (see the header)" >&2
    exit 2
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # the project need not be installed
exec "$python" bench/gpu_check.py "$@"
