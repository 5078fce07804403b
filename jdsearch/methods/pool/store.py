"""Pool files: save, load and train-then-save a teacher pool.

**Files.** A pool file is a jdsearch checkpoint of the super-net (:mod:`jdsearch.store.checkpoint`:
safetensors, sha256-verified, never unpickled) whose ``extra["pool"]`` holds the pool spec and
the per-phase training record; :func:`~jdsearch.store.checkpoint.load_checkpoint` also reads it (as the
largest detector).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from jdsearch.core.config import cache_key
from jdsearch.core.errors import CheckpointError, SpecError
from jdsearch.methods.pool.record import PhaseRecord
from jdsearch.methods.pool.supernet import ElasticPool
from jdsearch.methods.pool.training import PHASE_CHECKPOINT_EVERY, PhaseStates, resume_pool
from jdsearch.models.detector import Detector
from jdsearch.spec.detector import DetectorSpec
from jdsearch.spec.pool import PoolSpec
from jdsearch.store.checkpoint import (
    checkpoint_from_bytes,
    checkpoint_to_bytes,
    load_checkpoint,
    save_checkpoint,
    tensors_sha256,
)

__all__ = [
    "POOL_FORMAT",
    "POOL_VERSION",
    "load_pool",
    "pool_from_bytes",
    "pool_key",
    "pool_to_bytes",
    "save_pool",
    "train_and_save_pool",
]

logger = logging.getLogger(__name__)

POOL_FORMAT = "jdsearch-pool"
POOL_VERSION = 1


def _extra(pool: ElasticPool, record: Sequence[PhaseRecord] | None) -> dict[str, Any]:
    rec = pool.record if record is None else tuple(record)
    spec = pool.spec.to_dict()
    spec.pop("checkpoint", None)  # where a study finds a trained pool: not how it was trained
    return {
        "pool": {
            "format": POOL_FORMAT,
            "version": POOL_VERSION,
            "spec": spec,
            "record": [r.to_dict() for r in rec],
            **({} if pool.base_sha256 is None else {"base_sha256": pool.base_sha256}),
            **({} if pool.made_by is None else {"made_by": pool.made_by}),
        }
    }


def pool_to_bytes(pool: ElasticPool, record: Sequence[PhaseRecord] | None = None) -> bytes:
    """The pool as safetensors bytes (a super-net checkpoint with the pool in its metadata)."""
    return checkpoint_to_bytes(
        pool.supernet, class_names=pool.class_names, extra=_extra(pool, record)
    )


def save_pool(
    path: str | Path, pool: ElasticPool, record: Sequence[PhaseRecord] | None = None
) -> Path:
    """Write the pool atomically; ``record`` defaults to ``pool.record``."""
    return save_checkpoint(
        path, pool.supernet, class_names=pool.class_names, extra=_extra(pool, record)
    )


def _pool_from_checkpoint(ck: Any, source: str) -> ElasticPool:
    doc = ck.extra.get("pool")
    if not isinstance(doc, dict) or doc.get("format") != POOL_FORMAT:
        raise CheckpointError(
            f"{source}: a detector checkpoint, not a teacher pool (no pool metadata)"
        )
    if doc.get("version") != POOL_VERSION:
        raise CheckpointError(
            f"{source}: unsupported pool version {doc.get('version')!r} "
            f"(this jdsearch reads {POOL_VERSION})"
        )
    try:
        spec = PoolSpec.from_dict(doc.get("spec"), source=source)
    except SpecError as e:
        raise CheckpointError(f"{source}: invalid pool spec in metadata: {e}") from None
    try:
        record = tuple(PhaseRecord.from_dict(r) for r in doc.get("record", []))
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: malformed pool training record ({e})") from None
    digest = doc.get("base_sha256")
    if digest is not None and not isinstance(digest, str):
        raise CheckpointError(f"{source}: base_sha256 {digest!r} is not a digest")
    try:
        pool = ElasticPool(
            spec,
            ck.num_classes,
            detector_spec=ck.spec,
            supernet=ck.detector,
            name=ck.spec.name,
            class_names=ck.class_names,
            record=record,
        )
    except SpecError as e:
        raise CheckpointError(
            f"{source}: the stored super-net does not match its pool spec: {e}"
        ) from None
    pool.base_sha256 = digest
    made_by = doc.get("made_by")
    pool.made_by = made_by if isinstance(made_by, dict) else None  # judged where it is used
    return pool


def pool_from_bytes(
    data: bytes, source: str = "<bytes>", *, device: str | torch.device = "cpu"
) -> ElasticPool:
    """Read :func:`pool_to_bytes` output; corrupt data raises :class:`CheckpointError`."""
    return _pool_from_checkpoint(checkpoint_from_bytes(data, source, device=device), source)


def load_pool(path: str | Path, *, device: str | torch.device = "cpu") -> ElasticPool:
    """Read a pool file written by :func:`save_pool` (verified; never unpickles)."""
    return _pool_from_checkpoint(load_checkpoint(path, device=device), str(path))


def _resumed_pool(
    p: Path,
    pool_spec: PoolSpec,
    dataset: Dataset[Any],
    device: str | torch.device,
    base: Detector | None,
) -> ElasticPool:
    """The pool saved at ``p`` after its last finished phase, checked against the spec, the base
    it started from and the dataset, to train the phases still to do."""
    pool = load_pool(p, device=device)
    if not pool.spec.same_architecture(pool_spec):
        raise SpecError(
            f"{p}: holds a pool with another super-net or space; remove it or change the path"
        )
    digest = None if base is None else tensors_sha256(base.state_dict())
    if pool.base_sha256 != digest:
        began = "random weights" if pool.base_sha256 is None else "another base detector"
        now = "random weights" if digest is None else "this base detector"
        raise SpecError(
            f"{p}: holds a pool that started from {began}, not {now}; remove it or change the path"
        )
    num_classes = getattr(dataset, "num_classes", pool.num_classes)
    if num_classes != pool.num_classes:
        raise SpecError(f"{p}: the pool has {pool.num_classes} classes, the dataset {num_classes}")
    pool.spec = pool_spec
    logger.info(
        "resuming pool %s after %d of %d phases", p, len(pool.record), len(pool_spec.phases)
    )
    return pool


def train_and_save_pool(  # noqa: PLR0913 - keyword-only: the options of a pool's training
    pool_spec: PoolSpec,
    dataset: Dataset[Any],
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    resume: bool = True,
    max_iters: int | None = None,
    detector_spec: DetectorSpec | None = None,
    base: Detector | None = None,
    made_by: Mapping[str, Any] | None = None,
) -> ElasticPool:
    """Build (or, with ``resume`` and an existing ``path``, load) a pool, train the phases still
    to do, and save it to ``path`` after every phase. Entry point of ``jdsearch pool train``.

    ``dataset`` gives the classes (``num_classes``, ``class_names``). Resuming requires the file's
    pool to have the same super-net and space; the schedule of the phases still to run comes from
    ``pool_spec``. ``base``: a new pool starts from this detector (``pool.init: base``,
    :class:`ElasticPool`); a resumed one must have started from it. ``made_by``: the study fields
    that make the pool (a study's pool cache fields), recorded in the file with their key, so
    that a study can tell whether a pool file it is given is the pool it would train. The phase
    state is keyed to that key (without ``made_by``, to :func:`pool_key` of ``pool_spec`` and
    the start): a state another key saved is not resumed.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)  # its phase states are written there from the start
    pool = _open_pool(pool_spec, dataset, p if resume else None, device, detector_spec, base)
    if made_by is not None:
        key = cache_key(made_by)
        pool.made_by = {"key": key, "fields": dict(made_by)}
    else:
        key = pool_key(pool_spec, pool)
    # Inside a phase too: its training state every PHASE_CHECKPOINT_EVERY iterations, next to
    # the pool file, continued from when the phase is run again (a killed `prepare`).
    states = PhaseStates(_phase_state_path(p), PHASE_CHECKPOINT_EVERY, key=key)
    if not resume:
        states.path.unlink(missing_ok=True)
    for i in range(len(pool.record), len(pool_spec.phases)):
        resume_pool(
            pool,
            dataset,
            states,
            pool_spec,
            device=device,
            progress=progress,
            phases=[i],
            max_iters=max_iters,
        )
        save_pool(p, pool)
        logger.info("saved pool after phase %d to %s", i, p)
    if not p.exists():
        save_pool(p, pool)
    return pool


def train_pool_along(
    pool_spec: PoolSpec,
    dataset: Dataset[Any],
    path: str | Path,
    *,
    device: str | torch.device,
    base: Detector | None = None,
    key: str | None = None,
) -> None:
    """What :func:`train_and_save_pool` trains, from where it resumes (``path`` and its phase
    state, as they are), without writing anything: a rank other than 0 under ``torchrun``, which
    trains its share of each batch while rank 0 saves."""
    p = Path(path)
    pool = _open_pool(pool_spec, dataset, p, device, None, base)
    key = key or pool_key(pool_spec, pool)
    states = PhaseStates(_phase_state_path(p), PHASE_CHECKPOINT_EVERY, key=key, readonly=True)
    for i in range(len(pool.record), len(pool_spec.phases)):
        resume_pool(pool, dataset, states, pool_spec, device=device, phases=[i])


def pool_key(pool_spec: PoolSpec, pool: ElasticPool) -> str:
    """The hash of what makes ``pool``'s training, as far as the pool knows it: the spec (its
    phases, space and training) and the digest of the base it started from."""
    return cache_key({"pool": pool_spec.to_dict(), "base_sha256": pool.base_sha256})


def _phase_state_path(path: Path) -> Path:
    return path.with_name(path.name + ".phase-state")


def _open_pool(
    pool_spec: PoolSpec,
    dataset: Dataset[Any],
    path: Path | None,
    device: str | torch.device,
    detector_spec: DetectorSpec | None,
    base: Detector | None,
) -> ElasticPool:
    """The pool saved at ``path`` (when there is one), else a new one for ``dataset``'s classes,
    started from ``base`` when one is given."""
    if path is not None and path.exists():
        return _resumed_pool(path, pool_spec, dataset, device, base)
    num_classes = getattr(dataset, "num_classes", None)
    if not isinstance(num_classes, int):
        raise SpecError("train_and_save_pool: the dataset does not tell its num_classes")
    return ElasticPool(
        pool_spec,
        num_classes,
        detector_spec=detector_spec,
        class_names=getattr(dataset, "class_names", None),
        base=base,
    )
