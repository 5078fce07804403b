"""ResNet / ResNeXt backbones built block by block from a :class:`~jdsearch.spec.arch.BackboneArch`.

Every conv gets its channel counts from the arch, so a block pruned to ``(58, 59, 205)`` is just
another block. Module names are stable because morph actions, distillation and the teacher pool
address parameters by name:

``stem.conv``, ``stem.bn``, ``stages.{s}.{b}.conv1/bn1/conv2/bn2[/conv3/bn3]`` and, for a block
with a projection shortcut, ``stages.{s}.{b}.shortcut.conv/bn``. Strides sit on the 3×3 conv (the
"pytorch" ResNet style used by torchvision and mmdetection), or, for an arch with
``stride_in_1x1``, on a bottleneck's first 1×1 conv (detectron2's MSRA style).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from jdsearch.spec.arch import BASIC, BackboneArch, BlockSlot


def conv_bn(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1
) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """A bias-free ``kernel``×``kernel`` conv (padding ``kernel // 2``) and the ``BatchNorm2d`` of
    its output."""
    conv = nn.Conv2d(
        in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False
    )
    return conv, nn.BatchNorm2d(out_ch)


class Shortcut(nn.Module):
    """Projection shortcut: 1×1 conv (strided where the block is) + BN."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv, self.bn = conv_bn(in_ch, out_ch, 1, stride)

    def forward(self, x: Tensor) -> Tensor:
        """BN of the 1×1 projection of ``x``."""
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    """Two 3×3 convs: widths ``(c1, c_out)``."""

    def __init__(
        self, in_ch: int, channels: tuple[int, ...], stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        c1, c_out = channels
        self.conv1, self.bn1 = conv_bn(in_ch, c1, 3, stride)
        self.conv2, self.bn2 = conv_bn(c1, c_out, 3)
        self.shortcut = Shortcut(in_ch, c_out, stride) if (in_ch != c_out or stride != 1) else None
        self.relu = nn.ReLU(inplace=True)

    def residual(self, x: Tensor) -> Tensor:
        """The residual branch: conv-BN-ReLU, then conv-BN (no final ReLU)."""
        y = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(y))

    def forward(self, x: Tensor) -> Tensor:
        """ReLU of the residual branch plus the shortcut (identity or projection)."""
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.residual(x) + identity)


class Bottleneck(BasicBlock):
    """1×1 → 3×3 (strided, grouped) → 1×1: widths ``(c1, c2, c_out)``; with ``stride_in_1x1``
    the first 1×1 conv carries the stride instead."""

    def __init__(
        self,
        in_ch: int,
        channels: tuple[int, ...],
        stride: int = 1,
        groups: int = 1,
        stride_in_1x1: bool = False,
    ) -> None:
        nn.Module.__init__(self)
        c1, c2, c_out = channels
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1, self.bn1 = conv_bn(in_ch, c1, 1, s1)
        self.conv2, self.bn2 = conv_bn(c1, c2, 3, s3, groups)
        self.conv3, self.bn3 = conv_bn(c2, c_out, 1)
        self.shortcut = Shortcut(in_ch, c_out, stride) if (in_ch != c_out or stride != 1) else None
        self.relu = nn.ReLU(inplace=True)

    def residual(self, x: Tensor) -> Tensor:
        """The residual branch: 1×1, 3×3 and 1×1 conv-BN, with a ReLU after the first two."""
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.bn3(self.conv3(y))


def make_block(slot: BlockSlot, stride_in_1x1: bool = False) -> BasicBlock:
    """The :class:`BasicBlock` or :class:`Bottleneck` of ``slot``: its input width, conv widths,
    stride and groups (a bottleneck's stride on its 1×1 conv with ``stride_in_1x1``)."""
    b = slot.block
    if b.kind == BASIC:
        return BasicBlock(slot.in_channels, b.channels, slot.stride, b.groups)
    return Bottleneck(slot.in_channels, b.channels, slot.stride, b.groups, stride_in_1x1)


class Stem(nn.Module):
    """7×7 stride-2 conv + BN + ReLU + 3×3 stride-2 max-pool (output stride 4)."""

    def __init__(self, out_ch: int, in_ch: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Max-pool of ReLU(BN(conv(``x``))): features at stride 4."""
        return self.pool(self.relu(self.bn(self.conv(x))))


class ResNet(nn.Module):
    """The backbone body: returns the output of every stage (C2..C5) keyed "0".."3"."""

    def __init__(self, arch: BackboneArch) -> None:
        super().__init__()
        self.arch = arch
        self.stem = Stem(arch.stem)
        stages: list[list[nn.Module]] = [[] for _ in arch.stages]
        for slot in arch.slots():
            stages[slot.stage].append(make_block(slot, arch.stride_in_1x1))
        self.stages = nn.ModuleList(nn.Sequential(*blocks) for blocks in stages)
        init_weights(self)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """Each stage's output for image batch ``x``, keyed ``"0"``..``"3"``."""
        x = self.stem(x)
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            out[str(i)] = x
        return out


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """He (fan-out) init for convs, γ=1/β=0 for BN: the usual from-scratch ResNet init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
