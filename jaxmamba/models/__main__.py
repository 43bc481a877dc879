"""Prints the model table: parameters, GFLOPs per 256x256 image, forward time on this machine.

  python -m jaxmamba.models [--models a,b] [--no-time] [--batch-size 1] [--repeats 10]

GFLOPs come from XLA's cost analysis of the compiled forward pass (256x256x3, per image): a
multiply-add counts as 2 FLOPs, and a loop's body is counted once, not once per iteration
(measured: a 10-step `fori_loop` of a matmul counts as one matmul).  Where the forward has a loop
(the Mamba and UltraLight models' chunked selective scan on a CPU) the figure is a lower bound and
printed as ">=".  Forward time
is the median over `--repeats` calls of the compiled forward after one warm-up call, batch 1,
including the device sync.  Models whose code is not there yet show "not available".
"""
from __future__ import annotations

import argparse
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxmamba import timing
from jaxmamba.models import registry

IMAGE_SHAPE = (256, 256, 3)


def count_params(shapes) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes.get("params", {}))))


def _flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per computation
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def measure(name: str, batch: int = 1, time_it: bool = True, repeats: int = 10) -> dict:
  """{"params", "gflops", "ms"} of one model (gflops per image; ms per batch)."""
  model = registry.build(name)
  x_spec = jax.ShapeDtypeStruct((batch,) + IMAGE_SHAPE, jnp.float32)
  shapes = jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.PRNGKey(0),
                          x_spec)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  compiled = forward.lower(shapes, x_spec).compile()
  flops = _flops(compiled)
  row = {"params": count_params(shapes), "gflops": None if flops is None else flops / batch / 1e9,
         "gflops_lower_bound": _has_loop(compiled), "ms": None}
  if time_it:
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(
        jax.random.PRNGKey(0), jnp.zeros(x_spec.shape))
    x = jax.random.uniform(jax.random.PRNGKey(1), x_spec.shape)
    row["ms"] = timing.median_ms(compiled, variables, x, repeats=repeats)
  return row


def _has_loop(compiled) -> bool:
  """Whether the compiled program runs a while loop, whose body XLA's cost analysis counts once."""
  return re.search(r"\swhile\(", compiled.as_text()) is not None


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def _fmt_gflops(row) -> str:
  if row["gflops"] is None:
    return _fmt(None, "8")
  return format((">=" if row["gflops_lower_bound"] else "") + format(row["gflops"], ".4g"), ">8")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxmamba.models", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default=None,
                      help=f"comma-separated subset of: {','.join(registry.names())}")
  parser.add_argument("--no-time", action="store_true", help="skip the forward timing")
  parser.add_argument("--batch-size", type=int, default=1, help="batch for the timing")
  parser.add_argument("--repeats", type=int, default=10, help="timed calls per model")
  args = parser.parse_args(argv)
  names = registry.names() if args.models is None else [
      n.strip() for n in args.models.split(",") if n.strip()]
  unknown = [n for n in names if n not in registry.names()]
  if unknown:
    print(f"models: error: unknown model(s) {', '.join(unknown)}; known: "
          f"{', '.join(registry.names())}", file=sys.stderr)
    return 1

  device = jax.devices()[0]
  print(f"# device: {device.platform} ({device.device_kind}); time = batch {args.batch_size}")
  header = f"{'model':<14} {'params':>12} {'paper':>12} {'GFLOPs':>8} {'fwd ms':>9}"
  print(header)
  print("-" * len(header))
  lower_bounds = False
  for name in names:
    paper = registry.entry(name).paper_params
    try:
      row = measure(name, args.batch_size, not args.no_time, args.repeats)
    except (ImportError, AttributeError) as e:
      print(f"{name:<14} {'not available':>12} {paper:>12,}   ({type(e).__name__}: {e})")
      continue
    mark = "" if row["params"] == paper else "  (!= paper)"
    lower_bounds |= row["gflops_lower_bound"]
    print(f"{name:<14} {row['params']:>12,} {paper:>12,} {_fmt_gflops(row)} "
          f"{_fmt(row['ms'], '9.1f')}{mark}", flush=True)
  if lower_bounds:
    print("# GFLOPs >=: the forward runs a loop (the selective scan's chunks), whose body XLA's "
          "cost analysis counts once: a lower bound")
  return 0


if __name__ == "__main__":
  sys.exit(main())
