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

import itertools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype


class DepthwiseConv(nn.Module):
  """Stride-1, undilated conv with `feature_group_count` = input channels (channels last)."""
  features: int
  kernel_size: Sequence[int]
  padding: Sequence[tuple[int, int]]
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = None
  param_dtype: Any = jnp.float32

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
    w = kernel.astype(jnp.float32).reshape(ks + (channels, multiplier))
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0),) + tuple(map(tuple, self.padding)) + ((0, 0),))
    out_sizes = [xp.shape[1 + i] - ks[i] + 1 for i in range(nd)]
    if min(out_sizes) < 1:
      raise ValueError(f"DepthwiseConv: kernel {ks} larger than the padded input {xp.shape}")
    y = 0.0
    for tap in itertools.product(*(range(k) for k in ks)):
      window = xp[(slice(None),) + tuple(slice(t, t + n) for t, n in zip(tap, out_sizes))]
      y = y + window[..., None] * w[tap]
    y = y.reshape(y.shape[:-2] + (self.features,))
    if bias is not None:
      y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)

