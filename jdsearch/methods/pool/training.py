"""Training the pool (:func:`train_pool`): integrated progressive shrinking (IPS, paper 4).

**Training** (:func:`train_pool`, integrated progressive shrinking, IPS): phase 0 trains the
super-net alone with the plain detection loss; each later phase first re-orders channels by
importance (function-preserving, :func:`jdsearch.methods.pool.elastic.reorder_channels`), then samples one
sub-network of that phase's space per iteration — smaller depths *and* widths together, unlike
once-for-all's sequential progressive shrinking — and trains it with the detection loss plus
distillation from a frozen copy of the phase-0 super-net (:func:`jdsearch.methods.distill.make_distiller`).
Dynamic resolution throughout. Every phase is one :func:`jdsearch.engine.train.train` run: the next
sub-network is activated by the step callback, which runs after each optimizer step.

**Resuming inside a phase** (:func:`resume_pool`): every ``PhaseStates.every`` iterations the
phase's training state (:class:`~jdsearch.store.trainstate.TrainState`, with the sub-network
schedule's generator, counts and active sub-network) replaces one local file; a later run that
starts from the pool as that phase began (the pool file saved after the previous phase) rebuilds
the phase's teacher and channel order as before, then continues at the saved iteration — with
the weights an uninterrupted phase would have.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from jdsearch.core.errors import CheckpointError, SpecError
from jdsearch.core.files import read_bytes
from jdsearch.core.limits import MAX_CHECKPOINT_BYTES
from jdsearch.engine.train import StateHook, StepInfo, TrainResult, train
from jdsearch.methods.distill import make_distiller
from jdsearch.methods.pool.bn import recalibrate_bn
from jdsearch.methods.pool.elastic import ElasticConv2d, reorder_channels
from jdsearch.methods.pool.record import PhaseRecord
from jdsearch.methods.pool.supernet import ElasticPool
from jdsearch.models.heads import stop_recording
from jdsearch.spec.pool import PhaseSpec, PoolSpec
from jdsearch.spec.pool_space import SubnetConfig, SubnetSpace
from jdsearch.store.trainstate import TrainState, trainstate_from_bytes, trainstate_to_bytes

__all__ = ["PHASE_CHECKPOINT_EVERY", "PhaseStates", "resume_pool", "train_pool"]

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

    def state_dict(self) -> dict[str, Any]:
        """JSON form: the generator's state, the counts and the active sub-network."""
        return {
            "rng": self.rng.bit_generator.state,
            "sampled": {str(cfg): n for cfg, n in self.sampled.items()},
            "active": str(self.pool.active),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a :meth:`state_dict`: the same draws follow, the same sub-network is active."""
        try:
            self.rng.bit_generator.state = state["rng"]
            self.sampled = Counter(
                {SubnetConfig.parse(k): int(n) for k, n in state["sampled"].items()}
            )
            self.pool.activate(SubnetConfig.parse(state["active"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"pool phase state: bad sub-network schedule ({e})") from None


#: Iterations between two saves of a pool phase's training state (``train_and_save_pool``): at
#: the paper's scale a save every few minutes; the quickstart's phases are shorter and never save.
PHASE_CHECKPOINT_EVERY = 1000


class PhaseStates:
    """The resumable state of the pool phase in progress, in one local file (``path``; the latest
    state only), saved every ``every`` iterations of a phase (0: never). ``key``: the hash of
    what makes the pool's training (its spec, its start, its data; ``cache_key``), saved with the
    state; a state saved under another key is discarded. ``readonly``: only read (a rank other
    than 0 under ``torchrun`` resumes what rank 0 saved, and writes nothing)."""

    def __init__(
        self, path: str | Path, every: int, *, key: str | None = None, readonly: bool = False
    ) -> None:
        self.path, self.every, self.key, self.readonly = Path(path), int(every), key, readonly

    def load(self, phase: int) -> TrainState | None:
        """The state saved inside phase ``phase``; ``None`` if there is none, it belongs to another
        phase, or it cannot be read or was saved under another key (then with a warning, and the
        file is removed: the phase starts over)."""
        if not self.path.is_file():
            return None
        try:
            data = read_bytes(self.path, MAX_CHECKPOINT_BYTES)
            state = trainstate_from_bytes(data, source=str(self.path))
        except (OSError, CheckpointError) as e:
            logger.warning("%s: unreadable, phase %d starts over (%s)", self.path, phase, e)
            return None
        saved = state.meta.get("pool")
        if not isinstance(saved, dict):
            return None
        if saved.get("key") != self.key:
            was = "without a key" if saved.get("key") is None else f"under key {saved['key']}"
            logger.warning(
                "%s: saved %s, not this pool's %s (its spec, start or data changed): "
                "discarded, phase %d starts over",
                self.path,
                was,
                self.key,
                phase,
            )
            self.clear()
            return None
        return state if saved.get("phase") == phase else None

    def save(self, phase: int, state: TrainState, schedule: dict[str, Any]) -> None:
        """Replace the file with ``state`` of phase ``phase`` (atomically)."""
        if self.readonly:
            return
        pool = {"phase": phase, "schedule": schedule, "key": self.key}
        meta = {**state.meta, "pool": pool}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(trainstate_to_bytes(TrainState(state.iteration, state.tensors, meta)))
        os.replace(tmp, self.path)
        logger.info("pool phase %d: state saved at iteration %d", phase, state.iteration)

    def clear(self) -> None:
        """Remove the file (the phases it served are done)."""
        if self.readonly:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


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
    spec, dev = _check(pool, pool_spec, device)
    run = _PhaseRun(pool, dataset, spec, dev, progress, max_iters, callback)
    return run.phases(phases)


def resume_pool(
    pool: ElasticPool,
    dataset: Dataset[Any],
    states: PhaseStates,
    pool_spec: PoolSpec | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
    phases: Sequence[int] | None = None,
    max_iters: int | None = None,
) -> tuple[PhaseRecord, ...]:
    """:func:`train_pool` that also saves each phase's training state to ``states`` every
    ``states.every`` iterations, and continues a phase from the state saved there (``pool`` must
    then be the pool as that phase began: the file saved after the phase before)."""
    spec, dev = _check(pool, pool_spec, device)
    run = _PhaseRun(pool, dataset, spec, dev, progress, max_iters, None, states)
    return run.phases(phases)


def _check(
    pool: ElasticPool, pool_spec: PoolSpec | None, device: str | torch.device
) -> tuple[PoolSpec, torch.device]:
    spec = pool_spec or pool.spec
    if not spec.same_architecture(pool.spec):
        raise SpecError(
            f"train_pool: the pool spec describes another super-net or space than pool {pool.name}"
        )
    dev = torch.device(device)
    pool.to(dev)
    return spec, dev


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
    states: PhaseStates | None = None

    def phases(self, phases: Sequence[int] | None) -> tuple[PhaseRecord, ...]:
        """Train ``phases`` (default: those not in the pool's record), appending their records."""
        todo = (
            list(range(len(self.pool.record), len(self.spec.phases)))
            if phases is None
            else list(phases)
        )
        for i in todo:
            if not 0 <= i < len(self.spec.phases):
                raise SpecError(f"train_pool: no phase {i} (the spec has {len(self.spec.phases)})")
        records = []
        for i in todo:
            record = self.phase(i)
            records.append(record)
            self.pool.record = (*self.pool.record, record)
            if self.states is not None:  # its state is spent (the phase is in the record now)
                self.states.clear()
        return tuple(records)

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
        resume = None if self.states is None else self.states.load(i)
        if resume is None:
            schedule.next()
        else:
            logger.info("IPS phase %d: resuming at iteration %d", i, resume.iteration)
            schedule.load_state_dict(resume.meta["pool"]["schedule"])

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
                resume=resume,
                state_hook=self.hook(i, schedule),
            )
        finally:
            stop_recording(pool.supernet)
            pool.activate(pool.largest)
        return _record(i, phase, result, len(schedule.sampled), reordered)

    def hook(self, i: int, schedule: _SubnetSchedule) -> StateHook | None:
        """Phase ``i``'s state saver (with the schedule's state); ``None`` without states. Read-only
        states (a rank other than 0) get one too, which saves nothing: under ``torchrun`` every
        rank gives its own generators to the state rank 0 saves."""
        states = self.states
        if states is None or states.every <= 0:
            return None
        return StateHook(states.every, lambda st: states.save(i, st, schedule.state_dict()))

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
