"""Transposed convolutions as matrix products, whose gradients XLA's CPU runs fast.

XLA computes a transposed convolution as a convolution of the zero-dilated input, and its
gradient on the CPU falls off the fast Eigen path: a 2x2 stride-2 ConvTranspose 128->64 on
2x128x128 took 0.1 s forward and 22 s forward + backward.  When the kernel equals the stride and
there is no padding (nnU-Net's and UNet's upsampling) every input pixel writes its own output
patch, so the layer is one matrix product and a reshape: 0.37 s forward + backward
(`python -m experiments.bench_train --compare_torch` prints the micro-benchmark).  The weight
gradient is summed over blocks of pixels, which keeps both CPU threads busy where one product
with a huge contraction and a small result would not.  Overlapping kernels (ResNet-Seg's 4x4
stride 2 padding 1) are one product of input patches per stride phase (conv_transpose_phases).

Measured and not used: the same blocked products for the ordinary convolutions' weight gradient
(one per kernel tap) made UMambaBot-PP's train step slower (1.8 s against 1.5 s at batch 4,
128 px), so those stay XLA's own; and XLA's CPU options `--xla_cpu_use_onednn=true` and
`--xla_cpu_use_xnnpack=true` made the forward convolution 2-3x and the transposed convolution's
gradient 4-5x slower, so they stay at their defaults.

`use_fast_cpu_path()` decides once, at trace time: on a GPU the native (cuDNN) path stays.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# Output pixels per block of the weight-gradient product (see _blocked_xt_y).
_BLOCK_ROWS = 4096
# Output pixels per im2col block of an ordinary convolution's weight gradient (_weight_gradient):
# 2048 measured best of 1024-16384 for a 3x3 conv 64->64 on 4x256x256.
_PATCH_PIXELS = 2048


# False forces XLA's native convolutions everywhere (`bench_train --native_conv`: the "before").
ENABLED = True


def use_fast_cpu_path() -> bool:
  """The matrix-product ConvTransposes help XLA's CPU backend; decided at trace time."""
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


def conv_transpose_phases(x, kernel, stride: int, padding: int):
  """torch ConvTranspose2d (square kernel k, stride s, padding p) without the dilated input.

  Output pixel o + p = m*s + r gets x[m - j] * w[r + j*s] over the taps j: each of the s*s
  output phases r is an ordinary stride-1 convolution of x with every s-th tap of the kernel.
  With the s*s sub-kernels stacked on the output features, the layer is one matrix product of
  the input's taps x taps patches (im2col), whose phases are then interleaved and the border p
  cropped.  XLA's autodiff of that is matrix products and pads: ResNet-Seg's 4x4 stride-2
  ConvTranspose 128->64 on 4x32x32 took 35 ms forward + backward against 1.5 s for the dilated
  convolution.  Measured and not used: the stacked sub-kernels as one stride-1 convolution
  (XLA's convolution gradient, 2-3x slower than the dilated one here) and the blocked weight
  gradient of _blocked_xt_y (no gain, and slow where few pixel counts divide the block).
  `kernel` is (k, k, in, out).
  """
  k, k2, cin, cout = kernel.shape
  n, h, wd, _ = x.shape
  s, p = stride, padding
  out_h, out_w = (h - 1) * s - 2 * p + k, (wd - 1) * s - 2 * p + k
  if k != k2 or s < 1 or p < 0 or min(out_h, out_w) < 1:
    raise ValueError(f"conv_transpose_phases: needs a square kernel, stride >= 1, padding >= 0 "
                     f"and a non-empty output, got kernel {kernel.shape[:2]}, stride {s}, "
                     f"padding {p}, input {h}x{wd}")
  taps = -(-k // s)
  # taps past k are zero; tap t = j*s + r -> (j, r), flipped in j to read x[m - j] as a patch
  w = jnp.pad(kernel, ((0, taps * s - k), (0, taps * s - k), (0, 0), (0, 0)))
  w = w.reshape(taps, s, taps, s, cin, cout)[::-1, :, ::-1]
  w = w.transpose(0, 2, 4, 1, 3, 5).reshape(taps * taps * cin, s * s * cout)
  hm, wm = h + taps - 1, wd + taps - 1  # the full (uncropped) output, in input pixels
  xp = jnp.pad(x, ((0, 0), (taps - 1, taps - 1), (taps - 1, taps - 1), (0, 0)))
  patches = jnp.concatenate(
      [xp[:, a:a + hm, b:b + wm] for a in range(taps) for b in range(taps)], axis=-1)
  u = jnp.dot(patches, w).reshape(n, hm, wm, s, s, cout)
  u = u.transpose(0, 1, 3, 2, 4, 5).reshape(n, hm * s, wm * s, cout)
  return u[:, p:p + out_h, p:p + out_w]


# ------------------------------------------------------------------------------------------------
# Ordinary convolutions: XLA's forward and input gradient, our weight gradient


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, whose weight gradient runs 2-4x faster on a CPU (nn.Conv's hook).

  XLA computes a convolution's weight gradient as a convolution whose kernel is the whole
  cotangent image; on the CPU that falls off the fast path (a 3x3 conv 64->64 on 4x256x256:
  80 ms forward, 81 ms input gradient, 808 ms weight gradient).  Where this helps (a CPU, a 2-D
  NHWC/HWIO convolution, no groups, no input dilation) the forward pass and the input gradient
  stay XLA's own and the weight gradient is an im2col product over blocks of output rows
  (_weight_gradient: 210 ms there); a 1x1 kernel is one matrix product (_pointwise_conv).
  Everything else is `lax.conv_general_dilated` unchanged.
  """
  native = lambda: lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  if not (use_fast_cpu_path() and lhs.ndim == 4 and feature_group_count == 1
          and batch_group_count == 1 and preferred_element_type is None
          and all(d == 1 for d in (lhs_dilation or (1, 1)))
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
    return native()
  dilation = tuple(rhs_dilation or (1, 1))
  if isinstance(padding, str):
    window = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation)]
    padding = lax.padtype_to_pads(lhs.shape[1:3], window, window_strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if min(min(p) for p in padding) < 0:
    return native()
  if rhs.shape[:2] == (1, 1):
    return _pointwise_conv(lhs, rhs, tuple(window_strides), padding, precision)
  return conv2d_nhwc(lhs, rhs, tuple(window_strides), padding, dilation, precision)


def _pointwise_conv(x, w, strides, padding, precision):
  """A 1x1 convolution as the matrix product it is: 4-5x faster forward + backward than XLA's CPU
  convolution (1024->256 on 4x64x64: 148 against 716 ms); XLA differentiates the product."""
  if any(p for pair in padding for p in pair):
    x = jnp.pad(x, ((0, 0),) + padding + ((0, 0),))
  if strides != (1, 1):
    x = x[:, ::strides[0], ::strides[1]]
  return lax.dot_general(x, w[0, 0], (((3,), (0,)), ((), ())), precision=precision)


_NHWC = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x, w, strides, padding, dilation, precision):
  return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                  dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv2d_nhwc(x, w, strides, padding, dilation, precision=None):
  """A 2-D convolution (x NHWC, w HWIO, explicit padding) with the im2col weight gradient."""
  return _xla_conv(x, w, strides, padding, dilation, precision)


def _conv2d_fwd(x, w, strides, padding, dilation, precision):
  return _xla_conv(x, w, strides, padding, dilation, precision), (x, w)


def _conv2d_bwd(strides, padding, dilation, precision, res, ct):
  x, w = res
  # XLA's input gradient is a forward convolution and already fast; unused cotangents (the image
  # fed to the first layer) are dropped by XLA's dead-code elimination.
  (dx,) = jax.linear_transpose(
      lambda a: _xla_conv(a, w, strides, padding, dilation, precision), x)(ct)
  dw = _weight_gradient(x, ct, w.shape[:2], strides, padding, dilation, precision)
  return dx, dw.astype(w.dtype)


conv2d_nhwc.defvjp(_conv2d_fwd, _conv2d_bwd)


def _largest_divisor_at_most(n: int, cap: int) -> int:
  return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def _weight_gradient(x, ct, kernel_size: Sequence[int], strides, padding, dilation,
                     precision=None):
  """d(conv)/d(kernel) (kh, kw, in, out) in float32: sum over output pixels of patch^T ct.

  The patches (im2col) of ~_PATCH_PIXELS output pixels at a time are built and multiplied in a
  loop, so no full im2col matrix is ever written: the loop body's product has a contraction of
  a few thousand and a (out, kh*kw*in) result, a shape XLA's CPU dot runs near its peak, where
  the native gradient's one contraction over the whole image does not.
  """
  n, h, wd, c = x.shape
  _, oh, ow, o = ct.shape
  kh, kw = kernel_size
  (sh, sw), (dh, dw) = strides, dilation
  (pt, pb), (pl, pr) = padding
  images = _largest_divisor_at_most(n, max(1, _PATCH_PIXELS // ow))
  rows = max(1, min(oh, _PATCH_PIXELS // (images * ow)))
  row_blocks = -(-oh // rows)
  span_h = (rows - 1) * sh + (kh - 1) * dh + 1
  # zero rows past the bottom feed only the zero cotangent rows of the last, padded block
  extra_h = max(0, (row_blocks * rows - 1) * sh + (kh - 1) * dh + 1 - (h + pt + pb))
  xp = jnp.pad(x, ((0, 0), (pt, pb + extra_h), (pl, pr), (0, 0)))
  ctp = jnp.pad(ct, ((0, 0), (0, row_blocks * rows - oh), (0, 0), (0, 0)))
  taps = [(a * dh, b * dw) for a in range(kh) for b in range(kw)]

  def block(i):
    img, row = (i // row_blocks) * images, (i % row_blocks) * rows
    xb = lax.dynamic_slice(xp, (img, row * sh, 0, 0), (images, span_h) + xp.shape[2:])
    patches = jnp.concatenate(
        [xb[:, a:a + (rows - 1) * sh + 1:sh, b:b + (ow - 1) * sw + 1:sw] for a, b in taps], -1)
    cb = lax.dynamic_slice(ctp, (img, row, 0, 0), (images, rows, ow, o))
    return lax.dot_general(cb.reshape(-1, o), patches.reshape(-1, kh * kw * c),
                           (((0,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)

  count = (n // images) * row_blocks
  acc = block(0) if count == 1 else lax.fori_loop(
      0, count, lambda i, acc: acc + block(i), jnp.zeros((o, kh * kw * c), jnp.float32))
  return acc.T.reshape(kh, kw, c, o)
