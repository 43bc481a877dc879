"""The six launches of the Triton selective scan, described once, and the two executors that run
the description: torch tensors (a GPU, or the CPU under TRITON_INTERPRET=1) and jax_triton.

A `Plan` lists, per launch, the kernel, its grid, its arguments in the kernel's order (names of
arrays, or ints for the scalar arguments), its outputs (shape, dtype, whether zero-initialised;
they follow the arguments, as jax_triton appends them), its constexprs and num_warps.  Both
executors only walk this list, so an argument-order or output-shape slip shows up in the CPU
tests (interpreter) and in the decoded CUDA lowering (tests/test_triton_lowering.py) alike.

Plain Python: importing this module imports neither triton nor jax.
"""
from __future__ import annotations

import dataclasses
import math

# The default launch configuration (BLOCK_D, CHUNK, num_warps): the one of SWEEP_CONFIGS with
# 4 tile elements per thread whose kernels do not spill on sm_80 or sm_90 (ptxas; kernels/NOTES.md)
# and keep the 16 x 64 tiles; with 4 warps `_bwd_grads` spills.  To be set by the GPU sweep.
DEFAULT_BLOCK_D = 16
DEFAULT_CHUNK = 64
NUM_WARPS = 8
DEFAULT_CONFIG = (DEFAULT_BLOCK_D, DEFAULT_CHUNK, NUM_WARPS)
# The configurations the GPU sweep times (experiments/gpu_all.sh) and `python -m
# kernels.resources` reports registers and spills for: around the default, one knob at a time.
SWEEP_CONFIGS = (DEFAULT_CONFIG, (16, 64, 4), (8, 64, 4), (32, 64, 8), (16, 32, 8), (16, 128, 8),
                 (8, 32, 4))
CHAIN_BLOCK = 256
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Array:
  shape: tuple
  dtype: str


@dataclasses.dataclass(frozen=True)
class Output:
  name: str
  shape: tuple
  dtype: str
  zeroed: bool = False


@dataclasses.dataclass(frozen=True)
class Launch:
  kernel: str            # a @triton.jit function of kernels.selective_scan_triton
  grid: tuple
  args: tuple            # array names (str) and scalar arguments (int), in the kernel's order
  outputs: tuple         # Output, passed after args
  constexprs: tuple      # sorted (name, value)
  num_warps: int


@dataclasses.dataclass(frozen=True)
class Plan:
  inputs: dict           # name -> Array: what the caller passes, in the shapes the kernels read
  zeros: dict            # name -> Array: zero-filled arrays the executor makes (dummy, init)
  launches: tuple
  results: tuple         # names of the arrays the pass returns; None for an absent gradient

  def result_outputs(self):
    """The Output (shape, dtype) of each result, None where the result is None."""
    made = {o.name: o for launch in self.launches for o in launch.outputs}
    return tuple(None if r is None else made[r] for r in self.results)


def _pow2_at_most(n):
  return 1 << (max(1, n).bit_length() - 1)


def _next_pow2(n):
  return 1 << max(0, n - 1).bit_length()


def tiles(dim, length, groups, block_d=DEFAULT_BLOCK_D, chunk=DEFAULT_CHUNK):
  """(BLOCK_D, CHUNK, nchunks, d-blocks) for a call: tiles are powers of two; a channel block
  never straddles a B/C group."""
  if block_d < 1 or block_d & (block_d - 1) or chunk < 16 or chunk & (chunk - 1):
    raise ValueError(f"block_d must be a power of two and chunk one >= 16, got {block_d}, {chunk}")
  per_group = dim // groups
  if groups == 1:
    bd = min(block_d, max(2, _next_pow2(dim)))
  else:
    bd = min(block_d, per_group & -per_group)    # the largest power of two dividing per_group
  t = min(chunk, max(16, _next_pow2(length)))
  return bd, t, math.ceil(length / t), math.ceil(dim / bd)


def aligned(length):
  """The ALIGNED constexpr: whether rows of length L start on 16-element boundaries."""
  return length % 16 == 0


_OPTIONAL = ("D", "z", "delta_bias")


def _layout(specs):
  """Checks `specs` (name -> (shape, dtype name) or None for u delta A B C D z delta_bias) and
  returns (batch, dim, length, nstate, groups, inputs) with B, C as (b, G, N, L)."""
  u, A, B = specs["u"], specs["A"], specs["B"]
  batch, dim, length = u[0]
  nstate = A[0][1]
  groups = B[0][1] if len(B[0]) == 4 else 1
  inputs = {}
  for name in ("u", "delta", "A", "B", "C") + _OPTIONAL:
    spec = specs.get(name)
    if spec is None:
      continue
    shape, dtype = tuple(spec[0]), str(spec[1])
    if dtype not in DTYPES:
      raise ValueError(f"{name}: dtype {dtype} is not one of {DTYPES}")
    if name in ("B", "C"):
      shape = (batch, groups, nstate, length)
    inputs[name] = Array(shape, dtype)
  return batch, dim, length, nstate, groups, inputs


def _common(specs, softplus, block_d, chunk):
  batch, dim, length, nstate, groups, inputs = _layout(specs)
  bd, t, nc, ndb = tiles(dim, length, groups, block_d, chunk)
  present = {name: specs.get(name) is not None for name in _OPTIONAL}
  opt = {name: name if present[name] else "dummy" for name in _OPTIONAL}
  flags = dict(HAS_D=present["D"], HAS_Z=present["z"], HAS_BIAS=present["delta_bias"],
               SOFTPLUS=bool(softplus))
  tile = dict(N=nstate, BLOCK_D=bd, CHUNK=t, ALIGNED=aligned(length))
  sizes = (length, dim, nc, groups)
  zeros = {"dummy": Array((1,), "float32")}
  return (batch, dim, nstate, nc, (nc, ndb, batch), inputs, present, opt, flags, tile, sizes,
          zeros)


def _constexprs(**kw):
  return tuple(sorted(kw.items()))


def _chain(src, dst, init, final, states, final_shape, reverse, num_warps):
  """The sequential pass over chunks; it sees the (b, chunks, dim, N) states as (b, chunks,
  dim * N), the same memory."""
  batch, nc, dim, nstate = states
  width = dim * nstate
  grid = (math.ceil(width / CHAIN_BLOCK), batch)
  return Launch("_chain_chunks", grid, (src[0], src[1], init, nc, width),
                (Output(dst, states, "float32"), Output(final, final_shape, "float32")),
                _constexprs(BLOCK=CHAIN_BLOCK, REVERSE=reverse), num_warps)


def forward_plan(specs, softplus, block_d=DEFAULT_BLOCK_D, chunk=DEFAULT_CHUNK,
                 num_warps=NUM_WARPS):
  """Results: y (u's shape and dtype), last state (b, dim, N) and H (b, chunks, dim, N), fp32."""
  (batch, dim, nstate, nc, grid, inputs, present, opt, flags, tile, sizes,
   zeros) = _common(specs, softplus, block_d, chunk)
  states = (batch, nc, dim, nstate)
  width = dim * nstate
  zeros["init"] = Array((batch, width), "float32")
  u = inputs["u"]
  launches = (
      Launch("_fwd_chunk_summary", grid, ("u", "delta", "A", "B", opt["delta_bias"]) + sizes,
             (Output("P", states, "float32"), Output("S", states, "float32")),
             _constexprs(**tile, HAS_BIAS=flags["HAS_BIAS"], SOFTPLUS=flags["SOFTPLUS"]),
             num_warps),
      _chain(("P", "S"), "H", "init", "last", states, (batch, dim, nstate), False, num_warps),
      Launch("_fwd_output", grid,
             ("u", "delta", "A", "B", "C", opt["D"], opt["z"], opt["delta_bias"], "H") + sizes,
             (Output("y", u.shape, u.dtype),),
             _constexprs(**tile, **flags), num_warps),
  )
  return Plan(inputs, zeros, launches, ("y", "last", "H"))


def backward_plan(specs, softplus, block_d=DEFAULT_BLOCK_D, chunk=DEFAULT_CHUNK,
                  num_warps=NUM_WARPS):
  """Inputs: dy (u's shape and dtype), dlast (b, dim*N) fp32, H, and the forward's.  Results, per
  batch row: du, ddelta, dz (inputs' dtypes), dB, dC (b, G, N, L) fp32, dA (b, chunks, dim, N),
  dD, ddelta_bias (b, chunks, dim) partial sums; None for absent optional inputs."""
  (batch, dim, nstate, nc, grid, inputs, present, opt, flags, tile, sizes,
   zeros) = _common(specs, softplus, block_d, chunk)
  states = (batch, nc, dim, nstate)
  width = dim * nstate
  u, delta, B = inputs["u"], inputs["delta"], inputs["B"]
  inputs = dict(inputs, dy=Array(u.shape, u.dtype), dlast=Array((batch, width), "float32"),
                H=Array(states, "float32"))
  partial = (batch, nc, dim)

  def maybe(name, shape, dtype, present_):
    return Output(name, shape if present_ else (1,), dtype if present_ else "float32")

  z = inputs.get("z")
  grads = (
      Output("du", u.shape, u.dtype), Output("ddelta", delta.shape, delta.dtype),
      maybe("dz", u.shape, z.dtype if z else None, present["z"]),
      Output("dB", B.shape, "float32", zeroed=True), Output("dC", B.shape, "float32", zeroed=True),
      Output("dA", states, "float32"),
      maybe("dD", partial, "float32", present["D"]),
      maybe("dbias", partial, "float32", present["delta_bias"]),
  )
  launches = (
      Launch("_bwd_chunk_summary", grid,
             ("delta", "A", "C", opt["z"], opt["delta_bias"], "dy") + sizes,
             (Output("Q", states, "float32"), Output("Gloc", states, "float32")),
             _constexprs(**tile, HAS_Z=flags["HAS_Z"], HAS_BIAS=flags["HAS_BIAS"],
                         SOFTPLUS=flags["SOFTPLUS"]), num_warps),
      _chain(("Q", "Gloc"), "Gin", "dlast", "g_first", states, (batch, width), True, num_warps),
      Launch("_bwd_grads", grid,
             ("u", "delta", "A", "B", "C", opt["D"], opt["z"], opt["delta_bias"], "dy", "H",
              "Gin") + sizes, grads, _constexprs(**tile, **flags), num_warps),
  )
  results = ("du", "ddelta", "dz" if present["z"] else None, "dB", "dC", "dA",
             "dD" if present["D"] else None, "dbias" if present["delta_bias"] else None)
  return Plan(inputs, zeros, launches, results)


# ------------------------------------------------------------------------------------------------
# Executors.  `arrays`: name -> array for every name in plan.inputs (reshaped to the plan's shape;
# the dtype must match).


def _check_dtype(name, got, want):
  if got != want:
    raise ValueError(f"launch plan input {name}: dtype {got}, the plan was made for {want}")


def _bind(plan, arrays, reshape, dtype_name, make_zeros):
  env = {}
  for name, spec in plan.inputs.items():
    x = arrays[name]
    _check_dtype(name, dtype_name(x), spec.dtype)
    env[name] = reshape(x, spec.shape)
  for name, spec in plan.zeros.items():
    env[name] = make_zeros(spec)
  return env


def _result(plan, env):
  return tuple(None if r is None else env[r] for r in plan.results)


def run_torch(plan, arrays):
  """Runs the plan on torch tensors (all on one device)."""
  import torch  # noqa: PLC0415

  from kernels import selective_scan_triton as K  # noqa: PLC0415  (imports triton)
  device = arrays["u"].device
  dt = lambda name: getattr(torch, name)   # noqa: E731
  env = _bind(plan, arrays, lambda x, s: x.reshape(s).contiguous(),
              lambda x: str(x.dtype).removeprefix("torch."),
              lambda s: torch.zeros(s.shape, dtype=dt(s.dtype), device=device))
  for launch in plan.launches:
    outs = [(torch.zeros if o.zeroed else torch.empty)(o.shape, dtype=dt(o.dtype), device=device)
            for o in launch.outputs]
    args = [env[a] if isinstance(a, str) else a for a in launch.args]
    getattr(K, launch.kernel)[launch.grid](*args, *outs, num_warps=launch.num_warps,
                                           **dict(launch.constexprs))
    env.update((o.name, x) for o, x in zip(launch.outputs, outs))
  return _result(plan, env)


def run_jax_triton(plan, arrays, compute_capability=None):
  """Runs the plan through jax_triton.triton_call (traceable: jit, export)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import jax_triton as jt  # noqa: PLC0415

  from kernels import selective_scan_triton as K  # noqa: PLC0415
  env = _bind(plan, arrays, lambda x, s: x.reshape(s), lambda x: jnp.dtype(x.dtype).name,
              lambda s: jnp.zeros(s.shape, s.dtype))
  for launch in plan.launches:
    outs = jt.triton_call(
        *[env[a] if isinstance(a, str) else a for a in launch.args],
        kernel=getattr(K, launch.kernel),
        out_shape=[jax.ShapeDtypeStruct(o.shape, o.dtype) for o in launch.outputs],
        grid=launch.grid,
        zeroed_outputs=tuple(i for i, o in enumerate(launch.outputs) if o.zeroed),
        num_warps=launch.num_warps, compute_capability=compute_capability,
        **dict(launch.constexprs))
    env.update((o.name, x) for o, x in zip(launch.outputs, outs))
  return _result(plan, env)
