"""A PyTorch twin of taylor_jax's CIFAR-style ResNet (``taylor_jax/models/cifar_resnet.py``) and
the conversion of its Flax variables, for the side-by-side study with Torch-Pruning (issue 15).

Same layers in the same order: 3x3 stem conv (no bias) + BN + ReLU; per stage basic blocks
conv3x3-BN-ReLU-conv3x3-BN, + shortcut (1x1 conv + BN where the stage starts, stride 2), ReLU;
global average pool; linear head. BatchNorm: eps 1e-5, momentum 0.1 (Flax's 0.9). Widths follow
the zoo's groups (``stage{s}``: residual stream, ``stage{s}.block{b}``: inside a block), so a
pruned JAX network converts as well as a full one.

  from torch_cifar_resnet import from_jax
  net = from_jax(model, variables)         # a torch.nn.Module in eval mode
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn


class BasicBlock(nn.Module):

  def __init__(self, cin: int, mid: int, out: int, stride: int, projection: bool):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(mid)
    self.conv2 = nn.Conv2d(mid, out, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out)
    self.proj = (nn.Sequential(nn.Conv2d(cin, out, 1, stride, 0, bias=False), nn.BatchNorm2d(out))
                 if projection else None)

  def forward(self, x):
    y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
    return torch.relu((x if self.proj is None else self.proj(x)) + y)


class CifarResNet(nn.Module):

  def __init__(self, widths: Mapping[str, int], num_classes: int = 10, blocks_per_stage: int = 3,
               in_channels: int = 1):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(in_channels, widths['stage1'], 3, 1, 1, bias=False),
                              nn.BatchNorm2d(widths['stage1']), nn.ReLU())
    blocks, cin = [], widths['stage1']
    for s in (1, 2, 3):
      for b in range(blocks_per_stage):
        out = widths[f'stage{s}']
        first = b == 0 and s > 1
        blocks.append(BasicBlock(cin, widths[f'stage{s}.block{b}'], out, 2 if first else 1,
                                 first))
        cin = out
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Linear(cin, num_classes)

  def forward(self, x):  # x: (N, C, H, W)
    return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def _bn(dst: nn.BatchNorm2d, params: Mapping[str, Any], stats: Mapping[str, Any]) -> None:
  dst.weight.data = torch.from_numpy(np.asarray(params['scale'], np.float32).copy())
  dst.bias.data = torch.from_numpy(np.asarray(params['bias'], np.float32).copy())
  dst.running_mean.data = torch.from_numpy(np.asarray(stats['mean'], np.float32).copy())
  dst.running_var.data = torch.from_numpy(np.asarray(stats['var'], np.float32).copy())


def _conv(dst: nn.Conv2d, kernel) -> None:  # HWIO -> OIHW
  dst.weight.data = torch.from_numpy(np.ascontiguousarray(
      np.asarray(kernel, np.float32).transpose(3, 2, 0, 1)))


def from_jax(model, variables: Mapping[str, Any]) -> CifarResNet:
  """The torch network computing what ``model.apply(variables, x)`` computes (eval mode; the
  input as NCHW). ``model``: a zoo ``CifarResNet`` (full or surgered widths)."""
  p, st = variables['params'], variables['batch_stats']
  in_channels = int(np.shape(p['stem_conv']['kernel'])[2])
  net = CifarResNet(dict(model.widths), model.num_classes, model.blocks_per_stage, in_channels)
  _conv(net.stem[0], p['stem_conv']['kernel'])
  _bn(net.stem[1], p['stem_bn'], st['stem_bn'])
  i = 0
  for s in (1, 2, 3):
    for b in range(model.blocks_per_stage):
      name, blk = f'stage{s}_block{b}', net.blocks[i]
      _conv(blk.conv1, p[name]['conv1']['kernel'])
      _bn(blk.bn1, p[name]['bn1'], st[name]['bn1'])
      _conv(blk.conv2, p[name]['conv2']['kernel'])
      _bn(blk.bn2, p[name]['bn2'], st[name]['bn2'])
      if blk.proj is not None:
        _conv(blk.proj[0], p[name]['proj_conv']['kernel'])
        _bn(blk.proj[1], p[name]['proj_bn'], st[name]['proj_bn'])
      i += 1
  net.head.weight.data = torch.from_numpy(np.ascontiguousarray(
      np.asarray(p['head']['kernel'], np.float32).T))
  net.head.bias.data = torch.from_numpy(np.asarray(p['head']['bias'], np.float32).copy())
  return net.eval()
