"""Detection KD: recording RoI heads, shared proposals, the three KD losses, trainer integration."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads

from jdsearch.core.errors import JDSearchError, SpecError
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import set_resolution
from jdsearch.methods.distill import (
    Distiller,
    class_aware_loc_loss,
    feature_loss,
    make_distiller,
    soft_cross_entropy,
    teacher_outputs,
)
from jdsearch.models.detector import Detector, build_detector
from jdsearch.models.heads import (
    RecordingRoIHeads,
    pop_record,
    recording,
    start_recording,
    stop_recording,
)
from jdsearch.spec.arch import BASIC, BOTTLENECK, BackboneArch
from jdsearch.spec.detector import load_spec
from jdsearch.spec.settings import KDConfig

NUM_CLASSES = 5
KD_NAMES = {"loss_kd_feat", "loss_kd_cls", "loss_kd_loc"}

STUDENT_ARCH = BackboneArch.resnet([1, 1, 1, 1], kind=BASIC, widths=(8, 16, 16, 32), stem=8, fpn=16)
# Different block kind, depth, widths and FPN width from the student.
TEACHER_ARCH = BackboneArch.resnet(
    [1, 2, 1, 1], kind=BOTTLENECK, widths=(8, 8, 16, 16), stem=8, fpn=24
)


def small(arch: BackboneArch) -> Detector:
    det = build_detector(load_spec("tiny-r18-fpn").with_arch(arch), num_classes=NUM_CLASSES)
    set_resolution(det, Resolution(96, 80))
    return det


def batch(empty: bool = False) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 80, 96, generator=g), torch.rand(3, 72, 80, generator=g)]
    if empty:
        boxes = [torch.zeros(0, 4), torch.zeros(0, 4)]
        labels = [torch.zeros(0, dtype=torch.int64)] * 2
    else:
        boxes = [
            torch.tensor([[8.0, 10.0, 40.0, 50.0], [50.0, 20.0, 90.0, 70.0]]),
            torch.tensor([[5.0, 5.0, 60.0, 40.0]]),
        ]
        labels = [torch.tensor([1, 3]), torch.tensor([4])]
    return images, [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels, strict=True)]


def bn_eval(det: nn.Module) -> None:
    """Training mode for the heads (proposal sampling), eval-mode BN (deterministic features)."""
    det.train()
    for m in det.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def plain_heads(heads: RoIHeads, spec: Any) -> RoIHeads:
    roi = spec.roi
    return RoIHeads(
        heads.box_roi_pool,
        heads.box_head,
        heads.box_predictor,
        roi.fg_iou_thresh,
        roi.bg_iou_thresh,
        roi.batch_size_per_image,
        roi.positive_fraction,
        None,
        roi.score_thresh,
        roi.nms_thresh,
        roi.detections_per_img,
    )


def hook_count(det: nn.Module) -> int:
    mods = [det.transform, det.roi_heads.box_roi_pool, det.roi_heads.box_predictor, det.roi_heads]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mods)


# ---------------------------------------------------------------------- recording heads
def test_recording_off_is_plain_torchvision() -> None:
    """Same weights ⇒ same training losses and detections as torchvision's own RoIHeads; with
    recording off nothing is hooked or kept (and observing while on changes no number)."""
    torch.manual_seed(0)
    det = small(STUDENT_ARCH)
    ref = copy.deepcopy(det)
    ref.roi_heads = plain_heads(ref.roi_heads, det.spec)
    assert isinstance(det.roi_heads, RecordingRoIHeads) and type(ref.roi_heads) is RoIHeads
    assert list(det.state_dict()) == list(ref.state_dict())
    images, targets = batch()

    def train_losses(model: nn.Module) -> dict[str, Tensor]:
        m = copy.deepcopy(model).train()
        torch.manual_seed(1)
        return {k: v.detach() for k, v in m(images, targets).items()}

    with torch.no_grad():
        out, out_ref = copy.deepcopy(det).eval()(images), copy.deepcopy(ref).eval()(images)
    for a, b in zip(out, out_ref, strict=True):
        assert len(a["boxes"]) > 0
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], b[key])

    expected = train_losses(ref)
    for k, v in train_losses(det).items():
        assert torch.equal(v, expected[k]), k
    assert hook_count(det) == 0
    det.train()
    det(images, targets)
    assert det.roi_heads.pop_record() is None  # recording off: nothing kept

    with recording(det):
        assert hook_count(det) > 0
        torch.manual_seed(1)
        observed = det(images, targets)
        assert pop_record(det) is not None
        for k, v in observed.items():
            assert torch.equal(v.detach(), expected[k]), k
    assert hook_count(det) == 0


def test_record_is_the_steps_own_values() -> None:
    torch.manual_seed(0)
    det = small(STUDENT_ARCH).train()
    images, targets = batch()
    seen: dict[str, Tensor] = {}
    det.backbone.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    with recording(det) as heads:
        losses = det(images, targets)
        rec = heads.pop_record()
        assert rec is not None and heads.pop_record() is None  # popping consumes
    assert rec.images is seen["x"]  # exactly the tensor the backbone saw
    n = rec.num_proposals
    assert n == sum(len(p) for p in rec.proposals) == len(rec.all_labels) == len(rec.box_regression)
    assert rec.box_features.shape == (n, 16, 7, 7)
    assert rec.class_logits.shape == (n, NUM_CLASSES) and rec.box_regression.shape == (
        n,
        4 * NUM_CLASSES,
    )
    # ground-truth boxes are added to the proposals, so every object yields positives
    assert int(rec.positive.sum()) >= 3
    assert set(rec.all_labels.tolist()) <= {0, 1, 3, 4}
    # the recorded logits are the ones the detection loss was computed from
    assert torch.allclose(
        losses["loss_classifier"], F.cross_entropy(rec.class_logits, rec.all_labels)
    )
    heads = det.roi_heads
    logits, _ = heads.box_predictor(heads.box_head(rec.box_features))
    assert torch.allclose(logits, rec.class_logits)

    # eval forwards never record; stop_recording drops a kept step
    start_recording(det)
    det.eval()
    with torch.no_grad():
        det(images)
    assert pop_record(det) is None
    det.train()
    det(images, targets)
    stop_recording(det)
    start_recording(det)
    assert pop_record(det) is None
    stop_recording(det)
    assert hook_count(det) == 0


def test_dynamic_resolution_teacher_sees_the_students_tensor() -> None:
    torch.manual_seed(0)
    student, teacher = small(STUDENT_ARCH), small(TEACHER_ARCH)
    kd = make_distiller(student, teacher)
    got: dict[str, Tensor] = {}
    student.backbone.register_forward_pre_hook(lambda m, a: got.__setitem__("s", a[0]))
    teacher.backbone.register_forward_pre_hook(lambda m, a: got.__setitem__("t", a[0]))
    images, targets = batch()
    shapes = set()
    for res in (Resolution(96, 80), Resolution(160, 128)):
        set_resolution(student, res)
        student.train()
        student(images, targets)
        kd(student)
        assert got["t"] is got["s"]
        shapes.add(tuple(got["s"].shape))
    assert len(shapes) == 2


# ---------------------------------------------------------------------- losses
def test_loss_functions_by_hand() -> None:
    s = torch.tensor([[0.0, 1.0, 2.0]])
    t = torch.tensor([[1.0, 0.0, 0.0]])
    p_t, p_s = F.softmax(t, 1), F.softmax(s, 1)
    assert soft_cross_entropy(s, t).item() == pytest.approx(
        -(p_t * p_s.log()).sum().item(), rel=1e-6
    )
    p_t2, p_s2 = F.softmax(t / 2, 1), F.softmax(s / 2, 1)
    expected_t2 = -4 * (p_t2 * p_s2.log()).sum().item()
    assert soft_cross_entropy(s, t, temperature=2.0).item() == pytest.approx(expected_t2, rel=1e-6)

    # two classes + background, one proposal: the background column is ignored
    logits = torch.tensor([[5.0, 0.0, math.log(3.0)]])  # p = [e^5, 1, 3] / Z
    z = math.exp(5) + 1 + 3
    reg_t = torch.tensor([[9.0, 9.0, 9.0, 9.0, 1.0, 2.0, 0.0, 0.0, -1.0, 0.0, 0.0, 4.0]])
    reg_s = torch.zeros_like(reg_t)
    want = abs(1 / z * 1 + 3 / z * -1) + abs(2 / z) + 0 + abs(12 / z)
    assert class_aware_loc_loss(reg_s, reg_t, logits).item() == pytest.approx(want, rel=1e-6)
    # opposite per-class errors cancel under the teacher's weights: it is |Σ p Δ|, not Σ p |Δ|
    assert class_aware_loc_loss(reg_s, reg_s, logits).item() == 0.0

    a, b = torch.ones(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    b[1] = 3.0  # per-proposal MSE 1 and 4, N_p = 2
    assert feature_loss(a, b, normalize=False).item() == pytest.approx(2.5)
    assert feature_loss(a, b).item() == pytest.approx(2.5 / 4.5)  # ÷ mean teacher² = (0 + 9) / 2
    assert feature_loss(3 * a, 3 * b).item() == pytest.approx(2.5 / 4.5)  # scale-free
    empty = torch.zeros(0, 3, 7, 7, requires_grad=True)
    zero = feature_loss(empty, torch.zeros(0, 3, 7, 7))
    assert zero.item() == 0.0 and zero.requires_grad
    n0 = torch.zeros(0, NUM_CLASSES)
    assert soft_cross_entropy(n0, n0).item() == 0.0
    assert class_aware_loc_loss(torch.zeros(0, 20), torch.zeros(0, 20), n0).item() == 0.0


def test_identical_student_and_teacher() -> None:
    """Same weights, Dirac adapter: zero feature and localisation loss; soft CE = teacher entropy."""
    torch.manual_seed(0)
    student = small(STUDENT_ARCH)
    teacher = copy.deepcopy(student)
    kd = make_distiller(student, teacher)
    assert torch.equal(kd.adapter.weight, nn.init.dirac_(torch.empty(16, 16, 3, 3)))
    bn_eval(student)
    images, targets = batch()
    student(images, targets)
    rec = student.roi_heads.pop_record()
    assert rec is not None and int(rec.positive.sum()) > 0
    losses = kd.losses(rec)
    assert losses["loss_kd_feat"].item() == pytest.approx(0.0, abs=1e-10)
    assert losses["loss_kd_loc"].item() == pytest.approx(0.0, abs=1e-10)
    p = F.softmax(rec.class_logits.detach(), 1)
    entropy = -(p * p.log()).sum(1).mean()
    assert losses["loss_kd_cls"].item() == pytest.approx(entropy.item(), rel=1e-5)
    # and the loss does see a difference: perturb the student's box head
    with torch.no_grad():
        student.roi_heads.box_head.fc7.weight.add_(0.05)
        student.backbone.fpn.layer_blocks[0][0].weight.add_(0.05)
    student(images, targets)
    moved = kd(student)
    assert moved["loss_kd_feat"].item() > 1e-6 and moved["loss_kd_loc"].item() > 1e-6
    assert moved["loss_kd_cls"].item() > entropy.item()


def test_gradients_reach_student_and_adapter_never_teacher() -> None:
    torch.manual_seed(0)
    student, teacher = small(STUDENT_ARCH), small(TEACHER_ARCH)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd = make_distiller(student, teacher, KDConfig(feat_weight=1.0, cls_weight=0.5, loc_weight=2.0))
    assert kd.adapter.weight.shape == (24, 16, 3, 3)  # student FPN 16 → teacher FPN 24
    kd.train()
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert {n for n, p in kd.named_parameters() if p.requires_grad} == {
        "adapter.weight",
        "adapter.bias",
    }

    student.train()
    images, targets = batch()
    student(images, targets)
    losses = kd(student)
    assert set(losses) == KD_NAMES and all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert kd.adapter.weight.grad is not None and kd.adapter.weight.grad.abs().sum() > 0
    body_conv = student.backbone.body.stages[3][0].conv1.weight  # reached through RoIAlign
    for p in (
        body_conv,
        student.roi_heads.box_head.fc6.weight,
        student.roi_heads.box_predictor.bbox_pred.weight,
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


def test_images_without_objects_give_finite_losses() -> None:
    torch.manual_seed(0)
    student, teacher = small(STUDENT_ARCH), small(TEACHER_ARCH)
    kd = make_distiller(student, teacher)
    student.train()
    images, targets = batch(empty=True)
    det_losses = student(images, targets)
    rec_losses = kd(student)
    assert rec_losses["loss_kd_feat"].item() == 0.0  # no positive proposal
    total = sum(det_losses.values()) + sum(rec_losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [
        p.grad for p in [*student.parameters(), *kd.adapter.parameters()] if p.grad is not None
    ]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------- wiring and ownership
def test_adapter_is_not_part_of_the_student() -> None:
    student, teacher = small(STUDENT_ARCH), small(TEACHER_ARCH)
    fresh_keys = list(small(STUDENT_ARCH).state_dict())
    kd = make_distiller(student, teacher)
    assert list(student.state_dict()) == fresh_keys
    assert not any("adapter" in k for k in student.state_dict())
    assert {"adapter.weight", "adapter.bias"} <= set(kd.state_dict())


def test_adapter_init_depends_on_the_seed_only() -> None:
    """Different FPN widths need a randomly initialised adapter: it must not depend on the
    process's random state (a search on two machines gave different H for the same trial)."""
    student, teacher = small(STUDENT_ARCH), small(TEACHER_ARCH)
    assert student.backbone.out_channels != teacher.backbone.out_channels
    torch.manual_seed(1)
    expected_next = torch.rand(1)
    torch.manual_seed(1)
    a = make_distiller(student, teacher, seed=7).adapter.weight.detach().clone()
    assert torch.equal(torch.rand(1), expected_next)  # the global stream is left alone
    torch.manual_seed(2)
    b = make_distiller(student, teacher, seed=7).adapter.weight.detach().clone()
    c = make_distiller(student, teacher, seed=8).adapter.weight.detach()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_make_distiller_converts_plain_heads_and_checks_the_pair() -> None:
    student, teacher = small(STUDENT_ARCH), small(TEACHER_ARCH)
    student.roi_heads = plain_heads(student.roi_heads, student.spec)
    fc6 = student.roi_heads.box_head.fc6.weight
    make_distiller(student, teacher)
    assert isinstance(student.roi_heads, RecordingRoIHeads)
    assert student.roi_heads.box_head.fc6.weight is fc6  # same modules, not copies

    with pytest.raises(SpecError, match="classes"):
        make_distiller(
            small(STUDENT_ARCH),
            build_detector(load_spec("tiny-r18-fpn").with_arch(TEACHER_ARCH), 7),
        )
    with pytest.raises(JDSearchError, match="teacher is the student"):
        make_distiller(student, student)
    other = small(TEACHER_ARCH)
    other.transform.image_std = [0.5, 0.5, 0.5]
    with pytest.raises(SpecError, match="image_std"):
        make_distiller(small(STUDENT_ARCH), other)
    lone = Distiller(small(TEACHER_ARCH), 16, 24)
    fresh = small(STUDENT_ARCH).train()
    fresh(*batch())
    with pytest.raises(JDSearchError, match="recorded no training step"):
        lone(fresh)


def test_kd_config_validation() -> None:
    assert KDConfig() == KDConfig(1.0, 1.0, 1.0, 1.0)
    with pytest.raises(SpecError, match="loc_weight"):
        KDConfig(loc_weight=-1.0)
    with pytest.raises(SpecError, match="temperature"):
        KDConfig(temperature=0.0)
    with pytest.raises(SpecError, match="feat_weight"):
        KDConfig(feat_weight=float("nan"))
    cfg = KDConfig.from_dict({"cls_weight": 0.5, "temperature": 2})
    assert (
        cfg == KDConfig(cls_weight=0.5, temperature=2) and KDConfig.from_dict(cfg.to_dict()) == cfg
    )
    assert KDConfig.from_dict({"feat_normalize": False}).feat_normalize is False
    with pytest.raises(SpecError, match="feat_normalize"):
        KDConfig(feat_normalize="yes")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"^study.yaml: kd.feat: unknown key \(known: cls_weight"):
        KDConfig.from_dict({"feat": 1.0}, source="study.yaml")


def test_teacher_outputs_on_student_proposals() -> None:
    torch.manual_seed(0)
    student, teacher = small(STUDENT_ARCH), small(TEACHER_ARCH)
    make_distiller(student, teacher)
    student.train()
    student(*batch())
    rec = pop_record(student)
    assert rec is not None
    out = teacher_outputs(teacher, rec)
    assert out.box_features.shape == (rec.num_proposals, 24, 7, 7)
    assert out.class_logits.shape == rec.class_logits.shape and not out.class_logits.requires_grad
    # the same numbers as running the teacher's heads by hand on those proposals
    with torch.no_grad():
        feats = teacher.backbone(rec.images)
        pooled = teacher.roi_heads.box_roi_pool(feats, rec.proposals, rec.image_sizes)
    assert torch.equal(pooled, out.box_features)


# ---------------------------------------------------------------------- trainer
def test_kd_training_with_the_trainer(tmp_path: Path) -> None:
    train_mod = pytest.importorskip("jdsearch.engine.train")
    from jdsearch.data.coco import CocoDataset
    from jdsearch.data.synth import generate

    info = generate(tmp_path / "synth", images=8, seed=3, size=64)
    ds = CocoDataset(info.train_json, info.image_dir)
    torch.manual_seed(0)
    cfg = train_mod.TrainConfig(
        max_iters=6, batch_size=2, lr=0.01, warmup_iters=2, seed=0, log_every=100
    )
    teacher = build_detector(load_spec("tiny-r18-fpn").with_arch(TEACHER_ARCH), ds.num_classes)
    train_mod.train(teacher, ds, cfg)  # a briefly trained teacher: sane BN statistics
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_detector(load_spec("tiny-r18-fpn").with_arch(STUDENT_ARCH), ds.num_classes)
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    kd = make_distiller(student, teacher)
    adapter_before = kd.adapter.weight.detach().clone()

    steps: list[dict[str, float]] = []
    result = train_mod.train(
        student, ds, cfg, loss_terms=[kd], callback=lambda s: steps.append(s.losses)
    )
    assert len(steps) == 6
    for step in steps:
        assert set(step) >= KD_NAMES and all(math.isfinite(step[k]) for k in KD_NAMES)
    assert set(result.final_losses) >= KD_NAMES
    assert not torch.equal(kd.adapter.weight.detach(), adapter_before)  # optimised with the student
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    # frozen teacher: no weight and no BN running statistic moved during the student's training
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
