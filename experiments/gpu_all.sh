#!/usr/bin/env bash
# Every GPU measurement the project has prepared, in one command on a machine with a CUDA GPU:
# kernels/gpu_check.sh (the Triton GPU tests, the kernel benchmark against associative and
# chunked, the launch-configuration sweep that picks the default by measurement) and then
# experiments/gpu_bench_train.sh (train-step rates against the authors' H100 rates).
#
#   OUT=DIR BUDGET_S=540 bash experiments/gpu_all.sh      (or: bash experiments/gpu_all.sh DIR 540)
#
#   OUT       output folder (default ./gpu_out); it gets at most 8 files:
#             kernel/{env.txt, tests.log, bench.log, sweep.log},
#             train/{env.txt, compare_authors.md, compare_authors.log, mamba.log}
#   BUDGET_S  wall-clock budget in seconds (default 540 = 9 minutes); every stage has its own
#             share and timeout, and the script carries on past a failed stage
#   SMOKE=1   shrinks every stage to seconds, to try the script on a CPU-only machine
#
# Software it expects (see kernels/NOTES.md): Python >= 3.11, jax with CUDA, triton, flax, optax,
# orbax, absl, tqdm; wheels of what the machine lacks (jax-triton, ml-collections) may be put in
# ./.whl/ beforehand (kernels/gpu_prologue.sh installs them; nothing is downloaded).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-${OUT:-$ROOT/gpu_out}}
BUDGET_S=${2:-${BUDGET_S:-540}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
share() { echo $(( BUDGET_S * $1 / 1000 )); }   # per-mille of the budget, in seconds
# Shares (per mille): ~4% set-up and environment twice, tests 11%, bench 15%, sweep 20%,
# train-step comparison 36%, UMambaBot-PP scans 11%; the stage timeouts add up to 93%.
OUT=$OUT/kernel TESTS_S=$(share 110) BENCH_S=$(share 150) SWEEP_S=$(share 200) \
  bash "$ROOT/kernels/gpu_check.sh"
# Their tables are also at the end of bench.log and sweep.log: drop them to stay within 8 files.
rm -f "$OUT/kernel/bench_f32.md" "$OUT/kernel/sweep.md"
OUT=$OUT/train COMPARE_S=$(share 360) MAMBA_S=$(share 110) \
  bash "$ROOT/experiments/gpu_bench_train.sh"
echo "files under $OUT:"; (cd "$OUT" && find . -type f | sort)
