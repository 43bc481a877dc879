"""PyTorch test oracle: UltraLight VM-UNet and the Crews & Whalen variants v1-v6.

Written from the specification (/work/shared/spec/models-ultralight.md §1-4), in the authors' module
structure so that state_dict keys read as theirs (`encoder4.0.mamba.A_log`, `scab.catt.att1.weight`,
`ebn1.weight`, ...).  The Mamba is mamba_ssm's own (third_party/mamba_oracle.py, PyTorch path).
Used only by tests; nothing here is derived from the Flax code.

Like the authors' models, `forward` ends in a sigmoid; `forward_logits` is the same computation
without it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from third_party import mamba_oracle


class PyramidPooling(nn.Module):
  """tests/pyramidal_pooling.py as the spec describes it (§1.5): no norm, input not kept."""

  def __init__(self, in_channels, out_channels, bins=(1, 2, 3, 6)):
    super().__init__()
    self.bins = bins
    self.out_channels = list(out_channels)
    self.conv_layers = nn.ModuleList(nn.Conv2d(in_channels, oc, 1) for oc in out_channels)

  def forward(self, x):
    size = x.shape[2:]
    outs = []
    for b, conv in zip(self.bins, self.conv_layers):
      p = F.relu(conv(F.adaptive_avg_pool2d(x, b)))
      outs.append(F.interpolate(p, size=size, mode="bilinear", align_corners=True))
    return torch.cat(outs, dim=1)[:, :sum(self.out_channels)]


class PVMLayer(nn.Module):
  """Parallel Vision Mamba layer (§1.2), chunks processed one by one as the authors do."""

  def __init__(self, input_dim, output_dim, chunks=4, pp=False, d_state=16, d_conv=4, expand=2):
    super().__init__()
    self.input_dim, self.output_dim, self.chunks = input_dim, output_dim, chunks
    self.norm = nn.LayerNorm(input_dim)
    self.mamba = mamba_oracle.mamba(input_dim // chunks, d_state=d_state, d_conv=d_conv,
                                    expand=expand)
    self.proj = nn.Linear(input_dim, output_dim)
    self.skip_scale = nn.Parameter(torch.ones(1))
    if pp:
      c = input_dim
      self.ppm = PyramidPooling(c, [c // 8, c // 4, c // 2, c // 8])
    self.pp = pp

  def forward(self, x):
    if x.dtype == torch.float16:
      x = x.type(torch.float32)
    if self.pp:
      x = self.ppm(x)
    b, c = x.shape[:2]
    dims = x.shape[2:]
    x_flat = x.reshape(b, c, dims.numel()).transpose(-1, -2)
    x_norm = self.norm(x_flat)
    parts = [self.mamba(xi) + self.skip_scale * xi for xi in torch.chunk(x_norm, self.chunks, dim=2)]
    x_mamba = self.proj(self.norm(torch.cat(parts, dim=2)))
    return x_mamba.transpose(-1, -2).reshape(b, self.output_dim, *dims)


class ChannelAttBridge(nn.Module):
  def __init__(self, c_list):
    super().__init__()
    total = sum(c_list) - c_list[-1]
    self.levels = len(c_list) - 1
    self.get_all_att = nn.Conv1d(1, 1, kernel_size=3, padding=1, bias=False)
    for i in range(self.levels):
      setattr(self, f"att{i + 1}", nn.Linear(total, c_list[i]))

  def forward(self, ts):
    att = torch.cat([F.adaptive_avg_pool2d(t, 1) for t in ts], dim=1)   # (B, S, 1, 1)
    att = self.get_all_att(att.squeeze(-1).transpose(-1, -2))            # (B, 1, S)
    outs = []
    for i, t in enumerate(ts):
      a = torch.sigmoid(getattr(self, f"att{i + 1}")(att))              # (B, 1, C_i)
      outs.append(a.transpose(-1, -2).unsqueeze(-1).expand_as(t))
    return outs


class SpatialAttBridge(nn.Module):
  def __init__(self):
    super().__init__()
    self.shared_conv2d = nn.Sequential(nn.Conv2d(2, 1, 7, stride=1, padding=9, dilation=3),
                                       nn.Sigmoid())

  def forward(self, ts):
    outs = []
    for t in ts:
      avg_out = torch.mean(t, dim=1, keepdim=True)
      max_out, _ = torch.max(t, dim=1, keepdim=True)
      outs.append(self.shared_conv2d(torch.cat([avg_out, max_out], dim=1)))
    return outs


class SCAttBridge(nn.Module):
  def __init__(self, c_list):
    super().__init__()
    self.catt = ChannelAttBridge(c_list)
    self.satt = SpatialAttBridge()

  def forward(self, ts):
    rs = list(ts)
    ts = [s * t for s, t in zip(self.satt(ts), ts)]
    rs_ = list(ts)
    ts = [t + r for t, r in zip(ts, rs)]
    ts = [c * t for c, t in zip(self.catt(ts), ts)]
    return [t + r_ for t, r_ in zip(ts, rs_)]


def _init_weights(m):
  """The authors' model-level re-initialisation (§1.6), applied to every sub-module."""
  if isinstance(m, nn.Linear):
    nn.init.trunc_normal_(m.weight, std=0.02)      # bounds at absolute +-2, as timm's
    if m.bias is not None:
      nn.init.constant_(m.bias, 0)
  elif isinstance(m, nn.Conv1d):
    n = m.kernel_size[0] * m.out_channels
    m.weight.data.normal_(0, math.sqrt(2.0 / n))
  elif isinstance(m, nn.Conv2d):
    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
    m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
    if m.bias is not None:
      m.bias.data.zero_()


def _up(x):
  return F.interpolate(x, scale_factor=(2, 2), mode="bilinear", align_corners=True)


def _enc(norm, op, x):
  return F.gelu(F.max_pool2d(norm(op(x)), 2, 2))


class UltraLightVMUNet(nn.Module):
  """Six-level layout (§2): the original (k=4, c 8..64), v2 (k=8), v4/v5/v6 (c 16..512, k=8).

  `pp` is "none", "all" (v4) or "bottleneck" (v6: encoder6 only).
  """

  def __init__(self, c_list=(8, 16, 24, 32, 48, 64), chunks=4, pp="none", input_channels=3):
    super().__init__()
    c = list(c_list)
    every = pp == "all"
    pvm = lambda i, o, p=every: nn.Sequential(PVMLayer(i, o, chunks, pp=p))  # noqa: E731
    self.encoder1 = nn.Sequential(nn.Conv2d(input_channels, c[0], 3, stride=1, padding=1))
    self.encoder2 = nn.Sequential(nn.Conv2d(c[0], c[1], 3, stride=1, padding=1))
    self.encoder3 = nn.Sequential(nn.Conv2d(c[1], c[2], 3, stride=1, padding=1))
    self.encoder4 = pvm(c[2], c[3])
    self.encoder5 = pvm(c[3], c[4])
    self.encoder6 = pvm(c[4], c[5], every or pp == "bottleneck")
    self.scab = SCAttBridge(c)
    self.decoder1 = pvm(c[5], c[4])
    self.decoder2 = pvm(c[4], c[3])
    self.decoder3 = pvm(c[3], c[2])
    self.decoder4 = nn.Sequential(nn.Conv2d(c[2], c[1], 3, stride=1, padding=1))
    self.decoder5 = nn.Sequential(nn.Conv2d(c[1], c[0], 3, stride=1, padding=1))
    for i in range(5):
      setattr(self, f"ebn{i + 1}", nn.GroupNorm(4, c[i]))
    for i, ch in enumerate((c[4], c[3], c[2], c[1], c[0])):
      setattr(self, f"dbn{i + 1}", nn.GroupNorm(4, ch))
    self.final = nn.Conv2d(c[0], 1, kernel_size=1)
    self.apply(_init_weights)

  def forward_logits(self, x):
    out = t1 = _enc(self.ebn1, self.encoder1, x)
    out = t2 = _enc(self.ebn2, self.encoder2, out)
    out = t3 = _enc(self.ebn3, self.encoder3, out)
    out = t4 = _enc(self.ebn4, self.encoder4, out)
    out = t5 = _enc(self.ebn5, self.encoder5, out)
    t1, t2, t3, t4, t5 = self.scab([t1, t2, t3, t4, t5])
    out = F.gelu(self.encoder6(out))
    out5 = F.gelu(self.dbn1(self.decoder1(out))) + t5
    out4 = F.gelu(_up(self.dbn2(self.decoder2(out5)))) + t4
    out3 = F.gelu(_up(self.dbn3(self.decoder3(out4)))) + t3
    out2 = F.gelu(_up(self.dbn4(self.decoder4(out3)))) + t2
    out1 = F.gelu(_up(self.dbn5(self.decoder5(out2)))) + t1
    return _up(self.final(out1))

  def forward(self, x):
    return torch.sigmoid(self.forward_logits(x))


class UltraLightVMUNet5(nn.Module):
  """Five-level layout of v1 (k=4) and v3 (k=8), c 16..256 (§3): encoder3 is a PVM."""

  def __init__(self, c_list=(16, 32, 64, 128, 256), chunks=4, input_channels=3):
    super().__init__()
    c = list(c_list)
    pvm = lambda i, o: nn.Sequential(PVMLayer(i, o, chunks))  # noqa: E731
    self.encoder1 = nn.Sequential(nn.Conv2d(input_channels, c[0], 3, stride=1, padding=1))
    self.encoder2 = nn.Sequential(nn.Conv2d(c[0], c[1], 3, stride=1, padding=1))
    self.encoder3 = pvm(c[1], c[2])
    self.encoder4 = pvm(c[2], c[3])
    self.encoder5 = pvm(c[3], c[4])
    self.scab = SCAttBridge(c)
    self.decoder1 = pvm(c[4], c[3])
    self.decoder2 = pvm(c[3], c[2])
    self.decoder3 = pvm(c[2], c[1])
    self.decoder4 = nn.Sequential(nn.Conv2d(c[1], c[0], 3, stride=1, padding=1))
    for i in range(4):
      setattr(self, f"ebn{i + 1}", nn.GroupNorm(4, c[i]))
    for i, ch in enumerate((c[3], c[2], c[1], c[0])):
      setattr(self, f"dbn{i + 1}", nn.GroupNorm(4, ch))
    self.final = nn.Conv2d(c[0], 1, kernel_size=1)
    self.apply(_init_weights)

  def forward_logits(self, x):
    out = t1 = _enc(self.ebn1, self.encoder1, x)
    out = t2 = _enc(self.ebn2, self.encoder2, out)
    out = t3 = _enc(self.ebn3, self.encoder3, out)
    out = t4 = _enc(self.ebn4, self.encoder4, out)
    t1, t2, t3, t4 = self.scab([t1, t2, t3, t4])
    out = F.gelu(self.encoder5(out))
    out4 = F.gelu(self.dbn1(self.decoder1(out))) + t4
    out3 = F.gelu(_up(self.dbn2(self.decoder2(out4)))) + t3
    out2 = F.gelu(_up(self.dbn3(self.decoder3(out3)))) + t2
    out1 = F.gelu(_up(self.dbn4(self.decoder4(out2)))) + t1
    return _up(self.final(out1))

  def forward(self, x):
    return torch.sigmoid(self.forward_logits(x))


_WIDE6 = (16, 32, 64, 128, 256, 512)


def build(variant: str) -> nn.Module:
  """The authors' model for variant "base", "v1", ..., "v6" (§3's table)."""
  if variant == "base":
    return UltraLightVMUNet()
  if variant == "v1":
    return UltraLightVMUNet5(chunks=4)
  if variant == "v2":
    return UltraLightVMUNet(chunks=8)
  if variant == "v3":
    return UltraLightVMUNet5(chunks=8)
  if variant in ("v4", "v5", "v6"):
    pp = {"v4": "all", "v5": "none", "v6": "bottleneck"}[variant]
    return UltraLightVMUNet(_WIDE6, chunks=8, pp=pp)
  raise ValueError(f"unknown UltraLight variant {variant!r}")
