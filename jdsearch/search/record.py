"""What a study records, and the only place that knows the names it is recorded under.

A trial's result is one :class:`TrialRecord`: the objective writes it with :meth:`to_attrs`, and
the sampler's feasibility callback, the summary, export, compare and the report read it back with
:meth:`TrialRecord.from_trial`. Studies written by jdsearch 0.1 read too (fields they lack take
their defaults). The study-level names (base detector, pool, spec, categories) are here as well.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from jdsearch.storage.gc import Holders

__all__ = [
    "BASE_ATTR",
    "BASE_FLOPS_ATTR",
    "BASE_MOVE",
    "BASE_RESOLUTION_ATTR",
    "CATEGORIES_SYSATTR",
    "DECISION_SYSATTR",
    "FAIL_REASON_ATTR",
    "FINETUNE_ATTRS",
    "FINETUNE_MOVE",
    "HELDOUT_PREFIX",
    "KD_MODE_ATTR",
    "KIND_ATTR",
    "MOVE_PARAM",
    "NOISE_ATTR",
    "PARENT_ATTR",
    "POOL_ATTR",
    "RETRY_OF_ATTR",
    "RETRY_REASON_ATTR",
    "SET_ASIDE_PREFIX",
    "SPEC_FILE_ATTR",
    "SPEC_SYSATTR",
    "STATE_SYSATTR",
    "STRATEGY_ATTR",
    "TIMINGS",
    "TRACEBACK_SYSATTR",
    "WORKER_SYSATTR",
    "TrialRecord",
    "artifact_holders",
    "cost_name",
    "decision_attrs",
    "h_of",
    "is_complete",
    "set_aside_trials",
]

# -- the trial parameter and what the sampler records when it decides
MOVE_PARAM = "move"  # the categorical trial parameter: "base", a student action or a teacher move
BASE_MOVE = "base"  # the root trial: the base detector with the pool's super-net as teacher
PARENT_ATTR = "parent"  # trial number of the parent pair (None for the root)
KIND_ATTR = "move_kind"  # "base", "student", "teacher" or "finetune"
# The move the sampler chose, written before Optuna writes the parameter (which cannot change):
# a claim that other workers count as tried, and that a worker who lost a race rewrites.
DECISION_SYSATTR = "jdsearch:decision"
FINETUNE_MOVE = "finetune"  # a post-search fine-tuning of its parent's pair (jdsearch finetune)
# A fine-tuning trial's request, set when it is enqueued (a retried copy keeps them): epochs, lr
# (None: the fast evaluation's) and a token that tells the request's attempts from any other.
FINETUNE_ATTRS = ("finetune_epochs", "finetune_lr", "finetune_request")

# -- what the objective records (user attributes: what `optuna trials` and the dashboard show)
FAIL_REASON_ATTR = "fail_reason"  # a failed trial: the one-line error that failed it
# A retry of a trial whose worker was lost (Optuna refuses attributes on the failed trial): its
# number, and why it failed (the worker and when it last beat its heartbeat).
RETRY_OF_ATTR = "retry_of"
RETRY_REASON_ATTR = "retry_reason"
_CHECKPOINT = "checkpoint"  # artifact id of the trial's student checkpoint
_STUDENT = "student"  # appendix-B encoding of the student
_STUDENT_SUBNET = "student_subnet"  # SubnetConfig string of a student cut from the pool ("pool")
_TEACHER = "teacher"  # SubnetConfig string of the teacher
_TEACHER_PARAMS = "teacher_params"  # the teacher's backbone parameters (paper fig. 5)
_FLOPS = "flops"  # multiply-adds at the base resolution: C(S) of the score H
_FLOPS_AT = "flops_at"  # resolution -> multiply-adds at that resolution
_BACKBONE_FLOPS = "backbone_flops"
_STAGE_FLOPS = "stage_flops"  # stem, stage 1..4
_PARAMS = "params"
_METRICS = "metrics"  # resolution -> COCO AP, AP50, AP75, APs, APm, APl
_AP = "ap"  # resolution -> the score's metric
_H = "h"  # resolution -> H
_H_VALUE = "h_value"  # the trial's H (its best over resolutions), in either score mode
_COST = "cost"  # resolution -> (C/C_base)·(R/R_base)^β: what H raises to −α (score.cost's C)
_LATENCY = "latency"  # resolution -> {ratio, ms, base_ms, device} (score.cost: latency)
_BEST_RESOLUTION = "best_resolution"  # where H is highest: the trial's value
_MORPH = "morph"  # new_params, inherited_params of a student action
_TRAIN_IMAGES = "train_images"  # images the trial's training went through (its compute budget)
TIMINGS = ("train_s", "eval_s", "teacher_s", "load_s", "upload_s")  # seconds, each its own attr
# (system attributes: machine-facing state, hidden from `optuna trials`)
_ARCH = "jdsearch:student_arch"  # BackboneArch.to_dict() of the student
_STUDENT_MOVES = "jdsearch:student_moves"  # feasible student actions from this student
_ARCH_KEY = "jdsearch:arch_key"  # what a latency measurement is cached by (search.cost)
WORKER_SYSATTR = "jdsearch:worker"  # "hostname:pid" of the worker that ran the last attempt
# a failed trial: the file, on its worker's machine, that holds its traceback (search.failures)
TRACEBACK_SYSATTR = "jdsearch:traceback_log"

# -- the study
BASE_ATTR = "base_artifact"  # artifact id of the base detector's checkpoint
POOL_ATTR = "pool_artifact"  # artifact id of the teacher pool
BASE_FLOPS_ATTR = "base_flops"  # C_base of the score H
BASE_RESOLUTION_ATTR = "base_resolution"  # R_base of the score H
SPEC_FILE_ATTR = "spec_file"  # the study spec file the study was created from
STRATEGY_ATTR = "strategy"  # search.strategy: hill_climb, greedy or random
KD_MODE_ATTR = "kd_mode"  # kd.mode: dynamic, fixed or off
NOISE_ATTR = "noise_floor"  # a trial re-run with other seeds (jdsearch.search.noise)
SPEC_SYSATTR = "jdsearch:spec"  # the study spec, as a dict (a system attr: too long to print)
CATEGORIES_SYSATTR = "jdsearch:categories"  # [[COCO category id, name], ...] in label order 1..K
# + a trial number: that trial's checkpoint was found unreadable ({artifact, reason, worker})
SET_ASIDE_PREFIX = "jdsearch:unreadable:"
# + a trial number: its metrics on the held-out split, where `export` measured them
# ({metrics: {AP, AP50, AP75}, resolution, images, file}; what its dashboard note shows)
HELDOUT_PREFIX = "jdsearch:heldout:"
# a trial's mid-trial training state ({"artifact": id}; jdsearch.search.resume)
STATE_SYSATTR = "jdsearch:train_state"


# -- the study's objectives: what Optuna, the dashboard and `optuna trials` call the values
_COST_NAMES = {"flops": "FLOPs ratio", "params": "params ratio", "latency": "latency ratio"}


def cost_name(cost: str) -> str:
    """What a Pareto study calls its cost value (``score.cost`` ``latency`` → ``latency ratio``):
    (C/C_base)·(R/R_base)^β, a ratio to the base."""
    return _COST_NAMES[cost]


def artifact_holders() -> Holders:
    """The attributes that name a study's artifacts, for ``jdsearch gc``: the spec marks a
    jdsearch study, its base and pool attrs name what it keeps, a trial's training state what
    its retry resumes from."""
    from jdsearch.storage.gc import Holders

    return Holders(SPEC_SYSATTR, (BASE_ATTR, POOL_ATTR), STATE_SYSATTR)


def decision_attrs(parent: int | None, kind: str) -> dict[str, Any]:
    """The user attributes that record the sampler's choice of parent and kind of move."""
    return {PARENT_ATTR: parent, KIND_ATTR: kind}


def set_aside_trials(study_system_attrs: Mapping[str, Any]) -> frozenset[int]:
    """Trials whose checkpoints were found unreadable, from the study's system attrs: never a
    parent again."""
    return frozenset(
        int(k.removeprefix(SET_ASIDE_PREFIX))
        for k in study_system_attrs
        if k.startswith(SET_ASIDE_PREFIX) and k.removeprefix(SET_ASIDE_PREFIX).isdigit()
    )


def h_of(t: FrozenTrial) -> float | None:
    """The score H of a trial: its value in a single-objective study (``score.mode: h``), the
    ``h_value`` attribute in a Pareto study (whose values are AP and the cost); ``None`` when it
    has neither."""
    if t.values is not None and len(t.values) == 1:
        return float(t.values[0])
    h = t.user_attrs.get(_H_VALUE)
    return None if h is None else float(h)


def is_complete(t: FrozenTrial) -> bool:
    """COMPLETE with finite values and a finite H."""
    if t.state != TrialState.COMPLETE or not t.values:
        return False
    h = h_of(t)
    return h is not None and math.isfinite(h) and all(math.isfinite(v) for v in t.values)


@dataclass(frozen=True)
class TrialRecord:
    """One trial: its place in the lineage, the pair it trained and what it measured.

    ``number``, ``move``, ``parent``, ``kind`` and ``value`` (H, :func:`h_of`: Optuna's value, or
    the ``h_value`` attribute in a Pareto study) come from Optuna's own record of the trial (and
    the sampler); the rest is what the objective measured, written by :meth:`to_attrs`
    (``h_value``, H once more, is written by every trial since Pareto studies exist).
    FLOPs are multiply-adds; ``metrics``, ``ap``, ``h``, ``cost``, ``latency`` and ``flops_at``
    map a resolution (``LONGxSHORT``) to its value.
    """

    student: str = ""
    teacher: str = ""
    student_subnet: str = ""
    checkpoint: str | None = None
    number: int | None = None
    move: str | None = None
    parent: int | None = None
    kind: str | None = None
    value: float | None = None
    teacher_params: int | None = None
    flops: int | None = None
    flops_at: Mapping[str, int] = field(default_factory=dict)
    backbone_flops: int | None = None
    stage_flops: tuple[int, ...] = ()
    params: int | None = None
    metrics: Mapping[str, Mapping[str, float | None]] = field(default_factory=dict)
    ap: Mapping[str, float] = field(default_factory=dict)
    h: Mapping[str, float] = field(default_factory=dict)
    h_value: float | None = None
    cost: Mapping[str, float] = field(default_factory=dict)
    latency: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    arch_key: str | None = None
    best_resolution: str | None = None
    morph: Mapping[str, int] = field(default_factory=dict)
    train_images: int | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    arch: Mapping[str, Any] | None = None
    student_moves: tuple[str, ...] = ()
    worker: str | None = None

    # ------------------------------------------------------------------ writing
    def to_attrs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(user attributes, system attributes)`` of the objective's result.

        The lineage fields (``number``, ``move``, ``parent``, ``kind``, ``value``) are Optuna's
        and the sampler's to write, and the worker is written when the trial starts.
        """
        user = {
            _CHECKPOINT: self.checkpoint,
            _STUDENT: self.student,
            **({_STUDENT_SUBNET: self.student_subnet} if self.student_subnet else {}),
            _TEACHER: self.teacher,
            _TEACHER_PARAMS: self.teacher_params,
            _FLOPS: self.flops,
            _FLOPS_AT: dict(self.flops_at),
            _BACKBONE_FLOPS: self.backbone_flops,
            _STAGE_FLOPS: list(self.stage_flops),
            _PARAMS: self.params,
            _METRICS: {k: dict(v) for k, v in self.metrics.items()},
            _AP: dict(self.ap),
            _H: dict(self.h),
            **({} if self.h_value is None else {_H_VALUE: self.h_value}),
            **({_COST: dict(self.cost)} if self.cost else {}),
            **({_LATENCY: {k: dict(v) for k, v in self.latency.items()}} if self.latency else {}),
            _BEST_RESOLUTION: self.best_resolution,
            _MORPH: dict(self.morph),
            **({} if self.train_images is None else {_TRAIN_IMAGES: self.train_images}),
            **{k: self.timings[k] for k in TIMINGS if k in self.timings},
        }
        system = {
            _ARCH: None if self.arch is None else dict(self.arch),
            _STUDENT_MOVES: list(self.student_moves),
            **({} if self.arch_key is None else {_ARCH_KEY: self.arch_key}),
        }
        return user, system

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_trial(cls, t: FrozenTrial) -> TrialRecord:
        """The record of ``t`` (any state; a running or failed trial has only its lineage)."""
        a, s = t.user_attrs, t.system_attrs
        parent = a.get(PARENT_ATTR)
        return cls(
            student=str(a.get(_STUDENT, "")),
            teacher=str(a.get(_TEACHER, "")),
            student_subnet=str(a.get(_STUDENT_SUBNET, "")),
            checkpoint=a.get(_CHECKPOINT),
            number=t.number,
            move=t.params.get(MOVE_PARAM),
            parent=None if parent is None else int(parent),
            kind=a.get(KIND_ATTR),
            value=h_of(t),
            teacher_params=a.get(_TEACHER_PARAMS),
            flops=a.get(_FLOPS),
            flops_at=dict(a.get(_FLOPS_AT) or {}),  # absent in the earliest 0.1 studies
            backbone_flops=a.get(_BACKBONE_FLOPS),
            stage_flops=tuple(a.get(_STAGE_FLOPS) or ()),
            params=a.get(_PARAMS),
            metrics=dict(a.get(_METRICS) or {}),
            ap=dict(a.get(_AP) or {}),
            h=dict(a.get(_H) or {}),
            h_value=a.get(_H_VALUE),
            cost=dict(a.get(_COST) or {}),
            latency=dict(a.get(_LATENCY) or {}),
            arch_key=s.get(_ARCH_KEY),
            best_resolution=a.get(_BEST_RESOLUTION),
            morph=dict(a.get(_MORPH) or {}),
            train_images=a.get(_TRAIN_IMAGES),
            timings={k: float(a[k]) for k in TIMINGS if a.get(k) is not None},
            arch=s.get(_ARCH),
            student_moves=tuple(s.get(_STUDENT_MOVES) or ()),
            worker=s.get(WORKER_SYSATTR),
        )

    @property
    def is_finetune(self) -> bool:
        """Whether the trial is a post-search fine-tuning (not a step of the search)."""
        return self.move == FINETUNE_MOVE

    def point(self) -> tuple[float, float] | None:
        """``(AP, cost)`` where the trial scored best: the score's metric and the cost of H there
        (a Pareto study's values); ``None`` for a trial recorded before the cost was."""
        res = self.best_resolution or ""
        if res not in self.ap or res not in self.cost:
            return None
        return float(self.ap[res]), float(self.cost[res])

    def metric_at(self, resolution: str | None, key: str = "AP") -> float | None:
        """COCO ``key`` (in [0, 1]) at ``resolution``; ``None`` when not recorded."""
        value = self.metrics.get(resolution or "", {}).get(key)
        return None if value is None else float(value)

    def flops_where_scored(self) -> tuple[int | None, str | None]:
        """``(multiply-adds, resolution)`` where the trial scored best; ``(flops, None)`` (at the
        base resolution) for a trial recorded before ``flops_at`` existed."""
        res = self.best_resolution
        if res is not None and self.flops_at.get(res) is not None:
            return int(self.flops_at[res]), res
        return self.flops, None
