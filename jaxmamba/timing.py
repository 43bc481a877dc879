"""Wall-clock timing of compiled JAX functions, shared by the benchmark scripts."""
from __future__ import annotations

import statistics
import time

import jax


def median_ms(fn, *args, repeats: int = 10) -> float:
  """Median milliseconds of `fn(*args)` over `repeats` calls after one warm-up call, each call
  including the device sync (so asynchronous dispatch is not mistaken for speed)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)
