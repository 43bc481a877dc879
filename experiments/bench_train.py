"""Time the jit-compiled train step of a Table I config on synthetic batches.

  python -m experiments.bench_train --config=umambabot_pp
  python -m experiments.bench_train --config=umambabot_pp --config.dtype=bfloat16
  python -m experiments.bench_train --config=ulvmunet --config.batch_size=16 --steps=20
  python -m experiments.bench_train --compare_authors [--out=FILE.md]
  python -m experiments.bench_train --compare_torch [--models=unet,umambabot_pp] [--out=FILE.md]
  python -m experiments.bench_train --compare_torch --models=unet --repeats=5

Uses the config's recipe (batch size, image size 256 or --config.data.synthetic.image_size,
dtype, scan_impl) on every visible device, but not its synthetic_run shrink and no real data;
prints compile time, seconds per step and images per second.

`--compare_authors` runs the harness behind the authors' PyTorch rates quoted in issue 7 (one
H100, batch 64, 256x256, pooled Dice loss + Adam, no DataParallel so BatchNorm over the whole
batch) for UNet, ResNet18/50-seg and SegFormer in float32 and bfloat16, and prints a Markdown
table with their images/s beside ours.  `--batch_size` and `--image_size` shrink it for a smoke
run; the ratio column is only meaningful on an H100 at the defaults.

`--compare_torch` times, in this process and at the same batch (default 4), size (256) and
thread count (all cores), the PyTorch versions in `third_party/torch_models` and ours, with the
same harness (float32, pooled Dice + Adam, BatchNorm over the whole batch; eval = forward in
inference mode), and prints train and eval images/s side by side plus a convolution
micro-benchmark (experiments/bench_torch.py; needs the test dependencies).  Each side runs in
a process of its own (its own heap, as for a user of either) and the two take turns step by
step, so a machine that slows down for a minute slows both.  `--repeats=N` runs each model's
comparison N times, each in fresh processes, and lists every run's ratios under the table: on a
shared 2-core machine one run's ratio moves by ~5-10% from run to run (kernels/NOTES.md), more
than between the steps of one run, so a single run cannot tell 0.97x from 1.03x.
"""
from __future__ import annotations

import functools
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments.bench_ours import authors_harness, step_fns
from experiments.configs import base
from jaxmamba import host_memory

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "config name or path", lock_config=True)
flags.DEFINE_integer("steps", 10, "timed steps (after one warm-up step that compiles)")
flags.DEFINE_bool("compare_authors", False, "time the four models of the authors' H100 rates")
flags.DEFINE_bool("compare_torch", False, "time the PyTorch models beside ours on this machine")
flags.DEFINE_bool("native_conv", False, "XLA's native convolutions, not jaxmamba.nn.conv's CPU "
                  "gradients (to time the difference)")
flags.DEFINE_integer("batch_size", None, "with --compare_*: batch (default 64 authors, 4 torch)")
flags.DEFINE_integer("image_size", 256, "with --compare_*: the image size")
flags.DEFINE_string("out", "", "with --compare_*: also write the table to this file")
flags.DEFINE_list("models", [], "with --compare_*: a subset of the models")
flags.DEFINE_integer("repeats", 1, "with --compare_torch: runs of each model's comparison, each "
                     "in fresh processes; the table gives their median and every run's ratios")

# --compare_torch's default models: the CNNs, the main job's model and two UltraLights.
TORCH_MODELS = ("unet", "resnet18_seg", "segformer", "umambabot_pp", "ulvmunet", "ulvmunet_v5")

# The authors' PyTorch training rates on one H100 (images/s; batch 64, 256x256, Dice + Adam,
# eager): float32, and bfloat16 autocast + channels_last.  Quoted in issue 7.
AUTHORS_H100 = {"unet": (545, 1415), "resnet18_seg": (3086, 4922),
                "resnet50_seg": (1203, 2335), "segformer": (539, 308)}


def bench(config, steps: int) -> dict:
  """Compile time, median seconds per train step and images/s of `config`'s train step."""
  facts, fns = step_fns(config)
  t0 = time.perf_counter()
  fns["train"]()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fns["train"]()
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  return dict(facts, compile_s=compile_s, step_s=step_s,
              images_per_s=facts["batch_size"] / step_s, loss=facts["loss"]())


def compare_authors(steps: int, batch_size: int, image_size: int, models=()) -> str:
  """Markdown table: our train-step images/s against the authors' PyTorch H100 rates."""
  unknown = set(models) - set(AUTHORS_H100)
  if unknown:
    raise ValueError(f"no authors' rate for {sorted(unknown)}; known: {', '.join(AUTHORS_H100)}")
  lines = ["| model | dtype | batch | px | compile s | ms/step | ours img/s | authors H100 img/s "
           "| ours / authors |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name, rates in AUTHORS_H100.items():
    if models and name not in models:
      continue
    for dtype, theirs in zip(("float32", "bfloat16"), rates):
      r = bench(authors_harness(name, dtype, batch_size, image_size), steps)
      lines.append(f"| {name} | {dtype} | {batch_size} | {image_size} | {r['compile_s']:.1f} | "
                   f"{r['step_s'] * 1e3:.1f} | {r['images_per_s']:.0f} | {theirs} | "
                   f"{r['images_per_s'] / theirs:.2f} |")
      print(lines[-1], flush=True)
  device = jax.devices()[0]
  lines.append(f"\n{len(jax.devices())} x {device.device_kind} ({device.platform}), "
               f"jax {jax.__version__}, median of {steps} steps after a compiling one.")
  return "\n".join(lines)


def compare_torch(steps: int, batch_size: int, image_size: int, models=(),
                  repeats: int = 1) -> str:
  """Markdown table: PyTorch and our train/eval images/s and their ratio per model (medians over
  `repeats` runs), then each run's ratios (when repeats > 1), then the conv rows."""
  import os

  from jaxmamba.models import registry
  unknown = set(models) - set(registry.names())
  if unknown:
    raise ValueError(f"unknown model(s) {sorted(unknown)}; known: {', '.join(registry.names())}")
  if repeats < 1:
    raise ValueError(f"--repeats must be at least 1, got {repeats}")
  import torch

  from jaxmamba.nn import conv as conv_lib
  threads = os.cpu_count()
  torch.set_num_threads(threads)
  lines = ["| model | PyTorch train img/s | ours | ours / PyTorch | PyTorch eval img/s | ours "
           "| ours / PyTorch |", "|---|---:|---:|---:|---:|---:|---:|"]
  by_run = ["", "| model | train ours / PyTorch, each run | eval ours / PyTorch, each run |",
            "|---|---|---|"]
  for name in models or TORCH_MODELS:
    runs = []
    for i in range(repeats):
      runs.append(_torch_and_ours_rates(name, steps, batch_size, image_size, threads,
                                        native_conv=not conv_lib.ENABLED))
      if repeats > 1:
        print(f"{name} run {i + 1}/{repeats}: " + ", ".join(
            f"{kind} {runs[-1]['ours', kind] / runs[-1]['torch', kind]:.2f}"
            for kind in ("train", "eval")), flush=True)
    rate = {key: float(np.median([run[key] for run in runs])) for key in runs[0]}
    cells = []
    for kind in ("train", "eval"):
      # the median of the runs' own ratios (each from steps that took turns); for one run, the
      # ratio of the two rates printed beside it
      ratio = np.median([run["ours", kind] / run["torch", kind] for run in runs])
      cells += [f"{rate['torch', kind]:.2f}", f"{rate['ours', kind]:.2f}", f"{ratio:.2f}"]
    lines.append(f"| {name} | {' | '.join(cells)} |")
    print(lines[-1], flush=True)
    by_run.append(f"| {name} | " + " | ".join(
        ", ".join(f"{run['ours', kind] / run['torch', kind]:.2f}" for run in runs)
        for kind in ("train", "eval")) + " |")
  if repeats > 1:
    lines += by_run
  lines += ["", "| convolution micro-benchmark | PyTorch ms | ours ms | PyTorch / ours |",
            "|---|---:|---:|---:|"]
  from experiments import bench_torch
  for what, t_ms, o_ms in bench_torch.conv_micro(batch_size, image_size, steps):
    lines.append(f"| {what} | {t_ms:.0f} | {o_ms:.0f} | {t_ms / o_ms:.2f} |")
    print(lines[-1], flush=True)
  convs = ("ours with XLA's native convolutions" if not conv_lib.ENABLED
           else "ours with jaxmamba.nn.conv's CPU paths")
  runs_note = (f"; each model compared in {repeats} runs of fresh processes, its rates and "
               f"ratios the medians over the runs" if repeats > 1 else "")
  lines.append(f"\n{convs}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
               f"{host_memory.describe()} (PyTorch's and ours, jaxmamba.host_memory); "
               f"batch {batch_size}, "
               f"{image_size}x{image_size}, float32, {threads} threads (torch {torch.__version__}, "
               f"jax {jax.__version__} on {jax.devices()[0].platform}); median of {steps} steps "
               f"after a warm-up one, PyTorch's and ours taking turns step by step (the models "
               f"each in a process of its own, the convolutions in this one){runs_note}; load "
               f"average at the end {os.getloadavg()[0]:.1f}.")
  return "\n".join(lines)


def _torch_and_ours_rates(name: str, steps: int, batch_size: int, image_size: int, threads: int,
                          native_conv: bool) -> dict:
  """{(side, kind): images/s} of one interleaved run, each side in a fresh worker process."""
  from experiments import bench_torch
  workers = [bench_torch.Worker(side, name, batch_size, image_size, threads,
                                native_conv=native_conv) for side in ("torch", "ours")]
  try:
    fns = {(side, kind): functools.partial(worker, kind)
           for side, worker in zip(("torch", "ours"), workers) for kind in ("train", "eval")}
    seconds = bench_torch.interleaved_medians(fns, steps)
  finally:
    for worker in workers:
      worker.close()
  return {key: batch_size / s for key, s in seconds.items()}


def main(argv):
  del argv
  if FLAGS.repeats != 1 and not FLAGS.compare_torch:
    sys.exit("error: --repeats is for --compare_torch")
  if FLAGS.native_conv:
    from jaxmamba.nn import conv
    conv.ENABLED = False
  if FLAGS.compare_torch or FLAGS.compare_authors:
    compare, default_batch = ((functools.partial(compare_torch, repeats=FLAGS.repeats), 4)
                              if FLAGS.compare_torch else (compare_authors, 64))
    try:
      table = compare(FLAGS.steps, FLAGS.batch_size or default_batch, FLAGS.image_size,
                      FLAGS.models)
    except ValueError as e:
      sys.exit(f"error: {e}")
    print(table)
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        f.write(table + "\n")
    return
  if _CONFIG.value is None:
    sys.exit("error: give --config=NAME or --compare_authors")
  r = bench(_CONFIG.value, FLAGS.steps)
  print(f"{r['model']}: batch {r['batch_size']} at {r['image_size']}px, {r['dtype']}, "
        f"{r['devices']} {r['platform']} device(s): first step (compile) {r['compile_s']:.1f} s, "
        f"{r['step_s'] * 1e3:.1f} ms/step (median), {r['images_per_s']:.1f} images/s")


if __name__ == "__main__":
  host_memory.reexec()
  try:
    argv, _ = base.resolve_argv(sys.argv)
  except ValueError as e:
    sys.exit(f"error: {e}")
  app.run(main, argv=argv)
