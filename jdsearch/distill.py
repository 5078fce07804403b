"""Knowledge distillation for Faster R-CNN FPN detectors (paper section 3.2, appendices A.2 and G).

The :class:`Distiller` is a *loss term* for :func:`jdsearch.train.train`: after each training
forward of the student it reads what the student recorded (:mod:`jdsearch.models.heads`), runs the
frozen teacher on the same inputs and returns the weighted KD losses, which the trainer adds to
``L_det``. Together with the BN-sparsity term the student minimises
``L = L_det + L_feat + L_pred + λ L_BN`` (section 3.3), ``L_pred = L_cls + L_loc``.

**Shared proposals** (appendix A.2). Student and teacher would sample different proposals, so the
teacher uses the student's: it runs its own backbone on the student's transformed image batch
(same resize, normalisation and padding, so dynamic resolution is shared too), then its own
``box_roi_pool`` → ``box_head`` → ``box_predictor`` on the student's sampled proposals, in eval
mode and without gradients. Its RPN and transform never run.

**Losses.** With ``N`` sampled proposals (all images of the batch), ``N_p`` of them positive
(matched to an object, label > 0), ``K`` classes including background:

* ``L_feat`` (3.2.1): ``(1 / N_p) · Σ_{i positive} mean_{c,y,x} (f_adap(F_S,i) − F_T,i)² / E_T``
  where ``F`` are the RoIAligned FPN features of proposal ``i`` (``C × P × P``, before the box
  head), ``f_adap`` is a 3×3 conv (stride 1, padding 1) from the student's FPN width to the
  teacher's, and ``E_T`` is the teacher's mean squared feature over the same positives (a
  constant: no gradient), or 1 with ``KDConfig.feat_normalize = False``. Choices, all
  departures from a literal reading of the formula, each a constant factor per batch:

  - *Which proposals:* the positive ones. The section motivates proposal features by the
    foreground/background imbalance of whole-map imitation, and ``N_p`` counts positives, so the
    sum runs over the object proposals it normalises by. It is 0 (and finite) when a batch has
    no positive proposal (e.g. images without objects).
  - *Per-element mean inside a proposal* instead of the sum over ``W·H·C``: the two differ by
    ``C·P²`` (12 544 for a 256-wide FPN and 7×7 pooling, 1 568 for the tiny presets), which
    would otherwise have to be folded into ``feat_weight`` differently for every teacher width.
  - *Relative to the teacher's feature energy* (``E_T``, on by default): FPN outputs are not
    normalised, and their scale differs between teachers (dynamic distillation swaps teachers
    during the search) and is large for fresh students. Unnormalised, the adapter's regression
    has curvature ``∝ 9·C_S/C_T · E[F_S²]``, which made SGD at lr 0.02 diverge within ten
    iterations on the tiny presets (``E[F²] ≈ 10``); divided by ``E_T`` it is scale-free and
    ``feat_weight = 1`` means the same for any pair. With ``feat_normalize = False`` the term is
    the plain MSE over positive proposals.

  ``f_adap`` is applied to the pooled features (as the paper writes it: F_S *after* RoI align),
  not to the student's FPN maps before pooling: only the ``N_p × P × P`` positions of positive
  proposals go through the conv, far fewer than the FPN maps' pixels at detection resolutions
  (e.g. ≤ 128·49 vs ~89 000 positions per 1333×800 image), and the conv's parameters never touch
  the student's own forward. When the widths are equal the conv is Dirac-initialised (identity),
  otherwise PyTorch's default init.
* ``L_cls`` (3.2.2): soft cross-entropy ``−(1/N) Σ_i Σ_k p_t^{ik} log p_s^{ik}`` with
  ``p = softmax(logits / T)``, multiplied by ``T²`` (Hinton's scaling, so gradients keep their
  size when ``T`` changes; ``T = 1`` by default, which is the paper's formula).
* ``L_loc`` (3.2.2): class-aware localisation, ``(1/N) Σ_i ‖Σ_{c=1}^{K−1} p_t^{ic} (reg_t^{ic} −
  reg_s^{ic})‖₁`` over the foreground classes, ``p_t`` the teacher's class probabilities (at
  ``T = 1``: they weigh class hypotheses, they are not soft targets) and ``reg`` the 4 box-coder
  deltas of each class; the L1 norm sums the 4 coordinates.

Each is multiplied by its weight in :class:`KDConfig` and returned as ``loss_kd_feat``,
``loss_kd_cls`` and ``loss_kd_loc``.

**Ownership.** The adapter belongs to the distiller (the student's training state), never to the
student: exporting the student's ``state_dict`` exports a plain detector. The teacher is a
submodule (so ``.to(device)`` moves it) but is frozen: ``requires_grad`` off and eval mode, also
after ``distiller.train()``. The trainable state is ``distiller.adapter``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jdsearch.errors import JDSearchError, SpecError
from jdsearch.models.heads import RecordingRoIHeads, RoIRecord, start_recording, stop_recording
from jdsearch.settings import KDConfig

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
        super().train(mode)
        self.teacher.eval()  # frozen: BN running statistics, no dropout, whatever the mode
        return self

    def forward(self, student: nn.Module) -> dict[str, Tensor]:
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
