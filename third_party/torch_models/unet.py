"""The authors' UNet in PyTorch (spec models-conv-umamba.md §2), written from the spec as a test
oracle.  Key names as in the authors' models/UNet.py: `encoder{1..4}`, `bottleneck`,
`decoder{4..1}` are Sequentials (conv 0, BN 1, ReLU 2, conv 3, BN 4, ReLU 5), `upconv{4..1}` the
ConvTranspose2d k2 s2, `conv` the 1x1 head.
"""
import torch
from torch import nn


def double_conv(cin: int, cout: int) -> nn.Sequential:
  layers = []
  for a in (cin, cout):
    layers += [nn.Conv2d(a, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
  return nn.Sequential(*layers)


class UNet(nn.Module):
  widths = (32, 64, 128, 256)

  def __init__(self):
    super().__init__()
    cin = 3
    for i, w in enumerate(self.widths, start=1):
      setattr(self, f"encoder{i}", double_conv(cin, w))
      cin = w
    self.bottleneck = double_conv(256, 512)
    for i in range(len(self.widths), 0, -1):
      w = self.widths[i - 1]
      setattr(self, f"upconv{i}", nn.ConvTranspose2d(2 * w, w, kernel_size=2, stride=2))
      setattr(self, f"decoder{i}", double_conv(2 * w, w))
    self.conv = nn.Conv2d(32, 1, kernel_size=1)

  def forward(self, x):
    skips = []
    for i in range(1, 5):
      x = getattr(self, f"encoder{i}")(x if i == 1 else nn.functional.max_pool2d(x, 2))
      skips.append(x)
    x = self.bottleneck(nn.functional.max_pool2d(x, 2))
    for i in range(4, 0, -1):
      x = torch.cat([getattr(self, f"upconv{i}")(x), skips[i - 1]], dim=1)
      x = getattr(self, f"decoder{i}")(x)
    return self.conv(x)
