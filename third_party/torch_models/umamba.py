"""PyTorch UMambaBot / UMambaBot-PP oracle (spec models-conv-umamba.md §5-§7), used only by tests.

Built from the real nnU-Net blocks of dynamic-network-architectures (ResidualEncoder, BasicBlockD,
StackedResidualBlocks, ConvDropoutNormReLU) and mamba_ssm's real Mamba on its CPU path, plus the
authors' repo-local decoder (UNetResDecoder without deep supervision) and pyramid pooling module,
written here from the spec.  Attribute names follow the authors' modules so that `state_dict()`
yields their key names: `encoder.*`, `ppm.conv_layers.{i}.*`, `ln.*`, `mamba.*`, `decoder.encoder.*`
(the decoder keeps a reference to the encoder), `decoder.transpconvs.{s}.*`,
`decoder.stages.{s}.blocks.0.*`, `decoder.seg_layers.{s}.*`.

Needs `dynamic-network-architectures` (a test dependency: pip install --no-deps
dynamic-network-architectures==0.4.4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, StackedResidualBlocks
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from torch import nn

from third_party import mamba_oracle

FEATURES = (32, 64, 128, 256, 512)
STRIDES = (1, 2, 2, 2, 2)
PPM_BINS = (1, 2, 3, 6)
PPM_CHANNELS = (64, 128, 256, 64)


class PyramidalPoolingModule(nn.Module):
  """Per bin b: AdaptiveAvgPool2d(b) -> Conv 1x1 (bias) -> ReLU -> bilinear (align_corners=True) back
  to the input size; concatenated in bin order.  The input itself is not kept (spec §6)."""

  def __init__(self, input_channels, pool_sizes, output_channels):
    super().__init__()
    self.pool_sizes = tuple(pool_sizes)
    self.conv_layers = nn.ModuleList(
        nn.Conv2d(input_channels, oc, kernel_size=1, bias=True) for oc in output_channels)

  def forward(self, x):
    size = x.shape[2:]
    outs = []
    for bins, conv in zip(self.pool_sizes, self.conv_layers):
      y = F.relu(conv(F.adaptive_avg_pool2d(x, bins)))
      outs.append(F.interpolate(y, size=size, mode="bilinear", align_corners=True))
    return torch.cat(outs, dim=1)


class UNetResDecoder(nn.Module):
  """Coarse-to-fine: ConvTranspose (kernel = stride) -> concat [up, skip] -> residual blocks.

  One seg layer per stage exists, but only the finest one is applied (no deep supervision).
  """

  def __init__(self, encoder: ResidualEncoder, num_classes: int, n_conv_per_stage):
    super().__init__()
    self.encoder = encoder
    chans = encoder.output_channels
    transpconvs, stages, seg_layers = [], [], []
    for s in range(1, len(chans)):
      below, skip = chans[-s], chans[-(s + 1)]
      stride = encoder.strides[-s]
      transpconvs.append(nn.ConvTranspose2d(below, skip, stride, stride, bias=encoder.conv_bias))
      stages.append(StackedResidualBlocks(
          n_conv_per_stage[s - 1], encoder.conv_op, 2 * skip, skip, encoder.kernel_sizes[-(s + 1)], 1,
          encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs, encoder.dropout_op,
          encoder.dropout_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs))
      seg_layers.append(encoder.conv_op(skip, num_classes, 1, 1, 0, bias=True))
    self.stages = nn.ModuleList(stages)
    self.transpconvs = nn.ModuleList(transpconvs)
    self.seg_layers = nn.ModuleList(seg_layers)

  def forward(self, skips):
    x = skips[-1]
    for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
      x = stage(torch.cat((up(x), skips[-(s + 2)]), dim=1))
    return self.seg_layers[-1](x)


class UMambaBot(nn.Module):
  """The authors' UMambaBot (pyramid_pooling=False) or UMambaBot-PP (True), fixed configuration."""

  def __init__(self, pyramid_pooling: bool = False):
    super().__init__()
    self.encoder = ResidualEncoder(
        3, 5, FEATURES, nn.Conv2d, 3, STRIDES, (1, 1, 1, 1, 1), conv_bias=True,
        norm_op=nn.InstanceNorm2d, norm_op_kwargs={}, dropout_op=None, nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True}, block=BasicBlockD, return_skips=True)
    self.ppm = (PyramidalPoolingModule(FEATURES[-1], PPM_BINS, PPM_CHANNELS)
                if pyramid_pooling else None)
    self.ln = nn.LayerNorm(FEATURES[-1])
    self.mamba = mamba_oracle.mamba(FEATURES[-1], d_state=16, d_conv=4, expand=2)
    self.decoder = UNetResDecoder(self.encoder, 1, (1, 1, 1, 1))

  def forward(self, x):
    skips = self.encoder(x)
    f = self.ppm(skips[-1]) if self.ppm is not None else skips[-1]
    b, c, h, w = f.shape
    tokens = self.ln(f.reshape(b, c, h * w).transpose(1, 2))   # (B, L, C), token = h*W + w
    skips[-1] = self.mamba(tokens).transpose(1, 2).reshape(b, c, h, w)
    return self.decoder(skips)
