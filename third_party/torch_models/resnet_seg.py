"""ResNet18-Seg / ResNet50-Seg in PyTorch (spec models-conv-umamba.md §3), a test oracle.

torchvision is not usable here, so `resnet(depth)` builds the torchvision resnet18/resnet50
structure by hand with torchvision's module names and init (conv1, bn1, relu, maxpool,
layer1..layer4 of BasicBlock / Bottleneck v1.5 with conv{k}, bn{k}, downsample.{0,1}; avgpool, fc;
kaiming_normal fan_out convs, BN 1/0).  `ResNetSeg` wraps `children()[:-2]` in a Sequential named
`encoder` as the authors did, plus the ConvTranspose decoder Sequential.
"""
import torch
from torch import nn


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin: int, width: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU()
    self.downsample = _downsample(cin, width, stride)

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin: int, width: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)   # v1.5: stride on the 3x3
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(4 * width)
    self.relu = nn.ReLU()
    self.downsample = _downsample(cin, 4 * width, stride)

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + (x if self.downsample is None else self.downsample(x)))


def _downsample(cin, cout, stride):
  if stride == 1 and cin == cout:
    return None
  return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
  """torchvision.models.ResNet, module for module (num_classes 1000)."""

  def __init__(self, block, layers):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = 64
    for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
      blocks = []
      for j in range(n):
        blocks.append(block(cin, width, 2 if (i > 1 and j == 0) else 1))
        cin = width * block.expansion
      setattr(self, f"layer{i}", nn.Sequential(*blocks))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(cin, 1000)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(depth: int) -> ResNet:
  if depth == 18:
    return ResNet(BasicBlock, (2, 2, 2, 2))
  if depth == 50:
    return ResNet(Bottleneck, (3, 4, 6, 3))
  raise ValueError(f"depth must be 18 or 50, got {depth}")


class ResNetSeg(nn.Module):
  """Encoder = backbone children minus avgpool/fc; decoder = ConvT 4x4 s2 p1 stack + bilinear."""

  def __init__(self, depth: int, backbone: ResNet | None = None):
    super().__init__()
    backbone = backbone or resnet(depth)
    self.encoder = nn.Sequential(*list(backbone.children())[:-2])
    widths = (512, 256, 128, 64, 1) if depth == 18 else (2048, 512, 256, 128, 1)
    layers = []
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
      layers.append(nn.ConvTranspose2d(a, b, kernel_size=4, stride=2, padding=1))
      if k < 3:
        layers.append(nn.ReLU())
    self.decoder = nn.Sequential(*layers)

  def forward(self, x):
    size = x.shape[-2:]   # the authors' fixed (256, 256) == the input size
    y = self.decoder(self.encoder(x))
    return nn.functional.interpolate(y, size=size, mode="bilinear", align_corners=False)
