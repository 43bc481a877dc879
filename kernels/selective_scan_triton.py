"""The Mamba-1 selective scan as Triton kernels: a two-level chunked scan, forward and backward.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t   (per batch b, channel d, state n)
    y_t = (<C_t, h_t> + D * u_t) * silu(z_t)

Layouts are mamba_ssm's (see jaxmamba/ops/selective_scan.py): u, delta, z, y (b, dim, L);
A (dim, N); B, C (b, G, N, L) (G = 1 for ungrouped); D, delta_bias (dim,).

Every time-parallel program works on one (BLOCK_D channels x CHUNK steps) tile of one batch row
and walks the N states in a loop, so B_n and C_n are loaded once per (batch, step) and shared by
the channels of the tile (a run-time loop: unrolled, it let the compiler hoist every state's
loads, and `_bwd_grads` spilled registers at every tile size -- ptxas, kernels/NOTES.md); the scan over the tile's time axis is a `tl.associative_scan`
of affine maps (a, b): h -> a*h + b.  exp is exp2 with log2(e) folded into A.

Forward (3 launches):
  1. `_fwd_chunk_summary`  (chunk, d-block, batch): per state n, the chunk's affine map
     (P = prod a, S = local end state from h=0).  Out: P, S (b, chunks, dim, N).
  2. `_chain_chunks`       (d*N block, batch): sequential over chunks, H[c] = state entering c;
     also the final state.  Tiny: it touches 1/CHUNK of the input's size per state.
  3. `_fwd_output`         (chunk, d-block, batch): rescan each chunk from H[c], y = C.h + D u,
     gate.  Writes y only.  Saved for the backward: H, (b, chunks, dim, N) -- never (b, dim, L, N).

Backward (3 launches), with g_t = dL/dh_t = a_{t+1} g_{t+1} + C_t dy_t (a reverse scan):
  1. `_bwd_chunk_summary`  per chunk: Q = prod_{t in chunk} a_{t+1}, Gloc = g at the chunk's first
     step from g = 0 after the chunk.  The reverse scan runs as a forward scan over tiles loaded
     in reversed time order (no `reverse=True`, whose codegen has had open bugs in Triton).
  2. `_chain_chunks`       reversed: Gin[c] = g at the first step of chunk c + 1, starting from
     the last state's cotangent.
  3. `_bwd_grads`          per chunk: recompute h from H[c] (forward scan), g from Gin[c]
     (reversed-order scan, `tl.flip`ped back), then every gradient.  Reductions across programs:
     dB, dC (sum over the tile's channels, then over d-blocks) with fp32 atomics into a zeroed
     (b, G, N, L) buffer, as mamba_ssm does; dA, dD, d(delta_bias) as per-(batch, chunk) partial
     sums that the caller sums (deterministic, and exact per batch row, which lets vmap fold
     into the batch).

The six launches (grids, argument order, outputs, constexprs) are described once, in
kernels/launch_plan.py, which both the JAX binding and the torch launch functions at the bottom run
(torch: a GPU, or the CPU under TRITON_INTERPRET=1, which must be set before triton is imported).
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels import launch_plan
from kernels.launch_plan import DEFAULT_BLOCK_D, DEFAULT_CHUNK, NUM_WARPS

# Globals read inside kernels must be tl.constexpr.
LOG2E = tl.constexpr(1.4426950408889634)
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # torch's softplus: identity above this


# ------------------------------------------------------------------------------------------------
# Device functions.


@triton.jit
def _affine_combine(a_l, b_l, a_r, b_r):
  # Apply (a_l, b_l) first, then (a_r, b_r): h -> a_r * (a_l * h + b_l) + b_r.
  return a_l * a_r, a_r * b_l + b_r


@triton.jit
def _delta(delta_ptr, bias_ptr, offs, mask, d_idx, d_mask,
           HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
  """delta after bias and softplus (0 where masked, so a = 1 and the state passes through), and
  d delta / d raw delta."""
  raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
  if HAS_BIAS:
    raw += tl.load(bias_ptr + d_idx, mask=d_mask, other=0.0).to(tl.float32)[:, None]
  if SOFTPLUS:
    e = tl.exp(tl.minimum(raw, SOFTPLUS_THRESHOLD))
    # log(1 + e) loses e when e < 2^-24; e itself is then the answer to float precision.
    soft = tl.where(raw < -15.0, e, tl.log(1.0 + e))
    val = tl.where(raw > SOFTPLUS_THRESHOLD, raw, soft)
    slope = tl.where(raw > SOFTPLUS_THRESHOLD, 1.0, e / (1.0 + e))
  else:
    val = raw
    slope = tl.full(raw.shape, 1.0, tl.float32)
  return tl.where(mask, val, 0.0), slope


@triton.jit
def _gate(z_ptr, offs, mask, HAS_Z: tl.constexpr):
  """(silu(z), d silu / dz) on a tile; (1, 0) without z."""
  if HAS_Z:
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(z)
    return z * sig, sig * (1.0 + z * (1.0 - sig))
  else:
    return tl.full(offs.shape, 1.0, tl.float32), tl.full(offs.shape, 0.0, tl.float32)


@triton.jit
def _tile(L, dim, nchunks, groups,
          N: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr):
  """Indices of this program's (channels x steps) tile and the base offsets it needs."""
  if ALIGNED:
    # L % 16 == 0: rows start 64-byte aligned, so tile loads can be vectorised (jax_triton does
    # not specialise integer arguments on divisibility itself).
    L = tl.multiple_of(L, 16)
  c = tl.program_id(0)
  blk = tl.program_id(1)
  b = tl.program_id(2).to(tl.int64)
  d_idx = blk * BLOCK_D + tl.arange(0, BLOCK_D)
  d_mask = d_idx < dim
  i = tl.arange(0, CHUNK)
  t = c * CHUNK + i
  # Channel blocks never straddle a B/C group (the launcher picks BLOCK_D so), so B_n, C_n are
  # one row per tile.
  group = (blk * BLOCK_D) // (dim // groups)
  row_base = (b * dim + d_idx) * L                     # (BLOCK_D,) into (b, dim, L)
  bc_base = (b * groups + group) * N * L               # scalar; + n * L into (b, G, N, L)
  state_base = ((b * nchunks + c) * dim + d_idx)       # (BLOCK_D,) into (b, chunks, dim[, N])
  return c, b, group, d_idx, d_mask, i, t, row_base, bc_base, state_base


# ------------------------------------------------------------------------------------------------
# Forward.


@triton.jit
def _fwd_chunk_summary(u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr,
                       L, dim, nchunks, groups,
                       P_ptr, S_ptr,
                       N: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                       ALIGNED: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
  c, b, group, d_idx, d_mask, i, t, row_base, bc_base, state_base = _tile(
      L, dim, nchunks, groups, N, BLOCK_D, CHUNK, ALIGNED)
  t_mask = t < L
  mask = d_mask[:, None] & t_mask[None, :]
  offs = row_base[:, None] + t[None, :]
  delta, _ = _delta(delta_ptr, bias_ptr, offs, mask, d_idx, d_mask, HAS_BIAS, SOFTPLUS)
  du = delta * tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
  delta_sum = tl.sum(delta, axis=1)
  for n in range(N):
    A2 = tl.load(A_ptr + d_idx * N + n, mask=d_mask, other=0.0).to(tl.float32) * LOG2E
    Bn = tl.load(B_ptr + bc_base + n * L + t, mask=t_mask, other=0.0).to(tl.float32)
    a = tl.exp2(delta * A2[:, None])
    _, h = tl.associative_scan((a, du * Bn[None, :]), 1, _affine_combine)
    end_state = tl.sum(tl.where(i[None, :] == CHUNK - 1, h, 0.0), axis=1)
    tl.store(P_ptr + state_base * N + n, tl.exp2(delta_sum * A2), mask=d_mask)
    tl.store(S_ptr + state_base * N + n, end_state, mask=d_mask)


@triton.jit
def _chain_chunks(P_ptr, S_ptr, init_ptr, nchunks, width,
                  H_ptr, final_ptr,
                  BLOCK: tl.constexpr, REVERSE: tl.constexpr):
  """Sequential over chunks: H[c] = carry entering chunk c; carry = P[c] * carry + S[c].

  Forward: chunks in order, from init (zeros).  Backward (REVERSE): chunks last to first, from the
  last state's cotangent, giving Gin[c] = adjoint at the first step of chunk c + 1.
  """
  b = tl.program_id(1).to(tl.int64)
  j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
  m = j < width
  carry = tl.load(init_ptr + b * width + j, mask=m, other=0.0).to(tl.float32)
  for k in range(nchunks):
    c = nchunks - 1 - k if REVERSE else k
    offs = (b * nchunks + c) * width + j
    tl.store(H_ptr + offs, carry, mask=m)
    carry = tl.load(P_ptr + offs, mask=m, other=1.0) * carry + tl.load(S_ptr + offs, mask=m,
                                                                       other=0.0)
  tl.store(final_ptr + b * width + j, carry, mask=m)


@triton.jit
def _fwd_output(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, H_ptr,
                L, dim, nchunks, groups,
                y_ptr,
                N: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr):
  c, b, group, d_idx, d_mask, i, t, row_base, bc_base, state_base = _tile(
      L, dim, nchunks, groups, N, BLOCK_D, CHUNK, ALIGNED)
  t_mask = t < L
  mask = d_mask[:, None] & t_mask[None, :]
  offs = row_base[:, None] + t[None, :]
  delta, _ = _delta(delta_ptr, bias_ptr, offs, mask, d_idx, d_mask, HAS_BIAS, SOFTPLUS)
  u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
  du = delta * u
  first = i[None, :] == 0
  y = tl.zeros((BLOCK_D, CHUNK), tl.float32)
  for n in range(N):
    A2 = tl.load(A_ptr + d_idx * N + n, mask=d_mask, other=0.0).to(tl.float32) * LOG2E
    Bn = tl.load(B_ptr + bc_base + n * L + t, mask=t_mask, other=0.0).to(tl.float32)
    Cn = tl.load(C_ptr + bc_base + n * L + t, mask=t_mask, other=0.0).to(tl.float32)
    h0 = tl.load(H_ptr + state_base * N + n, mask=d_mask, other=0.0)
    a = tl.exp2(delta * A2[:, None])
    x = du * Bn[None, :]
    x = tl.where(first, x + a * h0[:, None], x)   # fold the incoming state into step 0
    _, h = tl.associative_scan((a, x), 1, _affine_combine)
    y += h * Cn[None, :]
  if HAS_D:
    y += u * tl.load(D_ptr + d_idx, mask=d_mask, other=0.0).to(tl.float32)[:, None]
  gate, _ = _gate(z_ptr, offs, mask, HAS_Z)
  tl.store(y_ptr + offs, y * gate, mask=mask)


# ------------------------------------------------------------------------------------------------
# Backward.


@triton.jit
def _reversed_inputs(delta_ptr, bias_ptr, dout_ptr, z_ptr, row_base, c, i, d_idx, d_mask, L,
                     CHUNK: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr):
  """Tiles in reversed time order (column i holds step t = c*CHUNK + CHUNK-1-i): delta at t+1
  (the a that carries g_{t+1} back to g_t) and dy = dout * silu(z) at t."""
  t_rev = c * CHUNK + (CHUNK - 1) - i
  rev_mask = d_mask[:, None] & (t_rev < L)[None, :]
  rev_offs = row_base[:, None] + t_rev[None, :]
  next_mask = d_mask[:, None] & (t_rev + 1 < L)[None, :]
  delta_next, _ = _delta(delta_ptr, bias_ptr, rev_offs + 1, next_mask, d_idx, d_mask, HAS_BIAS,
                         SOFTPLUS)
  gate, _ = _gate(z_ptr, rev_offs, rev_mask, HAS_Z)
  dy = tl.load(dout_ptr + rev_offs, mask=rev_mask, other=0.0).to(tl.float32) * gate
  return t_rev, delta_next, dy


@triton.jit
def _bwd_chunk_summary(delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr,
                       L, dim, nchunks, groups,
                       Q_ptr, G_ptr,
                       N: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                       ALIGNED: tl.constexpr,
                       HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
  c, b, group, d_idx, d_mask, i, t, row_base, bc_base, state_base = _tile(
      L, dim, nchunks, groups, N, BLOCK_D, CHUNK, ALIGNED)
  t_rev, delta_next, dy = _reversed_inputs(delta_ptr, bias_ptr, dout_ptr, z_ptr, row_base, c, i,
                                           d_idx, d_mask, L, CHUNK, HAS_Z, HAS_BIAS, SOFTPLUS)
  next_sum = tl.sum(delta_next, axis=1)
  for n in range(N):
    A2 = tl.load(A_ptr + d_idx * N + n, mask=d_mask, other=0.0).to(tl.float32) * LOG2E
    Cn = tl.load(C_ptr + bc_base + n * L + t_rev, mask=t_rev < L, other=0.0).to(tl.float32)
    a_next = tl.exp2(delta_next * A2[:, None])
    _, g = tl.associative_scan((a_next, dy * Cn[None, :]), 1, _affine_combine)
    g_first = tl.sum(tl.where(i[None, :] == CHUNK - 1, g, 0.0), axis=1)
    tl.store(Q_ptr + state_base * N + n, tl.exp2(next_sum * A2), mask=d_mask)
    tl.store(G_ptr + state_base * N + n, g_first, mask=d_mask)


@triton.jit
def _bwd_grads(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr,
               H_ptr, Gin_ptr,
               L, dim, nchunks, groups,
               du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
               N: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr,
               HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
               SOFTPLUS: tl.constexpr):
  c, b, group, d_idx, d_mask, i, t, row_base, bc_base, state_base = _tile(
      L, dim, nchunks, groups, N, BLOCK_D, CHUNK, ALIGNED)
  t_mask = t < L
  mask = d_mask[:, None] & t_mask[None, :]
  offs = row_base[:, None] + t[None, :]
  delta, slope = _delta(delta_ptr, bias_ptr, offs, mask, d_idx, d_mask, HAS_BIAS, SOFTPLUS)
  u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
  dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
  gate, dgate = _gate(z_ptr, offs, mask, HAS_Z)
  dy = dout * gate
  t_rev, delta_next_r, dy_r = _reversed_inputs(delta_ptr, bias_ptr, dout_ptr, z_ptr, row_base, c,
                                               i, d_idx, d_mask, L, CHUNK, HAS_Z, HAS_BIAS,
                                               SOFTPLUS)
  du_delta = delta * u
  first = i[None, :] == 0
  y = tl.zeros((BLOCK_D, CHUNK), tl.float32)         # C.h, for dz
  du_acc = tl.zeros((BLOCK_D, CHUNK), tl.float32)
  ddelta_acc = tl.zeros((BLOCK_D, CHUNK), tl.float32)
  for n in range(N):
    A = tl.load(A_ptr + d_idx * N + n, mask=d_mask, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    Bn = tl.load(B_ptr + bc_base + n * L + t, mask=t_mask, other=0.0).to(tl.float32)
    Cn = tl.load(C_ptr + bc_base + n * L + t, mask=t_mask, other=0.0).to(tl.float32)
    Cn_r = tl.load(C_ptr + bc_base + n * L + t_rev, mask=t_rev < L, other=0.0).to(tl.float32)
    h0 = tl.load(H_ptr + state_base * N + n, mask=d_mask, other=0.0)
    g_in = tl.load(Gin_ptr + state_base * N + n, mask=d_mask, other=0.0)
    # h over the chunk, from the saved state entering it.
    a = tl.exp2(delta * A2[:, None])
    x = du_delta * Bn[None, :]
    _, h = tl.associative_scan((a, tl.where(first, x + a * h0[:, None], x)), 1, _affine_combine)
    # g over the chunk, in reversed order, from g at the next chunk's first step.
    a_next_r = tl.exp2(delta_next_r * A2[:, None])
    w_r = dy_r * Cn_r[None, :]
    w_r = tl.where(first, w_r + a_next_r * g_in[:, None], w_r)
    _, g_r = tl.associative_scan((a_next_r, w_r), 1, _affine_combine)
    g = tl.flip(g_r, 1)
    # h_t - x_t = a_t h_{t-1}: the term through a_t = exp(delta_t A).
    g_ah = g * (h - x)
    y += h * Cn[None, :]
    g_B = g * Bn[None, :]
    du_acc += g_B * delta
    ddelta_acc += g_B * u + g_ah * A[:, None]
    tl.store(dA_ptr + state_base * N + n, tl.sum(g_ah * delta, axis=1), mask=d_mask)
    tl.atomic_add(dB_ptr + bc_base + n * L + t, tl.sum(g * du_delta, axis=0), mask=t_mask)
    tl.atomic_add(dC_ptr + bc_base + n * L + t, tl.sum(h * dy, axis=0), mask=t_mask)
  if HAS_D:
    D = tl.load(D_ptr + d_idx, mask=d_mask, other=0.0).to(tl.float32)
    du_acc += dy * D[:, None]
    y += u * D[:, None]
    tl.store(dD_ptr + state_base, tl.sum(dy * u, axis=1), mask=d_mask)
  if HAS_Z:
    tl.store(dz_ptr + offs, dout * y * dgate, mask=mask)
  # Steps past L carry g (the last state's cotangent) through a = 1: keep them out of the sums.
  ddelta_raw = tl.where(mask, ddelta_acc * slope, 0.0)
  if HAS_BIAS:
    tl.store(dbias_ptr + state_base, tl.sum(ddelta_raw, axis=1), mask=d_mask)
  tl.store(du_ptr + offs, du_acc, mask=mask)
  tl.store(ddelta_ptr + offs, ddelta_raw, mask=mask)


# ------------------------------------------------------------------------------------------------
# Torch launch functions: the launch plan (kernels/launch_plan.py) run on torch tensors.

_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _specs(*arrays):
  return {name: None if x is None else (tuple(x.shape), str(x.dtype).removeprefix("torch."))
          for name, x in zip(_NAMES, arrays)}


def forward(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
            block_d=DEFAULT_BLOCK_D, chunk=DEFAULT_CHUNK, num_warps=NUM_WARPS):
  """Torch launch: returns (y in u's dtype, last state (b, dim, N) fp32, H (b, chunks, dim, N))."""
  arrays = (u, delta, A, B, C, D, z, delta_bias)
  p = launch_plan.forward_plan(_specs(*arrays), delta_softplus, block_d, chunk, num_warps)
  return launch_plan.run_torch(p, dict(zip(_NAMES, arrays)))


def backward_parts(dout, dlast, H, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, block_d=DEFAULT_BLOCK_D, chunk=DEFAULT_CHUNK,
                   num_warps=NUM_WARPS):
  """Torch launch of the backward, per batch row: (du, ddelta, dz, dB, dC (b, G, N, L) fp32,
  dA (b, chunks, dim, N), dD, ddelta_bias (b, chunks, dim) partial sums); None for absent
  optional inputs; dlast may be None."""
  import torch  # noqa: PLC0415

  arrays = (u, delta, A, B, C, D, z, delta_bias)
  p = launch_plan.backward_plan(_specs(*arrays), delta_softplus, block_d, chunk, num_warps)
  if dlast is None:
    dlast = torch.zeros(p.inputs["dlast"].shape, dtype=torch.float32, device=u.device)
  return launch_plan.run_torch(p, dict(zip(_NAMES, arrays), dy=dout, H=H,
                                       dlast=dlast.to(torch.float32)))


def backward(dout, dlast, H, u, delta, A, B, C, D=None, z=None, delta_bias=None,
             delta_softplus=False, block_d=DEFAULT_BLOCK_D, chunk=DEFAULT_CHUNK,
             num_warps=NUM_WARPS):
  """Torch launch: gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in the inputs' layouts
  and dtypes, None for absent optional inputs; dlast may be None."""
  du, ddelta, dz, dB, dC, dA, dD, dbias = backward_parts(
      dout, dlast, H, u, delta, A, B, C, D, z, delta_bias, delta_softplus, block_d, chunk,
      num_warps)
  dB, dC = dB.reshape(B.shape).to(B.dtype), dC.reshape(C.shape).to(C.dtype)
  dA = dA.sum((0, 1)).to(A.dtype)
  dD = dD.sum((0, 1)).to(D.dtype) if D is not None else None
  dbias = dbias.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None
  return du, ddelta, dA, dB, dC, dD, dz, dbias
