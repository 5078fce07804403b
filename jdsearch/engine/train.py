"""The training loop: SGD + warm-up + cosine/step schedule, dynamic resolution, pluggable losses.

One loop serves every training in jdsearch — base detectors, the fast evaluation of a searched
student (paper A.1.4: 3 epochs, cosine schedule, lr 0.01, batch 4) and the teacher pool. Extra
objectives (the BN-sparsity penalty of pruning, knowledge distillation) plug in as *loss terms*,
see :func:`train`.

Dynamic resolution (paper 3.1.2, A.1.3): with ``TrainConfig.resolutions`` set, one resolution is
drawn per iteration by a seeded :class:`~jdsearch.data.coco.ResolutionSampler` and applied to the
detector's transform with :func:`~jdsearch.data.coco.set_resolution`; the transform's original sizes are
restored when training ends (also on error).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from jdsearch.core.errors import CheckpointError, DataError, JDSearchError, SpecError
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import (
    ResolutionSampler,
    get_resolution,
    make_loader,
    set_resolution,
    targets_to,
    using_resolution,
)
from jdsearch.engine import distributed
from jdsearch.spec.settings import COSINE, TrainConfig
from jdsearch.store.trainstate import TrainState, flatten, unflatten

__all__ = [
    "StateHook",
    "StepInfo",
    "TrainResult",
    "TrainState",
    "TrainingDiverged",
    "lr_factor",
    "train",
]

logger = logging.getLogger(__name__)

_FINAL_WINDOW = 20  # final losses average the last this-many iterations


class TrainingDiverged(JDSearchError):
    """The total loss became NaN or infinite; the message names the iteration and the culprits."""


def lr_factor(config: TrainConfig, iteration: int, total: int) -> float:
    """Multiplier of ``config.lr`` at 0-based ``iteration`` of ``total`` (warm-up × schedule)."""
    if iteration < config.warmup_iters:
        alpha = iteration / config.warmup_iters
        warm = config.warmup_factor * (1 - alpha) + alpha
    else:
        warm = 1.0
    progress = iteration / total
    if config.schedule == COSINE:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = config.gamma ** sum(1 for m in config.milestones if progress >= m)
    return warm * decay


@dataclass(frozen=True)
class StepInfo:
    """What the optional ``callback`` of :func:`train` receives after every iteration."""

    iteration: int  # 1-based: iterations done
    total_iters: int
    epoch: int  # 0-based epoch of this iteration's batch
    lr: float
    resolution: Resolution | None
    losses: dict[str, float]  # every term, detached
    loss: float  # their sum
    images: int  # images seen so far
    seconds: float
    data_seconds: float = 0.0  # of those, waiting for batches (reading, decoding, collating)


@dataclass(frozen=True)
class TrainResult:
    """Summary of one training run (JSON-friendly through :meth:`to_dict`)."""

    iterations: int
    images: int
    seconds: float
    images_per_s: float
    final_losses: dict[str, float]  # mean of each term over the last ≤ 20 iterations
    loss_history: tuple[float, ...]  # total loss, each point the mean of `history_stride` iters
    history_stride: int = 1
    resolutions: tuple[str, ...] = field(default=())  # the set sampled from ("" = fixed size)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of every field (tuples as lists)."""
        d = dataclasses.asdict(self)
        d["loss_history"] = list(self.loss_history)
        d["resolutions"] = list(self.resolutions)
        return d


LossTerm = nn.Module
Callback = Callable[[StepInfo], None]


@dataclass(frozen=True)
class StateHook:
    """Hand the run's resumable :class:`TrainState` to ``save`` every ``every`` iterations (never
    after the last one; 0 = never). It runs after the step's ``callback``, so whatever the callback
    changed for the next step (the pool's next sub-network) has happened; an exception in ``save``
    stops training and propagates. Under ``torchrun`` every rank needs one, with the same
    ``every``: each gives its own generators to the state, which rank 0 alone gets and saves."""

    every: int
    save: Callable[[TrainState], None]

    def due(self, done: int, total: int) -> bool:
        """Whether a state is saved after ``done`` of ``total`` iterations."""
        return self.every > 0 and done % self.every == 0 and done < total


class _Skip(Sampler[list[int]]):
    """A batch sampler without the first ``skip`` batches of ``inner`` (indices only: the images
    of the skipped batches are never read)."""

    def __init__(self, inner: Any, skip: int) -> None:
        self.inner, self.skip = inner, skip

    def __iter__(self) -> Iterator[list[int]]:
        batches = iter(self.inner)
        for _ in range(self.skip):
            if next(batches, None) is None:
                return
        yield from batches

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)


class _Shard(Sampler[list[int]]):
    """This rank's part of each global batch of ``inner``: the ``rank``-th of ``world`` nearly
    equal contiguous chunks (a batch shorter than ``world`` gives an empty chunk its first image,
    so that every rank steps)."""

    def __init__(self, inner: Any, rank: int, world: int) -> None:
        self.inner, self.rank, self.world = inner, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.inner:
            n, r, w = len(batch), self.rank, self.world
            part = list(batch[r * n // w : (r + 1) * n // w])
            yield part or list(batch[:1])

    def __len__(self) -> int:
        return len(self.inner)


def _skipping(loader: Any, skip: int) -> DataLoader[Any]:
    """``loader`` without its first ``skip`` batches (the images of the skipped batches are
    never read)."""
    return _rebatched(loader, _Skip(loader.batch_sampler, skip))


def _rebatched(loader: Any, batch_sampler: Sampler[list[int]]) -> DataLoader[Any]:
    """``loader`` with another batch sampler: the same dataset, workers, collate function and
    shuffling generator (drawn from in the same order)."""
    return DataLoader(
        loader.dataset,
        batch_sampler=batch_sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
    )


_END = object()


class _Batches:
    """Endless ``(epoch, batch)``; each pass reshuffles with the loader's own seeded generator.

    It knows where it is — the generator's state as the pass began and the batches taken from it —
    so a resumed run restores the generator, skips the batches taken and sees the same order."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.epoch, self.taken = 0, 0
        self.epoch_rng: Tensor | None = None
        self._batches: Iterator[Any] | None = None

    def _begin(self, skip: int) -> None:
        self.epoch_rng = self.loader.generator.get_state()
        self.taken = skip
        self._batches = iter(self.loader if skip == 0 else _skipping(self.loader, skip))

    def __next__(self) -> tuple[int, Any]:
        if self._batches is None:
            self._begin(0)
        batch = next(self._batches, _END)  # type: ignore[arg-type]
        if batch is _END:
            if self.taken == 0:
                raise DataError("training dataset yielded no batch")
            self.epoch += 1
            self._begin(0)
            batch = next(self._batches, _END)  # type: ignore[arg-type]
            if batch is _END:
                raise DataError("training dataset yielded no batch")
        self.taken += 1
        return self.epoch, batch

    def restore(self, epoch: int, taken: int, epoch_rng: Tensor) -> None:
        """Continue at batch ``taken`` of pass ``epoch``, whose generator state was ``epoch_rng``."""
        self.loader.generator.set_state(epoch_rng)
        self.epoch = epoch
        self._begin(taken)


def _hflip(
    images: list[Tensor], targets: list[dict[str, Any]], p: float, gen: torch.Generator
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Flip each image left-right with probability ``p`` (boxes follow; inputs untouched)."""
    if p <= 0:
        return images, targets
    flips = (torch.rand(len(images), generator=gen) < p).tolist()
    out_images, out_targets = [], []
    for image, target, flip in zip(images, targets, flips, strict=True):
        if flip:
            width = image.shape[-1]
            boxes = target["boxes"]
            target = {
                **target,
                "boxes": torch.stack(
                    [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1
                ),
            }
            image = image.flip(-1)
        out_images.append(image)
        out_targets.append(target)
    return out_images, out_targets


def _without_crowd(targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets without their crowd objects (``iscrowd == 1``), as COCO practice trains:
    torchvision's Faster R-CNN would take a crowd region for one ordinary object. Every
    per-object tensor (boxes, labels, area…) is filtered alike; targets without crowd pass as is."""
    out = []
    for target in targets:
        crowd = target.get("iscrowd")
        if not isinstance(crowd, Tensor) or not bool(crowd.any()):
            out.append(target)
            continue
        keep = crowd == 0
        n = len(crowd)
        out.append(
            {
                k: v[keep] if isinstance(v, Tensor) and v.dim() and len(v) == n else v
                for k, v in target.items()
            }
        )
    return out


def _trainable(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _fmt(losses: Mapping[str, Tensor | float]) -> str:
    return ", ".join(
        f"{k}={float(v.detach() if isinstance(v, Tensor) else v):.4g}" for k, v in losses.items()
    )


def _compress(values: Sequence[float], points: int) -> tuple[tuple[float, ...], int]:
    stride = max(1, math.ceil(len(values) / points))
    out = tuple(
        sum(values[i : i + stride]) / len(values[i : i + stride])
        for i in range(0, len(values), stride)
    )
    return out, stride


def train(
    detector: nn.Module,
    dataset: Dataset[Any],
    config: TrainConfig,
    *,
    loss_terms: Sequence[nn.Module] = (),
    progress: bool = False,
    callback: Callback | None = None,
    resume: TrainState | None = None,
    state_hook: StateHook | None = None,
) -> TrainResult:
    """Train ``detector`` (a torchvision ``GeneralizedRCNN``, in place) on ``dataset``.

    The detector is moved to ``config.device`` and stays there. Its training/eval mode and its
    transform's resize sizes are restored on return. Batches may mix image sizes (the detector's
    transform resizes and pads them). Deterministic on CPU for a given ``config.seed``: the data
    order, the resolution draws and torchvision's RPN/RoI sampling (torch's global RNG, seeded
    inside ``torch.random.fork_rng``; Python's and NumPy's, which a resume sets, restored too).

    **Loss-term contract.** Each element of ``loss_terms`` is an ``nn.Module`` whose
    ``forward(model) -> dict[str, Tensor]`` is called right after
    ``loss_dict = model(images, targets)`` in every step, with the model that just ran its forward
    pass; the returned scalar losses are added to the total (their names must not clash with the
    detector's or each other's). A term may read what the model recorded during that forward
    (e.g. a distiller reads the student's sampled proposals and features) and may own trainable
    parameters (e.g. an adaptation conv): the optimizer covers every ``requires_grad`` parameter of
    the detector *and* of the terms (de-duplicated, so a term may hold a reference to the
    detector). The trainer moves the terms to the device and calls ``.train()`` on them; a term
    that holds a frozen teacher must keep it frozen itself — ``requires_grad_(False)`` and an
    overridden ``train()`` that leaves the teacher in eval mode.

    Crowd objects (``iscrowd == 1`` in a target) are left out of training, as in COCO practice;
    evaluation still sees them. A non-finite total loss raises :class:`TrainingDiverged` naming
    the iteration and the terms that were non-finite. ``callback(StepInfo)`` runs after every
    optimizer step (an exception in it stops training and propagates, e.g. Optuna's ``TrialPruned``).

    **Resuming.** ``state_hook`` receives a :class:`TrainState` every ``every`` iterations;
    ``resume`` (one of them, built on the same detector, terms, data and config) continues that
    run at its iteration: weights, optimizer, data position and every RNG are restored, so the
    result equals the uninterrupted run's (bit for bit at one CPU thread). A state that does not
    fit raises :class:`CheckpointError` before any step.
    """
    run = _setup(detector, dataset, config, loss_terms)
    was_training = detector.training
    rng_devices = _cuda_index(run.device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=rng_devices))
        stack.enter_context(_fork_host_rngs())  # a resume sets them (_restore_rngs)
        stack.enter_context(distributed.synchronized_batch_norm())  # a no-op in one process
        # using_resolution restores the transform's original sizes (also on error).
        stack.enter_context(using_resolution(detector, get_resolution(detector)))
        torch.manual_seed(config.seed)
        detector.train()
        for term in run.terms:
            term.train()
        try:
            return _loop(run, progress, callback, resume, state_hook)
        finally:
            detector.train(was_training)
            run.parallel = None  # its reducer lets go of the parameters' gradient hooks


@contextlib.contextmanager
def _fork_host_rngs() -> Iterator[None]:
    """Python's and NumPy's global generators as they were on entry, restored on exit (also on
    error): what ``torch.random.fork_rng`` does for torch's."""
    python, numpy = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


def _cuda_index(device: torch.device) -> list[int]:
    """``[index]`` of a CUDA ``device`` (``cuda`` is the current one: each rank's own under
    torchrun), ``[]`` for another device."""
    if device.type != "cuda":
        return []
    return [torch.cuda.current_device() if device.index is None else device.index]


@dataclass
class _Run:
    """What every iteration of one training run shares."""

    detector: nn.Module
    terms: list[nn.Module]
    loader: Any
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: ResolutionSampler | None
    config: TrainConfig
    total: int
    use_amp: bool
    device: torch.device
    # What runs a step's forward: None for the detector and the terms one after the other in this
    # process, or their DistributedDataParallel (``torchrun``: gradients averaged over the ranks).
    parallel: nn.Module | None = None

    @property
    def params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]


def _setup(
    detector: nn.Module, dataset: Dataset[Any], config: TrainConfig, loss_terms: Sequence[nn.Module]
) -> _Run:
    """Check the device and data, move the detector and terms, build loader and optimizer."""
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(
            f"TrainConfig.device: {config.device!r} requested but CUDA is not available"
        )
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError(
            f"{getattr(dataset, 'ann_file', 'training dataset')}: no images to train on"
        )
    use_amp = config.amp and device.type == "cuda"
    if config.amp and not use_amp:
        logger.info("amp requested but device is %s: training in float32", device)
    terms = list(loss_terms)
    detector.to(device)
    for term in terms:
        term.to(device)
    world = distributed.world_size()
    # Under torchrun the batch size is per rank: one loader order for the global batch (the same
    # on every rank, by the seed), of which each rank reads its share.
    loader = make_loader(
        dataset,
        config.batch_size * world,
        shuffle=True,
        seed=config.seed,
        num_workers=loader_workers(config.num_workers, device),
        pin_memory=device.type == "cuda",
    )
    if world > 1:
        loader = _rebatched(loader, _Shard(loader.batch_sampler, distributed.rank(), world))
    params = _trainable([detector, *terms])
    if not params:
        raise JDSearchError(
            "nothing to train: no parameter of the detector or loss terms requires grad"
        )
    optimizer = torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    return _Run(
        detector=detector,
        terms=terms,
        loader=loader,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda", enabled=use_amp),
        sampler=ResolutionSampler(config.resolutions, config.seed) if config.resolutions else None,
        config=config,
        total=config.total_iters(len(loader)),
        use_amp=use_amp,
        device=device,
        parallel=_data_parallel(detector, terms, device) if world > 1 else None,
    )


def loader_workers(asked: int, device: torch.device) -> int:
    """Data-loading processes: ``asked``, except that on a GPU, 0 (the default) means as many
    as the CPU cores this rank may use allow (up to 4), so that decoding keeps the GPU fed."""
    if asked > 0 or device.type != "cuda":
        return asked
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(4, (cores or 1) // distributed.world_size() - 1))


class _Joint(nn.Module):
    """The detector and its loss terms as one module: one forward gives every loss."""

    def __init__(self, detector: nn.Module, terms: Sequence[nn.Module]) -> None:
        super().__init__()
        self.detector = detector
        self.terms = nn.ModuleList(terms)

    def forward(self, images: list[Tensor], targets: list[dict[str, Any]]) -> dict[str, Tensor]:
        return _losses(self.detector, self.terms, images, targets)


def _losses(
    detector: nn.Module,
    terms: Sequence[nn.Module],
    images: list[Tensor],
    targets: list[dict[str, Any]],
) -> dict[str, Tensor]:
    """The detector's losses on a batch, then each loss term's (which reads that forward)."""
    losses: dict[str, Tensor] = dict(detector(images, targets))
    for term in terms:
        extra = term(detector)
        clash = set(extra) & set(losses)
        assert not clash, f"loss term {type(term).__name__} reuses names {sorted(clash)}"
        losses.update(extra)
    return losses


def _data_parallel(detector: nn.Module, terms: Sequence[nn.Module], device: torch.device) -> Any:
    """The detector and terms wrapped in ``DistributedDataParallel``: rank 0's weights and
    buffers (the teacher's too) copied to every rank as it is built, gradients averaged after
    each backward. Buffers are not re-sent at each step: the batch-norm statistics are the global
    batch's on every rank already. A module with ``may_skip_parameters`` (the pool's elastic
    stages, whose shallower sub-networks leave blocks unused) makes DDP look for unused ones."""
    from torch.nn.parallel import DistributedDataParallel

    skips = any(getattr(m, "may_skip_parameters", False) for m in detector.modules())
    return DistributedDataParallel(
        _Joint(detector, terms),
        device_ids=_cuda_index(device) or None,
        forward_sync_buffers=False,
        find_unused_parameters=skips,
    )


@dataclass
class _Cursor:
    """Where a run is: its batches, its flip generator, its log (what a state restores)."""

    batches: _Batches
    flip: torch.Generator
    log: _Log
    resolution: Resolution | None = None


def _loop(
    run: _Run,
    progress: bool,
    callback: Callback | None,
    resume: TrainState | None,
    hook: StateHook | None,
) -> TrainResult:
    from tqdm.auto import tqdm

    cursor = _Cursor(
        _Batches(run.loader),
        # Each rank flips its own share of the batch (rank 0 as one process would).
        torch.Generator().manual_seed(run.config.seed + 7919 * distributed.rank()),
        _Log(run.config, run.total),
    )
    start = 0 if resume is None else _restore(run, cursor, resume)
    bar = tqdm(
        total=run.total,
        initial=start,
        # None: tqdm's own test, no bar where stderr is not a terminal (a redirected log would
        # hold one carriage-return line per iteration).
        disable=None if progress else True,
        desc="train",
        unit="it",
        dynamic_ncols=True,
    )
    try:
        for it in range(start, run.total):
            info = _iteration(run, cursor, it)
            if progress:
                bar.set_postfix(loss=f"{info.loss:.3f}", img_s=f"{info.images / info.seconds:.1f}")
            bar.update(1)
            if callback is not None:
                callback(info)
            if hook is not None and hook.due(it + 1, run.total):
                state = _capture(run, cursor, it + 1)  # every rank gives its generators
                if state is not None:  # rank 0 saves
                    hook.save(state)
    finally:
        bar.close()
    return cursor.log.result()


def _iteration(run: _Run, cursor: _Cursor, it: int) -> StepInfo:
    """Iteration ``it``: the next batch, its learning rate and resolution, one step, its log."""
    waited = time.perf_counter()
    epoch, (images, targets) = next(cursor.batches)
    cursor.log.data_seconds += time.perf_counter() - waited
    lr = run.config.lr * lr_factor(run.config, it, run.total)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.sampler is not None:
        cursor.resolution = run.sampler.next()
        set_resolution(run.detector, cursor.resolution)
    targets = _without_crowd(list(targets))
    images, targets = _hflip(list(images), targets, run.config.hflip, cursor.flip)
    losses, loss = _step(run, it, lr, images, targets)
    # Images seen by every rank: the global batch (the ranks' shares are equal but for a last,
    # shorter batch).
    seen = len(images) * distributed.world_size()
    return cursor.log.add(it, epoch, lr, cursor.resolution, losses, loss, seen)


def _term_params(run: _Run) -> dict[str, Tensor]:
    """The loss terms' own trainable parameters (a KD adapter), by ``term index.name``."""
    own = {id(p) for p in run.detector.parameters()}
    return {
        f"{i}.{name}": p
        for i, term in enumerate(run.terms)
        for name, p in term.named_parameters()
        if p.requires_grad and id(p) not in own
    }


def _generators(run: _Run, cursor: _Cursor) -> tuple[dict[str, Tensor], list[Any], Any]:
    """This rank's own generators: torch's (CPU, and the run's CUDA device), the flip generator
    (as tensors), NumPy's (its keys a tensor, the rest a list) and Python's."""
    tensors = {"rng.torch": torch.get_rng_state(), "rng.flip": cursor.flip.get_state()}
    if run.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(run.device)
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    numpy = [str(np_state[0]), int(np_state[2]), int(np_state[3]), float(np_state[4])]
    return tensors, numpy, random.getstate()


def _capture(run: _Run, cursor: _Cursor, done: int) -> TrainState | None:
    """The run after ``done`` iterations as a :class:`TrainState` (CPU copies of everything).
    Under ``torchrun`` every rank takes part: the state holds each rank's own generators (rank
    ``r``'s as ``rank{r}.rng.*`` tensors and ``meta["ranks"][r]``), and only rank 0 gets it
    (``None`` on the others)."""
    ranks = distributed.all_gather_object(_generators(run, cursor))
    if not distributed.is_main():
        return None
    tensors = {
        f"model.{k}": v.detach().to("cpu", copy=True) for k, v in run.detector.state_dict().items()
    }
    for name, p in _term_params(run).items():
        tensors[f"terms.{name}"] = p.detach().to("cpu", copy=True)
    assert cursor.batches.epoch_rng is not None  # a pass has begun: done ≥ 1
    tensors["data.epoch_rng"] = cursor.batches.epoch_rng.clone()
    own, numpy, python = ranks[0]
    tensors.update(own)
    meta = {
        "total": run.total,
        "seed": run.config.seed,
        "optimizer": flatten(run.optimizer.state_dict(), "optim", tensors),
        "scaler": flatten(run.scaler.state_dict(), "scaler", tensors),
        "sampler": None if run.sampler is None else run.sampler.state_dict(),
        "data": {"epoch": cursor.batches.epoch, "taken": cursor.batches.taken},
        "numpy": numpy,
        "python": flatten(python, "python", tensors),
        "log": cursor.log.state_dict(),
    }
    if len(ranks) > 1:
        meta["ranks"] = {}
        for r, (own, numpy, python) in enumerate(ranks[1:], start=1):
            tensors.update({f"rank{r}.{k}": v for k, v in own.items()})
            python_json = flatten(python, f"rank{r}.python", tensors)
            meta["ranks"][str(r)] = {"numpy": numpy, "python": python_json}
    return TrainState(done, tensors, meta)


def _restore(run: _Run, cursor: _Cursor, state: TrainState) -> int:
    """Put ``state`` into the run; the iteration to continue at. :class:`CheckpointError` when
    it was saved by another run (length, seed, parameters)."""
    meta, t = state.meta, state.tensors
    if meta.get("total") != run.total or meta.get("seed") != run.config.seed:
        raise CheckpointError(
            f"training state of a run of {meta.get('total')} iterations with seed "
            f"{meta.get('seed')}; this run has {run.total} with seed {run.config.seed}"
        )
    if not 0 < state.iteration <= run.total:
        raise CheckpointError(f"training state at a bad iteration {state.iteration}")
    _check_fits(run, t)
    try:
        model = {k.removeprefix("model."): v for k, v in t.items() if k.startswith("model.")}
        run.detector.load_state_dict(model, strict=True)
        _load_term_params(run, t)
        run.optimizer.load_state_dict(unflatten(meta["optimizer"], t))
        run.scaler.load_state_dict(unflatten(meta["scaler"], t))
        if run.sampler is not None:
            run.sampler.load_state_dict(meta["sampler"])
        data = meta["data"]
        cursor.batches.restore(int(data["epoch"]), int(data["taken"]), t["data.epoch_rng"])
        cursor.log.load_state_dict(meta["log"])
        _restore_rngs(run, cursor, meta, t)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"training state does not fit this run ({e})") from None
    return state.iteration


def _check_fits(run: _Run, tensors: Mapping[str, Tensor]) -> None:
    """Refuse (before anything is changed) a state whose weights are not this run's: other
    names or shapes of the detector's state or of the loss terms' parameters."""
    here = {f"model.{k}": v for k, v in run.detector.state_dict().items()}
    here.update({f"terms.{k}": v for k, v in _term_params(run).items()})
    saved = {k: v for k, v in tensors.items() if k.startswith(("model.", "terms."))}
    if set(here) != set(saved):
        odd = sorted(set(here) ^ set(saved))[:3]
        raise CheckpointError(f"training state of another model (weights differ: {odd}…)")
    for k, v in here.items():
        if tuple(saved[k].shape) != tuple(v.shape):
            raise CheckpointError(f"training state of another model ({k}: {tuple(saved[k].shape)})")


def _load_term_params(run: _Run, tensors: Mapping[str, Tensor]) -> None:
    params = _term_params(run)
    saved = {k.removeprefix("terms."): v for k, v in tensors.items() if k.startswith("terms.")}
    if set(saved) != set(params):
        raise KeyError(f"loss-term parameters {sorted(saved)} saved, {sorted(params)} here")
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise ValueError(f"loss-term parameter {name}: shape {tuple(saved[name].shape)}")
            p.copy_(saved[name])


def _restore_rngs(
    run: _Run, cursor: _Cursor, meta: Mapping[str, Any], tensors: Mapping[str, Tensor]
) -> None:
    """This rank's generators: torch's (CPU and the run's CUDA device), the flip generator,
    NumPy's and Python's. Each rank takes its own from a state that holds every rank's, and rank
    0's from one saved by one process (or before the ranks' were kept)."""
    r = distributed.rank()
    own = (meta.get("ranks") or {}).get(str(r)) if r else None
    prefix, source = (f"rank{r}.", own) if own is not None else ("", meta)
    torch.set_rng_state(tensors[f"{prefix}rng.torch"])
    cursor.flip.set_state(tensors[f"{prefix}rng.flip"])
    if run.device.type == "cuda" and f"{prefix}rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors[f"{prefix}rng.cuda"], run.device)
    name, pos, has_gauss, cached = source["numpy"]
    keys = tensors[f"{prefix}rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((name, keys, int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = unflatten(source["python"], tensors)
    random.setstate((version, tuple(internal), gauss))


def _step(
    run: _Run, it: int, lr: float, images: list[Tensor], targets: list[dict[str, Any]]
) -> tuple[dict[str, Tensor], float]:
    """One forward (detector and loss terms) and optimizer step: each loss, and their sum."""
    images = [im.to(run.device, non_blocking=True) for im in images]
    targets = targets_to(targets, run.device)
    with torch.autocast(device_type=run.device.type, dtype=torch.float16, enabled=run.use_amp):
        if run.parallel is not None:
            losses: dict[str, Tensor] = dict(run.parallel(images, targets))
        else:
            losses = _losses(run.detector, run.terms, images, targets)
    loss = sum(v.float() for v in losses.values())
    assert isinstance(loss, Tensor)
    # Under torchrun every rank stops at once when one diverges (a lone one would hang the rest).
    if not distributed.agree(bool(torch.isfinite(loss))):
        distributed.settle()  # every rank raises it here
        bad = {k: v for k, v in losses.items() if not torch.isfinite(v).all()}
        raise TrainingDiverged(
            f"training diverged at iteration {it + 1}/{run.total} (lr {lr:.3g}): total loss "
            f"{float(loss.detach())}; non-finite terms: {_fmt(bad) or 'none (the sum overflowed)'}"
        )
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.config.grad_clip is not None:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.params, run.config.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return losses, float(loss.detach())


class _Log:
    """Loss history, the last iterations' losses, images seen, periodic log lines."""

    def __init__(self, config: TrainConfig, total: int) -> None:
        self.config, self.total = config, total
        self.history: list[float] = []
        self.recent: list[dict[str, float]] = []
        self.images = 0
        self.start = time.perf_counter()
        self.data_seconds = 0.0  # this process's waits for batches (not kept in a state)

    def add(
        self,
        it: int,
        epoch: int,
        lr: float,
        resolution: Resolution | None,
        losses: Mapping[str, Tensor],
        total_value: float,
        images: int,
    ) -> StepInfo:
        self.images += images
        values = {k: float(v.detach()) for k, v in losses.items()}
        self.history.append(total_value)
        self.recent.append(values)
        del self.recent[:-_FINAL_WINDOW]
        elapsed = time.perf_counter() - self.start
        if (it + 1) % self.config.log_every == 0 or it + 1 == self.total:
            logger.info(
                "iter %d/%d epoch %d lr %.4g res %s loss %.4f (%s) %.1f img/s",
                it + 1,
                self.total,
                epoch,
                lr,
                resolution or "-",
                total_value,
                _fmt(values),
                self.images / elapsed,
            )
        return StepInfo(
            iteration=it + 1,
            total_iters=self.total,
            epoch=epoch,
            lr=lr,
            resolution=resolution,
            losses=values,
            loss=total_value,
            images=self.images,
            seconds=elapsed,
            data_seconds=self.data_seconds,
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON form of what was logged so far (its seconds included)."""
        return {
            "history": list(self.history),
            "recent": list(self.recent),
            "images": self.images,
            "seconds": time.perf_counter() - self.start,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the log of a :meth:`state_dict`."""
        self.history = [float(v) for v in state["history"]]
        self.recent = [{str(k): float(v) for k, v in r.items()} for r in state["recent"]]
        self.images = int(state["images"])
        self.start = time.perf_counter() - float(state["seconds"])

    def result(self) -> TrainResult:
        seconds = time.perf_counter() - self.start
        recent = self.recent
        names = dict.fromkeys(k for r in recent for k in r)
        final = {
            k: sum(r[k] for r in recent if k in r) / sum(1 for r in recent if k in r) for k in names
        }
        points, stride = _compress(self.history, self.config.history_points)
        return TrainResult(
            iterations=self.total,
            images=self.images,
            seconds=seconds,
            images_per_s=self.images / seconds if seconds > 0 else float("inf"),
            final_losses=final,
            loss_history=points,
            history_stride=stride,
            resolutions=tuple(str(r) for r in self.config.resolutions),
        )
