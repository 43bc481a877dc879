"""The 2x2 stride-2 transposed convolution as a matrix product, whose gradient XLA's CPU runs fast.

XLA computes a transposed convolution as a convolution of the zero-dilated input, and its
gradient on the CPU falls off the fast Eigen path: a 2x2 stride-2 ConvTranspose 128->64 on
2x128x128 took 0.1 s forward and 22 s forward + backward.  When the kernel equals the stride and
there is no padding (nnU-Net's and UNet's upsampling) every input pixel writes its own output
patch, so the layer is one matrix product and a reshape: 0.37 s forward + backward
(`python -m experiments.bench_train --compare_torch` prints the micro-benchmark).  The weight
gradient is summed over blocks of pixels, which keeps both CPU threads busy where one product
with a huge contraction and a small result would not.

Measured and not used: the same blocked products for the ordinary convolutions' weight gradient
(one per kernel tap) made UMambaBot-PP's train step slower (1.8 s against 1.5 s at batch 4,
128 px), so those stay XLA's own; and XLA's CPU options `--xla_cpu_use_onednn=true` and
`--xla_cpu_use_xnnpack=true` made the forward convolution 2-3x and the transposed convolution's
gradient 4-5x slower, so they stay at their defaults.

`use_fast_cpu_path()` decides once, at trace time: on a GPU the native (cuDNN) path stays.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Output pixels per block of the weight-gradient product (see _blocked_xt_y).
_BLOCK_ROWS = 4096


# False forces XLA's native convolutions everywhere (`bench_train --native_conv`: the "before").
ENABLED = True


def use_fast_cpu_path() -> bool:
  """The matrix-product ConvTranspose helps XLA's CPU backend; decided at trace time."""
  return ENABLED and jax.default_backend() == "cpu"


def _blocked_xt_y(a, b):
  """a (K, i), b (K, o) -> a^T b (i, o) in float32, as a batch of products over row blocks.

  XLA's CPU dot with a huge contraction and a small result runs on one thread at a fraction of
  peak; ~_BLOCK_ROWS rows per block, multiplied as a batch and summed, keeps both threads busy.
  """
  k = a.shape[0]
  rows = math.gcd(k, _BLOCK_ROWS) if k > _BLOCK_ROWS else k
  a = a.astype(jnp.float32).reshape(k // rows, rows, -1)
  b = b.astype(jnp.float32).reshape(k // rows, rows, -1)
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((0,), (0,)))).sum(0)


def _pixel_shuffle_matmul(x, w):
  """x (n, h, wd, c) @ w (c, kh, kw, o) -> (n, h*kh, wd*kw, o): each input pixel its own patch."""
  n, h, wd, _ = x.shape
  _, kh, kw, o = w.shape
  y = jnp.einsum("nhwc,cabo->nhawbo", x, w)
  return y.reshape(n, h * kh, wd * kw, o)


@jax.custom_vjp
def conv_transpose_nonoverlapping(x, kernel):
  """torch ConvTranspose2d with kernel == stride and no padding; `kernel` (kh, kw, in, out)."""
  return _pixel_shuffle_matmul(x, jnp.transpose(kernel, (2, 0, 1, 3)))


def _convt_fwd(x, kernel):
  return conv_transpose_nonoverlapping(x, kernel), (x, kernel)


def _convt_bwd(res, ct):
  x, kernel = res
  kh, kw, cin, cout = kernel.shape
  n, h, wd, _ = x.shape
  # ct (n, h*kh, wd*kw, o) -> rows (n*h*wd, kh*kw*o): each input pixel's patch
  patches = ct.reshape(n, h, kh, wd, kw, cout).transpose(0, 1, 3, 2, 4, 5).reshape(
      n * h * wd, kh * kw * cout)
  w_rows = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin, kh * kw * cout)
  dx = jnp.dot(patches, w_rows.T).reshape(x.shape)
  dw = _blocked_xt_y(x.reshape(n * h * wd, cin), patches)
  dw = jnp.transpose(dw.reshape(cin, kh, kw, cout), (1, 2, 0, 3))
  return dx.astype(x.dtype), dw.astype(kernel.dtype)


conv_transpose_nonoverlapping.defvjp(_convt_fwd, _convt_bwd)
