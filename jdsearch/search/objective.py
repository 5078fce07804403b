"""One Optuna trial = one iteration of algorithm 1: load the parent, move, train, evaluate, score.

The study's storage holds everything a worker needs: the spec (study user attrs), the base
detector and the teacher pool (study-level artifacts), and every trial's student checkpoint
(trial-level artifacts, in the same database by default). A worker anywhere that reaches the
storage URL can add trials to the lineage or resume it.

Score (paper 3.1.4): ``H(S, R) = mAP(S, R) × [(C(S)/C_base) · (R/R_base)^β]^−α`` with C the
student's multiply-adds counted at the base resolution (the architecture's complexity) and R the
resolution's pixel count (long × short side), so that the resolution's share of the complexity is
weighted by β. A trial's value is the best H over the study's resolutions.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import upload_artifact
from optuna.trial import FrozenTrial

from jdsearch.data import CocoDataset
from jdsearch.distill import make_distiller
from jdsearch.errors import JDSearchError
from jdsearch.evaluate import CocoMetrics, evaluate
from jdsearch.flops import count_flops
from jdsearch.models import Detector
from jdsearch.models.heads import stop_recording
from jdsearch.morph.actions import MorphConfig, all_actions, evolve_with_report, feasible_actions
from jdsearch.morph.pruning import BNSparsity
from jdsearch.pool import ElasticPool, SubnetConfig, SubnetSpace
from jdsearch.resolution import Resolution
from jdsearch.search.sampler import BASE_MOVE, MOVE_PARAM, PARENT_ATTR
from jdsearch.store.checkpoint import Checkpoint, checkpoint_from_bytes, checkpoint_to_bytes
from jdsearch.study import StudySpec
from jdsearch.train import train

log = logging.getLogger(__name__)

# User attributes of a trial (what `optuna trials` and the dashboard show).
CHECKPOINT_ATTR = "checkpoint"  # artifact id of the trial's student checkpoint
STUDENT_ATTR = "student"  # appendix-B encoding
TEACHER_ATTR = "teacher"  # SubnetConfig string
# System attributes (internal state, hidden from `optuna trials`).
ARCH_SYSATTR = "jdsearch:student_arch"  # BackboneArch.to_dict() of the trial's student
STUDENT_MOVES_SYSATTR = "jdsearch:student_moves"  # feasible student actions from this student
WORKER_SYSATTR = (
    "jdsearch:worker"  # "hostname:pid" of the worker that ran (the last attempt of) a trial
)


def worker_id() -> str:
    """This process as a worker: ``hostname:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def move_vocabulary() -> list[str]:
    """The fixed choices of the ``move`` parameter: base, student actions, teacher mutations."""
    return [BASE_MOVE, *all_actions(), *SubnetSpace.move_names()]


def score_h(
    ap: float,
    flops: float,
    flops_base: float,
    res: Resolution,
    res_base: Resolution,
    alpha: float,
    beta: float,
) -> float:
    """The paper's H(S, R) for one resolution."""
    ratio = (flops / flops_base) * (res.pixels / res_base.pixels) ** beta
    return ap * ratio ** (-alpha)


@dataclass
class SearchContext:
    """What every trial of a study shares (built once per worker by :mod:`jdsearch.search`)."""

    spec: StudySpec
    store: Any  # optuna ArtifactStore
    train_set: CocoDataset
    val_set: CocoDataset
    pool: ElasticPool
    base_artifact: str  # artifact id of the base detector's checkpoint
    base_resolution: Resolution
    base_flops: int
    progress: bool = False

    @property
    def morph_config(self) -> MorphConfig:
        return MorphConfig(channel_fraction=self.spec.search.channel_fraction)

    # ------------------------------------------------------------------ artifacts
    def download(self, artifact_id: str, source: str) -> Checkpoint:
        with self.store.open_reader(artifact_id) as reader:
            data = reader.read()
        return checkpoint_from_bytes(data, source=source, device=self.spec.device)

    def upload(
        self,
        trial: optuna.Trial | optuna.Study,
        detector: Detector,
        extra: Mapping[str, Any],
        name: str,
    ) -> str:
        data = checkpoint_to_bytes(
            detector, class_names=self.train_set.class_names, extra=dict(extra), source=name
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            return upload_artifact(
                study_or_trial=trial, file_path=str(path), artifact_store=self.store
            )

    # ------------------------------------------------------------------ sampler support
    def feasible(self, parent: FrozenTrial) -> tuple[list[str], list[str]]:
        """Student actions (recorded by the parent's trial) and teacher mutations of a parent."""
        students = list(parent.system_attrs.get(STUDENT_MOVES_SYSATTR, []))
        teacher = SubnetConfig.parse(parent.user_attrs[TEACHER_ATTR])
        teachers = sorted(self.pool.space.neighbours(teacher))
        return students, teachers


class TrialFailed(JDSearchError):
    """A trial could not be evaluated (its parent's checkpoint is missing, a move is invalid…)."""


def _parent(study: optuna.Study, number: int) -> FrozenTrial:
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            return t
    raise TrialFailed(f"parent trial {number} does not exist in study {study.study_name!r}")


class Objective:
    """Callable for ``study.optimize``: one evolve–train–evaluate step."""

    def __init__(self, ctx: SearchContext) -> None:
        self.ctx = ctx
        self.vocabulary = move_vocabulary()

    def __call__(self, trial: optuna.Trial) -> float:
        ctx, spec = self.ctx, self.ctx.spec
        # Set first (a retried trial inherits the killed attempt's system attrs, this one included).
        trial.storage.set_trial_system_attr(trial._trial_id, WORKER_SYSATTR, worker_id())
        move = trial.suggest_categorical(MOVE_PARAM, self.vocabulary)
        parent_no = trial.user_attrs.get(PARENT_ATTR)
        t0 = time.perf_counter()
        morph: dict[str, Any] = {}
        if move == BASE_MOVE:
            student = ctx.download(ctx.base_artifact, "base detector").detector
            teacher_cfg = ctx.pool.space.largest()
        else:
            if parent_no is None:
                raise TrialFailed(f"trial {trial.number}: move {move!r} without a parent")
            parent = _parent(trial.study, int(parent_no))
            if CHECKPOINT_ATTR not in parent.user_attrs:
                raise TrialFailed(f"trial {trial.number}: parent {parent_no} has no checkpoint")
            student = ctx.download(
                parent.user_attrs[CHECKPOINT_ATTR], f"trial {parent_no}"
            ).detector
            teacher_cfg = SubnetConfig.parse(parent.user_attrs[TEACHER_ATTR])
            if move in SubnetSpace.move_names():
                new_cfg = ctx.pool.space.apply_move(teacher_cfg, move)
                if new_cfg is None:
                    raise TrialFailed(
                        f"trial {trial.number}: teacher move {move} leaves the pool's space from {teacher_cfg}"
                    )
                teacher_cfg = new_cfg
            else:
                student, report = evolve_with_report(student, move, config=ctx.morph_config)
                morph = {
                    "new_params": report.new_params,
                    "inherited_params": report.inherited_params,
                }
        load_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        teacher = ctx.pool.teacher(teacher_cfg, ctx.train_set, device=spec.device)
        teacher_s = time.perf_counter() - t1
        teacher_params = sum(p.numel() for p in teacher.backbone.body.parameters())
        seed = spec.search.seed * 100003 + trial.number
        terms = [make_distiller(student, teacher, spec.kd, seed=seed)]
        if spec.search.bn_sparsity > 0:
            terms.append(BNSparsity(spec.search.bn_sparsity))
        config = spec.train_config(spec.fast_eval, seed)
        result = train(student, ctx.train_set, config, loss_terms=terms, progress=ctx.progress)
        stop_recording(student)
        del terms, teacher

        t2 = time.perf_counter()
        metrics = evaluate(student, ctx.val_set, spec.resolutions, device=spec.device)
        eval_s = time.perf_counter() - t2
        flops = count_flops(student, size=ctx.base_resolution.hw)
        # What the student costs at each size it was evaluated at (the AP–FLOPs front, table 4).
        flops_at = {
            key: count_flops(student, size=Resolution.parse(key).hw).total for key in metrics
        }
        h = {
            key: score_h(
                getattr(m, spec.score.metric),
                flops.total,
                ctx.base_flops,
                Resolution.parse(key),
                ctx.base_resolution,
                spec.score.alpha,
                spec.score.beta,
            )
            for key, m in metrics.items()
        }
        best_res = max(h, key=lambda k: h[k])
        value = h[best_res]
        if not math.isfinite(value):
            raise TrialFailed(f"trial {trial.number}: score is not finite ({value})")

        t3 = time.perf_counter()
        lineage_extra = {
            "trial": trial.number,
            "parent": parent_no,
            "move": move,
            "teacher": str(teacher_cfg),
        }
        artifact_id = ctx.upload(trial, student, lineage_extra, f"trial-{trial.number}.safetensors")
        upload_s = time.perf_counter() - t3
        attrs = {
            CHECKPOINT_ATTR: artifact_id,
            STUDENT_ATTR: student.arch.encode(),
            TEACHER_ATTR: str(teacher_cfg),
            "teacher_params": teacher_params,  # the teacher's backbone parameters (paper fig. 5)
            "flops": flops.total,  # at the base resolution: C(S) of the score H
            "flops_at": flops_at,
            "backbone_flops": flops.backbone,
            "stage_flops": list(flops.per_stage),
            "params": flops.params,
            "metrics": {k: _metrics_dict(m) for k, m in metrics.items()},
            "ap": {k: getattr(m, spec.score.metric) for k, m in metrics.items()},
            "h": h,
            "best_resolution": best_res,
            "morph": morph,
            "train_s": round(result.seconds, 3),
            "eval_s": round(eval_s, 3),
            "teacher_s": round(teacher_s, 3),
            "load_s": round(load_s, 3),
            "upload_s": round(upload_s, 3),
        }
        for key, value_ in attrs.items():
            trial.set_user_attr(key, value_)
        # Machine-facing state stays out of the user attrs that `optuna trials` prints.
        internal = {
            ARCH_SYSATTR: student.arch.to_dict(),
            STUDENT_MOVES_SYSATTR: feasible_actions(student, config=ctx.morph_config),
        }
        for key, value_ in internal.items():
            trial.storage.set_trial_system_attr(trial._trial_id, key, value_)
        log.info(
            "trial %d (%s from %s): H %.4f at %s", trial.number, move, parent_no, value, best_res
        )
        return value


def _metrics_dict(m: CocoMetrics) -> dict[str, float | None]:
    return {
        k: (None if isinstance(v, float) and math.isnan(v) else round(float(v), 5))
        for k, v in m.to_dict().items()
        if k in ("AP", "AP50", "AP75", "APs", "APm", "APl")
    }
