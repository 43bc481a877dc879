"""Input-pipeline throughput: slices/s of 256x256x3 uint8 batches after the first epoch.

  python -m experiments.bench_data                      # synthetic source
  python -m experiments.bench_data --dir /path/kaggle_3m --tfds_dir /tmp/tfds

Prints the time of the first pass (load / generate / TFDS build + decode into memory), then the
steady-state rate of `data.batches` over later epochs, as numpy batches and as global jax.Arrays
sharded over the local devices with NamedSharding(mesh, P("data")).
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmamba import data


def _rate(slice_set, batch_size, min_slices, sharding=None) -> tuple[float, float, int]:
  """(slices per wall-clock second, per CPU second of this process, slices) over whole epochs
  from epoch 1 on, until min_slices were yielded.  The CPU-second rate is what one free core
  would sustain; it is the fairer number when other jobs share the machine.
  """
  seen, epoch = 0, 1
  start, cpu_start = time.perf_counter(), time.process_time()
  while seen < min_slices:
    for batch in data.batches(slice_set, batch_size, shuffle=True, seed=0, epoch=epoch,
                              sharding=sharding):
      if sharding is not None:
        batch["image"].block_until_ready()
        batch["mask"].block_until_ready()
      seen += batch["image"].shape[0]
    epoch += 1
  return (seen / (time.perf_counter() - start), seen / (time.process_time() - cpu_start), seen)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default="", help="kaggle_3m folder; empty = synthetic source")
  parser.add_argument("--tfds_dir", default=data.default_config().tfds_dir)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--patients", type=int, default=24, help="synthetic pseudo-patients")
  parser.add_argument("--min_slices", type=int, default=20_000, help="slices to time")
  args = parser.parse_args(argv)

  cfg = data.default_config()
  cfg.dir, cfg.tfds_dir = args.dir, args.tfds_dir
  cfg.synthetic.num_patients = args.patients
  start = time.perf_counter()
  train = data.load_splits(cfg).train
  first = time.perf_counter() - start
  for _ in data.batches(train, args.batch_size, epoch=0):   # epoch 0: warm caches
    pass
  print(f"source: {args.dir or 'synthetic'}; train split {len(train)} slices "
        f"{train.images.shape[1:]}; first pass (load + split) {first:.2f} s")

  print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
  rate, cpu_rate, seen = _rate(train, args.batch_size, args.min_slices)
  print(f"numpy uint8 batches of {args.batch_size}: {rate:,.0f} slices/s wall, "
        f"{cpu_rate:,.0f} slices per CPU-s ({seen} slices)")
  devices = np.array(jax.devices())
  batch = args.batch_size - args.batch_size % len(devices)
  sharding = NamedSharding(Mesh(devices, ("data",)), P("data"))
  rate, cpu_rate, seen = _rate(train, batch, args.min_slices, sharding)
  print(f"sharded jax.Array batches of {batch} over {len(devices)} {devices[0].platform} "
        f"device(s): {rate:,.0f} slices/s wall, {cpu_rate:,.0f} slices per CPU-s "
        f"({seen} slices)")


if __name__ == "__main__":
  main()
