"""JAX binding of the Triton selective scan (kernels/selective_scan_triton.py), for impl="triton".

The op is a `jax.custom_vjp` whose forward and backward each launch three Triton kernels through
`jax_triton.triton_call`.  The forward saves only the per-chunk entering states H
(b, chunks, dim, N) beside the inputs; the backward recomputes inside each chunk.

Every kernel output is per batch row (cross-batch sums -- dA, dD, d delta_bias -- come back as
per-(row, chunk) partials that plain JAX sums), so:
  * vmap folds the mapped axis into the batch (a `custom_vmap` rule on the two launch functions);
    a vmap over A, D or delta_bias, which are shared by the batch, runs one call per element;
  * data parallelism: under a context mesh with a "data" axis (`jax.set_mesh`, as the trainer
    sets it) the op runs in a `shard_map` over the batch axis, each device on its own rows.  The
    kernels are opaque to XLA's partitioner, which would otherwise gather the whole batch onto
    every device and run it there.

`jax_triton` is imported inside functions only: it raises ImportError on a CPU-only jax.

Launch backends (`_BACKEND`): "jax_triton" (GPU) or "interpret", which runs the same kernels on
the CPU through `jax.pure_callback` and torch under TRITON_INTERPRET=1 -- used by the CPU tests to
exercise this module's custom_vjp / vmap plumbing with the real kernels.
"""
from __future__ import annotations

import functools
import importlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

# The module itself (the package exports the function under the same name).
_ss = importlib.import_module("jaxmamba.ops.selective_scan")

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_STATE = 64           # N is unrolled inside the kernels
MAX_GRID_YZ = 65535      # CUDA's limit on grid dims 2 and 3 (d-blocks, batch)
BLOCK_D = 16
CHUNK = 64

DATA_AXIS = "data"       # the mesh axis the batch is split over (jaxmamba.train's mesh)

_BACKEND = "jax_triton"
_COMPUTE_CAPABILITY = None  # None: ask the device; tests that only lower set e.g. 90


def _kernels():
  from kernels import selective_scan_triton  # noqa: PLC0415  (imports triton)
  return selective_scan_triton


def available() -> bool:
  """True when jax runs on a GPU and jax_triton imports.  Never raises."""
  try:
    if jax.default_backend() != "gpu":
      return False
    import jax_triton  # noqa: F401, PLC0415
    _kernels()
    return True
  except Exception:  # noqa: BLE001  (any failure means: not available)
    return False


def unsupported_reason(u, delta, A, B, C, D=None, z=None, delta_bias=None):
  """Why the kernels cannot run this call, or None when they can."""
  try:
    batch, dim, length, nstate, groups = _ss.check_args(u, delta, A, B, C, D, z, delta_bias)
  except ValueError as e:
    return str(e)
  for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                  ("delta_bias", delta_bias)):
    if t is not None and jnp.result_type(t) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
      return (f"{name} has dtype {jnp.result_type(t)}; the Triton scan takes float32, bfloat16 "
              "or float16")
  if nstate > MAX_STATE:
    return f"N={nstate} > {MAX_STATE} states"
  if batch > MAX_GRID_YZ:
    return f"batch={batch} > {MAX_GRID_YZ}"
  bd, _, _, ndb = _kernels().plan(dim, length, groups, BLOCK_D, CHUNK)
  if ndb > MAX_GRID_YZ:
    return f"dim={dim} needs {ndb} channel blocks of {bd} > {MAX_GRID_YZ}"
  return None


def supports(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> bool:
  """Whether the kernels handle these shapes and dtypes (so impl="auto" can fall back).  Never
  raises."""
  try:
    return unsupported_reason(u, delta, A, B, C, D, z, delta_bias) is None
  except Exception:  # noqa: BLE001
    return False


def _reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
  """The plain-JAX op this module must match: (y, last_state)."""
  return _ss.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                            return_last_state=True, impl="reference")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
  """The Triton selective scan: (y in u's dtype, last state (b, dim, N) float32).  Differentiable
  in every array argument (and through the last state)."""
  reason = unsupported_reason(u, delta, A, B, C, D, z, delta_bias)
  if reason is not None:
    raise ValueError(f"selective_scan(impl='triton'): unsupported call: {reason}")
  # A set _COMPUTE_CAPABILITY means lowering for a named GPU (export) without one at hand.
  if _BACKEND == "jax_triton" and _COMPUTE_CAPABILITY is None and not available():
    raise RuntimeError("selective_scan(impl='triton') needs jax on a GPU and jax_triton "
                       "importable; use impl='auto' or 'chunked' elsewhere")
  softplus, cfg = bool(delta_softplus), (BLOCK_D, CHUNK)
  scan = lambda *a: _scan(*a, softplus, cfg)   # noqa: E731
  return _per_data_shard(scan, (u, delta, A, B, C, D, z, delta_bias), _FWD_ROWS)


def _arrays_only(fn, args):
  """(g, present): g takes only the non-None `args` (at indices `present`), as shard_map and
  pure_callback need, and calls fn with the None arguments put back in their places."""
  present = [i for i, a in enumerate(args) if a is not None]

  def g(*arrays):
    full = [None] * len(args)
    for i, a in zip(present, arrays):
      full[i] = a
    return fn(*full)
  return g, present


def _per_data_shard(fn, args, rows):
  """fn(*args) -> (y, last), on each device's batch rows when the context mesh has a "data" axis
  that divides the batch (`rows`: which arguments are per batch row); else one plain call."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names:
    return fn(*args)
  shards = mesh.shape[DATA_AXIS]
  if shards == 1 or args[0].shape[0] % shards:
    return fn(*args)
  local, present = _arrays_only(fn, args)
  # check_vma=False: the custom_vjp inside carries no varying-axis types; the transpose then sums
  # the cotangents of the shared arguments (A, D, delta_bias) over the data axis, as it must.
  return jax.shard_map(local, in_specs=tuple(P(DATA_AXIS) if rows[i] else P() for i in present),
                       out_specs=(P(DATA_AXIS), P(DATA_AXIS)), check_vma=False)(
                           *[args[i] for i in present])


# ------------------------------------------------------------------------------------------------
# custom_vjp over the two launch functions.


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _scan(u, delta, A, B, C, D, z, delta_bias, softplus, cfg):
  y, last, _ = _launch_forward(softplus, cfg)(u, delta, A, _groups(B), _groups(C), D, z,
                                               delta_bias)
  return y, last


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, cfg):
  y, last, H = _launch_forward(softplus, cfg)(u, delta, A, _groups(B), _groups(C), D, z,
                                               delta_bias)
  return (y, last), (u, delta, A, B, C, D, z, delta_bias, H)


def _scan_bwd(softplus, cfg, res, cotangents):
  u, delta, A, B, C, D, z, delta_bias, H = res
  dy, dlast = cotangents
  du, ddelta, dz, dB, dC, dA_part, dD_part, dbias_part = _launch_backward(softplus, cfg)(
      dy.astype(u.dtype), dlast.astype(jnp.float32), H, u, delta, A, _groups(B), _groups(C), D,
      z, delta_bias)
  dB, dC = dB.reshape(B.shape).astype(B.dtype), dC.reshape(C.shape).astype(C.dtype)
  dA = dA_part.sum((0, 1)).astype(A.dtype)
  dD = None if D is None else dD_part.sum((0, 1)).astype(D.dtype)
  dbias = None if delta_bias is None else dbias_part.sum((0, 1)).astype(delta_bias.dtype)
  return du, ddelta, dA, dB, dC, dD, dz, dbias


_scan.defvjp(_scan_fwd, _scan_bwd)


def _groups(M):
  return M[:, None] if M.ndim == 3 else M


# ------------------------------------------------------------------------------------------------
# The launch functions, with a vmap rule that folds the mapped axis into the batch.

# Which arguments are per batch row (foldable) and which are shared by the batch.
_FWD_ROWS = (True, True, False, True, True, False, True, False)  # u delta A B C D z bias
_BWD_ROWS = (True, True, True) + _FWD_ROWS                        # dy dlast H + the above


def _fold_rule(fn, rows):
  """custom_vmap rule: fold the mapped axis into the batch when only per-row arguments are
  mapped; otherwise one call per mapped element."""
  def rule(axis_size, in_batched, *args):
    shared_mapped = any(bat for bat, row, a in zip(in_batched, rows, args)
                        if not row and a is not None)
    if shared_mapped:
      mapped = [a if (a is not None and bat) else None for a, bat in zip(args, in_batched)]

      def one(xs):
        full = [x if x is not None else a for x, a in zip(xs, args)]
        return fn(*full)
      outs = jax.lax.map(one, mapped)
      return outs, jax.tree_util.tree_map(lambda _: True, outs)

    folded = []
    for a, bat, row in zip(args, in_batched, rows):
      if a is None or not row:
        folded.append(a)
        continue
      if not bat:
        a = jnp.broadcast_to(a, (axis_size,) + a.shape)
      folded.append(a.reshape((axis_size * a.shape[1],) + a.shape[2:]))
    outs = fn(*folded)
    outs = jax.tree_util.tree_map(lambda o: o.reshape((axis_size, -1) + o.shape[1:]), outs)
    return outs, jax.tree_util.tree_map(lambda _: True, outs)
  return rule


@functools.cache
def _launch_forward(softplus, cfg):
  def call(u, delta, A, B, C, D, z, delta_bias):
    if _BACKEND == "interpret":
      return _interpret_forward(u, delta, A, B, C, D, z, delta_bias, softplus, cfg)
    return _triton_forward(u, delta, A, B, C, D, z, delta_bias, softplus, cfg)

  fn = jax.custom_batching.custom_vmap(call)
  fn.def_vmap(_fold_rule(fn, _FWD_ROWS))
  return fn


@functools.cache
def _launch_backward(softplus, cfg):
  def call(dy, dlast, H, u, delta, A, B, C, D, z, delta_bias):
    args = (dy, dlast, H, u, delta, A, B, C, D, z, delta_bias)
    if _BACKEND == "interpret":
      return _interpret_backward(*args, softplus, cfg)
    return _triton_backward(*args, softplus, cfg)

  fn = jax.custom_batching.custom_vmap(call)
  fn.def_vmap(_fold_rule(fn, _BWD_ROWS))
  return fn


def _shapes(u, A, B, cfg):
  batch, dim, length = u.shape
  groups, nstate = B.shape[1], A.shape[1]
  bd, t, nc, ndb = _kernels().plan(dim, length, groups, *cfg)
  return batch, dim, length, groups, nstate, bd, t, nc, ndb


def _flags(D, z, delta_bias, softplus):
  return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
              SOFTPLUS=softplus)


def _f32(shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _launch_setup(u, A, B, D, z, delta_bias, softplus, cfg):
  """What both passes' launches share: kernels, shapes, optional inputs (a dummy where absent, the
  kernel's HAS_* flag says so) and launch options."""
  K = _kernels()
  dummy = jnp.zeros((1,), jnp.float32)
  optional = tuple(dummy if x is None else x for x in (D, z, delta_bias))
  common = dict(num_warps=K.NUM_WARPS, compute_capability=_COMPUTE_CAPABILITY)
  return K, _shapes(u, A, B, cfg), optional, _flags(D, z, delta_bias, softplus), common


def _triton_forward(u, delta, A, B, C, D, z, delta_bias, softplus, cfg):
  import jax_triton as jt  # noqa: PLC0415
  K, (batch, dim, length, groups, nstate, bd, t, nc, ndb), (D_, z_, bias_), flags, common = \
      _launch_setup(u, A, B, D, z, delta_bias, softplus, cfg)
  grid = (nc, ndb, batch)
  states = _f32((batch, nc, dim, nstate))
  P, S = jt.triton_call(
      u, delta, A, B, bias_, length, dim, nc, groups, kernel=K._fwd_chunk_summary,
      out_shape=[states, states], grid=grid, N=nstate, BLOCK_D=bd, CHUNK=t,
      ALIGNED=K.aligned(length),
      HAS_BIAS=flags["HAS_BIAS"], SOFTPLUS=softplus, **common)
  width = dim * nstate
  H, last = jt.triton_call(
      P, S, jnp.zeros((batch, width), jnp.float32), nc, width, kernel=K._chain_chunks,
      out_shape=[states, _f32((batch, dim, nstate))],
      grid=(-(-width // K.CHAIN_BLOCK), batch), BLOCK=K.CHAIN_BLOCK, REVERSE=False, **common)
  y = jt.triton_call(
      u, delta, A, B, C, D_, z_, bias_, H, length, dim, nc, groups, kernel=K._fwd_output,
      out_shape=jax.ShapeDtypeStruct(u.shape, u.dtype), grid=grid, N=nstate, BLOCK_D=bd,
      CHUNK=t, ALIGNED=K.aligned(length), **flags, **common)
  return y, last, H


def _triton_backward(dy, dlast, H, u, delta, A, B, C, D, z, delta_bias, softplus, cfg):
  import jax_triton as jt  # noqa: PLC0415
  K, (batch, dim, length, groups, nstate, bd, t, nc, ndb), (D_, z_, bias_), flags, common = \
      _launch_setup(u, A, B, D, z, delta_bias, softplus, cfg)
  grid = (nc, ndb, batch)
  states = _f32((batch, nc, dim, nstate))
  Q, Gloc = jt.triton_call(
      delta, A, C, z_, bias_, dy, length, dim, nc, groups, kernel=K._bwd_chunk_summary,
      out_shape=[states, states], grid=grid, N=nstate, BLOCK_D=bd, CHUNK=t,
      ALIGNED=K.aligned(length),
      HAS_Z=flags["HAS_Z"], HAS_BIAS=flags["HAS_BIAS"], SOFTPLUS=softplus, **common)
  width = dim * nstate
  Gin, _ = jt.triton_call(
      Q, Gloc, dlast.reshape(batch, width), nc, width, kernel=K._chain_chunks,
      out_shape=[states, _f32((batch, width))],
      grid=(-(-width // K.CHAIN_BLOCK), batch), BLOCK=K.CHAIN_BLOCK, REVERSE=True, **common)
  partial = _f32((batch, nc, dim))
  out_shape = [
      jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(delta.shape, delta.dtype),
      jax.ShapeDtypeStruct(z.shape, z.dtype) if z is not None else _f32((1,)),
      _f32(B.shape), _f32(C.shape), states,
      partial if D is not None else _f32((1,)),
      partial if delta_bias is not None else _f32((1,)),
  ]
  du, ddelta, dz, dB, dC, dA, dD, dbias = jt.triton_call(
      u, delta, A, B, C, D_, z_, bias_, dy, H, Gin, length, dim, nc, groups,
      kernel=K._bwd_grads, out_shape=out_shape, grid=grid, zeroed_outputs=(3, 4),
      N=nstate, BLOCK_D=bd, CHUNK=t, ALIGNED=K.aligned(length), **flags, **common)
  return (du, ddelta, dz if z is not None else None, dB, dC, dA,
          dD if D is not None else None, dbias if delta_bias is not None else None)


# ------------------------------------------------------------------------------------------------
# The "interpret" backend: the same kernels on the CPU (TRITON_INTERPRET=1) via torch.


def _to_torch(x):
  import torch  # noqa: PLC0415
  return None if x is None else torch.from_numpy(np.asarray(x, np.float32).copy())


_INTERPRET_LOCK = threading.Lock()


def _host_call(fn, out_shapes, *args):
  """pure_callback around a torch function; None arguments and results pass through."""
  shapes = [s for s in out_shapes if s is not None]

  def host(*full):
    # Triton's interpreter keeps the launch grid in global state: devices sharing this process
    # (fake CPU devices under a mesh) call back from several threads, so one launch at a time.
    with _INTERPRET_LOCK:
      outs = [o for o in fn(*map(_to_torch, full)) if o is not None]
    return tuple(np.asarray(o.float().numpy()).astype(s.dtype) for o, s in zip(outs, shapes))

  callback, present = _arrays_only(host, args)
  flat = jax.pure_callback(callback, tuple(shapes), *[args[i] for i in present])
  it = iter(flat)
  return tuple(None if s is None else next(it) for s in out_shapes)


def _interpret_forward(u, delta, A, B, C, D, z, delta_bias, softplus, cfg):
  K = _kernels()
  batch, dim, length, groups, nstate, bd, t, nc, ndb = _shapes(u, A, B, cfg)
  out_shapes = [jax.ShapeDtypeStruct(u.shape, u.dtype), _f32((batch, dim, nstate)),
                _f32((batch, nc, dim, nstate))]

  def fn(*a):
    return K.forward(*a, delta_softplus=softplus, block_d=cfg[0], chunk=cfg[1])
  return _host_call(fn, out_shapes, u, delta, A, B, C, D, z, delta_bias)


def _interpret_backward(dy, dlast, H, u, delta, A, B, C, D, z, delta_bias, softplus, cfg):
  K = _kernels()
  batch, dim, length, groups, nstate, bd, t, nc, ndb = _shapes(u, A, B, cfg)
  partial = _f32((batch, nc, dim))
  out_shapes = [jax.ShapeDtypeStruct(u.shape, u.dtype),
                jax.ShapeDtypeStruct(delta.shape, delta.dtype),
                None if z is None else jax.ShapeDtypeStruct(z.shape, z.dtype),
                _f32(B.shape), _f32(C.shape), _f32((batch, nc, dim, nstate)),
                None if D is None else partial, None if delta_bias is None else partial]

  def fn(dy, dlast, H, *a):
    return K.backward_parts(dy, dlast, H, *a, delta_softplus=softplus, block_d=cfg[0],
                            chunk=cfg[1])
  return _host_call(fn, out_shapes, dy, dlast, H, u, delta, A, B, C, D, z, delta_bias)
