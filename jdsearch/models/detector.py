"""Assemble a torchvision Faster R-CNN FPN from a detector spec.

torchvision supplies the detector family (``GeneralizedRCNNTransform``, RPN, ``RoIHeads``,
``MultiScaleRoIAlign``, FPN); jdsearch supplies the backbone body built from a
:class:`~jdsearch.spec.arch.BackboneArch`. The returned detector carries its spec (``detector.spec``) and
architecture (``detector.arch``) so that every later step — FLOPs, morph actions, checkpoints —
reads the architecture from the model it acts on.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import initLevelMapper

from jdsearch.core.errors import CheckpointError
from jdsearch.models.heads import RecordingRoIHeads
from jdsearch.models.layers import AlignedMultiScaleRoIAlign, SpecAnchorGenerator
from jdsearch.models.resnet import ResNet
from jdsearch.spec.arch import BackboneArch
from jdsearch.spec.detector import DetectorSpec, RoISpec, RPNSpec

FEATURE_NAMES = ["0", "1", "2", "3"]


class ResNetFPN(nn.Module):
    """ResNet body + FPN (P2–P5 from the four stages, P6 by max-pooling P5)."""

    def __init__(self, arch: BackboneArch) -> None:
        super().__init__()
        self.body = ResNet(arch)
        self.fpn = FeaturePyramidNetwork(
            list(arch.stage_out_channels), arch.fpn, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = arch.fpn

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """The FPN features of image batch ``x``: P2–P5 keyed ``"0"``..``"3"`` and P6 as
        ``"pool"``."""
        return self.fpn(self.body(x))


STEM_STRIDE = 4  # 7×7 stride-2 conv, then 3×3 stride-2 max-pool


def feature_strides(arch: BackboneArch) -> list[int]:
    """Input pixels per feature pixel of P2–P5 (each stage's output)."""
    strides, total = [], STEM_STRIDE
    for s in arch.strides:
        total *= s
        strides.append(total)
    return strides


def fix_roi_scales(pool: MultiScaleRoIAlign, arch: BackboneArch) -> None:
    """Set the RoI pooler's feature scales from the architecture.

    torchvision infers them on the pooler's first call, from that batch's feature height over
    its image height, and keeps them: a first image that is short after resizing (say 19×96,
    padded to 32×96) makes P2 look like stride 2 instead of 4, and every later call pools from
    the wrong places (measured: all scores of a trained detector tie at one value). The strides
    are known here, so nothing is left to the first batch.
    """
    scales = [1.0 / s for s in feature_strides(arch)]
    pool.scales = scales
    k_min, k_max = round(math.log2(1 / scales[0])), round(math.log2(1 / scales[-1]))
    pool.map_levels = initLevelMapper(
        k_min, k_max, canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level
    )


class Detector(FasterRCNN):
    """torchvision's ``FasterRCNN`` that knows its spec and architecture."""

    spec: DetectorSpec

    @property
    def arch(self) -> BackboneArch:
        """The backbone architecture, ``spec.arch``."""
        return self.spec.arch


def _head_settings(rpn: RPNSpec, roi: RoISpec) -> dict[str, Any]:
    """torchvision ``FasterRCNN`` keyword arguments of the RPN and RoI-head settings."""
    return {
        "rpn_pre_nms_top_n_train": rpn.pre_nms_top_n_train,
        "rpn_pre_nms_top_n_test": rpn.pre_nms_top_n_test,
        "rpn_post_nms_top_n_train": rpn.post_nms_top_n_train,
        "rpn_post_nms_top_n_test": rpn.post_nms_top_n_test,
        "rpn_nms_thresh": rpn.nms_thresh,
        "rpn_fg_iou_thresh": rpn.fg_iou_thresh,
        "rpn_bg_iou_thresh": rpn.bg_iou_thresh,
        "rpn_batch_size_per_image": rpn.batch_size_per_image,
        "rpn_positive_fraction": rpn.positive_fraction,
        "box_score_thresh": roi.score_thresh,
        "box_nms_thresh": roi.nms_thresh,
        "box_detections_per_img": roi.detections_per_img,
        "box_fg_iou_thresh": roi.fg_iou_thresh,
        "box_bg_iou_thresh": roi.bg_iou_thresh,
        "box_batch_size_per_image": roi.batch_size_per_image,
        "box_positive_fraction": roi.positive_fraction,
    }


def _anchor_generator(spec: DetectorSpec) -> AnchorGenerator:
    """torchvision's anchors, or (``rpn.round_anchors`` false, ``rpn.fixed_anchor_strides``)
    detectron2's."""
    rpn = spec.rpn
    sizes = tuple((s,) for s in rpn.anchor_sizes)
    ratios = (tuple(rpn.aspect_ratios),) * len(rpn.anchor_sizes)
    if rpn.round_anchors and not rpn.fixed_anchor_strides:
        return AnchorGenerator(sizes=sizes, aspect_ratios=ratios)
    strides = feature_strides(spec.arch)
    strides.append(2 * strides[-1])  # P6: max-pooled P5
    fixed = strides if rpn.fixed_anchor_strides else None
    return SpecAnchorGenerator(sizes, ratios, rounded=rpn.round_anchors, strides=fixed)


def _assemble(spec: DetectorSpec, n: int) -> Detector:
    """The torchvision modules of the detector, built in a fixed order (the seeded weights
    depend on it)."""
    arch, rpn, roi, inp = spec.arch, spec.rpn, spec.roi, spec.input
    backbone = ResNetFPN(arch)
    anchor_gen = _anchor_generator(spec)
    pooler = AlignedMultiScaleRoIAlign if roi.aligned else MultiScaleRoIAlign
    pool = pooler(FEATURE_NAMES, output_size=roi.pool_size, sampling_ratio=roi.sampling_ratio)
    fix_roi_scales(pool, arch)
    box_head = TwoMLPHead(arch.fpn * roi.pool_size**2, roi.representation_size)
    det = Detector(
        backbone,
        num_classes=None,
        min_size=inp.size.short,
        max_size=inp.size.long,
        image_mean=list(inp.image_mean),
        image_std=list(inp.image_std),
        rpn_anchor_generator=anchor_gen,
        box_roi_pool=pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(roi.representation_size, n),
        **_head_settings(rpn, roi),
    )
    return det


def build_detector(
    spec_or_arch: DetectorSpec | BackboneArch,
    num_classes: int | None = None,
    *,
    seed: int | None = None,
) -> Detector:
    """Build a Faster R-CNN FPN detector (a torchvision ``FasterRCNN``).

    Args:
        spec_or_arch: a :class:`DetectorSpec` (from :func:`jdsearch.load_spec`), or a bare
            :class:`BackboneArch`, which gets the default (paper-sized) heads.
        num_classes: classes including the background; default the spec's.
        seed: with a seed the initial weights depend on it alone (torch seeds its generator
            differently in every process); the global random state is left as it was.

    Returns:
        The detector, in training mode, with ``detector.arch`` and ``detector.spec`` set.

    Raises:
        ValueError: no ``num_classes`` and the spec sets none.
        FieldError: ``num_classes`` out of range (``DetectorSpec.num_classes``).

    Example:
        ``build_detector(load_spec("r50-fpn"), num_classes=81, seed=0)`` has the parameters of
        torchvision's ``fasterrcnn_resnet50_fpn(num_classes=81)`` (41.76 M).
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_detector(spec_or_arch, num_classes)
    spec = (
        spec_or_arch
        if isinstance(spec_or_arch, DetectorSpec)
        else DetectorSpec(name="custom", arch=spec_or_arch)
    )
    n = num_classes if num_classes is not None else spec.num_classes
    if n is None:
        raise ValueError("build_detector: num_classes is required (the spec does not set it)")
    # the spec checks the count (FieldError) before a layer of that many outputs is allocated
    spec = spec if spec.num_classes == n else dataclasses.replace(spec, num_classes=n)
    det = _assemble(spec, n)
    det.transform.size_divisible = spec.input.size_divisible
    # Same modules and settings; records sampled proposals/outputs for distillation when asked.
    det.roi_heads = RecordingRoIHeads.from_heads(det.roi_heads)
    det.spec = spec
    return det


_MAX_LISTED = 3  # names listed in a mismatch message before "and N more"


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def load_weights_exactly(
    module: nn.Module, tensors: Mapping[str, Tensor], *, source: str, what: str
) -> None:
    """``module.load_state_dict(tensors, strict=True)``, after checking that the tensors fit:
    a misfit is one line naming the missing, unexpected and misshapen tensors.

    Raises:
        CheckpointError: ``SOURCE: weights do not match WHAT: missing …; unexpected …; shape
            mismatch NAME (file) vs (module) …``.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(
        f"{k} {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(expected) & set(tensors)
        if tensors[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch {_listing(wrong)} (file vs spec)")
    if problems:
        raise CheckpointError(f"{source}: weights do not match {what}: " + "; ".join(problems))
    module.load_state_dict(tensors, strict=True)
