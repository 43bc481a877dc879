#!/usr/bin/env bash
# One-shot GPU check of the Triton selective scan (run once, from the repo root, on the device
# machine: Python 3.12, jax 0.11.2 + CUDA 13, triton 3.6.0, torch; no jax-triton, no internet).
#
#   carry: .whl   (jax_triton-0.3.1-py3-none-any.whl, fetched on the CPU machine with
#                  pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl jax-triton==0.3.1)
#   run:   bash kernels/gpu_check.sh          (timeout_s 540; it budgets itself to ~7.5 minutes)
#
# Writes to $OUT (6 files): env.txt, tests.log, bench.log, bench_f32.md, sweep.log, sweep.md.
# Every stage has its own timeout and the script carries on past failures, so one run gives
# everything it can.  Needs neither ml-collections nor tensorflow-datasets.
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
print("triton_dispatch.available():", triton_dispatch.available())
EOF
} 2>&1 | tee "$OUT/env.txt"

# Stage budgets in seconds; experiments/gpu_all.sh shrinks them to run both device scripts at once.
TESTS_S=${TESTS_S:-170} BENCH_S=${BENCH_S:-220} SWEEP_S=${SWEEP_S:-80}

stage "GPU tests (tests/test_triton_gpu.py, <= $TESTS_S s)"
timeout $TESTS_S python3 -m pytest -q --maxfail=6 --no-header -p no:cacheprovider -m gpu \
  tests/test_triton_gpu.py -rA 2>&1 | tee "$OUT/tests.log" | grep -v "^PASSED" | tail -40
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"

stage "bench, float32, default GPU shapes: triton, chunked(64), associative (<= $BENCH_S s)"
timeout $BENCH_S python3 -m kernels.bench --mode gpu --budget-s $(( BENCH_S * 3 / 4 )) --out "$OUT/bench_f32.md" \
  > "$OUT/bench.log" 2>&1
echo "bench exit: $?" | tee -a "$OUT/bench.log"
tail -30 "$OUT/bench.log"

stage "triton CHUNK sweep (32, 128) and bfloat16 on the three calibration shapes (<= $SWEEP_S s)"
# Total: ~10 + 170 + 220 + 80 s = ~8 minutes at worst (defaults).
{
  timeout $(( SWEEP_S * 9 / 16 )) python3 -m kernels.bench --mode gpu --impls triton --triton-chunks 32,128 \
    --shapes 64,32,4096,16 16,1024,256,16 4,2048,4096,16 --repeats 3
  echo "sweep exit: $?"
  timeout $(( SWEEP_S * 7 / 16 )) python3 -m kernels.bench --mode gpu --impls triton --dtype bfloat16 \
    --shapes 64,32,4096,16 16,1024,256,16 4,2048,4096,16 --repeats 3
  echo "bf16 exit: $?"
} > "$OUT/sweep.log" 2>&1
grep "^|" "$OUT/sweep.log" | sort -u > "$OUT/sweep.md"
tail -20 "$OUT/sweep.log"
stage "done"
