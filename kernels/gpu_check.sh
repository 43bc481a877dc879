#!/usr/bin/env bash
# GPU check of the Triton selective scan, on a machine with a CUDA GPU, from the repo root:
#
#   OUT=DIR bash kernels/gpu_check.sh     (about 7.5 minutes at most with the default budgets)
#
# Without network access, put a jax-triton wheel in ./.whl/ first, e.g. on another machine:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl jax-triton==0.3.1
# Writes to $OUT (6 files): env.txt, tests.log, bench.log, bench_f32.md, sweep.log, sweep.md.
# Every stage has its own timeout and the script carries on past failures, so one run gives
# everything it can.  Needs neither ml-collections nor tensorflow-datasets.  SMOKE=1 shrinks
# the shapes so the script can be tried on a CPU-only machine.
OUT_DEFAULT=/tmp/gpu_check_out
. "$(dirname "$0")/../kernels/gpu_prologue.sh"
# jax preallocates 75% of the GPU by default; the bench's peak-memory column must not see that,
# and the reference/associative baselines need room.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

stage "environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 - <<'EOF'
import sys, jax, triton
print("python", sys.version.split()[0], "jax", jax.__version__, "triton", triton.__version__)
print("devices", jax.devices())
try:
  import jax_triton
  print("jax_triton", jax_triton.__version__ if hasattr(jax_triton, "__version__") else "?")
except Exception as e:
  print("jax_triton import FAILED:", type(e).__name__, e)
from jaxmamba.ops import triton_dispatch
print("triton_dispatch.available():", triton_dispatch.available(),
      triton_dispatch.unavailable_reason() or "")
EOF
} 2>&1 | tee "$OUT/env.txt"

# Stage budgets in seconds; experiments/gpu_all.sh sets them from its total budget.
TESTS_S=${TESTS_S:-170} BENCH_S=${BENCH_S:-220} SWEEP_S=${SWEEP_S:-150}
# The three calibration shapes of kernels/NOTES.md's prediction table (B,D,L,N).
CALIBRATION="64,32,4096,16 16,1024,256,16 4,2048,4096,16"
BENCH_SHAPES=""
if [ "${SMOKE:-0}" = 1 ]; then
  CALIBRATION="2,16,64,4"
  BENCH_SHAPES="--shapes 2,16,64,4"
fi

stage "GPU tests (tests/test_triton_gpu.py, <= $TESTS_S s)"
timeout $TESTS_S python3 -m pytest -q --maxfail=6 --no-header -p no:cacheprovider -m gpu \
  tests/test_triton_gpu.py -rA 2>&1 | tee "$OUT/tests.log" | grep -v "^PASSED" | tail -40
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"

stage "bench, float32, default GPU shapes: triton, chunked(64), associative (<= $BENCH_S s)"
timeout $BENCH_S python3 -m kernels.bench --mode gpu --budget-s $(( BENCH_S * 3 / 4 )) $BENCH_SHAPES \
  --out "$OUT/bench_f32.md" > "$OUT/bench.log" 2>&1
echo "bench exit: $?" | tee -a "$OUT/bench.log"
tail -30 "$OUT/bench.log"

stage "triton launch-configuration sweep (BLOCK_D x CHUNK x num_warps) and bfloat16 (<= $SWEEP_S s)"
# Each configuration compiles the six kernels anew; the bench stops starting configurations when
# its budget is spent and picks the default among those that finished every shape.  The picked
# configuration goes into kernels/launch_plan.py's DEFAULT_CONFIG by hand, with the numbers.
{
  timeout $(( SWEEP_S * 3 / 4 )) python3 -m kernels.bench --mode gpu --impls triton --triton-configs sweep \
    --shapes $CALIBRATION --repeats 3 --budget-s $(( SWEEP_S * 5 / 8 ))
  echo "sweep exit: $?"
  timeout $(( SWEEP_S / 4 )) python3 -m kernels.bench --mode gpu --impls triton --dtype bfloat16 \
    --shapes $CALIBRATION --repeats 3
  echo "bf16 exit: $?"
} > "$OUT/sweep.log" 2>&1
grep "^|\|^config pick" "$OUT/sweep.log" | sort -u > "$OUT/sweep.md"
tail -20 "$OUT/sweep.log"
stage "done"
