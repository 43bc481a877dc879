"""Time the jit-compiled train step of a Table I config on synthetic batches.

  python -m experiments.bench_train --config=umambabot_pp
  python -m experiments.bench_train --config=umambabot_pp --config.dtype=bfloat16
  python -m experiments.bench_train --config=ulvmunet --config.batch_size=16 --steps=20

Uses the config's recipe (batch size, image size 256 or --config.data.synthetic.image_size,
dtype, scan_impl) on every visible device, but not its synthetic_run shrink and no real data;
prints compile time, seconds per step and images per second.
"""
from __future__ import annotations

import math
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments.configs import base

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "config name or path", lock_config=True)
flags.DEFINE_integer("steps", 10, "timed steps (after one warm-up step that compiles)")


def bench(config, steps: int) -> dict:
  from jaxmamba import data
  from jaxmamba.train import recipe, trainer
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.dir = ""
    config.synthetic_run.enabled = False
    config.data.split = "patient"
    # Just enough synthetic slices for one training batch (patient split keeps ~80% for train).
    config.data.synthetic.num_patients = 10
    config.data.synthetic.slices_per_patient = max(2, math.ceil(config.batch_size / 8) + 1)
  config = recipe.resolve_config(config)
  setup = trainer._Setup(config, workdir=None)
  batch = next(iter(data.batches(setup.splits.train, config.batch_size, shuffle=False,
                                 sharding=setup.batch_sharding)))
  state = setup.state
  t0 = time.perf_counter()
  state, stats = setup.train_step(state, batch)
  jax.block_until_ready(stats)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, stats = setup.train_step(state, batch)
    jax.block_until_ready(stats)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  return {"model": config.model, "devices": setup.num_devices,
          "platform": setup.devices[0].platform, "dtype": config.dtype,
          "batch_size": config.batch_size, "image_size": setup.train_size,
          "compile_s": compile_s, "step_s": step_s, "images_per_s": config.batch_size / step_s,
          "loss": float(stats["loss"])}


def main(argv):
  del argv
  r = bench(_CONFIG.value, FLAGS.steps)
  print(f"{r['model']}: batch {r['batch_size']} at {r['image_size']}px, {r['dtype']}, "
        f"{r['devices']} {r['platform']} device(s): first step (compile) {r['compile_s']:.1f} s, "
        f"{r['step_s'] * 1e3:.1f} ms/step (median), {r['images_per_s']:.1f} images/s")


if __name__ == "__main__":
  try:
    argv, _ = base.resolve_argv(sys.argv)
  except ValueError as e:
    sys.exit(f"error: {e}")
  app.run(main, argv=argv)
