"""2-D convolutions whose gradients run fast on XLA's CPU backend; same parameters as flax's.

XLA computes a convolution's weight gradient on the CPU as a convolution whose "kernel" is the
whole output cotangent (batch and feature dimensions swapped), and a transposed convolution as a
convolution of a zero-dilated input; both fall off the fast Eigen path: a 3x3 64->64 conv on
4x256x256 takes ~0.1 s forward and ~1 s forward + backward, and a 2x2 stride-2 ConvTranspose's
gradient ~40x its forward (`python -m experiments.bench_train --compare_torch` prints the
micro-benchmark).  Here:

* `conv2d` (a `jax.custom_vjp`): forward and input gradient are XLA's own (the input gradient is
  a forward convolution of the cotangent with the flipped kernel, which is fast), the weight
  gradient is one matrix product per kernel tap, summed over blocks of output pixels so that
  each product has a large output (XLA's CPU dot with a huge contraction and a 64x64 result
  runs on one thread at a fraction of peak).
* `conv_transpose_nonoverlapping`: a transposed conv whose kernel equals its stride and has no
  padding (nnU-Net's and UNet's 2x2 stride-2 upsampling) is one matrix product and a reshape;
  its weight gradient goes through the same blocked products.

`Conv2d` keeps `nn.Conv`'s parameter names and shapes (`kernel` (kh, kw, in/groups, out),
`bias`), so checkpoints, converters and the parity tests see no difference.  Which formulation
runs is decided once, by `use_fast_cpu_path()`: on a GPU XLA's native convolutions (cuDNN) stay.

XLA's CPU options were measured on the same micro-benchmark and left at their defaults:
`--xla_cpu_use_onednn=true` and `--xla_cpu_use_xnnpack=true` made the forward convolution 2-3x
slower and the transposed convolution's gradient 4-5x slower.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

DIMS = ("NHWC", "HWIO", "NHWC")
# Output pixels per block of the weight-gradient products (see _blocked_xt_y).
_BLOCK_ROWS = 4096


# False forces XLA's native convolutions everywhere (`bench_train --native_conv`: the "before").
ENABLED = True


def use_fast_cpu_path() -> bool:
  """The blocked-product gradients help XLA's CPU backend only; decided at trace time."""
  return ENABLED and jax.default_backend() == "cpu"


def native_conv(x, w, strides, padding, dilation, groups):
  return jax.lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                      dimension_numbers=DIMS, feature_group_count=groups,
                                      preferred_element_type=None)


def _blocked_xt_y(a, b, groups: int = 1):
  """sum_k a[k, g, i] * b[k, g, o] -> (g, i, o), for a (K, g, i) and b (K, g, o), in float32.

  The contraction is split into blocks of ~_BLOCK_ROWS rows, multiplied as a batch and summed,
  which keeps both CPU threads busy where one (K, i)^T (K, o) dot would not.
  """
  k = a.shape[0]
  rows = math.gcd(k, _BLOCK_ROWS) if k > _BLOCK_ROWS else k
  nb = k // rows
  a = a.astype(jnp.float32).reshape(nb, rows, groups, -1)
  b = b.astype(jnp.float32).reshape(nb, rows, groups, -1)
  # batch dims (block, group), contract rows -> (nb, g, i, o)
  part = jax.lax.dot_general(a, b, (((1,), (1,)), ((0, 2), (0, 2))))
  return part.sum(0)


def _weight_grad(x, ct, kernel_shape, strides, padding, dilation, groups):
  """d(sum(conv(x, w) * ct))/dw as one blocked product per kernel tap."""
  kh, kw, cin_g, cout = kernel_shape
  n, ho, wo, _ = ct.shape
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  ct_rows = ct.reshape(n * ho * wo, groups, cout // groups)
  taps = []
  for i in range(kh):
    for j in range(kw):
      r0, c0 = i * dilation[0], j * dilation[1]
      window = jax.lax.slice(
          xp, (0, r0, c0, 0),
          (n, r0 + strides[0] * (ho - 1) + 1, c0 + strides[1] * (wo - 1) + 1, xp.shape[-1]),
          (1, strides[0], strides[1], 1))
      g = _blocked_xt_y(window.reshape(n * ho * wo, groups, cin_g), ct_rows, groups)
      # (g, cin_g, cout_g) -> (cin_g, g * cout_g): output channel o = g * cout_g + m
      taps.append(jnp.transpose(g, (1, 0, 2)).reshape(cin_g, cout))
  return jnp.stack(taps).reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv2d(x, w, strides, padding, dilation, groups):
  """lax.conv_general_dilated (NHWC, HWIO) with a weight gradient XLA's CPU backend runs fast.

  `strides`, `dilation`: pairs; `padding`: two (low, high) pairs; all static.
  """
  return native_conv(x, w, strides, padding, dilation, groups)


def _conv2d_fwd(x, w, strides, padding, dilation, groups):
  return native_conv(x, w, strides, padding, dilation, groups), (x, w)


def _conv2d_bwd(strides, padding, dilation, groups, res, ct):
  x, w = res
  _, input_vjp = jax.vjp(lambda x_: native_conv(x_, w, strides, padding, dilation, groups), x)
  (dx,) = input_vjp(ct)
  dw = _weight_grad(x, ct, w.shape, strides, padding, dilation, groups)
  return dx, dw.astype(w.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


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
  dw = _blocked_xt_y(x.reshape(n * h * wd, 1, cin), patches[:, None, :])[0]
  dw = jnp.transpose(dw.reshape(cin, kh, kw, cout), (1, 2, 0, 3))
  return dx.astype(x.dtype), dw.astype(kernel.dtype)


conv_transpose_nonoverlapping.defvjp(_convt_fwd, _convt_bwd)


def _pairs(v, n: int = 2) -> tuple:
  return tuple(v) if isinstance(v, Sequence) else (v,) * n


class Conv2d(nn.Module):
  """`nn.Conv` (2-D, NHWC, explicit padding) with the same parameters and a fast CPU gradient."""
  features: int
  kernel_size: Sequence[int]
  strides: Any = 1
  padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))
  kernel_dilation: Any = 1
  feature_group_count: int = 1
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    ks = tuple(self.kernel_size)
    groups = self.feature_group_count
    if x.ndim != 4 or len(ks) != 2:
      raise ValueError(f"Conv2d: expected NHWC input and a 2-D kernel, got {x.shape} and {ks}")
    if x.shape[-1] % groups or self.features % groups:
      raise ValueError(f"Conv2d: {x.shape[-1]} input and {self.features} output channels are "
                       f"not both divisible by feature_group_count={groups}")
    kernel = self.param("kernel", self.kernel_init, ks + (x.shape[-1] // groups, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    strides, dilation = _pairs(self.strides), _pairs(self.kernel_dilation)
    padding = tuple(tuple(p) for p in self.padding)
    conv = conv2d if use_fast_cpu_path() else native_conv
    y = conv(x, kernel, strides, padding, dilation, groups)
    if bias is not None:
      y = y + bias
    return y
