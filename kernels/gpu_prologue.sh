# Sourced by the GPU scripts (kernels/gpu_check.sh, experiments/gpu_bench_train.sh): $OUT, the
# repo root as the working folder, a `stage` timer, and any wheels in ./.whl/ (fetched elsewhere
# with `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl ...`, for a
# GPU machine without network access) installed under /tmp/site.
# Usage: OUT_DEFAULT=/tmp/NAME_out; . "$(dirname "$0")/../kernels/gpu_prologue.sh"
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-$OUT_DEFAULT}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
T0=$(date +%s)
stage() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }

stage "install the wheels in .whl/ (if any)"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || echo "wheel install FAILED"
fi
export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
