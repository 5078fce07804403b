"""Knowledge distillation for Faster R-CNN FPN detectors (paper 3.2): the :class:`Distiller` loss
term adds the proposal-feature, soft-logit and class-aware localisation losses of a frozen
teacher, computed on the student's own sampled proposals. Design notes: ``docs/distillation.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jdsearch.core.errors import JDSearchError, SpecError
from jdsearch.models.heads import RecordingRoIHeads, RoIRecord, start_recording, stop_recording
from jdsearch.spec.settings import KDConfig

__all__ = [
    "Distiller",
    "TeacherOutputs",
    "class_aware_loc_loss",
    "feature_loss",
    "make_distiller",
    "soft_cross_entropy",
    "teacher_outputs",
]

LOSS_NAMES = ("loss_kd_feat", "loss_kd_cls", "loss_kd_loc")


@dataclass
class TeacherOutputs:
    """The teacher's RoI outputs on the student's sampled proposals (no autograd graph)."""

    box_features: Tensor  # (N, C_t, P, P)
    class_logits: Tensor  # (N, K)
    box_regression: Tensor  # (N, 4K)


# ---------------------------------------------------------------------- the three losses
def feature_loss(student: Tensor, teacher: Tensor, normalize: bool = True) -> Tensor:
    """``Σ_i mean((student_i − teacher_i)²) / max(N_p, 1)`` over the ``N_p`` positive proposals,
    divided by the teacher's mean squared value when ``normalize`` (a constant, no gradient).

    Both are ``(N_p, C, P, P)``, the student's already adapted to the teacher's width; 0 (with a
    graph) when ``N_p = 0``.
    """
    assert student.shape == teacher.shape, (student.shape, teacher.shape)
    teacher = teacher.detach().float()
    per_proposal = (student.float() - teacher).pow(2).flatten(1).mean(1)
    loss = per_proposal.sum() / max(int(student.shape[0]), 1)
    if normalize and teacher.numel() > 0:
        loss = loss / teacher.pow(2).mean().clamp(min=1e-12)
    return loss


def soft_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """``T² · mean_i(−Σ_k softmax(t_i/T)_k · log_softmax(s_i/T)_k)``; 0 for no proposals."""
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    n = max(int(student_logits.shape[0]), 1)
    return -(p_t * log_p_s).sum() / n * temperature**2


def class_aware_loc_loss(
    student_reg: Tensor, teacher_reg: Tensor, teacher_logits: Tensor
) -> Tensor:
    """``mean_i ‖Σ_{c ≥ 1} p_t^{ic} (reg_t^{ic} − reg_s^{ic})‖₁``; 0 for no proposals.

    ``*_reg`` are ``(N, 4K)`` class-specific deltas, ``teacher_logits`` ``(N, K)``; class 0 is the
    background and is left out.
    """
    n, k = teacher_logits.shape
    p_t = F.softmax(teacher_logits.float(), dim=1)[:, 1:, None]  # (N, K-1, 1)
    diff = (teacher_reg.float() - student_reg.float()).reshape(n, k, 4)[:, 1:]  # (N, K-1, 4)
    return (p_t * diff).sum(1).abs().sum() / max(n, 1)


# ---------------------------------------------------------------------- the teacher side
def teacher_outputs(teacher: nn.Module, record: RoIRecord) -> TeacherOutputs:
    """Run ``teacher`` (eval, no grad) on the student's image batch and sampled proposals."""
    heads = teacher.roi_heads
    with torch.no_grad():
        features = teacher.backbone(record.images)
        if isinstance(features, Tensor):
            features = {"0": features}
        pooled = heads.box_roi_pool(features, record.proposals, record.image_sizes)
        class_logits, box_regression = heads.box_predictor(heads.box_head(pooled))
    return TeacherOutputs(pooled, class_logits, box_regression)


# ---------------------------------------------------------------------- the loss term
def _make_adapter(student_fpn: int, teacher_fpn: int) -> nn.Conv2d:
    conv = nn.Conv2d(student_fpn, teacher_fpn, kernel_size=3, stride=1, padding=1)
    if student_fpn == teacher_fpn:
        nn.init.dirac_(conv.weight)
        nn.init.zeros_(conv.bias)
    return conv


class Distiller(nn.Module):
    """KD loss term: ``forward(student) -> {"loss_kd_feat", "loss_kd_cls", "loss_kd_loc"}``.

    Call it right after a training forward ``student(images, targets)`` of a student that records
    (see :func:`make_distiller`, which also checks the pair and switches recording on). Each call
    consumes the student's record of that step.
    """

    def __init__(
        self, teacher: nn.Module, student_fpn: int, teacher_fpn: int, config: KDConfig | None = None
    ) -> None:
        super().__init__()
        for name, width in (("student_fpn", student_fpn), ("teacher_fpn", teacher_fpn)):
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise SpecError(f"Distiller.{name}: must be a positive integer, got {width!r}")
        self.config = config if config is not None else KDConfig()
        self.teacher = teacher
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.adapter = _make_adapter(student_fpn, teacher_fpn)

    def train(self, mode: bool = True) -> Distiller:
        """Set the training mode as ``nn.Module.train`` does, but keep the teacher in eval mode;
        returns ``self``."""
        super().train(mode)
        self.teacher.eval()  # frozen: BN running statistics, no dropout, whatever the mode
        return self

    def forward(self, student: nn.Module) -> dict[str, Tensor]:
        """The weighted KD losses of the student's recorded step (:meth:`losses`);
        :class:`JDSearchError` when it recorded none."""
        heads = getattr(student, "roi_heads", None)
        record = heads.pop_record() if isinstance(heads, RecordingRoIHeads) else None
        if record is None:
            raise JDSearchError(
                "distiller: the student recorded no training step; build the distiller with "
                "make_distiller(student, teacher, config) and call it after a training forward"
            )
        return self.losses(record)

    def losses(self, record: RoIRecord) -> dict[str, Tensor]:
        """The weighted KD losses for one recorded student step."""
        cfg = self.config
        t = teacher_outputs(self.teacher, record)
        positive = record.positive.to(record.box_features.device)
        # Only the positive proposals go through the adapter (see the module docstring).
        l_feat = feature_loss(
            self.adapter(record.box_features[positive]),
            t.box_features[positive],
            cfg.feat_normalize,
        )
        l_cls = soft_cross_entropy(record.class_logits, t.class_logits, cfg.temperature)
        l_loc = class_aware_loc_loss(record.box_regression, t.box_regression, t.class_logits)
        return {
            "loss_kd_feat": cfg.feat_weight * l_feat,
            "loss_kd_cls": cfg.cls_weight * l_cls,
            "loss_kd_loc": cfg.loc_weight * l_loc,
        }

    def extra_repr(self) -> str:
        """The three loss weights and the temperature, for ``repr``."""
        c = self.config
        return f"feat={c.feat_weight}, cls={c.cls_weight}, loc={c.loc_weight}, T={c.temperature}"


# ---------------------------------------------------------------------- wiring
def _num_classes(detector: nn.Module) -> int:
    return int(detector.roi_heads.box_predictor.cls_score.out_features)


def _check_pair(student: nn.Module, teacher: nn.Module) -> None:
    if student is teacher:
        raise JDSearchError("distillation: the teacher is the student itself; pass a separate copy")
    for role, det in (("student", student), ("teacher", teacher)):
        for attr in ("transform", "backbone", "roi_heads"):
            if not hasattr(det, attr):
                raise JDSearchError(
                    f"distillation: the {role} ({type(det).__name__}) has no .{attr}"
                )
    ns, nt = _num_classes(student), _num_classes(teacher)
    if ns != nt:
        raise SpecError(f"distillation: teacher has {nt} classes (with background), student {ns}")
    for field in ("image_mean", "image_std"):
        s_val = [float(v) for v in getattr(student.transform, field)]
        t_val = [float(v) for v in getattr(teacher.transform, field)]
        if s_val != t_val:
            raise SpecError(
                f"distillation: teacher input.{field} {t_val} differs from the student's {s_val}"
            )


def make_distiller(
    student: nn.Module, teacher: nn.Module, config: KDConfig | None = None, *, seed: int = 0
) -> Distiller:
    """The KD loss term for training ``student`` with ``teacher`` (any pair of Faster R-CNN FPNs
    with the same classes and input normalisation; depths, widths and FPN widths may differ).

    Side effects on the student: its ``roi_heads`` becomes a :class:`RecordingRoIHeads` sharing
    the same modules if it is not one already, and recording is switched on (undo with
    :func:`jdsearch.models.heads.stop_recording`). The teacher is frozen and put in eval mode.
    ``seed`` sets the initial weights of the feature adapter (when the FPN widths differ).
    """
    _check_pair(student, teacher)
    if not isinstance(student.roi_heads, RecordingRoIHeads):
        student.roi_heads = RecordingRoIHeads.from_heads(student.roi_heads)
    stop_recording(teacher)  # e.g. a teacher deep-copied from a recording student
    start_recording(student)
    # The adapter between different FPN widths starts from random weights: from ``seed``, not from
    # the process's random state (which torch seeds differently in every process).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        distiller = Distiller(
            teacher,
            int(student.backbone.out_channels),
            int(teacher.backbone.out_channels),
            config,
        )
    p = next(student.parameters(), None)
    if p is not None:
        distiller.to(p.device)
    return distiller
