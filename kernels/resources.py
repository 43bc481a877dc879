"""Registers, spills, shared memory and occupancy of every Triton selective-scan kernel, per launch
configuration and GPU architecture, from ptxas's own report -- no GPU needed.

    python -m kernels.resources [--archs 80,90] [--configs all|default] [--out FILE]

Each kernel is compiled the way jax_triton compiles it (kernels/launch_plan.py's constexprs for a
Mamba call: N=16, float32, z, D, delta_bias and softplus on, L % 16 == 0; every pointer assumed
16-byte aligned) with `triton.compile` for a `GPUTarget`, then the PTX goes through the ptxas that
ships with triton (`ptxas -v`).  Occupancy is what those registers and triton's shared memory
allow on the SM (65,536 registers, allocated per warp in units of 256; at most 64 warps and 32
blocks; 164 KiB (sm_80) or 228 KiB (sm_90) of shared memory, 1 KiB of it reserved per block).
Prints a Markdown table (kernels/NOTES.md holds the last one).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import re
import subprocess
import sys
import tempfile

from kernels import launch_plan as LP

SHAPE = dict(batch=2, dim=64, length=256, nstate=16)   # the shape only sets the constexprs
SM = {80: dict(smem=164 * 1024), 90: dict(smem=228 * 1024)}
REGS_PER_SM, REG_UNIT, MAX_WARPS, MAX_BLOCKS, SMEM_RESERVED = 65536, 256, 64, 32, 1024
PTR = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}


@dataclasses.dataclass(frozen=True)
class Usage:
  kernel: str
  arch: int
  config: tuple          # (BLOCK_D, CHUNK, num_warps)
  registers: int
  spill_stores: int      # bytes
  spill_loads: int       # bytes
  stack: int             # bytes of stack frame
  shared: int            # bytes of shared memory (triton's metadata)
  variant: str = ""      # " (reverse)" for the backward's chain

  @property
  def warps_per_sm(self):
    warps = self.config[2]
    regs_per_warp = math.ceil(self.registers * 32 / REG_UNIT) * REG_UNIT
    blocks = min(MAX_BLOCKS, MAX_WARPS // warps, REGS_PER_SM // (regs_per_warp * warps))
    if self.shared:
      blocks = min(blocks, SM[self.arch]["smem"] // (self.shared + SMEM_RESERVED))
    return blocks * warps


def _specs(dtype="float32"):
  b, d, L, N = (SHAPE[k] for k in ("batch", "dim", "length", "nstate"))
  row = ((b, d, L), dtype)
  return dict(u=row, delta=row, A=((d, N), "float32"), B=((b, N, L), dtype),
              C=((b, N, L), dtype), D=((d,), "float32"), z=row, delta_bias=((d,), "float32"))


def launches(config, dtype="float32"):
  """The distinct (kernel, constexprs) launches of both passes at a configuration, with the
  dtype of every array argument."""
  block_d, chunk, warps = config
  seen, out = set(), []
  for make in (LP.forward_plan, LP.backward_plan):
    plan = make(_specs(dtype), True, block_d, chunk, warps)
    types = {n: s.dtype for n, s in {**plan.inputs, **plan.zeros}.items()}
    for launch in plan.launches:
      types.update((o.name, o.dtype) for o in launch.outputs)
      key = (launch.kernel, launch.constexprs)
      if key not in seen:
        seen.add(key)
        arrays = [types[a] if isinstance(a, str) else None for a in launch.args]
        out.append((launch, arrays + [o.dtype for o in launch.outputs]))
  return out


def _ptxas():
  import triton  # noqa: PLC0415
  return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_usage(launch, arg_dtypes, arch):
  """Compiles one launch for sm_<arch> and reads ptxas -v."""
  import triton  # noqa: PLC0415
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415
  from triton.compiler import ASTSource  # noqa: PLC0415

  from kernels import selective_scan_triton as K  # noqa: PLC0415
  kernel = getattr(K, launch.kernel)
  params = list(inspect.signature(kernel.fn).parameters)
  runtime = [p for p in params if p not in dict(launch.constexprs)]
  signature = {p: (PTR[t] if t else "i32") for p, t in zip(runtime, arg_dtypes)}
  signature.update({name: "constexpr" for name, _ in launch.constexprs})
  attrs = {(params.index(p),): [["tt.divisibility", 16]] for p, t in zip(runtime, arg_dtypes) if t}
  src = ASTSource(kernel, signature, constexprs=dict(launch.constexprs), attrs=attrs)
  gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
  with tempfile.TemporaryDirectory() as tmp, triton.knobs.cache.scope():
    # Importing jax_triton sets TRITON_CACHE_DIR="" (also when the import fails, as on a CPU-only
    # jax), which leaves triton.compile no cache folder: compile into this temporary one then.
    if not triton.knobs.cache.dir:
      triton.knobs.cache.dir = tmp
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": launch.num_warps})
    ptx = os.path.join(tmp, "k.ptx")
    with open(ptx, "w") as f:
      f.write(compiled.asm["ptx"])
    report = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", ptx, "-o",
                             os.path.join(tmp, "k.cubin")], capture_output=True, text=True,
                            check=True).stderr
  return parse_ptxas(report, launch.kernel, arch, compiled.metadata.shared)


def parse_ptxas(report, kernel, arch, shared):
  def grab(pattern):
    m = re.search(pattern, report)
    if not m:
      raise ValueError(f"ptxas -v report without {pattern!r}:\n{report}")
    return int(m.group(1))
  return dict(kernel=kernel, arch=arch, registers=grab(r"Used (\d+) registers"),
              spill_stores=grab(r"(\d+) bytes spill stores"),
              spill_loads=grab(r"(\d+) bytes spill loads"),
              stack=grab(r"(\d+) bytes stack frame"), shared=shared)


def report(configs, archs, log=print):
  rows = []
  for config in configs:
    for launch, dtypes in launches(config):
      for arch in archs:
        variant = " (reverse)" if dict(launch.constexprs).get("REVERSE") else ""
        usage = Usage(config=config, variant=variant, **compile_usage(launch, dtypes, arch))
        log(format_row(usage))
        rows.append(usage)
  return rows


def format_row(u):
  bd, chunk, warps = u.config
  shown = "-" if u.kernel == "_chain_chunks" else f"{bd} x {chunk}"
  spill = f"{u.spill_stores} / {u.spill_loads}"
  occ = u.warps_per_sm
  return (f"| {shown} | {warps} | `{u.kernel}`{u.variant} | sm_{u.arch} | {u.registers} | {spill} | "
          f"{u.stack} | {u.shared} | {occ} ({100 * occ / MAX_WARPS:.0f}%) |")


def table(rows):
  head = ("| BLOCK_D x CHUNK | warps | kernel | arch | regs/thread | spill st / ld (B) | "
          "stack (B) | smem (B) | warps/SM (occupancy) |\n|---|---|---|---|---|---|---|---|---|")
  return "\n".join([head] + [format_row(r) for r in rows])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--archs", default="80,90")
  p.add_argument("--configs", choices=("all", "default"), default="all",
                 help="the default configuration, or it and every one the GPU sweep tries")
  p.add_argument("--out", help="also write the Markdown table here")
  args = p.parse_args(argv)
  configs = [LP.DEFAULT_CONFIG] + ([c for c in LP.SWEEP_CONFIGS if c != LP.DEFAULT_CONFIG]
                                   if args.configs == "all" else [])
  archs = [int(a) for a in args.archs.split(",")]
  import triton  # noqa: PLC0415
  print(f"# ptxas -v, triton {triton.__version__}; N={SHAPE['nstate']}, float32, z/D/delta_bias/"
        f"softplus on, L % 16 == 0", flush=True)
  rows = report(configs, archs, log=lambda s: print(s, flush=True))
  text = table(rows) + "\n"
  print("\n" + text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  spilled = [r for r in rows if r.config == LP.DEFAULT_CONFIG and (r.spill_stores or r.spill_loads)]
  return 1 if spilled else 0


if __name__ == "__main__":
  sys.exit(main())
