"""One Optuna trial = one iteration of algorithm 1: load the parent, move, train, evaluate, score.

The study's storage holds everything a worker needs: the spec (a study system attr), the base
detector and the teacher pool (study-level artifacts), and every trial's student checkpoint
(trial-level artifacts, in the same database by default). A worker anywhere that reaches the
storage URL can add trials to the lineage or resume it.

Score (paper 3.1.4): ``H(S, R) = mAP(S, R) × [(C(S)/C_base) · (R/R_base)^β]^−α`` with C the
student's multiply-adds counted at the base resolution (the architecture's complexity) and R the
resolution's pixel count (long × short side), so that the resolution's share of the complexity is
weighted by β. A trial's value is the best H over the study's resolutions.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.artifacts import upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial

from jdsearch.core.errors import CheckpointError, JDSearchError, first_line
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import CocoDataset
from jdsearch.engine import distributed
from jdsearch.engine.evaluate import CocoMetrics, evaluate
from jdsearch.engine.train import StepInfo, TrainResult, TrainState, train
from jdsearch.methods.distill import make_distiller
from jdsearch.methods.morph.actions import (
    CHANNEL_PRUNE,
    Action,
    MorphConfig,
    all_actions,
    channel_costs,
    evolve_with_report,
    feasible_actions,
)
from jdsearch.methods.morph.importance import taylor_scores
from jdsearch.methods.morph.pruning import BNSparsity
from jdsearch.methods.morph.recovery import local_recovery
from jdsearch.methods.pool import ElasticPool
from jdsearch.models import Detector
from jdsearch.models.flops import FlopsReport, count_flops, count_spec_flops
from jdsearch.models.heads import stop_recording
from jdsearch.search.cost import CostMeter, arch_key, weighted_cost
from jdsearch.search.failures import FailureLog
from jdsearch.search.ranks import TRIAL, announce
from jdsearch.search.record import (
    BASE_MOVE,
    FAIL_REASON_ATTR,
    FINETUNE_ATTRS,
    FINETUNE_MOVE,
    MOVE_PARAM,
    PARENT_ATTR,
    SET_ASIDE_PREFIX,
    WORKER_SYSATTR,
    TrialRecord,
)
from jdsearch.search.resume import FollowedStates, TrialStates
from jdsearch.search.strategies import KDMode, ScoreMode, Strategy
from jdsearch.spec.pool_space import SubnetConfig, SubnetSpace
from jdsearch.spec.settings import TrainConfig
from jdsearch.spec.study import StudySpec
from jdsearch.storage.artifacts import check_artifact_id
from jdsearch.storage.optuna_internals import (
    HeldAttrs,
    lost_trial,
    set_study_system_attr,
    set_trial_attrs,
    set_trial_system_attr,
    stored_trial,
    trial_by_number,
)
from jdsearch.store.checkpoint import Checkpoint, checkpoint_from_bytes, checkpoint_to_bytes

log = logging.getLogger(__name__)


def worker_id() -> str:
    """This process as a worker: ``hostname:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


SUBNETS_KEPT = 4  # extracted pool sub-networks a worker keeps (SearchContext.subnet)
POOL_START = "pool.start"  # strategy pool: the root's pool student (see SearchContext.pool_start)
_POOL_PREFIX, _TEACHER_PREFIX = "pool.", "teacher."


def _as_pool_move(teacher_move: str) -> str:
    """``teacher.depth3+`` → ``pool.depth3+``: the same mutation, applied to a pool student."""
    return _POOL_PREFIX + teacher_move.removeprefix(_TEACHER_PREFIX)


def _as_teacher_move(pool_move: str) -> str:
    """``pool.depth3+`` → ``teacher.depth3+``: the name the pool's space knows the mutation by."""
    return _TEACHER_PREFIX + pool_move.removeprefix(_POOL_PREFIX)


def pool_moves() -> tuple[str, ...]:
    """Student moves of the ``pool`` strategy: ``pool.start`` from the root, then the pool's own
    mutations applied to the student's sub-network (``pool.depth3+`` as ``teacher.depth3+``)."""
    return (POOL_START, *map(_as_pool_move, SubnetSpace.move_names()))


def move_vocabulary() -> list[str]:
    """The fixed choices of the ``move`` parameter: base, student actions, teacher mutations,
    the pool strategy's student moves and post-search fine-tuning."""
    return [
        BASE_MOVE,
        *all_actions(),
        *SubnetSpace.move_names(),
        *pool_moves(),
        FINETUNE_MOVE,
    ]


def study_vocabulary(study: optuna.Study) -> list[str]:
    """The ``move`` choices the study's trials were asked with (Optuna refuses to change them
    within a study), or :func:`move_vocabulary` for a study without trials. A study created by
    jdsearch 0.2 or older keeps its shorter list: no pool strategy and no fine-tuning there."""
    for t in study.get_trials(deepcopy=False):
        dist = t.distributions.get(MOVE_PARAM)
        if dist is not None:
            return [str(c) for c in dist.choices]  # type: ignore[attr-defined]
    return move_vocabulary()


def score_h(
    ap: float,
    flops: float,
    flops_base: float,
    res: Resolution,
    res_base: Resolution,
    alpha: float,
    beta: float,
) -> float:
    """The paper's H(S, R) for one resolution, C being ``flops`` against ``flops_base`` (another
    cost's C/C_base passes as ``flops`` with ``flops_base`` 1)."""
    return ap * weighted_cost(flops / flops_base, res, res_base, beta) ** (-alpha)


@dataclass
class SearchContext:
    """What every trial of a study shares (built once per worker by
    :func:`jdsearch.search.session.open_run`). ``strategy``, ``kd`` and ``score`` are the study's
    strategy, KD mode (as its teacher check decided) and score mode, as objects."""

    spec: StudySpec
    store: Any  # optuna ArtifactStore
    train_set: CocoDataset
    val_set: CocoDataset
    pool: ElasticPool
    base_artifact: str  # artifact id of the base detector's checkpoint
    base_resolution: Resolution
    base_flops: int
    progress: bool = False
    vocabulary: tuple[str, ...] = ()  # the study's move choices; empty: move_vocabulary()
    strategy: Strategy = field(kw_only=True)
    kd: KDMode = field(kw_only=True)
    score: ScoreMode = field(kw_only=True)
    _pool_start: SubnetConfig | None = None
    _cost: CostMeter | None = None
    # This worker's last extracted sub-networks (BN-recalibrated) and FLOPs counts: a teacher
    # comes back with each student move, a student with each teacher move.
    _subnets: dict[str, Detector] = field(default_factory=dict)
    _flops: dict[tuple[Any, tuple[int, int]], FlopsReport] = field(default_factory=dict)

    def subnet(self, config: SubnetConfig) -> Detector:
        """The pool's sub-network ``config``, extracted and BN-recalibrated on the training set
        (a fresh copy of the last :data:`SUBNETS_KEPT` extractions': recalibration is seeded,
        so a copy equals a new extraction)."""
        key = str(config)
        if key not in self._subnets:
            if len(self._subnets) >= SUBNETS_KEPT:
                del self._subnets[next(iter(self._subnets))]
            self._subnets[key] = self.pool.teacher(config, self.train_set, device=self.spec.device)
        else:
            self._subnets[key] = self._subnets.pop(key)  # the most recently used last
        return copy.deepcopy(self._subnets[key])

    def flops(self, student: Detector, size: tuple[int, int]) -> FlopsReport:
        """:func:`count_flops` of ``student`` at ``size`` (``(h, w)``), counted once per
        detector spec (its architecture included) and size in this worker."""
        key = (student.spec, (int(size[0]), int(size[1])))
        if key not in self._flops:
            self._flops[key] = count_flops(student, size=key[1])
        return self._flops[key]

    def cost_meter(self) -> CostMeter:
        """C/C_base of the score (``score.cost``), built on first use."""
        if self._cost is None:
            score = self.spec.score
            self._cost = CostMeter(
                score.cost,
                lambda: self.download(self.base_artifact, "base detector").detector,
                self.base_flops,
                device=self.spec.device,
                warmup=score.latency_warmup,
                repeats=score.latency_repeats,
            )
        return self._cost

    @property
    def morph_config(self) -> MorphConfig:
        """The morph actions' :class:`MorphConfig` (the study's ``channel_fraction``)."""
        return MorphConfig(channel_fraction=self.spec.search.channel_fraction)

    # ------------------------------------------------------------------ artifacts
    def download(self, artifact_id: str, source: str) -> Checkpoint:
        """The checkpoint stored as artifact ``artifact_id``, loaded on the study's device;
        ``source`` names it in errors (:class:`CheckpointError` if it is damaged)."""
        with self.store.open_reader(check_artifact_id(artifact_id, source)) as reader:
            data = reader.read()
        return checkpoint_from_bytes(data, source=source, device=self.spec.device)

    def upload(
        self,
        trial: optuna.Trial | optuna.Study,
        detector: Detector,
        extra: Mapping[str, Any],
        name: str,
        held: dict[str, Any] | None = None,
    ) -> str:
        """Store ``detector``'s checkpoint (with ``extra``) as an artifact of ``trial`` (a trial or
        the study) under the file name ``name``; returns the artifact id. ``held`` (a trial's
        only): the system attributes that name the artifact go there, for the caller to write
        with the trial's record, instead of to the storage at once."""
        data = checkpoint_to_bytes(
            detector,
            class_names=self.train_set.class_names,
            extra=dict(extra),
            source=name,
            category_ids=self.train_set.category_ids,
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            return upload_artifact(
                study_or_trial=trial,
                file_path=str(path),
                artifact_store=self.store,
                storage=None if held is None else HeldAttrs(held),
            )

    # ------------------------------------------------------------------ the pool strategy
    def pool_start(self) -> SubnetConfig:
        """The first pool student: among the space's smallest and largest members and 30 others
        drawn with the search seed, the one with the most multiply-adds at the base resolution
        that does not cost more than the base detector (the smallest when every one does)."""
        if self._pool_start is None:
            space, rng = self.pool.space, np.random.default_rng(self.spec.search.seed)
            candidates = {
                space.smallest(),
                space.largest(),
                *(space.sample(rng) for _ in range(30)),
            }
            size, n = self.base_resolution.hw, self.pool.num_classes
            costs = {
                cfg: count_spec_flops(self.pool.spec_of(cfg), size, num_classes=n).total
                for cfg in sorted(candidates, key=str)
            }
            within = [cfg for cfg in costs if costs[cfg] <= self.base_flops]
            pick = max(within, key=lambda c: (costs[c], str(c))) if within else space.smallest()
            self._pool_start = pick
        return self._pool_start

    def pool_student_moves(self, record: TrialRecord) -> list[str]:
        """The pool strategy's student moves from a pair: ``pool.start`` from a student that is
        not a pool sub-network (the root), else the pool's mutations of its sub-network."""
        if not record.student_subnet:
            return [POOL_START]
        cfg = SubnetConfig.parse(record.student_subnet)
        return sorted(map(_as_pool_move, self.pool.space.neighbours(cfg)))

    # ------------------------------------------------------------------ sampler support
    def feasible(self, parent: FrozenTrial) -> tuple[list[str], list[str]]:
        """Student moves and teacher mutations of a parent: the student actions its trial recorded
        (the pool's mutations of its sub-network under the ``pool`` strategy), and the pool's
        mutations of its teacher when the teacher is searched (``kd.mode: dynamic``)."""
        record = TrialRecord.from_trial(parent)
        students = self.strategy.student_moves(record, lambda: self.pool_student_moves(record))
        return students, self.kd.teacher_moves(self.pool.space, record.teacher)


class TrialFailed(JDSearchError):
    """A trial could not be evaluated (its parent's checkpoint is missing, a move is invalid…)."""


class TrialLost(JDSearchError):
    """Another worker failed this worker's running trial as stale (its heartbeat was late: this
    worker could not reach the database for longer than the grace period) and re-queued it. The
    worker stops it, keeps the training state it saved for the retry, and does not tell it
    (:func:`jdsearch.search.run.optimize`)."""

    #: What the worker's line on the trial says (``STOPPED: ...``).
    REASON = (
        "another worker failed it as stale and re-queued it while this worker could not reach "
        "the database; stopped here and not told, its retry takes over"
    )

    def __init__(self, number: int) -> None:
        super().__init__(f"trial {number}: {self.REASON}")


class _StopWhenLost:
    """A training callback: stop the trial (:class:`TrialLost`) as soon as its storage knows it
    lost (a heartbeat after the database came back found it failed as stale). Under ``torchrun``
    every rank asks at every iteration and all stop together on rank 0's word (``lost``: always
    ``False`` on the others)."""

    def __init__(self, number: int, lost: Callable[[], bool]) -> None:
        self.number, self.lost = number, lost

    def __call__(self, info: StepInfo) -> None:
        if not distributed.agree(not self.lost()):
            distributed.settle()  # every rank raises here
            raise TrialLost(self.number)


def _trial(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial ``number`` (a parent: finished, read from the storage's cache of the trials the
    sampler read)."""
    found = trial_by_number(study, number)
    if found is None:
        raise TrialFailed(f"trial {number} does not exist in study {study.study_name!r}")
    return found


@dataclass
class _Pair:
    """A trial's (student, teacher) pair, loaded from its parent and moved."""

    student: Detector
    teacher: SubnetConfig | None  # None: no distillation (kd.mode off)
    morph: dict[str, int]
    load_s: float
    subnet: SubnetConfig | None = None  # the student's place in the pool (strategy pool)
    finetune: tuple[float, float | None] | None = None  # (epochs, lr) of a fine-tuning trial


@dataclass
class _Trained:
    teacher_params: int
    teacher_s: float
    train_s: float
    images: int  # what the training went through: the trial's compute budget


@dataclass
class _Score:
    metrics: dict[str, CocoMetrics]
    flops: FlopsReport  # at the base resolution
    flops_at: dict[str, int]
    h: dict[str, float]
    best_resolution: str
    eval_s: float
    cost: dict[str, float] = dataclasses.field(default_factory=dict)  # (C/C_base)·(R/R_base)^β
    latency: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    arch_key: str | None = None

    @property
    def value(self) -> float:
        return self.h[self.best_resolution]

    def objectives(self, mode: ScoreMode, metric: str) -> float | tuple[float, float]:
        """The trial's value(s) in a study of score mode ``mode``: H, or (AP, cost) where H is
        best."""
        res = self.best_resolution
        ap = float(getattr(self.metrics[res], metric))
        return mode.objectives(ap, self.cost.get(res, math.nan), self.value)


class Objective:
    """Callable for ``study.optimize``: one evolve–train–evaluate step.

    Its phases: :meth:`load_pair` (the parent's student and teacher, moved), :meth:`train_pair`
    (distillation at dynamic resolution), :meth:`score` (AP at every resolution, H) and
    :meth:`record` (upload the student, write the :class:`TrialRecord`).
    """

    def __init__(self, ctx: SearchContext) -> None:
        self.ctx = ctx
        self.vocabulary = list(ctx.vocabulary) or move_vocabulary()
        self.failures = FailureLog.of(ctx.spec)  # the failed trials' tracebacks

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        try:
            # Set first (a retried trial inherits the killed attempt's system attrs, this one too),
            # unless the storage wrote it as the trial started (storage_for's `started`).
            if stored_trial(trial).system_attrs.get(WORKER_SYSATTR) != worker_id():
                set_trial_system_attr(trial, WORKER_SYSATTR, worker_id())
            move = trial.suggest_categorical(MOVE_PARAM, self.vocabulary)
            parent = trial.user_attrs.get(PARENT_ATTR)
            return self._run(trial, move, parent)
        except UpdateFinishedTrialError as e:  # a write refused: another worker failed the trial
            raise TrialLost(trial.number) from e
        except TrialLost:
            raise
        except JDSearchError as e:  # why it failed, where `optuna trials` and the dashboard show
            with contextlib.suppress(Exception):  # never hide the error behind a storage one
                trial.set_user_attr(FAIL_REASON_ATTR, str(e))
            self.failures.record(trial, e, worker_id())  # the traceback, in a file its line names
            raise

    def _run(
        self, trial: optuna.Trial, move: str, parent: int | None
    ) -> float | tuple[float, float]:
        # The attempt's training states: resumed from (a retry), saved, and removed at its end.
        states = TrialStates(self.ctx.store, trial, self.ctx.spec.search.trial_checkpoint_every)
        lost = False
        try:
            return self._attempt(trial, move, parent, states)
        except (TrialLost, UpdateFinishedTrialError):
            lost = True  # the retry of a lost trial resumes the state this attempt saved
            raise
        finally:
            if not lost:
                states.discard()

    def _attempt(
        self, trial: optuna.Trial, move: str, parent: int | None, states: TrialStates
    ) -> float | tuple[float, float]:
        oom: str | None = None
        try:
            pair, trained, score = self._evaluate(trial.study, trial.number, move, parent, states)
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            distributed.check_in_step(e)  # one rank short of memory alone: the worker stops
            oom = first_line(e, 300)  # leave the handler first: its traceback holds the tensors
        if oom is not None:
            free_memory()  # the failed step's frames went with its traceback, its tensors too
            raise TrialFailed(
                f"trial {trial.number} ({move} from {parent}): out of memory on "
                f"{self.ctx.spec.device} ({oom}); the trial fails, the worker goes on"
            )
        if lost_trial(trial, read=True):  # asked now: no upload for a trial that is not ours
            raise TrialLost(trial.number)
        self.record(trial, move, parent, pair, trained, score)
        log.info(
            "trial %d (%s from %s): H %.4f at %s",
            trial.number,
            move,
            parent,
            score.value,
            score.best_resolution,
        )
        return score.objectives(self.ctx.score, self.ctx.spec.score.metric)

    def _evaluate(
        self,
        study: optuna.Study,
        number: int,
        move: str,
        parent: int | None,
        states: TrialStates | None = None,
    ) -> tuple[_Pair, _Trained, _Score]:
        """Load, move, train and score trial ``number``'s pair (nothing is recorded yet). With
        ``states``, a retry trains with its first attempt's seed and resumes the state that
        attempt left, and the training saves its state through them."""
        seed = self.seed_of(number if states is None else states.first_number)
        # Under torchrun the other ranks train this pair too: tell them the sampler's decision.
        announce(TRIAL, number=number, move=move, parent=parent, seed=seed)
        with distributed.lockstep(f"trial {number}"):
            pair = self.load_together(study, number, move, parent, seed)
            trained = self.train_pair(pair, seed, states)
        return pair, trained, self.score(number, pair.student, study)

    def follow(
        self, study: optuna.Study, number: int, move: str, parent: int | None, seed: int
    ) -> None:
        """A rank other than 0 under ``torchrun``: load and train trial ``number``'s pair with
        rank 0 (which alone scores and records it); a failure is rank 0's to report."""
        try:
            with distributed.lockstep(f"trial {number}"):
                pair = self.load_together(study, number, move, parent, seed)
                every = self.ctx.spec.search.trial_checkpoint_every
                self.train_pair(pair, seed, FollowedStates(number, every))
        except JDSearchError as e:
            distributed.check_in_step(e)  # a failure rank 0 shared: it records it
            log.info("trial %d on this rank: %s", number, e)

    def load_together(
        self, study: optuna.Study, number: int, move: str, parent: int | None, seed: int
    ) -> _Pair:
        """:meth:`load_pair` on every rank of the worker: all go on to train, or none does."""
        if not distributed.is_distributed():
            return self.load_pair(study, number, move, parent, seed)
        try:
            pair = self.load_pair(study, number, move, parent, seed)
        except Exception:
            distributed.agree(False)
            distributed.settle()  # every rank raises here (the others a TrialFailed)
            raise
        if not distributed.agree(True):
            distributed.settle()
            raise TrialFailed(f"trial {number}: another rank of this worker could not load it")
        return pair

    def seed_of(self, number: int) -> int:
        """The training seed of trial ``number``: the study's seed and the trial number."""
        return self.ctx.spec.search.seed * 100003 + number

    def load_pair(
        self,
        study: optuna.Study,
        number: int,
        move: str,
        parent_no: int | None,
        seed: int | None = None,
    ) -> _Pair:
        """Trial ``number``'s pair: its parent's student and teacher (the base detector and the
        super-net for the root), with ``move`` applied to one of them. A ``pool.*`` move cuts the
        student from the pool instead, and ``finetune`` keeps the parent's pair as it is.
        ``seed`` (default :meth:`seed_of` ``number``) draws the batches that rank channels for a
        ``channel_prune`` by Taylor importance (``search.channel_importance``)."""
        ctx = self.ctx
        t0 = time.perf_counter()
        if move == BASE_MOVE:
            student = ctx.download(ctx.base_artifact, "base detector").detector
            teacher = ctx.kd.root_teacher(ctx.pool.space)
            return _Pair(student, teacher, {}, time.perf_counter() - t0)
        if parent_no is None:
            raise TrialFailed(f"trial {number}: move {move!r} without a parent")
        parent = TrialRecord.from_trial(_trial(study, int(parent_no)))
        teacher = ctx.kd.teacher_of(parent.teacher)
        subnet = SubnetConfig.parse(parent.student_subnet) if parent.student_subnet else None
        if move in pool_moves():
            subnet = self._pool_subnet(number, move, subnet)
            student = ctx.subnet(subnet)
            return _Pair(student, teacher, {}, time.perf_counter() - t0, subnet)
        if parent.checkpoint is None:
            raise TrialFailed(f"trial {number}: parent {parent_no} has no checkpoint")
        student = self._parent_student(study, number, int(parent_no), parent.checkpoint)
        if move == FINETUNE_MOVE:
            epochs, lr = _finetune_request(_trial(study, number))
            return _Pair(student, teacher, {}, time.perf_counter() - t0, subnet, (epochs, lr))
        morph: dict[str, int] = {}
        if move in SubnetSpace.move_names():
            teacher = self._moved_teacher(number, move, teacher)
        else:
            seed_ = self.seed_of(number) if seed is None else seed
            config = self._morph_config(student, move, seed_)
            parent_student = student
            student, report = evolve_with_report(student, move, config=config)
            morph = {"new_params": report.new_params, "inherited_params": report.inherited_params}
            morph.update(self._recover(student, parent_student, move, seed_))
            subnet = None  # an evolved pool student is no longer the pool's sub-network
        return _Pair(student, teacher, morph, time.perf_counter() - t0, subnet)

    def _recover(self, child: Detector, parent: Detector, move: str, seed: int) -> dict[str, int]:
        """The study's local recovery (``search.recovery_iters``) of ``child`` towards ``parent``
        after ``move``, where ``search.recovery_moves`` names it; what the trial records of it
        (its steps and the training images they read), or nothing."""
        spec = self.ctx.spec
        iters = spec.search.recovery_iters
        if not iters or Action.parse(move).kind not in spec.search.recovery_moves:
            return {}
        batch = spec.fast_eval.batch_size
        local_recovery(
            child,
            parent,
            self.ctx.train_set,
            iters=iters,
            batch_size=batch,
            resolutions=spec.resolutions,
            seed=seed,
        )
        return {"recovery_iters": iters, "recovery_images": iters * batch}

    def _morph_config(self, student: Detector, move: str, seed: int) -> MorphConfig:
        """The morph settings ``move`` runs with: the study's, and for a ``channel_prune`` of a
        study that ranks channels by Taylor importance, the parent's scores on a few batches."""
        ctx, spec = self.ctx, self.ctx.spec
        importance = spec.search.channel_importance
        if importance == "bn_scale" or Action.parse(move).kind != CHANNEL_PRUNE:
            return ctx.morph_config
        scores = taylor_scores(
            student,
            ctx.train_set,
            batch_size=spec.fast_eval.batch_size,
            resolutions=spec.resolutions,
            seed=seed,
        )
        costs = channel_costs(student) if importance == "taylor_flops" else None
        return dataclasses.replace(ctx.morph_config, channel_scores=scores, channel_costs=costs)

    def _parent_student(
        self, study: optuna.Study, number: int, parent_no: int, artifact_id: str
    ) -> Detector:
        """The parent's student from its checkpoint. An unreadable one (missing, failing its
        sha256, not a checkpoint) sets the parent aside for good (:func:`set_aside`) and fails
        this trial, naming the artifact."""
        try:
            return self.ctx.download(artifact_id, f"trial {parent_no}").detector
        except (CheckpointError, ArtifactNotFound) as e:
            if _short_of_memory(e) or (
                isinstance(e, ArtifactNotFound) and self._readable(artifact_id)
            ):
                raise  # this worker's trouble (memory, a store that blinked), not the checkpoint's
            reason = first_line(e, 300)
        if distributed.is_main():  # under torchrun, rank 0 alone writes to the study
            set_aside(study, parent_no, artifact_id, reason)
        raise TrialFailed(
            f"trial {number}: the checkpoint of its parent, trial {parent_no} (artifact "
            f"{artifact_id}), is unreadable ({reason}); trial {parent_no} is never a parent again"
        )

    def _readable(self, artifact_id: str) -> bool:
        """Whether the artifact opens now (a store that blinked says "not found" once)."""
        try:
            with self.ctx.store.open_reader(artifact_id):
                return True
        except (ArtifactNotFound, OSError):
            return False

    def _upload_student(
        self,
        trial: optuna.Trial,
        student: Detector,
        lineage: Mapping[str, Any],
        held: dict[str, Any],
    ) -> str:
        """Upload the trained student (the attributes naming it go to ``held``); a store that
        fails (I/O, a database down past the retry window) fails this trial only."""
        name = f"trial-{trial.number}.safetensors"
        try:
            return self.ctx.upload(trial, student, lineage, name, held)
        except (JDSearchError, UpdateFinishedTrialError):  # the second: the trial is lost
            raise
        except Exception as e:
            raise TrialFailed(
                f"trial {trial.number}: uploading its checkpoint failed "
                f"({type(e).__name__}: {first_line(e, 300)}); the trial fails, the worker goes on"
            ) from e

    def _moved_teacher(self, number: int, move: str, teacher: SubnetConfig | None) -> SubnetConfig:
        if teacher is None:
            raise TrialFailed(f"trial {number}: teacher move {move} with kd.mode off")
        moved = self.ctx.pool.space.apply_move(teacher, move)
        if moved is None:
            raise TrialFailed(
                f"trial {number}: teacher move {move} leaves the pool's space from {teacher}"
            )
        return moved

    def _pool_subnet(self, number: int, move: str, subnet: SubnetConfig | None) -> SubnetConfig:
        """The sub-network a ``pool.*`` move gives from the parent's (``None``: not a pool
        student)."""
        if move == POOL_START:
            return self.ctx.pool_start()
        if subnet is None:
            raise TrialFailed(
                f"trial {number}: {move} from a student that is not cut from the pool"
            )
        moved = self.ctx.pool.space.apply_move(subnet, _as_teacher_move(move))
        if moved is None:
            raise TrialFailed(f"trial {number}: {move} leaves the pool's space from {subnet}")
        return moved

    def train_pair(
        self, pair: _Pair, seed: int, states: TrialStates | FollowedStates | None = None
    ) -> _Trained:
        """Extract the teacher from the pool and train the student with it (the fast evaluation:
        KD, BN sparsity, dynamic resolution), seeded by ``seed`` (:meth:`seed_of` in a search).
        ``states``: resume the state a killed attempt saved, and save this one's."""
        ctx, spec = self.ctx, self.ctx.spec
        if pair.morph.get("recovery_iters") and spec.search.after_recovery == "score":
            return _Trained(0, 0.0, 0.0, 0)  # the local recovery was its training
        terms: list[Any] = []
        teacher_params, teacher_s = 0, 0.0
        if pair.teacher is not None:
            t1 = time.perf_counter()
            teacher = ctx.subnet(pair.teacher)
            teacher_s = time.perf_counter() - t1
            teacher_params = sum(p.numel() for p in teacher.backbone.body.parameters())
            terms.append(make_distiller(pair.student, teacher, spec.kd, seed=seed))
        config = spec.train_config(spec.fast_eval, seed)
        if pair.finetune is not None:  # the structure is final: no BN sparsity, the asked epochs
            epochs, lr = pair.finetune
            config = dataclasses.replace(config, epochs=epochs, lr=config.lr if lr is None else lr)
        elif spec.search.bn_sparsity > 0:
            terms.append(BNSparsity(spec.search.bn_sparsity))
        if states is None:
            result = train(
                pair.student, ctx.train_set, config, loss_terms=terms, progress=ctx.progress
            )
        else:
            result = self._train_resumable(pair, config, terms, states)
        stop_recording(pair.student)
        return _Trained(teacher_params, teacher_s, result.seconds, result.images)

    def _train_resumable(
        self,
        pair: _Pair,
        config: TrainConfig,
        terms: list[Any],
        states: TrialStates | FollowedStates,
    ) -> TrainResult:
        """Train, resuming the state ``states`` inherited when there is one that fits (else from
        the start), saving this attempt's every ``search.trial_checkpoint_every`` iterations."""
        ctx = self.ctx

        def run(resume: TrainState | None) -> Any:
            return train(
                pair.student,
                ctx.train_set,
                config,
                loss_terms=terms,
                progress=ctx.progress,
                callback=_StopWhenLost(states.number, states.lost),
                resume=resume,
                state_hook=states.hook,
            )

        # Every rank resumes the state rank 0 found (the others have none of their own).
        resume: TrainState | None = distributed.broadcast_object(states.load())
        states.resumed(0 if resume is None else resume.iteration)
        if resume is not None:
            log.info("resuming the training at iteration %d", resume.iteration)
            modules = [pair.student, *terms]
            before = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]
            try:
                return run(resume)
            except CheckpointError as e:  # refused before any step
                log.warning("the saved training state does not fit (%s): starting over", e)
                for module, state in zip(modules, before, strict=True):
                    module.load_state_dict(state)  # a refusal may come after the weights loaded
                states.resumed(0)
        return run(None)

    def score(self, number: int, student: Detector, study: optuna.Study | None = None) -> _Score:
        """AP at every resolution of the study, FLOPs, the cost (``score.cost``) and H (the best
        over resolutions). ``study``: its trials' recorded latencies serve as a cache."""
        ctx, spec = self.ctx, self.ctx.spec
        t2 = time.perf_counter()
        metrics = evaluate(student, ctx.val_set, spec.resolutions, device=spec.device)
        eval_s = time.perf_counter() - t2
        flops = ctx.flops(student, ctx.base_resolution.hw)
        # What the student costs at each size it was evaluated at (the AP–FLOPs front, table 4).
        flops_at = {key: ctx.flops(student, Resolution.parse(key).hw).total for key in metrics}
        latency = spec.score.cost == "latency" and study is not None
        known = study.get_trials(deepcopy=False) if latency else ()  # its timings: a cache
        ratios, latency = ctx.cost_meter().ratios(
            student, list(metrics), flops=flops.total, params=flops.params, known=known
        )
        s, base_res = spec.score, ctx.base_resolution
        h, cost = {}, {}
        for key, m in metrics.items():
            # C/C_base over 1.0: for flops the very float division H always did (flops / C_base)
            ap, res = getattr(m, s.metric), Resolution.parse(key)
            h[key] = score_h(ap, ratios[key], 1.0, res, base_res, s.alpha, s.beta)
            cost[key] = weighted_cost(ratios[key], res, base_res, s.beta)
        best = max(h, key=lambda k: h[k])
        if not math.isfinite(h[best]) or not math.isfinite(cost[best]):
            raise TrialFailed(f"trial {number}: score is not finite ({h[best]}, cost {cost[best]})")
        key = arch_key(student)
        return _Score(metrics, flops, flops_at, h, best, eval_s, cost, latency, key)

    def record(
        self,
        trial: optuna.Trial,
        move: str,
        parent: int | None,
        pair: _Pair,
        trained: _Trained,
        score: _Score,
    ) -> TrialRecord:
        """Upload the trained student and write the trial's :class:`TrialRecord`."""
        ctx, spec, student = self.ctx, self.ctx.spec, pair.student
        t3 = time.perf_counter()
        lineage = {
            "trial": trial.number,
            "parent": parent,
            "move": move,
            "teacher": "" if pair.teacher is None else str(pair.teacher),
        }
        held: dict[str, Any] = {}  # the attribute naming the checkpoint: written with the record
        artifact_id = self._upload_student(trial, student, lineage, held)
        upload_s = time.perf_counter() - t3
        timings = {
            "train_s": trained.train_s,
            "eval_s": score.eval_s,
            "teacher_s": trained.teacher_s,
            "load_s": pair.load_s,
            "upload_s": upload_s,
        }
        record = TrialRecord(
            student=student.arch.encode(),
            teacher="" if pair.teacher is None else str(pair.teacher),
            student_subnet="" if pair.subnet is None else str(pair.subnet),
            checkpoint=artifact_id,
            teacher_params=trained.teacher_params,
            flops=score.flops.total,
            flops_at=score.flops_at,
            backbone_flops=score.flops.backbone,
            stage_flops=tuple(score.flops.per_stage),
            params=score.flops.params,
            metrics={k: _metrics_dict(m) for k, m in score.metrics.items()},
            ap={k: getattr(m, spec.score.metric) for k, m in score.metrics.items()},
            h=score.h,
            h_value=score.value,
            cost=score.cost,
            latency=score.latency,
            arch_key=score.arch_key,
            best_resolution=score.best_resolution,
            morph=pair.morph,
            train_images=trained.images,
            timings={k: round(v, 3) for k, v in timings.items()},
            arch=student.arch.to_dict(),
            student_moves=tuple(feasible_actions(student, config=ctx.morph_config)),
        )
        user, system = record.to_attrs()  # system ones: machine-facing, hidden from `optuna trials`
        write_record(trial, user, system, held)
        return record


def write_record(
    trial: optuna.Trial, user: dict[str, Any], system: dict[str, Any], held: dict[str, Any]
) -> None:
    """A trial's record (``user`` and ``system`` attributes) and the attributes ``held`` that
    name its uploaded checkpoint, in one transaction. Where that fails, the checkpoint is still
    named, alone if the trial takes it (``jdsearch gc`` removes a failed trial's checkpoint but
    never an unnamed one in a shared ``file:`` store), and the error goes on."""
    try:
        set_trial_attrs(trial, user, {**held, **system})
    except Exception:
        with contextlib.suppress(Exception):  # a lost trial or a database still down refuses it
            set_trial_attrs(trial, {}, held)
        raise


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocator's out-of-memory error (CUDA, MPS or the CPU's)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "out of memory" in text.lower() or "DefaultCPUAllocator: can't allocate memory" in text
    )


def _short_of_memory(e: BaseException) -> bool:
    """Whether ``e`` or what caused it is a failed allocation (the reader's, not the file's)."""
    while e is not None:
        if isinstance(e, MemoryError) or is_out_of_memory(e):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


def free_memory() -> None:
    """Give back what a failed trial held: Python's cycles, then the accelerator's cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def set_aside(study: optuna.Study, number: int, artifact_id: str, reason: str) -> None:
    """Record that trial ``number``'s checkpoint is unreadable: the sampler never picks it as a
    parent again (one study system attr per trial, so concurrent workers never race)."""
    log.warning("trial %d's checkpoint %s is unreadable: %s", number, artifact_id, reason)
    value = {"artifact": artifact_id, "reason": reason, "worker": worker_id()}
    set_study_system_attr(study, f"{SET_ASIDE_PREFIX}{number}", value)


def _finetune_request(trial: FrozenTrial) -> tuple[float, float | None]:
    """``(epochs, lr)`` a fine-tuning trial was enqueued with (:mod:`jdsearch.search.finetune`)."""
    epochs_key, lr_key, _ = FINETUNE_ATTRS
    epochs = trial.user_attrs.get(epochs_key)
    if not isinstance(epochs, int | float) or not epochs > 0:
        raise TrialFailed(f"trial {trial.number}: a finetune trial without its epochs ({epochs!r})")
    lr = trial.user_attrs.get(lr_key)
    return float(epochs), None if lr is None else float(lr)


def _metrics_dict(m: CocoMetrics) -> dict[str, float | None]:
    return {
        k: (None if isinstance(v, float) and math.isnan(v) else round(float(v), 5))
        for k, v in m.to_dict().items()
        if k in ("AP", "AP50", "AP75", "APs", "APm", "APl")
    }
