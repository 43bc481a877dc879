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

Both passes are launch plans (kernels/launch_plan.py), run by one of two backends (`_BACKEND`):
"jax_triton" (GPU) or "interpret", which runs the same plan on the CPU through
`jax.pure_callback` and torch under TRITON_INTERPRET=1, in the inputs' dtypes -- used by the CPU
tests to exercise this module's custom_vjp / vmap plumbing with the real kernels.
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
from kernels import launch_plan  # plain Python (no triton, no jax)

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_STATE = 64           # the largest N supports() accepts (Mamba uses 16; tested up to 16)
MAX_GRID_YZ = 65535      # CUDA's limit on grid dims 2 and 3 (d-blocks, batch)
# The launch configuration; the kernel benchmark's sweep sets these (kernels/bench.py).
BLOCK_D, CHUNK, NUM_WARPS = launch_plan.DEFAULT_CONFIG

DATA_AXIS = "data"       # the mesh axis the batch is split over (jaxmamba.train's mesh)

_BACKEND = "jax_triton"
_COMPUTE_CAPABILITY = None  # None: ask the device; tests that only lower set e.g. 90


def _kernels():
  from kernels import selective_scan_triton  # noqa: PLC0415  (imports triton)
  return selective_scan_triton


def unavailable_reason():
  """Why the kernels cannot run in this process (not a GPU backend, jax_triton missing or failing
  to import, triton failing to import), or None when they can.  Never raises."""
  try:
    backend = jax.default_backend()
    if backend != "gpu":
      return f"jax runs on {backend!r}, not a GPU"
  except Exception as e:  # noqa: BLE001  (the reason is the answer)
    return f"jax.default_backend() failed: {type(e).__name__}: {e}"
  try:
    import jax_triton  # noqa: F401, PLC0415
  except Exception as e:  # noqa: BLE001
    return f"jax_triton does not import: {type(e).__name__}: {e}"
  try:
    _kernels()
  except Exception as e:  # noqa: BLE001
    return f"the Triton kernels do not import: {type(e).__name__}: {e}"
  return None


def available() -> bool:
  """True when jax runs on a GPU and jax_triton imports (`unavailable_reason` says why not).
  Never raises."""
  return unavailable_reason() is None


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
  bd, _, _, ndb = launch_plan.tiles(dim, length, groups, BLOCK_D, CHUNK)
  if ndb > MAX_GRID_YZ:
    return f"dim={dim} needs {ndb} channel blocks of {bd} > {MAX_GRID_YZ}"
  return None


def support_reason(u, delta, A, B, C, D=None, z=None, delta_bias=None):
  """`unsupported_reason`, with any unexpected failure turned into the reason.  Never raises."""
  try:
    return unsupported_reason(u, delta, A, B, C, D, z, delta_bias)
  except Exception as e:  # noqa: BLE001
    return f"checking the call failed: {type(e).__name__}: {e}"


def supports(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> bool:
  """Whether the kernels handle these shapes and dtypes (so impl="auto" can fall back;
  `support_reason` says why not).  Never raises."""
  return support_reason(u, delta, A, B, C, D, z, delta_bias) is None


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
  if _BACKEND == "jax_triton" and _COMPUTE_CAPABILITY is None:
    why = unavailable_reason()
    if why is not None:
      raise RuntimeError(f"selective_scan(impl='triton') needs jax on a GPU and jax_triton "
                         f"importable ({why}); use impl='auto' or 'chunked' elsewhere")
  softplus, cfg = bool(delta_softplus), (BLOCK_D, CHUNK, NUM_WARPS)
  scan = lambda *a: _scan(*a, softplus, cfg)   # noqa: E731
  return _per_data_shard(scan, (u, delta, A, B, C, D, z, delta_bias), _FWD_ROWS)


def _arrays_only(fn, args):
  """(g, present): g takes only the non-None `args` (at indices `present`), as shard_map needs,
  and calls fn with the None arguments put back in their places."""
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
    return _triton_forward(u, delta, A, B, C, D, z, delta_bias, softplus, cfg)

  fn = jax.custom_batching.custom_vmap(call)
  fn.def_vmap(_fold_rule(fn, _FWD_ROWS))
  return fn


@functools.cache
def _launch_backward(softplus, cfg):
  def call(dy, dlast, H, u, delta, A, B, C, D, z, delta_bias):
    return _triton_backward(dy, dlast, H, u, delta, A, B, C, D, z, delta_bias, softplus, cfg)

  fn = jax.custom_batching.custom_vmap(call)
  fn.def_vmap(_fold_rule(fn, _BWD_ROWS))
  return fn


_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _plan_arrays(u, delta, A, B, C, D, z, delta_bias, **extra):
  """(specs for kernels.launch_plan, name -> array) of a call."""
  arrays = dict(zip(_NAMES, (u, delta, A, B, C, D, z, delta_bias)), **extra)
  specs = {name: None if arrays[name] is None else (arrays[name].shape,
                                                    jnp.dtype(arrays[name].dtype).name)
           for name in _NAMES}
  return specs, arrays


def _execute(plan, arrays):
  if _BACKEND == "interpret":
    return _interpret(plan, arrays)
  return launch_plan.run_jax_triton(plan, arrays, _COMPUTE_CAPABILITY)


def _triton_forward(u, delta, A, B, C, D, z, delta_bias, softplus, cfg):
  specs, arrays = _plan_arrays(u, delta, A, B, C, D, z, delta_bias)
  return _execute(launch_plan.forward_plan(specs, softplus, *cfg), arrays)


def _triton_backward(dy, dlast, H, u, delta, A, B, C, D, z, delta_bias, softplus, cfg):
  specs, arrays = _plan_arrays(u, delta, A, B, C, D, z, delta_bias, dy=dy, dlast=dlast, H=H)
  return _execute(launch_plan.backward_plan(specs, softplus, *cfg), arrays)


# ------------------------------------------------------------------------------------------------
# The "interpret" backend: the same plan on the CPU (TRITON_INTERPRET=1), on torch tensors of the
# same dtypes (bfloat16 included: the kernels do the casts, as on a GPU).


def _to_torch(x):
  import torch  # noqa: PLC0415
  x = np.ascontiguousarray(x)
  if x.dtype == jnp.bfloat16:        # numpy has no bfloat16 of its own: move the bits
    return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(x.copy())


def _to_numpy(t, dtype):
  import torch  # noqa: PLC0415
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(jnp.bfloat16).astype(dtype)
  return t.numpy().astype(dtype)


_INTERPRET_LOCK = threading.Lock()


def _interpret(plan, arrays):
  """The plan through jax.pure_callback and launch_plan.run_torch."""
  names = list(plan.inputs)
  outputs = plan.result_outputs()
  shapes = tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outputs if o is not None)

  def host(*values):
    # Triton's interpreter keeps the launch grid in global state: devices sharing this process
    # (fake CPU devices under a mesh) call back from several threads, so one launch at a time.
    with _INTERPRET_LOCK:
      outs = launch_plan.run_torch(plan, dict(zip(names, map(_to_torch, values))))
    return tuple(_to_numpy(o, s.dtype) for o, s in zip([o for o in outs if o is not None],
                                                       shapes))

  flat = iter(jax.pure_callback(host, shapes, *[arrays[n] for n in names]))
  return tuple(None if o is None else next(flat) for o in outputs)
