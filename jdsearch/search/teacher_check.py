"""``kd.when``: distil only from a teacher pool that is stronger than the base detector.

Distillation helps a student only when its teacher knows more than it does. A pool trained for
minutes on a CPU does not: the quickstart's, trained 5 epochs from scratch, scores 0.4 AP where
the base detector scores 11.2, and distilling from it cost the base about 2 held-out AP points
at equal training (issue 11's bench: ``longer_all_kd`` against ``longer_all``).

So when a study is prepared, the pool's largest sub-network (BN-recalibrated, as every teacher
is) and the base detector are scored on the selection split at the base resolution. With
``kd.when: stronger`` (the default) a study whose teacher does not beat the base searches without
one, as with ``kd.mode: off`` (no distillation, no teacher moves), and says so; a study made with
``kd.when: always`` distils from whatever the pool holds. The first worker to prepare the study
measures the check and records it in the study (user attr ``teacher_check``); once recorded it
decides for the whole study, so every worker, rank, resume, ``noise`` and ``finetune`` distils
alike (under ``torchrun`` rank 0 also hands its decision to the other ranks). A study that has
trials but no check (made with ``always``, or before the check existed) goes on as it began.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jdsearch.errors import JDSearchError
from jdsearch.search.record import KD_MODE_ATTR

if TYPE_CHECKING:
    import optuna
    from torch import nn

    from jdsearch.search.objective import SearchContext

__all__ = [
    "TEACHER_CHECK_ATTR",
    "TeacherCheck",
    "apply_teacher_check",
    "kd_summary",
    "measure_teacher",
    "use_kd_mode",
]

log = logging.getLogger(__name__)

TEACHER_CHECK_ATTR = "teacher_check"  # study user attr: the measured TeacherCheck


@dataclass(frozen=True)
class TeacherCheck:
    """The pool's largest sub-network against the base, both on the selection split."""

    teacher: str  # the sub-network's name (SubnetConfig)
    teacher_ap: float  # the score's metric, 0..1
    base_ap: float
    resolution: str  # where both were scored: the base resolution

    @property
    def stronger(self) -> bool:
        """Whether the teacher beats the base: the study distils (``kd.when: stronger``)."""
        return self.teacher_ap > self.base_ap

    def describe(self) -> str:
        """One line: both scores and what the study does."""
        verdict = (
            "the search distils"
            if self.stronger
            else "the search does not distil (kd.mode acts as off; a new study with kd.when: "
            "always distils anyway)"
        )
        return (
            f"teacher check at {self.resolution} on the selection split: the pool's largest "
            f"sub-network {self.teacher} AP {100 * self.teacher_ap:.1f}, the base detector "
            f"{100 * self.base_ap:.1f}: {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str) -> TeacherCheck:
        """Read a recorded check back (a study's attrs are data anyone with the database wrote).

        Raises:
            JDSearchError: not a mapping of these four fields with finite scores in [0, 1].
        """
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, dict) or sorted(data) != sorted(names):
            raise JDSearchError(f"{source}: {TEACHER_CHECK_ATTR} must map {names}, got {data!r}")
        for key in ("teacher", "resolution"):
            if not isinstance(data[key], str):
                raise JDSearchError(
                    f"{source}: {TEACHER_CHECK_ATTR}.{key} = {data[key]!r}: not a name"
                )
        for key in ("teacher_ap", "base_ap"):
            v = data[key]
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or not 0 <= v <= 1:
                raise JDSearchError(f"{source}: {TEACHER_CHECK_ATTR}.{key} = {v!r}: not in [0, 1]")
        return cls(data["teacher"], float(data["teacher_ap"]), float(data["base_ap"]),
                   data["resolution"])  # fmt: skip


def measure_teacher(ctx: SearchContext, base: nn.Module) -> TeacherCheck:
    """Score the pool's largest sub-network and ``base`` on the selection split at the base
    resolution (the score's metric)."""
    from jdsearch.evaluate import evaluate

    config = ctx.pool.space.largest()
    res, metric, device = ctx.base_resolution, ctx.spec.score.metric, ctx.spec.device
    scores = []
    teacher = ctx.pool.teacher(config, ctx.train_set, device=device)  # not kept: maybe never used
    for detector in (teacher, base):
        metrics = evaluate(detector, ctx.val_set, [res], device=device)
        scores.append(float(getattr(metrics[str(res)], metric)))
    return TeacherCheck(str(config), scores[0], scores[1], str(res))


def apply_teacher_check(
    study: optuna.Study, ctx: SearchContext, base: nn.Module, *, write: bool
) -> TeacherCheck | None:
    """Apply ``kd.when`` to the context's spec: measured once per study (``write``: record it),
    read back after. A recorded check decides for the whole study, whatever ``kd.when`` a later
    spec sets: every worker, re-run and fine-tune of one study distils alike. With a teacher that
    does not beat the base, ``ctx.spec.kd.mode`` becomes ``off`` for this worker. Returns the check
    (``None``: none applies)."""
    kd = ctx.spec.kd
    if kd.mode == "off":
        return None
    # Trials first, then the check: a worker records its check before it makes any trial, so a
    # trial seen here means its check is seen too (read the other way round, a worker starting
    # beside the first could miss both its check and then see its first trial).
    begun = bool(study.get_trials(deepcopy=False))
    stored = study.user_attrs.get(TEACHER_CHECK_ATTR)
    if stored is None and (kd.when == "always" or begun):
        return None  # distils as asked, or as the study began (before the check existed)
    if stored is None:
        check = measure_teacher(ctx, base)
        stored = study.user_attrs.get(TEACHER_CHECK_ATTR)  # another worker's, measured meanwhile
        if stored is None and write:
            study.set_user_attr(TEACHER_CHECK_ATTR, check.to_dict())
    if stored is not None:
        check = TeacherCheck.from_dict(stored, f"study {study.study_name}")
    log.info("%s", check.describe())
    if not check.stronger:
        use_kd_mode(ctx, "off")
    return check


def use_kd_mode(ctx: SearchContext, mode: str) -> None:
    """This worker's trials distil as ``mode`` says (the teacher check's decision, this worker's
    or rank 0's), whatever the spec asked."""
    ctx.spec = dataclasses.replace(ctx.spec, kd=dataclasses.replace(ctx.spec.kd, mode=mode))


def kd_summary(attrs: dict[str, Any]) -> str:
    """A study's distillation in words, from its user attrs: ``kd.mode``, and what the teacher
    check made of it (``dynamic, off: the pool's largest sub-network AP 0.4 does not beat the base's
    11.2``)."""
    mode = str(attrs.get(KD_MODE_ATTR, "dynamic"))  # 0.1 studies: dynamic
    stored = attrs.get(TEACHER_CHECK_ATTR)
    if stored is None or mode == "off":
        return mode
    try:
        check = TeacherCheck.from_dict(stored, "study")
    except JDSearchError as e:
        return f"{mode} ({e})"
    if check.stronger:
        return (
            f"{mode} (teacher check: AP {100 * check.teacher_ap:.1f} against the base's "
            f"{100 * check.base_ap:.1f})"
        )
    return (
        f"{mode}, off: the pool's largest sub-network AP {100 * check.teacher_ap:.1f} does not "
        f"beat the base's {100 * check.base_ap:.1f} (kd.when)"
    )
