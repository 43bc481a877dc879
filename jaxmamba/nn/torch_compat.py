"""PyTorch semantics the authors' models depend on, in JAX (NHWC): initialisers, resizes, pooling,
ConvTranspose2d, and a state_dict reader that checks every key and shape.

Each function here matches one torch op exactly (same index arithmetic), so model code can say
`resize_bilinear(x, size, align_corners=True)` and mean what `F.interpolate` meant.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from jaxmamba.nn import conv as fast_conv
from jaxmamba.nn.depthwise import DepthwiseConv

# ------------------------------------------------------------------------------------------------
# Initialisers


def torch_kernel_init(in_axis=-2, out_axis=-1):
  """torch's default Linear/Conv weight init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=in_axis,
                                          out_axis=out_axis)


def torch_transpose_kernel_init():
  """ConvTranspose2d: torch takes fan_in from weight dim 1, i.e. out_channels * kh * kw."""
  return torch_kernel_init(in_axis=-1, out_axis=-2)


def uniform_init(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_bias_init(fan_in: int):
  """torch's default bias init, U(+-1/sqrt(fan_in))."""
  return uniform_init(1.0 / np.sqrt(fan_in) if fan_in > 0 else 0.0)


def trunc_normal_init(std: float, lower: float = -2.0, upper: float = 2.0):
  """timm/torch trunc_normal_(std=std, a=lower, b=upper): the bounds are absolute, not in stds."""
  def init(key, shape, dtype=jnp.float32):
    return (jax.random.truncated_normal(key, lower / std, upper / std, shape, jnp.float32) * std
            ).astype(dtype)
  return init


def fan_out_normal_init(groups: int = 1):
  """normal(0, sqrt(2 / fan_out)), fan_out = kh*kw*out_channels/groups (UltraLight's conv init)."""
  def init(key, shape, dtype=jnp.float32):
    fan_out = int(np.prod(shape[:-2])) * shape[-1] // groups
    return jax.random.normal(key, shape, dtype) * np.sqrt(2.0 / fan_out)
  return init


def conv2d(features: int, kernel: int, stride: int = 1, padding: int = 0, groups: int = 1,
           bias: bool = True, in_features: int | None = None, dilation: int = 1, name=None,
           kernel_init=None, bias_init=None, dtype=None, split_multiplier: bool = False
           ) -> nn.Module:
  """nn.Conv with torch Conv2d's arguments and default init (bias fan_in needs `in_features`);
  a `jaxmamba.nn.conv.Conv`: nn.Conv with a faster gradient on the CPU.

  A depthwise conv (groups == in_features, stride 1, no dilation) is a `DepthwiseConv` with the
  same parameters: XLA's grouped-conv gradient is very slow on the CPU (jaxmamba.nn.depthwise),
  and can return its output as (..., multiplier, in_features) (`split_multiplier`).
  """
  if bias and bias_init is None:
    if in_features is None:
      raise ValueError("conv2d: torch's default bias init needs in_features")
    bias_init = torch_bias_init(in_features // groups * kernel * kernel)
  if groups > 1 and groups == in_features and stride == 1 and dilation == 1:
    return DepthwiseConv(features, (kernel, kernel), padding=[(padding, padding)] * 2,
                         use_bias=bias, kernel_init=kernel_init or torch_kernel_init(),
                         bias_init=bias_init or nn.initializers.zeros, dtype=dtype, name=name,
                         split_multiplier=split_multiplier)
  if split_multiplier:
    raise ValueError("conv2d: split_multiplier is an output layout of depthwise convolutions")
  return fast_conv.Conv(features, (kernel, kernel), strides=stride,
                        padding=[(padding, padding)] * 2, kernel_dilation=dilation,
                        feature_group_count=groups, use_bias=bias,
                        kernel_init=kernel_init or torch_kernel_init(),
                        bias_init=bias_init or nn.initializers.zeros, dtype=dtype, name=name)


class PatchConv(nn.Module):
  """torch Conv2d(in_features, features, kernel_size=stride=patch) with its default init
  (nn.Conv's parameter names and shapes), as a product of non-overlapping patches; patch 1 is a
  1x1 conv.  Called without input, it returns its (patch * patch * in, out) matrix and bias for
  products the model arranges itself.  H and W must be multiples of `patch`.

  XLA:CPU's gradient of these as convolutions transposed activations and kernels for Eigen's
  weight gradient, and recomputed the layers before them inside the copies (SegFormer's train
  step at batch 4, 256 px: its 1x1 convs so, 1.29 -> ~1.2 s; its attention's patch convs so,
  0.94 -> 0.90 s).
  """
  features: int
  in_features: int
  patch: int = 1
  use_bias: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x=None):
    r = self.patch
    kernel = self.param("kernel", torch_kernel_init(), (r, r, self.in_features, self.features))
    bias = (self.param("bias", torch_bias_init(self.in_features * r * r), (self.features,))
            if self.use_bias else jnp.zeros((self.features,)))
    kernel = kernel.reshape(r * r * self.in_features, self.features)
    if x is None:
      return kernel, bias
    b, h, w, c = x.shape
    if h % r or w % r:
      raise ValueError(f"PatchConv: H and W ({h}, {w}) must be multiples of the patch {r}")
    if r > 1:   # (b, h/r, w/r, r * r * c) patches, taps in the kernel's (dy, dx, c) order
      x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 2, 4, 5).reshape(
          b, h // r, w // r, r * r * c)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    return jnp.dot(x, kernel) + bias


def dense(features: int, in_features: int, bias: bool = True, name=None, kernel_init=None,
          bias_init=None, dtype=None) -> nn.Dense:
  """nn.Dense with torch Linear's default init."""
  return nn.Dense(features, use_bias=bias, kernel_init=kernel_init or torch_kernel_init(),
                  bias_init=bias_init or torch_bias_init(in_features), dtype=dtype, name=name)


class ConvTranspose2d(nn.Module):
  """torch.nn.ConvTranspose2d (groups 1, dilation 1): out = (in-1)*stride - 2*padding + kernel.

  The kernel is stored (kh, kw, in, out); torch's weight is (in, out, kh, kw).  Computed as a
  convolution of the stride-dilated input with the spatially flipped kernel, padding k-1-p; on a
  CPU, kernel == stride without padding (the U-Nets' 2x2 upsampling) as one matrix product,
  whose gradient XLA runs ~50x faster than the dilated convolution's, and any other kernel,
  stride and padding (ResNet-Seg's 4/2/1) as one product of the input's patches per stride
  phase, ~40x faster forward + backward (jaxmamba.nn.conv).
  """
  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[-1]
    k = self.kernel
    w = self.param("kernel", torch_transpose_kernel_init(), (k, k, in_features, self.features))
    dtype = self.dtype or x.dtype
    pad = k - 1 - self.padding
    if k == self.stride and self.padding == 0 and fast_conv.use_fast_cpu_path():
      y = fast_conv.conv_transpose_nonoverlapping(x.astype(dtype), w.astype(dtype))
    elif fast_conv.use_fast_cpu_path():
      y = fast_conv.conv_transpose_phases(x.astype(dtype), w.astype(dtype), self.stride,
                                          self.padding)
    else:
      y = jax.lax.conv_general_dilated(
          x.astype(dtype), w[::-1, ::-1].astype(dtype), window_strides=(1, 1),
          padding=[(pad, pad)] * 2, lhs_dilation=(self.stride, self.stride),
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      b = self.param("bias", torch_bias_init(self.features * k * k), (self.features,))
      y = y + b.astype(dtype)
    return y


# ------------------------------------------------------------------------------------------------
# Normalisation and activations


class LayerNorm(nn.Module):
  """torch LayerNorm(C, eps) over the last axis, computed and returned in float32, with
  nn.LayerNorm's parameters (`scale`, `bias`) and torch's backward formula (layer_norm)."""
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    return layer_norm(x.astype(jnp.float32), scale, bias, self.epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, epsilon: float):
  """(x - mean) / sqrt(biased variance + epsilon) * scale + bias over the last axis.

  The gradient written out as torch's layer_norm_backward computes it (two means over the
  channels, then one elementwise pass): XLA:CPU fused autodiff's passes of SegFormer's 16
  residual blocks into fusions of up to 85 inputs that it ran at a fraction of its speed.
  """
  return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
  mean = jnp.mean(x, -1, keepdims=True)
  centred = x - mean
  inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), -1, keepdims=True) + epsilon)
  return centred * inv_std * scale + bias, (x, mean, inv_std, scale)


def _layer_norm_bwd(epsilon, res, ct):
  del epsilon
  x, mean, inv_std, scale = res
  normed = (x - mean) * inv_std
  g = ct * scale
  dx = inv_std * (g - jnp.mean(g, -1, keepdims=True)
                  - normed * jnp.mean(g * normed, -1, keepdims=True))
  axes = tuple(range(x.ndim - 1))
  return dx, jnp.sum(ct * normed, axes), jnp.sum(ct, axes)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@jax.custom_vjp
def gelu(x):
  """torch's exact GELU, x * (1 + erf(x / sqrt 2)) / 2, and its backward formula,
  (1 + erf(x / sqrt 2)) / 2 + x * exp(-x^2 / 2) / sqrt(2 pi).

  jax.nn.gelu(approximate=False) uses erfc; XLA:CPU's fusions of its autodiff took ~7 ns a value
  in SegFormer's train step (batch 4 at 256x256: 1.15 s a step, 1.09 s with these).
  """
  return _gelu_fwd(x)[0]


def _gelu_cdf(x):
  return 0.5 + 0.5 * jax.lax.erf(x * np.float32(np.sqrt(0.5)).astype(x.dtype))


def _gelu_fwd(x):
  return x * _gelu_cdf(x), x


def _gelu_bwd(x, ct):
  pdf = jnp.exp(-0.5 * x * x) * np.float32(1 / np.sqrt(2 * np.pi)).astype(x.dtype)
  return (ct * (_gelu_cdf(x) + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


# ------------------------------------------------------------------------------------------------
# Resizing and pooling (NHWC)


def _source_index(out_len: int, in_len: int, align_corners: bool):
  """torch's area_pixel_compute_source_index for linear modes: (low index, high index, weight)."""
  dst = np.arange(out_len, dtype=np.float32)
  if align_corners:
    scale = np.float32(in_len - 1) / np.float32(out_len - 1) if out_len > 1 else np.float32(0)
    src = scale * dst
  else:
    scale = np.float32(in_len) / np.float32(out_len)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
  lo = np.minimum(np.floor(src).astype(np.int64), in_len - 1)
  hi = np.minimum(lo + 1, in_len - 1)
  return lo, hi, (src - lo).astype(np.float32)


def _interp_axis(x, axis: int, out_len: int, align_corners: bool):
  in_len = x.shape[axis]
  if in_len == out_len:
    return x
  lo, hi, w = _source_index(out_len, in_len, align_corners)
  # One product with the (out, in) interpolation matrix, two weights a row: its gradient is the
  # transposed product, where the gather formulation's was a scatter-add (SegFormer's 4x8x8x512
  # -> 64x64 on the CPU, forward + backward: 52 ms gathered, 23 ms as products).  HIGHEST keeps
  # float32 products on accelerators whose default would round them to bfloat16 or TF32.
  m = np.zeros((out_len, in_len), np.float32)
  np.add.at(m, (np.arange(out_len), lo), 1 - w)
  np.add.at(m, (np.arange(out_len), hi), w)
  y = jnp.tensordot(jnp.asarray(m, x.dtype), x, axes=((1,), (axis,)),
                    precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(y, 0, axis)


def resize_bilinear(x, size: Sequence[int], align_corners: bool):
  """F.interpolate(mode="bilinear", align_corners=...) on NHWC, without antialiasing.

  jax.image.resize is half-pixel and antialiases when shrinking, so neither mode matches it.
  """
  h, w = size
  return _interp_axis(_interp_axis(x, -3, h, align_corners), -2, w, align_corners)


def max_pool2d(x, kernel: int, stride: int | None = None, padding: int = 0):
  """nn.MaxPool2d(kernel, stride, padding) on NHWC (floor mode): the first maximum of each window
  in row-major order takes the gradient, as in torch; a NaN wins its window.

  Written as a running select over the k*k strided taps, which also keeps the winning tap's
  index (stored: XLA would otherwise recompute the chain, and the layers before it, inside the
  gradient).  The gradient puts each output's cotangent on that tap: where windows tile the input
  (2x2 stride 2) one select per pixel, else one padded strided write per tap.  `nn.max_pool`'s
  gradient lowers on the CPU to a variadic reduce-window over index arrays and a scatter (~10%
  of UNet's train step); autodiff of the select chain unwound it tap by tap through every later
  select (ResNet-Seg's 3x3 stride-2 pool with its ReLU's gradient: 19 -> 7.5 ms of a ~345 ms
  train step).
  """
  stride = stride or kernel
  n, h, w, c = x.shape
  oh, ow = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
  if padding * 2 > kernel or min(oh, ow) < 1:
    raise ValueError(f"max_pool2d: kernel {kernel}, stride {stride}, padding {padding} does not "
                     f"fit a {h}x{w} input (torch needs padding <= kernel / 2)")
  return _max_pool(x, kernel, stride, padding)


def _max_pool_taps(kernel: int, stride: int, padding: int, hw: tuple[int, int]):
  """(tap number, row slice, column slice) of each window tap in the padded input."""
  oh, ow = ((d + 2 * padding - kernel) // stride + 1 for d in hw)
  for a in range(kernel):
    for b in range(kernel):
      yield (a * kernel + b, slice(a, a + (oh - 1) * stride + 1, stride),
             slice(b, b + (ow - 1) * stride + 1, stride))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, kernel: int, stride: int, padding: int):
  return _max_pool_fwd(x, kernel, stride, padding)[0]


def _max_pool_fwd(x, kernel, stride, padding):
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
               constant_values=-jnp.inf) if padding else x
  best = index = None
  for t, rows, cols in _max_pool_taps(kernel, stride, padding, x.shape[1:3]):
    tap = xp[:, rows, cols]
    if best is None:
      best, index = tap, jnp.zeros(tap.shape, jnp.float32)
    else:
      take = (tap > best) | jnp.isnan(tap)
      best, index = jnp.where(take, tap, best), jnp.where(take, jnp.float32(t), index)
  # Stored, not recomputed: XLA would otherwise fuse the whole select chain (and the layers
  # before it) into the gradient, once per tap.  x itself is not needed, only its shape: a
  # zero-size slice of it carries that.
  return best, (fast_conv.materialized(index), x[:, :, :, :0])


def _max_pool_bwd(kernel, stride, padding, res, g):
  index, like = res
  n, oh, ow, c = g.shape
  h, w = like.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  if kernel == stride and not padding:
    # windows tile the input: one select per input pixel, then the rows/columns floor mode left
    taps = jnp.arange(kernel * kernel, dtype=jnp.float32).reshape(1, 1, kernel, 1, kernel, 1)
    dx = jnp.where(index[:, :, None, :, None] == taps, g[:, :, None, :, None], zero)
    dx = dx.reshape(n, oh * kernel, ow * kernel, c)
    return (jnp.pad(dx, ((0, 0), (0, h - oh * kernel), (0, w - ow * kernel), (0, 0))),)
  hp, wp = h + 2 * padding, w + 2 * padding
  dxp = None
  # last tap first: a pixel then sums its windows' cotangents in row-major window order, as torch
  for t, rows, cols in reversed(list(_max_pool_taps(kernel, stride, padding, (h, w)))):
    # this tap's cotangents, at its strided positions of the padded input
    part = jax.lax.pad(jnp.where(index == t, g, zero), zero, [
        (0, 0, 0), (rows.start, hp - rows.stop, stride - 1),
        (cols.start, wp - cols.stop, stride - 1), (0, 0, 0)])
    dxp = part if dxp is None else dxp + part
  return (dxp[:, padding:padding + h, padding:padding + w],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def adaptive_bins(in_len: int, out_len: int) -> list[tuple[int, int]]:
  """torch adaptive pooling windows: [floor(i*n/b), ceil((i+1)*n/b))."""
  return [((i * in_len) // out_len, -(-((i + 1) * in_len) // out_len)) for i in range(out_len)]


def _pool_matrix(in_len: int, out_len: int) -> np.ndarray:
  m = np.zeros((out_len, in_len), np.float32)
  for i, (s, e) in enumerate(adaptive_bins(in_len, out_len)):
    m[i, s:e] = 1.0 / (e - s)
  return m


def adaptive_avg_pool2d(x, size: Sequence[int]):
  """nn.AdaptiveAvgPool2d on NHWC (overlapping bins where the size does not divide)."""
  ph = jnp.asarray(_pool_matrix(x.shape[-3], size[0]), x.dtype)
  pw = jnp.asarray(_pool_matrix(x.shape[-2], size[1]), x.dtype)
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,...hwc->...owc", ph, x, precision=hp)
  return jnp.einsum("pw,...owc->...opc", pw, x, precision=hp)


class PyramidPooling(nn.Module):
  """The authors' PPM (tests/pyramidal_pooling.py): for each bin b, adaptive-avg-pool to b x b,
  1x1 conv (bias), ReLU, align-corners bilinear back to H x W; concatenated in bin order.  The input
  is *not* kept (it is replaced).  Conv i is named `conv_layers_{i}` (torch `conv_layers.{i}`).

  `init` "torch" = PyTorch defaults (UMambaBot-PP); "fan_out" = UltraLight's re-initialisation.
  """
  out_channels: Sequence[int]
  bins: Sequence[int] = (1, 2, 3, 6)
  init: str = "torch"
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    h, w, c = x.shape[-3:]
    outs = []
    for i, (b, oc) in enumerate(zip(self.bins, self.out_channels)):
      kw = (dict(kernel_init=fan_out_normal_init(), bias_init=nn.initializers.zeros)
            if self.init == "fan_out" else {})
      p = adaptive_avg_pool2d(x, (b, b))
      p = nn.relu(conv2d(oc, 1, in_features=c, name=f"conv_layers_{i}", dtype=self.dtype, **kw)(p))
      outs.append(resize_bilinear(p, (h, w), align_corners=True))
    return jnp.concatenate(outs, axis=-1)


# ------------------------------------------------------------------------------------------------
# State dicts


def to_numpy(t) -> np.ndarray:
  if hasattr(t, "detach"):
    t = t.detach().cpu().numpy()
  return np.asarray(t)


class StateDictReader:
  """Reads a torch state_dict into Flax layouts, remembering which keys were used.

  Every `take` names the key in its error; `finish()` fails if any key was left unused.
  """

  def __init__(self, state_dict: dict):
    self.sd = {k: v for k, v in state_dict.items()}
    self.used: set[str] = set()

  def take(self, key: str, shape: Sequence[int] | None = None) -> np.ndarray:
    if key not in self.sd:
      raise KeyError(f"state_dict has no key {key!r}")
    a = to_numpy(self.sd[key]).astype(np.float32)
    if shape is not None and tuple(a.shape) != tuple(shape):
      raise ValueError(f"state_dict key {key!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    self.used.add(key)
    return a

  def skip(self, key: str) -> None:
    """Marks a key as deliberately unused (e.g. BatchNorm's num_batches_tracked)."""
    if key in self.sd:
      self.used.add(key)

  def conv(self, prefix: str, bias: bool = True) -> dict:
    """Conv1d/Conv2d weight (out, in/g, *k) -> Flax kernel (*k, in/g, out)."""
    w = self.take(prefix + ".weight")
    out = {"kernel": np.transpose(w, tuple(range(2, w.ndim)) + (1, 0))}
    if bias:
      out["bias"] = self.take(prefix + ".bias")
    return out

  def conv_transpose(self, prefix: str, bias: bool = True) -> dict:
    """ConvTranspose2d weight (in, out, kh, kw) -> our kernel (kh, kw, in, out)."""
    out = {"kernel": np.transpose(self.take(prefix + ".weight"), (2, 3, 0, 1))}
    if bias:
      out["bias"] = self.take(prefix + ".bias")
    return out

  def linear(self, prefix: str, bias: bool = True) -> dict:
    out = {"kernel": self.take(prefix + ".weight").T}
    if bias:
      out["bias"] = self.take(prefix + ".bias")
    return out

  def norm(self, prefix: str) -> dict:
    """LayerNorm/GroupNorm affine parameters."""
    return {"scale": self.take(prefix + ".weight"), "bias": self.take(prefix + ".bias")}

  def batchnorm(self, prefix: str) -> tuple[dict, dict]:
    """(params, batch_stats) of a BatchNorm2d."""
    self.skip(prefix + ".num_batches_tracked")
    return self.norm(prefix), {"mean": self.take(prefix + ".running_mean"),
                               "var": self.take(prefix + ".running_var")}

  def finish(self) -> None:
    unused = sorted(set(self.sd) - self.used)
    if unused:
      raise ValueError(f"{len(unused)} state_dict keys were not used: {unused[:10]}"
                       + (" ..." if len(unused) > 10 else ""))


def check_variables_match(expected, got, what: str = "variables") -> None:
  """Fails, naming the path, where `got` differs from `expected` (e.g. jax.eval_shape of init)."""
  exp = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  have = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}
  missing, extra = sorted(set(exp) - set(have)), sorted(set(have) - set(exp))
  if missing or extra:
    raise ValueError(f"{what}: missing {missing[:8]}, unexpected {extra[:8]}")
  for k, v in exp.items():
    if tuple(np.shape(have[k])) != tuple(v.shape):
      raise ValueError(f"{what}: {k} has shape {tuple(np.shape(have[k]))}, expected {tuple(v.shape)}")
