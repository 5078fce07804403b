"""Detector builder: a torchvision Faster R-CNN FPN whose backbone follows the arch exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign

from jdsearch.models import build_detector
from jdsearch.models.resnet import Bottleneck
from jdsearch.spec.arch import BackboneArch
from jdsearch.spec.detector import load_spec

from .test_arch import PAPER_R101


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_torchvision_composition() -> None:
    det = build_detector(load_spec("tiny-r18-fpn"), num_classes=4)
    assert isinstance(det, FasterRCNN)
    assert isinstance(det.roi_heads, RoIHeads)
    assert isinstance(det.roi_heads.box_roi_pool, MultiScaleRoIAlign)
    assert det.roi_heads.box_predictor.cls_score.out_features == 4
    assert det.spec.num_classes == 4 and det.arch == det.spec.arch


def test_r50_fpn_parameter_count_matches_reference() -> None:
    """mmdetection's faster_rcnn_r50_fpn with 81 classes has 41.5 M parameters (torchvision's
    fasterrcnn_resnet50_fpn: 41.8 M with frozen-BN buffers counted differently)."""
    det = build_detector(load_spec("r50-fpn"), num_classes=81)
    assert 41.0e6 < n_params(det) < 41.8e6
    body = det.backbone.body
    # torchvision's resnet50 without its fc: 23.5 M
    assert abs(n_params(body) - 23.51e6) < 0.05e6


def test_heterogeneous_blocks_follow_the_arch() -> None:
    arch = BackboneArch.parse(PAPER_R101)
    det = build_detector(arch, num_classes=3)
    body = det.backbone.body
    for slot in arch.slots():
        block = body.stages[slot.stage][slot.index]
        assert isinstance(block, Bottleneck)
        c1, c2, c_out = slot.block.channels
        assert block.conv1.in_channels == slot.in_channels
        assert (block.conv1.out_channels, block.conv2.out_channels, block.conv3.out_channels) == (
            c1,
            c2,
            c_out,
        )
        assert block.conv2.stride == (slot.stride, slot.stride)
        assert (block.shortcut is not None) == slot.has_projection
    lateral_in = [blk[0].in_channels for blk in det.backbone.fpn.inner_blocks]
    assert lateral_in == list(arch.stage_out_channels) == [202, 300, 321, 2031]


def test_resnext_groups() -> None:
    det = build_detector(load_spec("x101-32x4d-fpn"), num_classes=81)
    assert det.backbone.body.stages[2][5].conv2.groups == 32
    assert det.backbone.body.stages[2][5].conv2.out_channels == 512


@pytest.mark.parametrize("preset", ["tiny-r18-fpn", "tiny-r50-fpn"])
def test_tiny_presets_train_and_infer(preset: str) -> None:
    torch.manual_seed(0)
    det = build_detector(load_spec(preset), num_classes=3)
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},
    ]
    det.train()
    losses = det(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    total.backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert det.backbone.body.stem.conv.weight.grad is not None
    det.eval()
    with torch.no_grad():
        out = det(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4
    assert out[0]["boxes"].shape[0] <= det.spec.roi.detections_per_img


def test_feature_strides_and_widths() -> None:
    det = build_detector(load_spec("tiny-r18-fpn"), num_classes=3).eval()
    x = torch.rand(1, 3, 128, 160)
    feats = det.backbone(x)
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [
        (32, 40),
        (16, 20),
        (8, 10),
        (4, 5),
        (2, 3),
    ]
    assert all(f.shape[1] == 32 for f in feats.values())


def test_roi_pool_scales_come_from_the_arch_not_the_first_batch() -> None:
    """torchvision infers the pooler's scales from the first batch it sees; a short first image
    (here 19×96 after resizing) used to fix P2 at stride 2 for the detector's lifetime."""
    torch.manual_seed(0)
    det = build_detector(load_spec("tiny-r18-fpn"), 7).eval()
    assert det.roi_heads.box_roi_pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    fresh = build_detector(load_spec("tiny-r18-fpn"), 7).eval()
    fresh.load_state_dict(det.state_dict())
    wide, square = torch.rand(3, 40, 200), torch.rand(3, 128, 128)
    with torch.no_grad():
        det([square])  # a normal first batch
        a = det([wide])[0]
        b = fresh([wide])[0]  # the short image first
    assert fresh.roi_heads.box_roi_pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_seeded_builds_are_reproducible_and_leave_the_global_rng_alone() -> None:
    """torch seeds its default generator per process: an unseeded base detector (and pool)
    started every run of a study from other weights (quickstart base AP 7.7 to 13.5)."""
    spec = load_spec("tiny-r18-fpn")
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_detector(spec, 7, seed=5)
    assert torch.equal(torch.rand(1), expected_next)  # global stream untouched
    torch.manual_seed(999)
    b = build_detector(spec, 7, seed=5)
    c = build_detector(spec, 7, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
