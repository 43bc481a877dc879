"""Forward time of the seven UltraLight VM-UNet models per selective-scan implementation.

Batch 1 (by default), 256x256x3, jitted, one warm-up call, then the median of `--repeats` calls.
Prints a Markdown table (ms per forward; compile time in parentheses).

  python experiments/bench_models_ul.py                       # all seven, chunked and associative
  python experiments/bench_models_ul.py --models ulvmunet --impls chunked reference --repeats 10
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from jaxmamba import host_memory, timing
from jaxmamba.models import registry

UL_MODELS = [n for n in registry.names() if registry.entry(n).family == "ultralight"]


def bench(name: str, impls, size: int, batch: int, repeats: int) -> dict[str, tuple[float, float]]:
  """{impl: (median forward ms, compile s)} for model `name`."""
  x = jax.random.uniform(jax.random.key(1), (batch, size, size, 3))
  # Parameters do not depend on the input size or the scan implementation: initialise them once,
  # on a small input, so the timed function is the only big compile.
  model = registry.build(name)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  out = {}
  for impl in impls:
    fwd = jax.jit(registry.build(name, scan_impl=impl).apply)
    t0 = time.perf_counter()
    compiled = fwd.lower(variables, x).compile()
    compile_s = time.perf_counter() - t0
    out[impl] = (timing.median_ms(compiled, variables, x, repeats=repeats), compile_s)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=UL_MODELS, choices=UL_MODELS)
  parser.add_argument("--impls", nargs="+", default=["chunked", "associative"],
                      choices=["chunked", "associative", "reference", "triton"])
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch {args.batch}, "
        f"{args.size}x{args.size}x3, median of {args.repeats} after one warm-up\n")
  print("| model | params | " + " | ".join(f"{i} ms (compile s)" for i in args.impls) + " |")
  print("|---|---:|" + "---:|" * len(args.impls))
  for name in args.models:
    res = bench(name, args.impls, args.size, args.batch, args.repeats)
    cells = " | ".join(f"{res[i][0]:.1f} ({res[i][1]:.0f})" for i in args.impls)
    print(f"| {name} | {registry.entry(name).paper_params:,} | {cells} |", flush=True)


if __name__ == "__main__":
  host_memory.reexec()
  main()
