#!/usr/bin/env bash
# Both one-shot device scripts in one command, for a session whose 15 device minutes (machine
# start included) cannot hold two ~8-minute calls: kernels/gpu_check.sh (Triton correctness and
# speed) then experiments/gpu_bench_train.sh (train-step rates against the authors' H100 rates),
# each with shrunken stage budgets.
#
#   carry: .whl   (jax_triton 0.3.1 and ml_collections 1.1.0 py3 wheels; see the two scripts)
#   run:   bash experiments/gpu_all.sh        (timeout_s 580; it budgets itself to ~9 minutes)
#
# $OUT gets at most 8 files (the device tool's limit): kernel/{env.txt, tests.log, bench.log,
# sweep.log} and train/{env.txt, compare_authors.md, compare_authors.log, mamba.log}.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/gpu_all_out}
# 15 s + 90 + 100 + 32 = ~240 s for the kernel check; 15 s + 230 + 70 = ~315 s for the train bench.
OUT=$OUT/kernel TESTS_S=90 BENCH_S=100 SWEEP_S=32 bash "$ROOT/kernels/gpu_check.sh"
# Their tables are also at the end of bench.log and sweep.log: drop them to stay within 8 files.
rm -f "$OUT/kernel/bench_f32.md" "$OUT/kernel/sweep.md"
OUT=$OUT/train COMPARE_S=230 MAMBA_S=70 bash "$ROOT/experiments/gpu_bench_train.sh"
