"""Training and distillation settings: the value types that specs hold and override.

:class:`TrainConfig` is the one set of training settings (base detector, pool phases, trials, the
CLI); :class:`KDConfig` the distillation weights. Specs hold them and override single fields with
:func:`dataclasses.replace`. Torch-free (device names are checked by their form, not by torch).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from jdsearch.core.config import INT_LIMIT, Fields, check, is_number, plain, read_dataclass
from jdsearch.core.resolution import Resolution

__all__ = [
    "COSINE",
    "KD_MODES",
    "KD_WHEN",
    "SCHEDULES",
    "STEP",
    "KDConfig",
    "TrainConfig",
    "is_device",
]

COSINE = "cosine"
STEP = "step"
SCHEDULES = (COSINE, STEP)
#: How a search distils: the teacher is searched (``dynamic``), the pool's super-net only
#: (``fixed``, conventional KD, paper fig. 4) or there is none (``off``: NAS + pruning alone).
KD_MODES = ("dynamic", "fixed", "off")
KD_WHEN = ("stronger", "always")  # kd.when: distil from a pool stronger than the base, or always
_POSITIVE = "must be a positive number"
MAX_LR = 10.0  # the largest learning rate a spec may ask for
# torch.device's accepted forms: a device type, optionally with an index.
_DEVICE_RE = re.compile(r"(cpu|cuda|mps|xpu|xla|meta|hpu|mtia|privateuseone)(:\d+)?")


def is_device(text: Any) -> bool:
    """Whether ``text`` has the form of a torch device (``cpu``, ``cuda``, ``cuda:1``…)."""
    return isinstance(text, str) and _DEVICE_RE.fullmatch(text) is not None


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Invalid values raise :class:`~jdsearch.core.config.FieldError` naming the field.

    * Length: ``max_iters`` when set, else ``epochs`` passes over the data (fractions allowed;
      at least one iteration).
    * Schedule (per iteration): linear warm-up from ``lr * warmup_factor`` to ``lr`` over
      ``warmup_iters``, multiplied by either ``cosine`` decay to 0 at the last iteration, or
      ``step`` decay by ``gamma`` at each milestone. ``milestones`` are *fractions* of the total
      iterations (e.g. ``(2/3, 8/9)``, mmdetection's 1x schedule), so they hold for any length.
    * ``grad_clip``: max global grad norm (``None`` = off).
    * ``amp``: mixed precision (``torch.autocast`` float16 + ``GradScaler``); only on CUDA, ignored
      (with a log line) on CPU.
    * ``resolutions``: dynamic-resolution set; empty = keep the detector's current size.
    * ``hflip``: probability of flipping each training image (and its boxes) left-right, the
      standard detection augmentation (mmdetection's ``RandomFlip(0.5)``); 0 disables it.
    * ``history_points``: at most this many points in :attr:`TrainResult.loss_history`.
    * ``batch_size``: images per step, per rank under ``torchrun`` (the global batch is
      ``batch_size`` × ranks, and an epoch takes that many times fewer iterations).
    * ``num_workers``: data-loading processes; on CUDA, 0 picks up to 4 from the free cores.

    Raises:
        FieldError: an invalid value (a :class:`~jdsearch.core.errors.SpecError`), e.g.
            ``TrainConfig.schedule: must be 'cosine' or 'step', got 'cosin'``.
    """

    epochs: float = 1.0
    max_iters: int | None = None
    batch_size: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    schedule: str = COSINE
    milestones: tuple[float, ...] = (2 / 3, 8 / 9)
    gamma: float = 0.1
    grad_clip: float | None = None
    amp: bool = False
    device: str = "cpu"
    seed: int = 0
    resolutions: tuple[Resolution, ...] = ()
    hflip: float = 0.5
    num_workers: int = 0
    log_every: int = 50
    history_points: int = 200

    def __post_init__(self) -> None:
        # Accept strings ("128x96") for convenience; store Resolution values.
        object.__setattr__(
            self, "resolutions", tuple(Resolution.parse(r) for r in self.resolutions)
        )
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        self._check_length()
        self._check_optimizer()
        self._check_schedule()
        self._check_run()

    def _check_length(self) -> None:
        if self.max_iters is None:
            check(self.epochs > 0 and math.isfinite(self.epochs), self, "epochs", _POSITIVE)
        else:
            check(self.max_iters >= 1, self, "max_iters", "must be ≥ 1")
        check(self.batch_size >= 1, self, "batch_size", "must be ≥ 1")

    def _check_optimizer(self) -> None:
        check(self.lr > 0 and math.isfinite(self.lr), self, "lr", _POSITIVE)
        # SGD on a detector diverges far below this; a larger value is a typo (1e6 for 1e-6).
        check(self.lr <= MAX_LR, self, "lr", f"must be ≤ {MAX_LR:g} (detectors train at ~0.02)")
        check(0 <= self.momentum < 1, self, "momentum", "must lie in [0, 1)")
        check(self.weight_decay >= 0, self, "weight_decay", "must be ≥ 0")
        ok = self.grad_clip is None or self.grad_clip > 0
        check(ok, self, "grad_clip", "must be positive or None")

    def _check_schedule(self) -> None:
        check(self.warmup_iters >= 0, self, "warmup_iters", "must be ≥ 0")
        check(0 < self.warmup_factor <= 1, self, "warmup_factor", "must lie in (0, 1]")
        check(self.schedule in SCHEDULES, self, "schedule", f"must be '{COSINE}' or '{STEP}'")
        ms = self.milestones
        ok = all(0 < m < 1 for m in ms) and list(ms) == sorted(ms)
        check(ok, self, "milestones", "must be increasing fractions of the run in (0, 1)")
        check(0 < self.gamma <= 1, self, "gamma", "must lie in (0, 1]")

    def _check_run(self) -> None:
        check(0 <= self.hflip <= 1, self, "hflip", "must be a probability in [0, 1]")
        check(self.num_workers >= 0, self, "num_workers", "must be ≥ 0")
        check(self.log_every >= 1, self, "log_every", "must be ≥ 1")
        check(self.history_points >= 1, self, "history_points", "must be ≥ 1")
        check(self.seed >= 0, self, "seed", "must be ≥ 0")
        check(self.seed <= INT_LIMIT, self, "seed", f"must be at most {INT_LIMIT} (64 bits)")
        check(
            is_device(self.device),
            self,
            "device",
            "is not a torch device such as 'cpu', 'cuda' or 'cuda:1'",
        )

    def total_iters(self, batches_per_epoch: int) -> int:
        """Iterations this config runs over a loader of ``batches_per_epoch`` batches."""
        if self.max_iters is not None:
            return self.max_iters
        return max(1, math.ceil(self.epochs * batches_per_epoch))


@dataclass(frozen=True)
class KDConfig:
    """Distillation weights and temperature (paper 3.2; ``docs/distillation.md``).

    A weight of 0 switches a term off (its loss is still reported, as 0, so logs keep one shape).
    ``feat_normalize`` divides the feature loss by the teacher's mean squared feature. ``mode``
    (one of :data:`KD_MODES`) applies to a search: its teacher is searched, fixed or absent.
    ``when`` (one of :data:`KD_WHEN`) too: ``stronger`` distils only when the pool's largest
    sub-network beats the base detector on the selection split (``jdsearch.search.teacher_check``),
    ``always`` whatever the pool holds.

    Raises:
        FieldError: a negative or non-finite weight, a temperature ≤ 0, a non-bool switch.
    """

    feat_weight: float = 1.0
    cls_weight: float = 1.0
    loc_weight: float = 1.0
    temperature: float = 1.0
    feat_normalize: bool = True
    mode: str = "dynamic"
    when: str = "stronger"

    def __post_init__(self) -> None:
        for name in ("feat_weight", "cls_weight", "loc_weight"):
            value = getattr(self, name)
            check(is_number(value) and value >= 0, self, name, "must be a finite number ≥ 0")
        t = self.temperature
        check(is_number(t) and t > 0, self, "temperature", "must be a finite number > 0")
        ok = isinstance(self.feat_normalize, bool)
        check(ok, self, "feat_normalize", "must be true or false")
        check(self.mode in KD_MODES, self, "mode", f"must be one of {', '.join(KD_MODES)}")
        check(self.when in KD_WHEN, self, "when", f"must be one of {', '.join(KD_WHEN)}")

    @classmethod
    def from_dict(cls, data: Any, source: str = "", path: str = "kd") -> KDConfig:
        """Read a spec's ``kd`` mapping (missing keys take the defaults).

        Raises:
            SpecError: an unknown key or an invalid value, named ``SOURCE: PATH.KEY``.
        """
        return read_dataclass(Fields(data, source, path), cls)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form of the fields (read back by :meth:`from_dict`)."""
        return plain(self)
