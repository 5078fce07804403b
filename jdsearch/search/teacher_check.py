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

from jdsearch.core.errors import JDSearchError
from jdsearch.search.record import KD_MODE_ATTR
from jdsearch.search.strategies import KDMode, NoKD, kd_mode_named

if TYPE_CHECKING:
    import optuna
    from torch import nn

    from jdsearch.search.assets import StudyAssets

__all__ = [
    "TEACHER_CHECK_ATTR",
    "TeacherCheck",
    "decide_kd",
    "kd_summary",
    "measure_teacher",
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


def measure_teacher(assets: StudyAssets, base: nn.Module) -> TeacherCheck:
    """Score the pool's largest sub-network and ``base`` on the selection split at the base
    resolution (the score's metric)."""
    from jdsearch.engine.evaluate import evaluate

    config = assets.pool.space.largest()
    res, metric, device = assets.base_resolution, assets.spec.score.metric, assets.spec.device
    scores = []
    teacher = assets.pool.teacher(config, assets.train_set, device=device)  # not kept
    for detector in (teacher, base):
        metrics = evaluate(detector, assets.val_set, [res], device=device)
        scores.append(float(getattr(metrics[str(res)], metric)))
    return TeacherCheck(str(config), scores[0], scores[1], str(res))


def teacher_check(
    study: optuna.Study, assets: StudyAssets, base: nn.Module, *, write: bool
) -> TeacherCheck | None:
    """The study's teacher check (``kd.when``): measured once per study (``write``: record it),
    read back after. A recorded check decides for the whole study, whatever ``kd.when`` a later
    spec sets: every worker, re-run and fine-tune of one study distils alike. ``None``: none
    applies (no distillation asked, ``kd.when: always``, or a study begun before the check)."""
    kd = assets.spec.kd
    if not kd_mode_named(kd.mode).distils:
        return None
    # Trials first, then the check: a worker records its check before it makes any trial, so a
    # trial seen here means its check is seen too (read the other way round, a worker starting
    # beside the first could miss both its check and then see its first trial).
    begun = bool(study.get_trials(deepcopy=False))
    stored = study.user_attrs.get(TEACHER_CHECK_ATTR)
    if stored is None and (kd.when == "always" or begun):
        return None  # distils as asked, or as the study began (before the check existed)
    if stored is None:
        check = measure_teacher(assets, base)
        stored = study.user_attrs.get(TEACHER_CHECK_ATTR)  # another worker's, measured meanwhile
        if stored is None and write:
            study.set_user_attr(TEACHER_CHECK_ATTR, check.to_dict())
    if stored is not None:
        check = TeacherCheck.from_dict(stored, f"study {study.study_name}")
    log.info("%s", check.describe())
    return check


def decide_kd(
    study: optuna.Study, assets: StudyAssets, base: nn.Module, *, write: bool
) -> tuple[KDMode, TeacherCheck | None]:
    """How this worker's trials distil: as ``kd.mode`` asks, unless the teacher check finds a
    pool that does not beat the base (then without a teacher); and the check, if one applies."""
    check = teacher_check(study, assets, base, write=write)
    if check is not None and not check.stronger:
        return NoKD(), check
    return kd_mode_named(assets.spec.kd.mode), check


def kd_summary(attrs: dict[str, Any]) -> str:
    """A study's distillation in words, from its user attrs: ``kd.mode``, and what the teacher
    check made of it (``dynamic, off: the pool's largest sub-network AP 0.4 does not beat the base's
    11.2``)."""
    mode = str(attrs.get(KD_MODE_ATTR, "dynamic"))  # 0.1 studies: dynamic
    stored = attrs.get(TEACHER_CHECK_ATTR)
    if stored is None or not KDMode.registry.get(mode, NoKD).distils:
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
