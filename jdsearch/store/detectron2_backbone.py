"""detectron2 backbone of a jdsearch student: a ResNet whose every block has its own widths, under
detectron2's own FPN. ``jdsearch export --format detectron2`` copies this file, unchanged, next to
the config and weights it writes; jdsearch itself never imports it.

Use it as detectron2's ``projects/`` are used::

    import jdsearch_backbone  # registers the backbone builder and the anchor generator
    from detectron2.config import get_cfg
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = get_cfg()
    jdsearch_backbone.add_jdsearch_config(cfg)
    cfg.merge_from_file("config.yaml")
    model = build_model(cfg)
    DetectionCheckpointer(model).load("model_final.pth")

``MODEL.JDSEARCH`` holds the architecture: ``STAGE_STRIDES`` (one per stage), ``BLOCKS`` (per
stage, each block's conv widths: ``[c1, c_out]`` basic, ``[c1, c2, c_out]`` bottleneck) and
``GROUPS`` (per stage, each block's 3×3 groups); the stem is ``MODEL.RESNETS.STEM_OUT_CHANNELS``
wide. A block has a projection shortcut when its width changes or it is strided.
``MODEL.RESNETS.STRIDE_IN_1X1`` puts a bottleneck's stride on its first 1×1 conv, ``NORM`` and
``MODEL.BACKBONE.FREEZE_AT`` mean what they mean for detectron2's ResNet.
``MODEL.ANCHOR_GENERATOR.NAME: JDSearchAnchorGenerator`` reproduces torchvision's anchors for a
student that kept them (``MODEL.JDSEARCH.ROUND_ANCHORS``, ``FIXED_ANCHOR_STRIDES``); a student
imported from detectron2 uses detectron2's ``DefaultAnchorGenerator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling import ANCHOR_GENERATOR_REGISTRY, BACKBONE_REGISTRY, Backbone
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicStem
from torch import nn

__all__ = [
    "JDSearchAnchorGenerator",
    "JDSearchBlock",
    "JDSearchResNet",
    "add_jdsearch_config",
    "build_jdsearch_resnet_fpn_backbone",
]


def add_jdsearch_config(cfg: CfgNode) -> None:
    """Add the ``MODEL.JDSEARCH`` keys (with their defaults) to a detectron2 config."""
    cfg.MODEL.JDSEARCH = CfgNode()
    cfg.MODEL.JDSEARCH.STAGE_STRIDES = [1, 2, 2, 2]
    cfg.MODEL.JDSEARCH.BLOCKS = []  # per stage, per block: conv output widths
    cfg.MODEL.JDSEARCH.GROUPS = []  # per stage, per block: groups of the 3×3 conv
    cfg.MODEL.JDSEARCH.ROUND_ANCHORS = False  # JDSearchAnchorGenerator: torchvision's rounding
    cfg.MODEL.JDSEARCH.FIXED_ANCHOR_STRIDES = True  # False: padded image size // feature size
    cfg.MODEL.JDSEARCH.SIZE_DIVISIBILITY = 32  # inputs are padded to a multiple of it


class JDSearchBlock(CNNBlockBase):
    """A residual block of any widths: two 3×3 convs (basic) or 1×1, 3×3 (grouped), 1×1
    (bottleneck), each with its norm, and a projection shortcut where the width changes or the
    block is strided. Names as detectron2's blocks: ``conv1..3`` (``.norm``), ``shortcut``."""

    def __init__(self, in_channels, channels, groups, stride, norm, stride_in_1x1):
        channels = [int(c) for c in channels]
        super().__init__(in_channels, channels[-1], stride)
        if len(channels) == 2:
            layout = [(3, stride, 1), (3, 1, 1)]
        else:
            s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
            layout = [(1, s1, 1), (3, s3, int(groups)), (1, 1, 1)]
        widths = [in_channels, *channels]
        self.convs = []
        for i, (k, s, groups) in enumerate(layout):
            conv = Conv2d(
                widths[i],
                widths[i + 1],
                kernel_size=k,
                stride=s,
                padding=k // 2,
                groups=groups,
                bias=False,
                norm=get_norm(norm, widths[i + 1]),
            )
            self.add_module(f"conv{i + 1}", conv)
            self.convs.append(conv)
        self.shortcut = None
        if in_channels != channels[-1] or stride != 1:
            self.shortcut = Conv2d(
                in_channels,
                channels[-1],
                kernel_size=1,
                stride=stride,
                bias=False,
                norm=get_norm(norm, channels[-1]),
            )

    def forward(self, x):
        out = x
        for i, conv in enumerate(self.convs):
            out = conv(out)
            if i < len(self.convs) - 1:
                out = F.relu_(out)
        out = out + (x if self.shortcut is None else self.shortcut(x))
        return F.relu_(out)


class JDSearchResNet(Backbone):
    """The ResNet of ``MODEL.JDSEARCH``: ``stem`` and ``res2``..``res5``, block by block."""

    def __init__(self, jd, stem, norm="FrozenBN", stride_in_1x1=False, freeze_at=0):
        super().__init__()
        self.stem = BasicStem(3, int(stem), norm)
        in_channels, stride = int(stem), self.stem.stride
        self._out_features, self._out_feature_strides, self._out_feature_channels = [], {}, {}
        for i, (first, widths, groups) in enumerate(
            zip(jd.STAGE_STRIDES, jd.BLOCKS, jd.GROUPS, strict=True)
        ):
            name = f"res{i + 2}"
            blocks = []
            for j, (channels, g) in enumerate(zip(widths, groups, strict=True)):
                s = first if j == 0 else 1
                blocks.append(JDSearchBlock(in_channels, channels, g, s, norm, stride_in_1x1))
                in_channels = blocks[-1].out_channels
            stride *= first
            self.add_module(name, nn.Sequential(*blocks))
            self._out_features.append(name)
            self._out_feature_strides[name] = stride
            self._out_feature_channels[name] = in_channels
        for module in [self.stem, *(getattr(self, n) for n in self._out_features)][:freeze_at]:
            for block in module.children() if isinstance(module, nn.Sequential) else [module]:
                block.freeze()

    def forward(self, x):
        out = {}
        x = self.stem(x)
        for name in self._out_features:
            x = getattr(self, name)(x)
            out[name] = x
        return out

    def output_shape(self):
        return {
            n: ShapeSpec(
                channels=self._out_feature_channels[n], stride=self._out_feature_strides[n]
            )
            for n in self._out_features
        }


def build_jdsearch_resnet_fpn_backbone(cfg, input_shape):
    """detectron2's FPN (P2–P6, P6 by max-pooling) over :class:`JDSearchResNet`."""
    body = JDSearchResNet(
        cfg.MODEL.JDSEARCH,
        cfg.MODEL.RESNETS.STEM_OUT_CHANNELS,
        norm=cfg.MODEL.RESNETS.NORM,
        stride_in_1x1=cfg.MODEL.RESNETS.STRIDE_IN_1X1,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )
    fpn = FPN(
        bottom_up=body,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    fpn._size_divisibility = int(cfg.MODEL.JDSEARCH.SIZE_DIVISIBILITY)
    return fpn


class JDSearchAnchorGenerator(DefaultAnchorGenerator):
    """detectron2's anchors, or torchvision's: cell anchors rounded to whole pixels
    (``ROUND_ANCHORS``) and each level's anchors ``padded image size // feature size`` apart
    (``FIXED_ANCHOR_STRIDES: False``; for P6 of an 800-pixel side that is 61, not 64)."""

    @configurable
    def __init__(self, *, rounded=False, fixed_strides=True, **kwargs):
        self.rounded = rounded  # read while the base class builds the cell anchors
        super().__init__(**kwargs)
        self.fixed_strides = fixed_strides

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {
            **DefaultAnchorGenerator.from_config(cfg, input_shape),
            "rounded": cfg.MODEL.JDSEARCH.ROUND_ANCHORS,
            "fixed_strides": cfg.MODEL.JDSEARCH.FIXED_ANCHOR_STRIDES,
        }

    def generate_cell_anchors(self, sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1, 2)):
        if not self.rounded:
            return super().generate_cell_anchors(sizes, aspect_ratios)
        scales = torch.as_tensor(sizes, dtype=torch.float32)  # as torchvision computes them
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=torch.float32))
        w_ratios = 1 / h_ratios
        ws = (scales[:, None] * w_ratios[None, :]).reshape(-1)
        hs = (scales[:, None] * h_ratios[None, :]).reshape(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def _grid_anchors(self, grid_sizes):
        if self.fixed_strides:
            return super()._grid_anchors(grid_sizes)
        height = grid_sizes[0][0] * self.strides[0]  # the first level is exactly 1/stride
        width = grid_sizes[0][1] * self.strides[0]
        anchors = []
        cells = [buffer for _, buffer in self.cell_anchors.named_buffers()]
        for (gh, gw), cell in zip(grid_sizes, cells, strict=True):
            ys = torch.arange(gh, dtype=torch.float32, device=cell.device) * (height // gh)
            xs = torch.arange(gw, dtype=torch.float32, device=cell.device) * (width // gw)
            shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            anchors.append((shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4))
        return anchors


# Registered once per process, whichever copy of this file is imported first.
if "build_jdsearch_resnet_fpn_backbone" not in BACKBONE_REGISTRY:
    BACKBONE_REGISTRY.register(build_jdsearch_resnet_fpn_backbone)
if "JDSearchAnchorGenerator" not in ANCHOR_GENERATOR_REGISTRY:
    ANCHOR_GENERATOR_REGISTRY.register(JDSearchAnchorGenerator)
