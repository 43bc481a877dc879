"""The authors' SegFormer in PyTorch (spec models-conv-umamba.md §4), a test oracle.

Module structure (and so state_dict keys) of the FrancescoSaverioZuppichini re-implementation the
authors used: encoder.stages[i] = Sequential(overlap_patch_merge, blocks, norm); each block a
Sequential of two residual wrappers holding `fn`; attention `reducer` + `att`
(nn.MultiheadAttention);
decoder.stages[j] = Sequential(UpsamplingBilinear2d, Conv 1x1); head.fuse = (conv, ReLU, BN),
head.predict.  Stochastic depth has p=0 (identity, no parameters) and is left out.
`forward` returns the authors' (B, 1, H/4, W/4) logits; `forward_full` adds their upsample.
"""
import torch
from torch import nn


class LayerNorm2d(nn.LayerNorm):
  """LayerNorm over channels of an NCHW map."""

  def forward(self, x):
    return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Residual(nn.Module):
  def __init__(self, fn: nn.Module):
    super().__init__()
    self.fn = fn

  def forward(self, x):
    return x + self.fn(x)


class EfficientAttention(nn.Module):
  def __init__(self, c: int, reduction: int, heads: int):
    super().__init__()
    self.reducer = nn.Sequential(nn.Conv2d(c, c, reduction, reduction), LayerNorm2d(c))
    self.att = nn.MultiheadAttention(c, heads, batch_first=True)

  def forward(self, x):
    b, c, h, w = x.shape
    kv = self.reducer(x).flatten(2).transpose(1, 2)
    q = x.flatten(2).transpose(1, 2)
    out = self.att(q, kv, kv, need_weights=False)[0]
    return out.transpose(1, 2).reshape(b, c, h, w)


def encoder_block(c: int, reduction: int, heads: int, expansion: int = 4) -> nn.Sequential:
  mix_mlp = nn.Sequential(nn.Conv2d(c, c, 1), nn.Conv2d(c, c * expansion, 3, padding=1, groups=c),
                          nn.GELU(), nn.Conv2d(c * expansion, c, 1))
  return nn.Sequential(
      Residual(nn.Sequential(LayerNorm2d(c), EfficientAttention(c, reduction, heads))),
      Residual(nn.Sequential(LayerNorm2d(c), mix_mlp)))


class EncoderStage(nn.Sequential):
  def __init__(self, cin, cout, patch, stride, depth, reduction, heads):
    super().__init__()
    self.overlap_patch_merge = nn.Sequential(
        nn.Conv2d(cin, cout, patch, stride, patch // 2, bias=False), LayerNorm2d(cout))
    self.blocks = nn.Sequential(*[encoder_block(cout, reduction, heads) for _ in range(depth)])
    self.norm = LayerNorm2d(cout)


class Encoder(nn.Module):
  def __init__(self, widths, depths, heads, patches, strides, reductions):
    super().__init__()
    cins = (3, *widths[:-1])
    self.stages = nn.ModuleList([EncoderStage(*a) for a in zip(cins, widths, patches, strides,
                                                               depths, reductions, heads)])

  def forward(self, x):
    feats = []
    for stage in self.stages:
      x = stage(x)
      feats.append(x)
    return feats


class Decoder(nn.Module):
  def __init__(self, out_c, widths, scales):
    super().__init__()
    self.stages = nn.ModuleList([nn.Sequential(nn.UpsamplingBilinear2d(scale_factor=s),
                                               nn.Conv2d(c, out_c, 1))
                                 for c, s in zip(widths, scales)])

  def forward(self, feats):
    return [stage(f) for f, stage in zip(feats, self.stages)]


class Head(nn.Module):
  def __init__(self, c, num_classes, n):
    super().__init__()
    self.fuse = nn.Sequential(nn.Conv2d(c * n, c, 1, bias=False), nn.ReLU(), nn.BatchNorm2d(c))
    self.predict = nn.Conv2d(c, num_classes, 1)

  def forward(self, feats):
    return self.predict(self.fuse(torch.cat(feats, dim=1)))


class SegFormer(nn.Module):
  def __init__(self, widths=(64, 128, 256, 512), depths=(3, 4, 6, 3), heads=(1, 2, 4, 8),
               patches=(7, 3, 3, 3), strides=(4, 2, 2, 2), reductions=(8, 4, 2, 1),
               decoder_channels=256, scales=(8, 4, 2, 1), num_classes=1):
    super().__init__()
    self.encoder = Encoder(widths, depths, heads, patches, strides, reductions)
    self.decoder = Decoder(decoder_channels, widths[::-1], scales)
    self.head = Head(decoder_channels, num_classes, len(widths))

  def forward(self, x):
    return self.head(self.decoder(self.encoder(x)[::-1]))

  def forward_full(self, x):
    """The authors' logits upsampled to the input size outside the model (align_corners=False)."""
    return nn.functional.interpolate(self(x), size=x.shape[-2:], mode="bilinear",
                                     align_corners=False)
