"""Mamba-1 selective scan with mamba_ssm's `selective_scan_fn` signature and layouts.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (per batch, channel d, state n)
    y_t = <C_t, h_t> + D * u_t ;  y_t *= silu(z_t)

Layouts (mamba_ssm's): u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or grouped
(batch, G, N, L) with channel d using group d // (dim // G); D, delta_bias: (dim,).
All math runs in float32; y comes back in u's dtype, the last state in float32.

Implementations (`impl=`):
  reference    jax.lax.scan over L: the oracle, O(batch*dim*N) live state, slow.
  associative  jax.lax.associative_scan over L on (batch, dim, L, N) tensors.
  chunked      lax.scan over chunks of L, an associative scan inside each chunk, the chunk body
               rematerialised so memory stays O(batch*dim*L) (plus one state per chunk).
  triton       the fused GPU kernel in kernels/selective_scan_triton.py (GPU only).
  auto         triton on a GPU when it is available and supports the call, else chunked with a
               warning (once per process) that says why; on the CPU the sequential lax.scan
               (reference) is fastest (kernels/RESULTS.md), so there.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

IMPLS = ("auto", "reference", "associative", "chunked", "triton")
DEFAULT_CHUNK = 32  # fastest or within 10% on every shape of the CPU sweep in kernels/RESULTS.md
SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus: identity above this


def softplus(x):
  """torch's softplus (beta 1, threshold 20), with a gradient that stays finite for large x."""
  safe = jnp.minimum(x, SOFTPLUS_THRESHOLD)
  return jnp.where(x > SOFTPLUS_THRESHOLD, x, jnp.log1p(jnp.exp(safe)))


# ------------------------------------------------------------------------------------------------
# Argument checks: every implementation goes through these, so a bad call never gets an answer.


def check_args(u, delta, A, B, C, D=None, z=None, delta_bias=None):
  """Validates shapes and dtypes; returns (batch, dim, L, N, groups)."""
  def fail(msg):
    raise ValueError(f"selective_scan: {msg}")

  for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                  ("delta_bias", delta_bias)):
    if t is None:
      continue
    dt = jnp.result_type(t)
    if jnp.issubdtype(dt, jnp.complexfloating):
      fail(f"{name} is complex ({dt}); only real Mamba-1 scans are supported")
    if not jnp.issubdtype(dt, jnp.floating):
      fail(f"{name} must be a floating-point array, got {dt}")
  if u.ndim != 3:
    fail(f"u must be (batch, dim, L), got shape {u.shape}")
  batch, dim, length = u.shape
  if length < 1:
    fail("the sequence length L must be at least 1")
  if delta.shape != u.shape:
    fail(f"delta must have u's shape {u.shape}, got {delta.shape}")
  if A.ndim != 2 or A.shape[0] != dim:
    fail(f"A must be (dim={dim}, N), got shape {A.shape}")
  nstate = A.shape[1]
  if B.ndim != C.ndim or B.shape != C.shape:
    fail(f"B and C must have the same shape, got {B.shape} and {C.shape}")
  if B.ndim == 2:
    fail("time-invariant B/C of shape (dim, N) are not supported; pass (batch, N, L)")
  if B.ndim == 3:
    groups = 1
    if B.shape != (batch, nstate, length):
      fail(f"B and C must be (batch={batch}, N={nstate}, L={length}), got {B.shape}")
  elif B.ndim == 4:
    groups = B.shape[1]
    if B.shape != (batch, groups, nstate, length):
      fail(f"grouped B and C must be (batch={batch}, G, N={nstate}, L={length}), got {B.shape}")
    if groups < 1 or dim % groups:
      fail(f"dim={dim} is not divisible by the number of B/C groups G={groups}")
  else:
    fail(f"B and C must be (batch, N, L) or (batch, G, N, L), got {B.shape}")
  for name, t in (("D", D), ("delta_bias", delta_bias)):
    if t is not None and t.shape != (dim,):
      fail(f"{name} must be (dim={dim},), got {t.shape}")
  if z is not None and z.shape != u.shape:
    fail(f"z must have u's shape {u.shape}, got {z.shape}")
  return batch, dim, length, nstate, groups


def _as_groups(M):
  """(b, N, L) or (b, G, N, L) -> float32 (b, G, N, L)."""
  M = M.astype(jnp.float32)
  return M[:, None] if M.ndim == 3 else M


def _per_channel(M, dim):
  """(b, G, ...) -> something that broadcasts against (b, dim, ...): channel d reads group d // (dim/G).

  Done late, on one chunk or step at a time, so grouped B/C never cost a (b, dim, N, L) tensor.
  """
  groups = M.shape[1]
  return M if groups == 1 else jnp.repeat(M, dim // groups, axis=1)


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
  """Float32 inputs of the recurrence: u, delta (after bias/softplus), A, B, C (b, G, N, L)."""
  u32 = u.astype(jnp.float32)
  delta32 = delta.astype(jnp.float32)
  if delta_bias is not None:
    delta32 = delta32 + delta_bias.astype(jnp.float32)[:, None]
  if delta_softplus:
    delta32 = softplus(delta32)
  return u32, delta32, A.astype(jnp.float32), _as_groups(B), _as_groups(C)


def _finish(y, u, u32, D, z, out_dtype):
  """y + D*u, gated by silu(z), cast to u's dtype."""
  if D is not None:
    y = y + u32 * D.astype(jnp.float32)[:, None]
  if z is not None:
    y = y * jax.nn.silu(z.astype(jnp.float32))
  return y.astype(out_dtype)


# ------------------------------------------------------------------------------------------------
# The recurrence, three ways.  Each takes float32 (u, delta, A, B, C) and returns y (b, d, L) and
# the last state (b, d, N).


def _scan_reference(u, delta, A, B, C):
  def step(h, inputs):
    u_t, d_t, B_t, C_t = inputs          # (b,d) (b,d) (b,G,N) (b,G,N)
    B_t, C_t = _per_channel(B_t, dim), _per_channel(C_t, dim)
    h = jnp.exp(d_t[..., None] * A) * h + (d_t * u_t)[..., None] * B_t
    return h, jnp.sum(h * C_t, axis=-1)

  dim = u.shape[1]

  xs = (jnp.moveaxis(u, -1, 0), jnp.moveaxis(delta, -1, 0), jnp.moveaxis(B, -1, 0),
        jnp.moveaxis(C, -1, 0))
  h0 = jnp.zeros(u.shape[:2] + A.shape[-1:], jnp.float32)
  h_last, ys = jax.lax.scan(step, h0, xs)
  return jnp.moveaxis(ys, 0, -1), h_last


def _combine(left, right):
  a_l, b_l = left
  a_r, b_r = right
  return a_l * a_r, a_r * b_l + b_r


def _scan_span(u, delta, A, B, C, h0):
  """One associative scan over the L axis (axis 2) of (b, d, L, N) terms, starting from h0."""
  dim = u.shape[1]
  B, C = _per_channel(B, dim), _per_channel(C, dim)
  dA = jnp.exp(delta[..., None] * A[:, None, :])                        # (b, d, L, N)
  dBu = (delta * u)[..., None] * jnp.swapaxes(B, -1, -2)               # (b, d, L, N)
  if h0 is not None:
    dBu = dBu.at[:, :, 0].add(dA[:, :, 0] * h0)
  _, h = jax.lax.associative_scan(_combine, (dA, dBu), axis=2)
  y = jnp.einsum("bdln,bdln->bdl", h, jnp.swapaxes(C, -1, -2),
                 precision=jax.lax.Precision.HIGHEST)
  return y, h[:, :, -1]


def _scan_associative(u, delta, A, B, C):
  return _scan_span(u, delta, A, B, C, None)


def _scan_chunked(u, delta, A, B, C, chunk):
  b, d, length = u.shape
  chunk = max(1, min(chunk, length))
  nchunks = -(-length // chunk)
  pad = nchunks * chunk - length
  if pad:
    # delta = 0 on the padding makes exp(delta*A) = 1 and delta*B*u = 0: the state passes through.
    widths = [(0, 0)] * 2 + [(0, pad)]
    u, delta = jnp.pad(u, widths), jnp.pad(delta, widths)
    B = jnp.pad(B, [(0, 0)] * 3 + [(0, pad)])
    C = jnp.pad(C, [(0, 0)] * 3 + [(0, pad)])

  def to_chunks(x):  # (..., nchunks*chunk) -> (nchunks, ..., chunk)
    return jnp.moveaxis(x.reshape(x.shape[:-1] + (nchunks, chunk)), -2, 0)

  @jax.checkpoint
  def body(h, xs):
    u_c, d_c, B_c, C_c = xs
    y_c, h_next = _scan_span(u_c, d_c, A, B_c, C_c, h)
    return h_next, y_c

  h0 = jnp.zeros((b, d, A.shape[-1]), jnp.float32)
  h_last, ys = jax.lax.scan(body, h0, (to_chunks(u), to_chunks(delta), to_chunks(B), to_chunks(C)))
  y = jnp.moveaxis(ys, 0, -2).reshape(b, d, nchunks * chunk)[..., :length]
  return y, h_last


# ------------------------------------------------------------------------------------------------


_FALLBACK_WARNED = False


def _warn_fallback(reason):
  """impl="auto" on a GPU that does not get the Triton kernel: say so (once per process)."""
  global _FALLBACK_WARNED
  if not _FALLBACK_WARNED:
    _FALLBACK_WARNED = True
    warnings.warn(f"selective_scan(impl='auto') on a GPU runs 'chunked', not the Triton kernel: "
                  f"{reason}", RuntimeWarning, stacklevel=3)


def _auto_impl(u, delta, A, B, C, D, z, delta_bias):
  backend = jax.default_backend()
  if backend == "cpu":
    # Measured (kernels/RESULTS.md): lax.scan beats both parallel scans on the CPU, forward and
    # forward+backward (e.g. 0.77 s vs 1.06 s for chunked(32) at (4, 1024, 256, 16) fwd+bwd).
    return "reference"
  if backend != "gpu":
    return "chunked"
  from jaxmamba.ops import triton_dispatch  # noqa: PLC0415  (lazy: GPU only)
  reason = (triton_dispatch.unavailable_reason()
            or triton_dispatch.support_reason(u, delta, A, B, C, D, z, delta_bias))
  if reason is not None:
    _warn_fallback(reason)
    return "chunked"
  return "triton"


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, impl="auto", chunk_size=DEFAULT_CHUNK):
  """Mamba-1 selective scan; see the module docstring for layouts and `impl` choices.

  Returns y (batch, dim, L) in u's dtype, and with `return_last_state` also (y, last_state) with
  last_state (batch, dim, N) float32.
  """
  check_args(u, delta, A, B, C, D, z, delta_bias)
  if impl not in IMPLS:
    raise ValueError(f"selective_scan: unknown impl {impl!r}; choose one of {IMPLS}")
  if not (isinstance(chunk_size, int) and chunk_size >= 1):
    raise ValueError(f"selective_scan: chunk_size must be a positive int, got {chunk_size!r}")
  if impl == "auto":
    impl = _auto_impl(u, delta, A, B, C, D, z, delta_bias)
  if impl == "triton":
    from jaxmamba.ops import triton_dispatch  # noqa: PLC0415
    y, last = triton_dispatch.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (y, last) if return_last_state else y

  u32, delta32, A32, B32, C32 = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
  if impl == "reference":
    y, last = _scan_reference(u32, delta32, A32, B32, C32)
  elif impl == "associative":
    y, last = _scan_associative(u32, delta32, A32, B32, C32)
  else:
    y, last = _scan_chunked(u32, delta32, A32, B32, C32, chunk_size)
  out = _finish(y, u, u32, D, z, u.dtype)
  return (out, last) if return_last_state else out
