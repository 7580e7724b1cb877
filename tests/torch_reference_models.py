"""Minimal PyTorch ImageNet models with torchvision's module names (so their ``state_dict()`` keys
and shapes are exactly torchvision's) for the converter tests; torchvision itself has no CPU
build here. Written from torchvision's documented architectures: ResNet v1.5 (stride on the 3x3
conv), VGG-BN with ``AdaptiveAvgPool2d((7, 7))`` and a 3-layer classifier, DenseNet-BC.

:func:`randomize` gives every parameter and BatchNorm running statistic random, non-trivial
values, so a converter that mixed up any layout would not pass by luck.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int = 1, downsample=None):
    super().__init__()
    self.conv1, self.bn1 = _conv(cin, planes, 3, stride), nn.BatchNorm2d(planes)
    self.conv2, self.bn2 = _conv(planes, planes, 3), nn.BatchNorm2d(planes)
    self.relu, self.downsample = nn.ReLU(inplace=True), downsample

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int = 1, downsample=None):
    super().__init__()
    self.conv1, self.bn1 = _conv(cin, planes, 1), nn.BatchNorm2d(planes)
    self.conv2, self.bn2 = _conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
    self.conv3, self.bn3 = _conv(planes, planes * 4, 1), nn.BatchNorm2d(planes * 4)
    self.relu, self.downsample = nn.ReLU(inplace=True), downsample

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
  def __init__(self, block, layers, num_classes: int = 1000):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
    self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
    cin = 64
    for s, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
      stride = 1 if s == 1 else 2
      blocks = []
      for b in range(n):
        down = None
        if b == 0 and (stride != 1 or cin != planes * block.expansion):
          down = nn.Sequential(nn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False),
                               nn.BatchNorm2d(planes * block.expansion))
        blocks.append(block(cin, planes, stride if b == 0 else 1, down))
        cin = planes * block.expansion
      setattr(self, f'layer{s}', nn.Sequential(*blocks))
    self.avgpool, self.fc = nn.AdaptiveAvgPool2d((1, 1)), nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for s in range(1, 5):
      x = getattr(self, f'layer{s}')(x)
    return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes=1000):
  return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet34(num_classes=1000):
  return ResNet(BasicBlock, (3, 4, 6, 3), num_classes)


def resnet50(num_classes=1000):
  return ResNet(Bottleneck, (3, 4, 6, 3), num_classes)


def resnet101(num_classes=1000):
  return ResNet(Bottleneck, (3, 4, 23, 3), num_classes)


class VGG(nn.Module):
  def __init__(self, cfg, num_classes: int = 1000):
    super().__init__()
    layers, cin = [], 3
    for v in cfg:
      if v == 'M':
        layers.append(nn.MaxPool2d(2, 2))
      else:
        layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        cin = v
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
        nn.Linear(4096, num_classes))

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg11_bn(num_classes=1000):
  return VGG((64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'), num_classes)


class _DenseLayer(nn.Module):
  def __init__(self, cin: int, growth: int, bn_size: int):
    super().__init__()
    self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
    self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
    self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

  def forward(self, feats):
    x = torch.cat(feats, 1)
    return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class _DenseBlock(nn.ModuleDict):
  def __init__(self, n: int, cin: int, growth: int, bn_size: int):
    super().__init__()
    for j in range(n):
      self.add_module(f'denselayer{j + 1}', _DenseLayer(cin + j * growth, growth, bn_size))

  def forward(self, x):
    feats = [x]
    for layer in self.values():
      feats.append(layer(feats))
    return torch.cat(feats, 1)


class _Transition(nn.Sequential):
  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.add_module('norm', nn.BatchNorm2d(cin))
    self.add_module('relu', nn.ReLU(inplace=True))
    self.add_module('conv', nn.Conv2d(cin, cout, 1, bias=False))
    self.add_module('pool', nn.AvgPool2d(2, 2))


class DenseNet(nn.Module):
  def __init__(self, growth=32, blocks=(6, 12, 24, 16), init=64, bn_size=4, num_classes=1000):
    super().__init__()
    mods = OrderedDict([('conv0', nn.Conv2d(3, init, 7, 2, 3, bias=False)),
                        ('norm0', nn.BatchNorm2d(init)), ('relu0', nn.ReLU(inplace=True)),
                        ('pool0', nn.MaxPool2d(3, 2, 1))])
    n = init
    for i, layers in enumerate(blocks, start=1):
      mods[f'denseblock{i}'] = _DenseBlock(layers, n, growth, bn_size)
      n += layers * growth
      if i < len(blocks):
        mods[f'transition{i}'] = _Transition(n, n // 2)
        n //= 2
    mods['norm5'] = nn.BatchNorm2d(n)
    self.features = nn.Sequential(mods)
    self.classifier = nn.Linear(n, num_classes)

  def forward(self, x):
    x = torch.relu(self.features(x))
    return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def densenet121(num_classes=1000):
  return DenseNet(num_classes=num_classes)


BUILDERS = {'resnet18': resnet18, 'resnet34': resnet34, 'resnet50': resnet50,
            'resnet101': resnet101, 'vgg11_bn': vgg11_bn, 'densenet121': densenet121}


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random weights (fan-in scaled, so activations stay O(1) at any depth), random BN affine
  parameters and running statistics (mean ~ N(0, 0.1^2), var ~ U(0.5, 2)); eval mode."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      fan_in = m.weight[0].numel()
      m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      if m.bias is not None:
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    elif isinstance(m, nn.BatchNorm2d):
      c = m.num_features
      m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
      m.bias.copy_(torch.randn(c, generator=g) * 0.1)
      m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
      m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
      m.num_batches_tracked.fill_(7)
  return model.eval()
