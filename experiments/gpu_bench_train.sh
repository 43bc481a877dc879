#!/usr/bin/env bash
# GPU timing of the train step: ours against the authors' PyTorch H100 rates, and the Mamba
# models with each scan implementation.  On a machine with a CUDA GPU, from the repo root:
#
#   OUT=DIR bash experiments/gpu_bench_train.sh     (about 7.7 minutes at most)
#
# Needs jax with CUDA, flax, optax, orbax, absl, tqdm and ml-collections; without network access,
# put an ml-collections (and jax-triton) wheel in ./.whl/ first, e.g. on another machine:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       ml-collections==1.1.0 jax-triton==0.3.1
# Writes to $OUT: env.txt, compare_authors.md (+ .log), mamba.log.  Every stage has its own
# timeout and the script carries on past failures.  Record what it prints in kernels/NOTES.md
# (Mamba rows) and the README (train-step rates), with the card's name.
# SMOKE=1 shrinks every stage to seconds, to try the script on a CPU.
OUT_DEFAULT=/tmp/gpu_bench_train_out
. "$(dirname "$0")/../kernels/gpu_prologue.sh"
if [ "${SMOKE:-0}" = 1 ]; then
  COMPARE_ARGS="--models=resnet18_seg --batch_size=2 --image_size=32 --steps=1"
  MAMBA_ARGS="--config.batch_size=2 --config.data.synthetic.image_size=32 --steps=1"
else
  COMPARE_ARGS="--steps=20"
  MAMBA_ARGS="--steps=10"
fi

# Stage budgets in seconds; experiments/gpu_all.sh sets them from its total budget.
COMPARE_S=${COMPARE_S:-330} MAMBA_S=${MAMBA_S:-110}

stage "environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    || echo "no nvidia-smi"
  python3 -c "import sys, jax; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

stage "ours vs the authors' PyTorch H100 rates: 4 models x float32/bfloat16, batch 64, 256 px (<= $COMPARE_S s)"
# Rows are printed as they finish, so a timeout still leaves the finished ones in the log.
timeout $COMPARE_S python3 -m experiments.bench_train --compare_authors $COMPARE_ARGS \
  --out="$OUT/compare_authors.md" > "$OUT/compare_authors.log" 2>&1
echo "compare exit: $?" | tee -a "$OUT/compare_authors.log"
grep "^|" "$OUT/compare_authors.log"

stage "UMambaBot-PP, the authors' batch size, triton and chunked scans (<= $MAMBA_S s)"
# Total: ~20 + 330 + 110 s = ~7.7 minutes at worst.
{
  for impl in triton chunked; do
    timeout $(( MAMBA_S / 2 )) python3 -m experiments.bench_train --config=umambabot_pp \
      --config.scan_impl=$impl $MAMBA_ARGS || echo "umambabot_pp $impl FAILED ($?)"
  done
} > "$OUT/mamba.log" 2>&1
grep -v "^[IW][0-9]" "$OUT/mamba.log" | tail -20
stage "done"
