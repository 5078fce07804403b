"""Training the pool (:func:`train_pool`): integrated progressive shrinking (IPS, paper 4).

**Training** (:func:`train_pool`, integrated progressive shrinking, IPS): phase 0 trains the
super-net alone with the plain detection loss; each later phase first re-orders channels by
importance (function-preserving, :func:`jdsearch.pool.elastic.reorder_channels`), then samples one
sub-network of that phase's space per iteration — smaller depths *and* widths together, unlike
once-for-all's sequential progressive shrinking — and trains it with the detection loss plus
distillation from a frozen copy of the phase-0 super-net (:func:`jdsearch.distill.make_distiller`).
Dynamic resolution throughout. Every phase is one :func:`jdsearch.train.train` run: the next
sub-network is activated by the step callback, which runs after each optimizer step.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from jdsearch.distill import make_distiller
from jdsearch.errors import SpecError
from jdsearch.models.heads import stop_recording
from jdsearch.pool.bn import recalibrate_bn
from jdsearch.pool.elastic import ElasticConv2d, reorder_channels
from jdsearch.pool.record import PhaseRecord
from jdsearch.pool.space import SubnetConfig, SubnetSpace
from jdsearch.pool.spec import PhaseSpec, PoolSpec
from jdsearch.pool.supernet import ElasticPool
from jdsearch.train import StepInfo, TrainResult, train

__all__ = ["train_pool"]

logger = logging.getLogger(__name__)


class _SubnetSchedule:
    """Samples and activates one sub-network per training step of a phase (the first with
    :meth:`next` before training, each later one after the previous step)."""

    def __init__(self, pool: ElasticPool, space: SubnetSpace, rng: np.random.Generator) -> None:
        self.pool, self.space, self.rng = pool, space, rng
        self.sampled: Counter[SubnetConfig] = Counter()

    def next(self) -> None:
        cfg = self.space.sample(self.rng)
        self.pool.activate(cfg)
        self.sampled[cfg] += 1

    def after_step(self, info: StepInfo) -> None:
        if info.iteration < info.total_iters:
            self.next()


def train_pool(
    pool: ElasticPool,
    dataset: Dataset[Any],
    pool_spec: PoolSpec | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
    phases: Sequence[int] | None = None,
    max_iters: int | None = None,
    callback: Callable[[int, StepInfo], None] | None = None,
) -> tuple[PhaseRecord, ...]:
    """Train ``pool`` with integrated progressive shrinking; returns the new phase records.

    ``pool_spec`` (default ``pool.spec``) gives the schedule; it must describe the pool's
    architecture. ``phases`` (0-based indices) defaults to the phases not yet in
    ``pool.record``, so a stopped run resumes where it stopped. ``max_iters`` caps every phase
    (tests, smoke runs). ``callback(phase, StepInfo)`` runs after every step. Records are also
    appended to ``pool.record``.

    Phase 0 trains the largest sub-network with the detection loss. A later phase re-orders
    channels by importance (if ``train.reorder``), then every iteration trains one sub-network
    sampled uniformly from the phase's space, with KD from a frozen copy of the super-net taken
    as the phase starts (BN-recalibrated from phase 2 on, since the super-net's statistics are by
    then a mixture) — so running the phases in one call or one call per phase is the same. The
    distiller's adapter is made elastic, so it reads whatever FPN width the sampled student has.
    """
    spec = pool_spec or pool.spec
    if not spec.same_architecture(pool.spec):
        raise SpecError(
            f"train_pool: the pool spec describes another super-net or space than pool {pool.name}"
        )
    todo = list(range(len(pool.record), len(spec.phases))) if phases is None else list(phases)
    for i in todo:
        if not 0 <= i < len(spec.phases):
            raise SpecError(f"train_pool: no phase {i} (the spec has {len(spec.phases)})")
    dev = torch.device(device)
    pool.to(dev)
    run = _PhaseRun(pool, dataset, spec, dev, progress, max_iters, callback)
    records = []
    for i in todo:
        record = run.phase(i)
        records.append(record)
        pool.record = (*pool.record, record)
    return tuple(records)


@dataclass
class _PhaseRun:
    """What every IPS phase of one :func:`train_pool` call shares."""

    pool: ElasticPool
    dataset: Dataset[Any]
    spec: PoolSpec
    device: torch.device
    progress: bool
    max_iters: int | None
    callback: Callable[[int, StepInfo], None] | None

    def phase(self, i: int) -> PhaseRecord:
        """Train phase ``i``: its loss terms, one sub-network per step, then its record."""
        pool, spec, phase = self.pool, self.spec, self.spec.phases[i]
        terms, reordered = self.terms(i)
        config = spec.phase_config(
            i, max_iters=self.max_iters, device=str(self.device), resolutions=pool.resolutions
        )
        rng = np.random.default_rng([spec.train.seed, 0x1B5, i])
        schedule = _SubnetSchedule(pool, phase.space, rng)
        logger.info(
            "IPS phase %d (%s): %s, %g epochs, lr %g",
            i,
            phase.name,
            phase.space.describe(),
            phase.epochs,
            phase.lr,
        )
        schedule.next()

        def step(info: StepInfo) -> None:
            schedule.after_step(info)
            if self.callback is not None:
                self.callback(i, info)

        try:
            result = train(
                pool.supernet,
                self.dataset,
                config,
                loss_terms=terms,
                progress=self.progress,
                callback=step,
            )
        finally:
            stop_recording(pool.supernet)
            pool.activate(pool.largest)
        return _record(i, phase, result, len(schedule.sampled), reordered)

    def terms(self, i: int) -> tuple[list[nn.Module], bool]:
        """Phase ``i``'s loss terms (none for the super-net phase; KD from a frozen copy of the
        super-net after it), and whether the channels were re-ordered first."""
        if i == 0:
            return [], False
        pool, spec, dev = self.pool, self.spec, self.device
        # The teacher: a frozen copy of the super-net as this phase starts. After phase 1 its
        # BN statistics mix every sampled sub-network's, so they are re-estimated.
        teacher = pool.extract(pool.largest, device=dev)
        if i > 1:
            recalibrate_bn(
                teacher,
                self.dataset,
                batches=spec.recalibration_batches,
                device=dev,
                batch_size=spec.train.batch_size,
                resolutions=pool.resolutions,
                seed=spec.train.seed,
            )
        if spec.reorder:
            reorder_channels(pool.supernet)
        distiller = make_distiller(pool.supernet, teacher, spec.kd)
        distiller.adapter = ElasticConv2d.from_module(distiller.adapter)
        return [distiller], spec.reorder


def _record(
    i: int, phase: PhaseSpec, result: TrainResult, sampled: int, reordered: bool
) -> PhaseRecord:
    record = PhaseRecord(
        phase=i,
        name=phase.name,
        space=phase.space.describe(),
        epochs=phase.epochs,
        lr=phase.lr,
        iterations=result.iterations,
        seconds=result.seconds,
        images_per_s=result.images_per_s,
        final_losses=dict(result.final_losses),
        loss_history=tuple(result.loss_history),
        history_stride=result.history_stride,
        subnets_sampled=sampled,
        reordered=reordered,
    )
    logger.info(
        "IPS phase %d done: %d iterations, %d sub-networks, %.0fs, losses %s",
        i,
        record.iterations,
        record.subnets_sampled,
        record.seconds,
        record.final_losses,
    )
    return record
