"""Building blocks of UltraLight VM-UNet (spec models-ultralight.md §1): the PVM layer and the
SC_Att_Bridge, NHWC, with the authors' initialisation (§1.6) as the Flax initialisers.

Flax module names mirror the authors' torch names (`norm`, `mamba`, `proj`, `skip_scale`, `ppm`,
`catt.get_all_att`, `catt.att{i}`, `satt.shared_conv2d`) so the state_dict converter in
`ultralight.py` is a plain renaming.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxmamba.nn import torch_compat
from jaxmamba.nn.mamba import Mamba

GN_GROUPS = 4
NORM_EPS = 1e-5  # torch's LayerNorm/GroupNorm default; Flax's is 1e-6


def gelu(x):
  """torch's default GELU is the exact erf form; Flax's default is the tanh approximation."""
  return torch_compat.gelu(x)


def group_norm(name: str) -> nn.GroupNorm:
  """GroupNorm(4, C) as torch: contiguous channel groups, eps 1e-5, statistics in float32."""
  return nn.GroupNorm(num_groups=GN_GROUPS, epsilon=NORM_EPS, dtype=jnp.float32,
                      use_fast_variance=False, name=name)


def ul_conv2d(features: int, kernel: int, padding: int = 0, dilation: int = 1, name=None,
              dtype=None) -> nn.Conv:
  """Conv2d with UltraLight's re-initialisation: normal(0, sqrt(2/fan_out)) weight, zero bias."""
  return torch_compat.conv2d(features, kernel, padding=padding, dilation=dilation, name=name,
                             kernel_init=torch_compat.fan_out_normal_init(),
                             bias_init=nn.initializers.zeros, dtype=dtype)


def ul_dense(features: int, name=None, dtype=None) -> nn.Dense:
  """Linear with UltraLight's re-initialisation: trunc-normal(0.02) weight, zero bias."""
  return nn.Dense(features, kernel_init=torch_compat.trunc_normal_init(0.02),
                  bias_init=nn.initializers.zeros, dtype=dtype, name=name)


def ppm_channels(c: int) -> tuple[int, int, int, int]:
  """Output widths of the PPM inside a PVM of width c, for bins (1, 2, 3, 6)."""
  return (c // 8, c // 4, c // 2, c // 8)


class PVMLayer(nn.Module):
  """Parallel Vision Mamba layer (§1.2): (B, H, W, Cin) -> (B, H, W, out_channels).

  One LayerNorm (applied before and after the Mamba), one Mamba of width Cin/chunks shared by all
  `chunks` contiguous channel chunks, a scalar skip_scale on the normalised chunk, and a Linear.
  The chunks are folded into the batch so the Mamba (and its scan) runs once per layer, on
  (B * chunks, H * W, Cin / chunks).  `pyramid_pooling` first replaces the input by a PPM (v4/v6).
  """
  out_channels: int
  chunks: int = 4
  pyramid_pooling: bool = False
  scan_impl: str = "auto"
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    if c % self.chunks:
      raise ValueError(f"PVMLayer: {c} input channels do not split into {self.chunks} chunks")
    if self.pyramid_pooling:
      if c % 8:
        raise ValueError(f"PVMLayer: the pyramid pooling needs channels divisible by 8, got {c}")
      x = torch_compat.PyramidPooling(out_channels=ppm_channels(c), init="fan_out",
                                      dtype=self.dtype, name="ppm")(x)
    dm = c // self.chunks
    length = h * w
    # NHWC flattened row-major is the authors' raster token order (h * W + w).
    seq = x.reshape(b, length, c).astype(jnp.float32)
    norm = torch_compat.LayerNorm(epsilon=NORM_EPS, name="norm")
    u = norm(seq)
    # (B, L, k*dm) -> (B*k, L, dm): contiguous channel chunks, chunk j of sample i at row i*k + j.
    u = u.reshape(b, length, self.chunks, dm).transpose(0, 2, 1, 3).reshape(b * self.chunks,
                                                                            length, dm)
    mamba = Mamba(dm, d_state=16, d_conv=4, expand=2, init_scheme="ultralight",
                  scan_impl=self.scan_impl, dtype=self.dtype, name="mamba")
    skip_scale = self.param("skip_scale", nn.initializers.ones, (1,), jnp.float32)
    v = mamba(u).astype(jnp.float32) + skip_scale * u
    v = v.reshape(b, self.chunks, length, dm).transpose(0, 2, 1, 3).reshape(b, length, c)
    v = norm(v)  # the same LayerNorm (same weights) a second time
    out = ul_dense(self.out_channels, name="proj", dtype=self.dtype)(v)
    return out.reshape(b, h, w, self.out_channels)


class SpatialAttBridge(nn.Module):
  """SAB: one 7x7 dilation-3 conv on [mean, max] over channels, shared by all levels."""
  dtype: Any = None

  @nn.compact
  def __call__(self, skips: Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
    conv = ul_conv2d(1, 7, padding=9, dilation=3, name="shared_conv2d", dtype=self.dtype)
    out = []
    for t in skips:
      m = jnp.concatenate([jnp.mean(t, axis=-1, keepdims=True), jnp.max(t, axis=-1, keepdims=True)],
                          axis=-1)
      out.append(nn.sigmoid(conv(m)))
    return out


class ChannelAttBridge(nn.Module):
  """CAB (split_att='fc'): a bias-free conv1d (k=3) over the concatenated pooled channel vector of
  all levels (it mixes channels across level boundaries), then one Linear per level."""
  dtype: Any = None

  @nn.compact
  def __call__(self, skips: Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
    v = jnp.concatenate([jnp.mean(t, axis=(1, 2)) for t in skips], axis=-1)  # (B, S)
    conv = nn.Conv(1, (3,), padding=[(1, 1)], use_bias=False, dtype=self.dtype,
                   kernel_init=nn.initializers.normal(math.sqrt(2.0 / 3.0)), name="get_all_att")
    v = conv(v[..., None])[..., 0]
    out = []
    for i, t in enumerate(skips):
      a = nn.sigmoid(ul_dense(t.shape[-1], name=f"att{i + 1}", dtype=self.dtype)(v))
      out.append(a[:, None, None, :])
    return out


class SCAttBridge(nn.Module):
  """SC_Att_Bridge (§1.4): t' = c * (s*t + t) + s*t, with s spatial and c channel attention."""
  dtype: Any = None

  @nn.compact
  def __call__(self, skips: Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
    spatial = SpatialAttBridge(dtype=self.dtype, name="satt")(skips)
    a = [s * t for s, t in zip(spatial, skips)]
    b = [ai + t for ai, t in zip(a, skips)]
    channel = ChannelAttBridge(dtype=self.dtype, name="catt")(b)
    return [c * bi + ai for c, bi, ai in zip(channel, b, a)]
