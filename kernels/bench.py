"""Selective-scan benchmark: `python -m kernels.bench [--mode cpu|gpu] [--impls ...] [--shapes ..]`.

For every implementation and shape (batch, dim, L, N) it measures, float32 by default:
  fwd ms       y = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)
  fwd+bwd ms   value and gradient of sum(y) w.r.t. all eight inputs
  GB/s         the minimum bytes (each input read once, each output written once; A, D and
               delta_bias ignored) over the time
  % floor      the floor time (minimum bytes at the copy bandwidth measured in the same run: XLA
               `a * 2` over a large donated array, read + write) over the time
  temp MiB     XLA's compiled memory_analysis() of the jitted fwd+bwd: scratch beyond its
               arguments and outputs (the same method on CPU and GPU; for impl="triton" it
               counts the chunk states and partial sums the kernels use)

Inputs rotate among up to 8 buffer sets (aiming at 256 MiB in all on the GPU, more than its L2)
so small shapes are not timed out of L2.  Implementations: triton (GPU), chunked (once per
--chunks size), associative, reference (small shapes only).
Rows run implementation by implementation; --budget-s stops starting new ones after a time.
Prints a Markdown table; --out FILE also writes it.
"""
from __future__ import annotations

import argparse
import importlib
import math
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from kernels import launch_plan as LP

# The module itself (the package exports the function under the same name).
ss = importlib.import_module("jaxmamba.ops.selective_scan")

GPU_SHAPES = [
    (64, 32, 4096, 16), (16, 1024, 256, 16), (4, 2048, 4096, 16), (8, 2048, 2048, 16),
    (32, 16, 1024, 16),
    # UltraLight PVM scans at batch 16 (models-ultralight.md section 5: batch x k, di, L, 16)
    (64, 16, 4096, 16),    # v1 enc3 (k=4, L=64^2)
    (64, 32, 1024, 16),    # v1 enc4 / dec3
    (128, 16, 1024, 16),   # v4-v6 enc4 (k=8)
    (64, 128, 256, 16),    # v1 dec1
    (128, 128, 64, 16),    # v4-v6 dec1
    (64, 12, 1024, 16),    # UL enc4
]
CPU_SHAPES = [(2, 64, 4096, 16), (16, 1024, 256, 16), (4, 32, 256, 16), (16, 16, 64, 16)]
GPU_IMPLS = "triton,chunked,associative"
CPU_IMPLS = "chunked,associative,reference"
GPU_CHUNKS = "64"
CPU_CHUNKS = "16,32,64,128,256"
REFERENCE_MAX_UPDATES = 2 ** 21   # batch*dim*L*N above which reference (a lax.scan) is skipped
ROTATE_BYTES = {"gpu": 256 << 20, "cpu": 16 << 20}
MAX_SAMPLING_S = {"gpu": 3.0, "cpu": 4.0}


def parse_shape(text):
  parts = [int(p) for p in text.lower().replace("x", ",").split(",") if p]
  if len(parts) != 4 or min(parts) < 1:
    raise argparse.ArgumentTypeError(f"a shape is B,D,L,N (or BxDxLxN), got {text!r}")
  return tuple(parts)


def make_inputs(key, shape, dtype):
  batch, dim, length, nstate = shape
  ks = jax.random.split(key, 8)
  n = jax.random.normal
  return (n(ks[0], (batch, dim, length), dtype), (0.5 * n(ks[1], (batch, dim, length)) - 1.0
                                                  ).astype(dtype),
          -jnp.exp(0.5 * n(ks[2], (dim, nstate))), n(ks[3], (batch, nstate, length), dtype),
          n(ks[4], (batch, nstate, length), dtype), n(ks[5], (dim,)),
          n(ks[6], (batch, dim, length), dtype), 0.3 * n(ks[7], (dim,)))


def min_bytes(shape, dtype):
  """(forward, forward+backward) minimum bytes: u, delta, z (b,d,L) and B, C (b,N,L) in, y out;
  the backward adds dy in and du, ddelta, dz, dB, dC out."""
  batch, dim, length, nstate = shape
  size = jnp.dtype(dtype).itemsize
  row, bc = batch * dim * length * size, batch * nstate * length * size
  fwd = 4 * row + 2 * bc
  return fwd, fwd + 4 * row + 2 * bc


def copy_bandwidth(mode):
  """Bytes read + written per second by XLA's a * 2 over a large float32 array (donated, so the
  output reuses the input's memory: on the CPU a fresh 128 MiB output costs page faults that
  would otherwise dominate)."""
  n = (256 << 20) if mode == "gpu" else (32 << 20)
  f = jax.jit(lambda x: x * 2, donate_argnums=0)
  a = f(jnp.ones((n,), jnp.float32))
  times = []
  for _ in range(10 if mode == "gpu" else 5):
    t0 = time.perf_counter()
    a = f(a)
    a.block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * 4 * n / min(times)


def time_fn(fn, input_sets, repeats, mode):
  """Median seconds per call, cycling through the input sets (compiled first).  Stops sampling
  once a few seconds are spent (slow CPU rows get one or two samples)."""
  jax.block_until_ready(fn(*input_sets[0]))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*input_sets[1 % len(input_sets)]))
  once = time.perf_counter() - t0
  samples = [once]
  # Enough calls per sample to outlast timer and dispatch noise (~50 ms); on the GPU also at least
  # one per input set, so the sets rotate through L2.
  per = max(len(input_sets) if mode == "gpu" else 1,
            min(50 if mode == "gpu" else 20, math.ceil(0.05 / max(once, 1e-6))))
  if per > 1:
    samples = []
  start = time.perf_counter()
  while len(samples) < repeats and time.perf_counter() - start < MAX_SAMPLING_S[mode]:
    t0 = time.perf_counter()
    outs = [fn(*input_sets[i % len(input_sets)]) for i in range(per)]
    jax.block_until_ready(outs)
    samples.append((time.perf_counter() - t0) / per)
  return statistics.median(samples)


def build(impl, chunk):
  kw = dict(delta_softplus=True, impl=impl)
  if impl == "chunked":
    kw["chunk_size"] = chunk

  def fwd(*a):
    return ss.selective_scan(*a, **kw)

  def fwd_bwd(*a):
    return jax.value_and_grad(lambda *b: jnp.sum(fwd(*b).astype(jnp.float32)),
                              argnums=tuple(range(8)))(*a)
  return jax.jit(fwd), jax.jit(fwd_bwd)


def temp_mib(jitted, args):
  try:
    analysis = jitted.lower(*args).compile().memory_analysis()
    return analysis.temp_size_in_bytes / 2 ** 20
  except Exception:  # noqa: BLE001  (not every backend reports it)
    return float("nan")


def parse_config(text):
  """BLOCK_D x CHUNK x num_warps, e.g. 16x64x4."""
  parts = [int(p) for p in text.lower().split("x") if p]
  if len(parts) != 3 or min(parts) < 1:
    raise argparse.ArgumentTypeError(f"a Triton config is BLOCK_DxCHUNKxWARPS, got {text!r}")
  return tuple(parts)


def config_name(config):
  return "x".join(map(str, config))


def run(mode, impls, shapes, chunks, triton_configs, dtype, repeats, budget_s=None, log=print):
  """Rows (impl, shape, fwd ms, fwd GB/s, fwd floor fraction, fwd+bwd ms, its floor fraction,
  temp MiB); implementation-major, so a time budget cuts the baselines, not the first impl."""
  bandwidth = copy_bandwidth(mode)
  log(f"copy bandwidth (XLA a*2, read+write): {bandwidth / 1e9:.1f} GB/s")
  start = time.perf_counter()
  rows = []
  for impl in impls:
    sizes = chunks if impl == "chunked" else triton_configs if impl == "triton" else [None]
    for chunk in sizes:
      name = (f"{impl}({config_name(chunk)})" if impl == "triton"
              else f"{impl}({chunk})" if chunk else impl)
      for shape in shapes:
        if impl == "reference" and math.prod(shape) > REFERENCE_MAX_UPDATES:
          continue
        if budget_s is not None and time.perf_counter() - start > budget_s:
          log(f"{name} {shape}: skipped (time budget {budget_s} s spent)")
          continue
        rows.append(measure(mode, impl, chunk, name, shape, dtype, repeats, bandwidth, log))
  return bandwidth, rows


def measure(mode, impl, chunk, name, shape, dtype, repeats, bandwidth, log):
  fwd_bytes, fb_bytes = min_bytes(shape, dtype)
  nsets = max(2, min(8, math.ceil(ROTATE_BYTES[mode] / fwd_bytes)))
  try:
    input_sets = [make_inputs(jax.random.PRNGKey(i), shape, dtype) for i in range(nsets)]
    if impl == "triton":
      from jaxmamba.ops import triton_dispatch  # noqa: PLC0415
      triton_dispatch.BLOCK_D, triton_dispatch.CHUNK, triton_dispatch.NUM_WARPS = chunk
    fwd, fwd_bwd = build(impl, chunk)
    t_f = time_fn(fwd, input_sets, repeats, mode)
    t_fb = time_fn(fwd_bwd, input_sets, repeats, mode)
    mem = temp_mib(fwd_bwd, input_sets[0])
  except Exception as e:  # noqa: BLE001  (one failure must not lose the other rows)
    log(f"{name} {shape}: FAILED {type(e).__name__}: {str(e)[:300]}")
    return (name, shape, None, None, None, None, None, None)
  row = (name, shape, t_f * 1e3, fwd_bytes / t_f / 1e9, fwd_bytes / bandwidth / t_f,
         t_fb * 1e3, fb_bytes / bandwidth / t_fb, mem)
  log(format_row(row))
  return row


def format_row(row):
  name, shape, t_f, gbs, frac_f, t_fb, frac_fb, mem = row
  cells = [name, "x".join(map(str, shape))]
  if t_f is None:
    return "| " + " | ".join(cells + ["failed"] * 6) + " |"
  cells += [f"{t_f:.3f}", f"{gbs:.3g}", f"{100 * frac_f:.1f}%", f"{t_fb:.3f}",
            f"{100 * frac_fb:.1f}%", f"{mem:.1f}"]
  return "| " + " | ".join(cells) + " |"


def table(rows):
  head = ("| impl | B x D x L x N | fwd ms | fwd GB/s | fwd % floor | fwd+bwd ms | fwd+bwd % floor "
          "| temp MiB |\n|---|---|---|---|---|---|---|---|")
  return "\n".join([head] + [format_row(r) for r in rows])


def pick_config(rows, configs):
  """The Triton config with the lowest geometric-mean fwd+bwd time over the shapes that every
  config with a full set of rows finished, against the default's (a Markdown line)."""
  times = {}
  for row in rows:
    name, shape, t_fb = row[0], row[1], row[5]
    if t_fb is not None and name.startswith("triton("):
      times.setdefault(name[len("triton("):-1], {})[shape] = t_fb
  shapes = set().union(*times.values()) if times else set()
  full = [config_name(c) for c in configs if set(times.get(config_name(c), {})) == shapes]
  partial = [config_name(c) for c in configs if config_name(c) not in full]
  if not shapes or not full:
    return "config pick: no configuration finished every shape"
  geo = {n: math.exp(statistics.fmean(math.log(times[n][s]) for s in shapes)) for n in full}
  best = min(geo, key=geo.get)
  default = config_name(LP.DEFAULT_CONFIG)
  versus = (f"; default {default}: {geo[default] / geo[best]:.2f}x the best"
            if default in geo else "")
  ranking = ", ".join(f"{n} {geo[n]:.3f} ms" for n in sorted(geo, key=geo.get))
  left_out = f"; not every shape finished (left out): {', '.join(partial)}" if partial else ""
  return (f"config pick (geometric-mean fwd+bwd ms over {len(shapes)} shapes, "
          f"BLOCK_DxCHUNKxWARPS): **{best}**{versus}. All: {ranking}{left_out}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mode", choices=("cpu", "gpu"),
                 default="gpu" if jax.default_backend() == "gpu" else "cpu")
  p.add_argument("--impls", help=f"comma list (gpu: {GPU_IMPLS}; cpu: {CPU_IMPLS})")
  p.add_argument("--shapes", nargs="+", type=parse_shape, help="B,D,L,N ...")
  p.add_argument("--chunks", help=f"chunk sizes for chunked (gpu: {GPU_CHUNKS}; cpu: {CPU_CHUNKS})")
  p.add_argument("--triton-configs", default="default",
                 help="Triton launch configurations BLOCK_DxCHUNKxWARPS (comma list), 'default' "
                 f"({config_name(LP.DEFAULT_CONFIG)}) or 'sweep' (kernels/launch_plan.py's "
                 "SWEEP_CONFIGS; then the config with the lowest geometric-mean fwd+bwd time "
                 "is reported)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--budget-s", type=float, help="stop starting new rows after this many seconds")
  p.add_argument("--out", help="also write the Markdown table here")
  args = p.parse_args(argv)
  gpu = args.mode == "gpu"
  impls = (args.impls or (GPU_IMPLS if gpu else CPU_IMPLS)).split(",")
  unknown = [i for i in impls if i not in ss.IMPLS or i == "auto"]
  if unknown:
    p.error(f"unknown impls {unknown}; choose from {ss.IMPLS[1:]}")
  chunks = [int(c) for c in (args.chunks or (GPU_CHUNKS if gpu else CPU_CHUNKS)).split(",")]
  triton_configs = ([LP.DEFAULT_CONFIG] if args.triton_configs == "default"
                    else list(LP.SWEEP_CONFIGS) if args.triton_configs == "sweep"
                    else [parse_config(c) for c in args.triton_configs.split(",")])
  shapes = args.shapes or (GPU_SHAPES if gpu else CPU_SHAPES)
  repeats = args.repeats or (5 if gpu else 3)
  dtype = jnp.dtype(args.dtype)
  print(f"# selective-scan bench: mode={args.mode} backend={jax.default_backend()} "
        f"devices={jax.devices()} dtype={dtype.name} jax={jax.__version__} "
        f"python={platform.python_version()}", flush=True)
  bandwidth, rows = run(args.mode, impls, shapes, chunks, triton_configs, dtype, repeats,
                        args.budget_s, log=lambda s: print(s, flush=True))
  text = (f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; dtype {dtype.name}; "
          f"median of {repeats} timings\n\n" + table(rows) + "\n")
  if len(triton_configs) > 1:
    text += "\n" + pick_config(rows, triton_configs) + "\n"
  print("\n" + text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  return 0 if all(r[2] is not None for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
