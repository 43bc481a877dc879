"""ResNet18-Seg / ResNet50-Seg (authors' models/ResNet18.py, ResNet50.py; spec §3), NHWC.

Encoder: torchvision resnet18/resnet50 minus avgpool and fc (conv1 7x7 s2, BN, ReLU, maxpool 3x3
s2 p1, layer1..4; BasicBlock / Bottleneck v1.5).  Decoder: a plain stack (no skips) of four
ConvTranspose 4x4 s2 p1 with bias, ReLU between, then bilinear (align_corners=False) to the input's
H x W (the authors' fixed (256, 256) = 2x the last ConvT output).  H, W: multiples of 32.

torch key names: the authors wrap `nn.Sequential(*list(resnet.children())[:-2])` as `encoder`, so
`encoder.0` = conv1, `encoder.1` = bn1, (2 relu, 3 maxpool: no params), `encoder.{4,5,6,7}` =
layer1..layer4 with torchvision's block names (`encoder.4.0.conv1.weight`, `.bn1.*`, `.conv2`,
`.bn2`, [`.conv3`, `.bn3`], `.downsample.0` conv, `.downsample.1` BN); the decoder Sequential has
the ConvTs at `decoder.{0,2,4,6}` (ReLUs and the Upsample have no params).
Ours: `conv1`, `bn1`, `layer{i}_{j}` blocks (`conv1`, `bn1`, ..., `downsample_conv`,
`downsample_bn`), `deconv{1..4}`.

Initialisation: encoder convs torchvision's kaiming_normal(fan_out) (the authors loaded ImageNet
weights over it: see `load_torchvision_encoder`), decoder torch defaults.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxmamba.models.cnn_common import (BatchNorm2d, TorchConverter, check_nhwc_input,
                                        expected_variables)
from jaxmamba.nn import torch_compat

# depth -> (block kind, blocks per layer)
LAYOUTS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}
LAYER_WIDTHS = (64, 128, 256, 512)
DECODER_WIDTHS = {18: (256, 128, 64, 1), 50: (512, 256, 128, 1)}
_EXPANSION = {"basic": 1, "bottleneck": 4}


def _conv(features, kernel, stride, name, dtype):
  """Bias-free torchvision conv (padding k//2) with kaiming_normal(fan_out, relu) init."""
  return torch_compat.conv2d(features, kernel, stride=stride, padding=kernel // 2, bias=False,
                             name=name, kernel_init=torch_compat.fan_out_normal_init(), dtype=dtype)


class ResidualBlock(nn.Module):
  """torchvision BasicBlock (`kind="basic"`) or Bottleneck v1.5 (stride on the 3x3)."""
  kind: str
  width: int
  stride: int = 1
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    out_features = self.width * _EXPANSION[self.kind]
    if self.kind == "basic":
      convs = ((self.width, 3, self.stride), (self.width, 3, 1))
    else:
      convs = ((self.width, 1, 1), (self.width, 3, self.stride), (out_features, 1, 1))
    y = x
    for i, (features, kernel, stride) in enumerate(convs, start=1):
      y = _conv(features, kernel, stride, f"conv{i}", self.dtype)(y)
      y = BatchNorm2d(name=f"bn{i}")(y, train)
      if i < len(convs):
        y = nn.relu(y)
    identity = x
    if self.stride != 1 or x.shape[-1] != out_features:
      identity = _conv(out_features, 1, self.stride, "downsample_conv", self.dtype)(x)
      identity = BatchNorm2d(name="downsample_bn")(identity, train)
    return nn.relu(y + identity.astype(y.dtype))


class ResNetSeg(nn.Module):
  """ResNet18-Seg (depth 18, 13,930,497 params) / ResNet50-Seg (depth 50, 42,909,633)."""
  depth: int = 18
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.depth not in LAYOUTS:
      raise ValueError(f"ResNetSeg: depth must be one of {sorted(LAYOUTS)}, got {self.depth}")
    check_nhwc_input(x, 32, "ResNetSeg")
    h, w = x.shape[1:3]
    kind, blocks = LAYOUTS[self.depth]
    y = _conv(64, 7, 2, "conv1", self.dtype)(x)
    y = nn.relu(BatchNorm2d(name="bn1")(y, train))
    y = torch_compat.max_pool2d(y, 3, 2, padding=1)
    for i, (width, n) in enumerate(zip(LAYER_WIDTHS, blocks), start=1):
      for j in range(n):
        stride = 2 if (i > 1 and j == 0) else 1
        y = ResidualBlock(kind, width, stride, self.dtype, name=f"layer{i}_{j}")(y, train)
    widths = DECODER_WIDTHS[self.depth]
    for i, features in enumerate(widths, start=1):
      y = torch_compat.ConvTranspose2d(features, 4, stride=2, padding=1, dtype=self.dtype,
                                       name=f"deconv{i}")(y)
      if i < len(widths):
        y = nn.relu(y)
    y = torch_compat.resize_bilinear(y.astype(jnp.float32), (h, w), align_corners=False)
    return y


# ------------------------------------------------------------------------------------------------
# torch state_dicts


def _torch_encoder_names(depth: int, torchvision: bool) -> dict[str, str]:
  """Our top-level encoder names -> torch key prefixes (the authors' Sequential or torchvision)."""
  kind, blocks = LAYOUTS[depth]
  names = {"conv1": "conv1" if torchvision else "encoder.0",
           "bn1": "bn1" if torchvision else "encoder.1"}
  for i, n in enumerate(blocks, start=1):
    layer = f"layer{i}" if torchvision else f"encoder.{3 + i}"
    for j in range(n):
      names[f"layer{i}_{j}"] = f"{layer}.{j}"
  return names


def _read_encoder(conv: TorchConverter, depth: int, torchvision: bool) -> None:
  kind = LAYOUTS[depth][0]
  n_convs = 2 if kind == "basic" else 3
  names = _torch_encoder_names(depth, torchvision)
  conv.conv(("conv1",), names.pop("conv1"), bias=False)
  conv.batchnorm(("bn1",), names.pop("bn1"))
  for ours, theirs in names.items():   # residual blocks
    for k in range(1, n_convs + 1):
      conv.conv((ours, f"conv{k}"), f"{theirs}.conv{k}", bias=False)
      conv.batchnorm((ours, f"bn{k}"), f"{theirs}.bn{k}")
    if "downsample_conv" in conv.expected["params"][ours]:
      conv.conv((ours, "downsample_conv"), f"{theirs}.downsample.0", bias=False)
      conv.batchnorm((ours, "downsample_bn"), f"{theirs}.downsample.1")


def from_torch_state_dict(state_dict, depth: int) -> dict:
  """Flax variables from the authors' ResNet{18,50}Seg state_dict (`encoder.*`, `decoder.*`)."""
  if depth not in LAYOUTS:
    raise ValueError(f"ResNetSeg: depth must be one of {sorted(LAYOUTS)}, got {depth}")
  conv = TorchConverter(state_dict, expected_variables(ResNetSeg(depth)))
  _read_encoder(conv, depth, torchvision=False)
  for i in range(1, 5):
    conv.conv_transpose((f"deconv{i}",), f"decoder.{2 * (i - 1)}")
  return conv.finish()


def load_torchvision_encoder(variables: dict, torchvision_state_dict, depth: int) -> dict:
  """`variables` with the encoder replaced by a torchvision resnet{18,50} state_dict.

  The state_dict has torchvision's own keys (`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ...);
  `fc.*` is ignored, any other unused or missing key is an error.  The decoder is left as it is.
  Returns new variables (the input is not modified).
  """
  if depth not in LAYOUTS:
    raise ValueError(f"ResNetSeg: depth must be one of {sorted(LAYOUTS)}, got {depth}")
  expected = expected_variables(ResNetSeg(depth))
  encoder_names = set(_torch_encoder_names(depth, torchvision=True))
  encoder_only = {col: {k: v for k, v in tree.items() if k in encoder_names}
                  for col, tree in expected.items()}
  sd = {k: v for k, v in torchvision_state_dict.items() if not k.startswith("fc.")}
  conv = TorchConverter(sd, encoder_only)
  _read_encoder(conv, depth, torchvision=True)
  encoder = conv.finish()
  out = {col: dict(tree) for col, tree in variables.items()}
  for col, tree in encoder.items():
    missing = set(tree) - set(out.get(col, {}))
    if missing:
      raise ValueError(f"load_torchvision_encoder: variables lack {col} entries {sorted(missing)}")
    out.setdefault(col, {}).update(tree)
  return out
