"""UNet of the paper (authors' models/UNet.py; spec models-conv-umamba.md §2), NHWC.

Four encoder double-conv blocks (32..256), a 512 bottleneck, four decoder steps of ConvTranspose
k2 s2 (bias) -> concat [up, skip] -> double conv, and a 1x1 head; BatchNorm after every 3x3 conv,
PyTorch default init.  Returns logits (B, H, W, 1); H and W must be multiples of 16.

torch key names (authors' module): `encoder{1..4}.{0,1,3,4}` and `bottleneck.{0,1,3,4}` (conv,
BN, -, conv, BN), `upconv{4..1}`, `decoder{4..1}.{0,1,3,4}`, head `conv`.  Ours: the same names,
with `conv_0`, `bn_0`, `conv_1`, `bn_1` inside each double conv.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxmamba.models.cnn_common import (BatchNorm2d, TorchConverter, check_nhwc_input,
                                        expected_variables, torch_default_conv)
from jaxmamba.nn import torch_compat
from jaxmamba.nn.torch_compat import ConvTranspose2d

WIDTHS = (32, 64, 128, 256)
BOTTLENECK = 512


class DoubleConv(nn.Module):
  """(Conv 3x3 bias -> BN -> ReLU) x 2."""
  features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(2):
      x = torch_default_conv(self.features, 3, x.shape[-1], f"conv_{i}", padding=1,
                             dtype=self.dtype)(x)
      x = nn.relu(BatchNorm2d(name=f"bn_{i}")(x, train))
    return x


class UNet(nn.Module):
  """The authors' UNet (7,765,985 parameters)."""
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_nhwc_input(x, 16, "UNet")
    skips = []
    for i, width in enumerate(WIDTHS, start=1):
      if i > 1:
        x = torch_compat.max_pool2d(x, 2)
      x = DoubleConv(width, self.dtype, name=f"encoder{i}")(x, train)
      skips.append(x)
    x = torch_compat.max_pool2d(x, 2)
    x = DoubleConv(BOTTLENECK, self.dtype, name="bottleneck")(x, train)
    for i in range(len(WIDTHS), 0, -1):
      width, skip = WIDTHS[i - 1], skips[i - 1]
      up = ConvTranspose2d(width, 2, stride=2, dtype=self.dtype, name=f"upconv{i}")(x)
      x = jnp.concatenate([up.astype(skip.dtype), skip], axis=-1)   # authors' order: up first
      x = DoubleConv(width, self.dtype, name=f"decoder{i}")(x, train)
    x = torch_default_conv(1, 1, WIDTHS[0], "conv", dtype=self.dtype)(x)
    return x.astype(jnp.float32)


def _double_conv(conv: TorchConverter, name: str) -> None:
  for i, (c, b) in enumerate(((0, 1), (3, 4))):   # Sequential indices of the convs and BNs
    conv.conv((name, f"conv_{i}"), f"{name}.{c}")
    conv.batchnorm((name, f"bn_{i}"), f"{name}.{b}")


def from_torch_state_dict(state_dict) -> dict:
  """Flax variables from the authors' UNet state_dict (no `module.` prefix)."""
  conv = TorchConverter(state_dict, expected_variables(UNet()))
  for i in range(1, len(WIDTHS) + 1):
    _double_conv(conv, f"encoder{i}")
    _double_conv(conv, f"decoder{i}")
    conv.conv_transpose((f"upconv{i}",), f"upconv{i}")
  _double_conv(conv, "bottleneck")
  conv.conv(("conv",), "conv")
  return conv.finish()
