"""Depthwise convolution (groups == input channels, stride 1) as a sum of shifted products.

XLA lowers a grouped convolution's gradient on the CPU to something 30-200x slower than the
forward pass (SegFormer's 3x3 depthwise MLP convs made its train step 68x its forward; measured
in kernels/NOTES.md); written as K shifted multiply-adds, forward and gradient are elementwise
work that XLA fuses, on any backend.  This is also how mamba_ssm's causal_conv1d kernel computes
Mamba's conv1d.  Products and sums are in float32 whatever the compute dtype (a bfloat16 conv
accumulates in float32 too).

Parameters are laid out exactly as flax's `nn.Conv(features, kernel_size,
feature_group_count=C)`: `kernel` (*kernel_size, 1, features) and `bias` (features,), with
output channel o = c * multiplier + m reading input channel c, so checkpoints and converters
are shared with the `nn.Conv` formulation.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

# Values per block of the kernel gradient's loop (_kernel_gradient): 2^17 float32 (512 KB),
# measured best of 1-16 rows a block for SegFormer's stage-1 MLP conv (4x64x64x256: 2 rows).
_BLOCK_ELEMENTS = 1 << 17


class DepthwiseConv(nn.Module):
  """Stride-1, undilated conv with `feature_group_count` = input channels (channels last).

  With `split_multiplier`, returns the M = features / C outputs per channel as M arrays of C
  channels, the m-th holding torch's channels c * M + m, each computed from x directly (for a
  next layer that takes them so, as SegFormer's MixMLP does).
  """
  features: int
  kernel_size: Sequence[int]
  padding: Sequence[tuple[int, int]]
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = None
  param_dtype: Any = jnp.float32
  split_multiplier: bool = False

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    if self.features % channels:
      raise ValueError(f"DepthwiseConv: features={self.features} is not a multiple of the "
                       f"{channels} input channels")
    ks = tuple(self.kernel_size)
    nd = len(ks)
    if x.ndim != nd + 2 or len(self.padding) != nd:
      raise ValueError(f"DepthwiseConv: a {nd}-D kernel needs (batch, *{nd} spatial, channels) "
                       f"input and {nd} padding pairs, got {x.shape} and {self.padding}")
    kernel = self.param("kernel", self.kernel_init, ks + (1, self.features), self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    out_dtype = x.dtype
    multiplier = self.features // channels
    w = kernel.astype(jnp.float32).reshape(ks + (self.features,))
    bias = None if bias is None else bias.astype(jnp.float32)
    x = x.astype(jnp.float32)
    padded = [x.shape[1 + i] + sum(self.padding[i]) for i in range(nd)]
    if min(p - k + 1 for p, k in zip(padded, ks)) < 1:
      raise ValueError(f"DepthwiseConv: kernel {ks} larger than the padded input {padded}")
    padding = tuple(tuple(p) for p in self.padding)
    # Each multiplier's C output channels from x itself: x's channels are never repeated.
    parts = tuple(depthwise_conv(x, w[..., m::multiplier], padding)
                  + (0.0 if bias is None else bias[m::multiplier]) for m in range(multiplier))
    if self.split_multiplier:
      return tuple(p.astype(out_dtype) for p in parts)
    y = parts[0] if multiplier == 1 else jnp.stack(parts, -1).reshape(   # torch's c * M + m
        parts[0].shape[:-1] + (self.features,))
    return y.astype(out_dtype)


def _windows(xp, ks, out_sizes):
  """(tap, the window of `xp` that tap reads) for each tap of a `ks` kernel, stride 1."""
  for tap in itertools.product(*(range(k) for k in ks)):
    yield tap, xp[(slice(None),) + tuple(slice(t, t + n) for t, n in zip(tap, out_sizes))]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv(x, w, padding):
  """y[..., o] = sum over taps t of x_padded[p + t, o] * w[t, o]: x (batch, *spatial, C) with one
  input channel per output channel, w (*kernel, C), float32.

  Both gradients are written as the same kind of shifted products (dx: the cotangent shifted the
  other way; dw: one product-sum per tap), where autodiff of the forward sum pads every tap's
  window back to the input's size.  SegFormer's stage-1 MLP conv (4x64x64, 64->256), forward +
  backward: 91 ms by autodiff, 41 ms so (the forward alone: 5 ms; PyTorch's forward + backward:
  30 ms).
  """
  return _depthwise_fwd(x, w, padding)[0]


def _depthwise_fwd(x, w, padding):
  ks = w.shape[:-1]
  xp = jnp.pad(x, ((0, 0),) + padding + ((0, 0),))
  out_sizes = [xp.shape[1 + i] - k + 1 for i, k in enumerate(ks)]
  y = 0.0
  for tap, window in _windows(xp, ks, out_sizes):
    y = y + window * w[tap]
  return y, (xp, w)


def _depthwise_bwd(padding, res, ct):
  # The barrier keeps XLA from merging the windows read here with the forward pass's identical
  # ones, which it then wrote out in the forward pass too (profiled in SegFormer's train step:
  # ~50 ms a stage-1 block's forward, against 5 with each pass reading its own windows).
  xp, w = jax.lax.optimization_barrier(res)
  ks = w.shape[:-1]
  # dxp[q] = sum_t ct[q - t] w[t]: the cotangent padded by k-1 and read at offset k-1-t
  ctp = jnp.pad(ct, ((0, 0),) + tuple((k - 1, k - 1) for k in ks) + ((0, 0),))
  dxp = 0.0
  for tap, window in _windows(ctp[(slice(None),) + tuple(slice(None, None, -1) for _ in ks)],
                              ks, xp.shape[1:-1]):
    dxp = dxp + window * w[tap]
  dxp = dxp[(slice(None),) + tuple(slice(None, None, -1) for _ in ks)]
  dx = dxp[(slice(None),) + tuple(slice(lo, n - hi) for (lo, hi), n in
                                  zip(padding, xp.shape[1:-1]))]
  return dx, _kernel_gradient(xp, ct, ks).reshape(w.shape)


def _kernel_gradient(xp, ct, ks):
  """(taps, C): per tap, the sum over batch and positions of window * ct, over blocks of rows.

  Over the whole image, XLA:CPU wrote every tap's window out to memory before its reduction
  read it back (SegFormer's stage-1 MLP conv: 50 ms for the nine); a loop over blocks of
  ~_BLOCK_ELEMENTS keeps each block's windows in cache (3x faster there).
  """
  rows = ct.shape[1]
  rows_per_block = max(1, min(rows, _BLOCK_ELEMENTS // (ct.size // rows)))
  blocks = -(-rows // rows_per_block)
  sum_axes = tuple(range(ct.ndim - 1))

  def block_sums(xb, cb):
    # reduce_precision to float32's own precision is the identity; it keeps the product out of
    # XLA:CPU's YNNPACK reduce fusion, which wrote each window out first, so that XLA's own
    # reduction reads the windows in place (SegFormer's stage-1 sums: 3.9 -> 2.8 ms a map).
    return jnp.stack([jnp.sum(jax.lax.reduce_precision(window * cb, 8, 23), sum_axes)
                      for _, window in _windows(xb, ks, cb.shape[1:-1])])
  if blocks == 1:
    return block_sums(xp, ct)
  # zero cotangent rows past the end contribute nothing; zero input rows keep the slices in range
  extra = blocks * rows_per_block - rows
  widths = [(0, 0)] * ct.ndim
  widths[1] = (0, extra)
  ct, xp = jnp.pad(ct, widths), jnp.pad(xp, widths)

  def body(i, acc):
    start = i * rows_per_block
    xb = jax.lax.dynamic_slice_in_dim(xp, start, rows_per_block + ks[0] - 1, axis=1)
    cb = jax.lax.dynamic_slice_in_dim(ct, start, rows_per_block, axis=1)
    return acc + block_sums(xb, cb)
  return jax.lax.fori_loop(0, blocks, body, jnp.zeros((math.prod(ks), ct.shape[-1]), ct.dtype))


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)
