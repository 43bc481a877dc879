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

Ordinary convolutions stay XLA's own, on Eigen rather than YNNPACK (jaxmamba.xla_flags): there
XLA's weight gradient of a 3x3 conv 64->64 on 4x256x256 takes 161 ms, against 808 ms on
YNNPACK.  Measured and not used: the weight gradient as an im2col product over blocks of output
rows (210 ms there: 4x faster than YNNPACK's, 1.3x slower than Eigen's), a 1x1 convolution as
a matrix product (no faster than Eigen's in UNet, ResNet18-seg or SegFormer), per-tap blocked
products for the weight gradient (slower still), and XLA's CPU options `--xla_cpu_use_onednn`
and `--xla_cpu_use_xnnpack` (forward convolutions 2-3x, the transposed convolution's gradient
4-5x slower).

Ordinary convolutions do get one thing on the CPU (`Conv`): their operands are materialized for
the gradient.  XLA:CPU's weight gradient reads the activation as (C, H, W, N) and the cotangent as
(H, W, N, C), and XLA fuses those transposing copies with the elementwise layers before them
(BatchNorm, ReLU, ResNet's residual additions, up to 35 inputs in ResNet50-seg), recomputed in
transposed order: 21 ms instead of ~7 ms for a 4x256x256x32 copy in UNet.  An exact identity
that XLA counts as expensive, x / (1 + 0 * x), is one it will not duplicate into a second
consumer, so the copies read the array the forward pass already wrote.  Only differentiated
values pass through it (a network's input does not), and inference does not run it.
Interleaved train steps, batch 4, 256 px, without -> with: ResNet50-seg 1221 -> 908 ms,
ResNet18-seg 343 -> 313, UNet 1429 -> 1386, SegFormer 801 -> 768, UMambaBot-PP 2191 -> 2161.
Where the convolution pads, the forward pass (under differentiation) writes its input padded and
convolves it without padding (_padded_input_conv), because Eigen's weight gradient is faster on
an input padded beforehand: UNet 1261-1324 -> 1115-1209 ms, ResNet18-seg 298-321 -> 276-306.

`use_fast_cpu_path()` decides once, at trace time: on a GPU the native (cuDNN) path stays.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# Output pixels per block of the weight-gradient product (see _blocked_xt_y).
_BLOCK_ROWS = 4096


# False forces XLA's native convolutions everywhere (`bench_train --native_conv`: the "before").
ENABLED = True


def use_fast_cpu_path() -> bool:
  """The matrix-product ConvTransposes help XLA's CPU backend; decided at trace time."""
  return ENABLED and jax.default_backend() == "cpu"


def materialized(x):
  """x, exactly for finite x (a non-finite one becomes NaN, where the loss is not finite either),
  computed with a division XLA will not recompute inside a later fusion."""
  return x / (1 + 0 * x)


@jax.custom_vjp
def materialize_input(x):
  """Identity; under differentiation the value is materialized once (see the module note)."""
  return x


materialize_input.defvjp(lambda x: (materialized(x), None), lambda _, g: (g,))


@jax.custom_vjp
def materialize_cotangent(y):
  """Identity whose cotangent is materialized once before the convolution's gradient reads it."""
  return y


materialize_cotangent.defvjp(lambda y: (y, None), lambda _, g: (materialized(g),))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """lax.conv_general_dilated whose input is materialized for the gradient on XLA's CPU backend,
  padded where the convolution pads (_padded_input_conv); elsewhere exactly lax's."""
  conv = functools.partial(
      jax.lax.conv_general_dilated, rhs=rhs, window_strides=window_strides,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  if not use_fast_cpu_path():
    return conv(lhs, padding=padding)
  if (isinstance(padding, str) or batch_group_count != 1 or preferred_element_type is not None
      or any(d != 1 for d in (lhs_dilation or ()))
      or not any(lo or hi for lo, hi in padding) or min(min(p) for p in padding) < 0):
    return conv(materialize_input(lhs), padding=padding)
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return _padded_input_conv(lhs, rhs, tuple(window_strides),
                            tuple((int(lo), int(hi)) for lo, hi in padding),
                            tuple(rhs_dilation or (1,) * len(padding)), dn, feature_group_count,
                            precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _padded_input_conv(x, kernel, strides, padding, rhs_dilation, dn, groups, precision):
  """A padded convolution whose forward pass under differentiation writes its input padded
  (materialized) and convolves it without padding, so the weight gradient reads that array.

  XLA:CPU's weight gradient (Eigen) pads inside its contraction, and copies the input to
  (C, H, W, N) first; given an input padded beforehand it runs faster (4x256x256, 64->32:
  50 -> 43 ms; 4x128x128, 128->64: 44-50 -> 34-38 ms, the copies excluded), but padding at
  that point costs more than it saves: XLA fuses the pad into the transposing copy, which then
  takes 29-32 ms instead of 7.5.  Padded in the forward pass, the pad fuses into the layer that
  wrote the input (a BatchNorm and ReLU) and the copy stays a plain transpose.  Forward + both
  gradients of BN-ReLU-conv, batch 4, ms (materialized input -> this): 256 px 64->32
  189-200 -> 165-184; 128 px 128->64 146-160 -> 133-138; 64 px 128->128 70-95 -> 59-92;
  16 px 512->512 47-48 -> 46.  Identical values: only where zeros are added moves.  Train steps
  (kernels/NOTES.md), three interleaved runs, before -> after: UNet 1321 -> 1209, 1324 -> 1202,
  1261 -> 1115 ms; ResNet18-seg 321 -> 306, 300 -> 280, 298 -> 276; the others within noise.
  Inference does not run it (the primal is lax's padded convolution).
  """
  return _lax_conv(strides, rhs_dilation, dn, groups, precision)(x, kernel, padding=padding)


def _lax_conv(strides, rhs_dilation, dn, groups, precision):
  """lax.conv_general_dilated with _padded_input_conv's fixed arguments; padding left open."""
  return functools.partial(jax.lax.conv_general_dilated, window_strides=strides,
                           rhs_dilation=rhs_dilation, dimension_numbers=dn,
                           feature_group_count=groups, precision=precision)


def _pad_widths(x, padding, dn):
  widths = [(0, 0)] * x.ndim
  for axis, pair in zip(dn.lhs_spec[2:], padding):
    widths[axis] = pair
  return widths


def _padded_input_conv_fwd(x, kernel, strides, padding, rhs_dilation, dn, groups, precision):
  # A zero XLA cannot see as a constant: with a constant one it folds the pad back into the
  # convolution's padding and pads inside the weight gradient's copy (the slow case above).  (It
  # is NaN where the kernel's first weight is not finite, and so is the loss then.)  The division
  # keeps the layer before (BatchNorm, ReLU) out of that copy, as materialize_input does; XLA
  # fuses both into one pass that writes the padded input.
  zero = (0 * kernel.reshape(-1)[0]).astype(x.dtype)
  x_padded = jax.lax.pad(materialized(x), zero,
                         [(lo, hi, 0) for lo, hi in _pad_widths(x, padding, dn)])
  y = _lax_conv(strides, rhs_dilation, dn, groups, precision)(x_padded, kernel, padding="VALID")
  return y, (x_padded, kernel)


def _padded_input_conv_bwd(strides, padding, rhs_dilation, dn, groups, precision, res, ct):
  x_padded, kernel = res
  conv = _lax_conv(strides, rhs_dilation, dn, groups, precision)
  x_shape = [d - lo - hi for d, (lo, hi) in zip(x_padded.shape, _pad_widths(x_padded, padding, dn))]
  x_aval = jax.ShapeDtypeStruct(tuple(x_shape), x_padded.dtype)
  dx, = jax.linear_transpose(lambda x: conv(x, kernel, padding=padding), x_aval)(ct)
  dkernel = jax.vjp(lambda k: conv(x_padded, k, padding="VALID"), kernel)[1](ct)[0]
  return dx, dkernel


_padded_input_conv.defvjp(_padded_input_conv_fwd, _padded_input_conv_bwd)


class Conv(nn.Conv):
  """nn.Conv (same parameters and names) whose gradient reads its input (padded, where the
  convolution pads) and output cotangent as materialized arrays on XLA's CPU backend; elsewhere
  exactly nn.Conv."""

  conv_general_dilated: Callable | None = conv_general_dilated

  def __call__(self, inputs):
    if not use_fast_cpu_path():
      return super().__call__(inputs)
    return materialize_cotangent(super().__call__(inputs))


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


def _pixel_shuffle_matmul(x, kernel):
  """x (n, h, wd, c), kernel (kh, kw, c, o) -> (n, h*kh, wd*kw, o): each input pixel its own
  patch.

  One product per kernel row, stacked between the image rows: output rows are then whole
  rows of products, where one product with all taps needed a transposing copy (UNet's upconv1,
  4x128x128x64 -> 32: 15.8 -> 6.6 ms).  The backward keeps the single product: per-row products
  over slices of the cotangent measured slower there (10-15 -> 18-27 ms)."""
  n, h, wd, c = x.shape
  kh, kw, _, o = kernel.shape
  rows = jnp.transpose(kernel, (0, 2, 1, 3)).reshape(kh, c, kw * o)
  y = jnp.stack([jnp.dot(x, rows[a]) for a in range(kh)], axis=2)   # (n, h, kh, wd, kw * o)
  return y.reshape(n, h * kh, wd * kw, o)


@jax.custom_vjp
def conv_transpose_nonoverlapping(x, kernel):
  """torch ConvTranspose2d with kernel == stride and no padding; `kernel` (kh, kw, in, out)."""
  return _pixel_shuffle_matmul(x, kernel)


def _convt_fwd(x, kernel):
  return conv_transpose_nonoverlapping(x, kernel), (x, kernel)


def _convt_bwd(res, ct):
  x, kernel = res
  kh, kw, cin, cout = kernel.shape
  n, h, wd, _ = x.shape
  # ct (n, h*kh, wd*kw, o) -> rows (n*h*wd, kh*kw*o): each input pixel's patch
  # materialized: both products read it, and XLA would otherwise make the copy twice
  patches = materialized(ct.reshape(n, h, kh, wd, kw, cout).transpose(0, 1, 3, 2, 4, 5).reshape(
      n * h * wd, kh * kw * cout))
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
