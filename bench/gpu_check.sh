#!/usr/bin/env bash
# The GPU check in one device call (at most 480 s on one GPU, by construction: every step has its
# own budget; a step that runs out is marked so and the others still run):
#   bash bench/gpu_check.sh [--out DIR]                       # on a machine with a CUDA GPU
#   bash bench/gpu_check.sh --device cpu --quick --out DIR    # every step's code path on the CPU
# DIR (default $OUT, else runs/gpu-check) receives each step's log and the result table as they
# are written, so a call cut off still returns what was done. The steps: bench/gpu_check.py.
#
# A GPU machine without the Optuna stack and without network: on a machine with the package index
# run `bash ../shared/tools/gpu-wheels.sh` (it reads bench/gpu-wheels.txt and fills .whl/), carry
# .whl along; this script installs them into /tmp/site when optuna is missing. PYTHON picks the
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
