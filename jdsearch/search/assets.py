"""What every worker of a study needs, and where it comes from: the data, the base detector and
the teacher pool. Made here when neither the storage, the files the spec names nor the local
caches (:mod:`jdsearch.search.caches`) hold them, uploaded to the study's artifact store, and read
back from it as :class:`StudyAssets`, what every worker then sees.

Imports every layer below the search and Optuna's public API.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from jdsearch.core.errors import JDSearchError, SpecError
from jdsearch.core.resolution import Resolution
from jdsearch.data import synth
from jdsearch.data.coco import CocoDataset
from jdsearch.engine import distributed
from jdsearch.engine.train import TrainingDiverged, train
from jdsearch.methods.morph.pruning import BNSparsity
from jdsearch.methods.pool import ElasticPool, pool_from_bytes, train_and_save_pool
from jdsearch.models import Detector, build_detector
from jdsearch.models.flops import count_flops
from jdsearch.models.torchvision_body import load_backbone_weights
from jdsearch.search.caches import (
    base_cache,
    base_fields,
    base_file,
    cached_pool_done,
    check_cached_base,
    check_cached_data,
    data_cache,
    data_fields,
    named_pool_unfit,
    pool_cache,
    pool_fields,
    read_made_by,
    write_made_by,
)
from jdsearch.search.ranks import BASE, POOL, announce
from jdsearch.search.record import (
    BASE_ATTR,
    BASE_FLOPS_ATTR,
    BASE_RESOLUTION_ATTR,
    CATEGORIES_SYSATTR,
    KD_MODE_ATTR,
    POOL_ATTR,
    SPEC_FILE_ATTR,
    SPEC_SYSATTR,
    STRATEGY_ATTR,
)
from jdsearch.search.splits import missing_files, selection_split
from jdsearch.spec.detector import load_spec
from jdsearch.spec.pool import PoolSpec
from jdsearch.spec.study import StudySpec, pool_base, study_from_stored
from jdsearch.storage.artifacts import read_artifact
from jdsearch.storage.optuna_internals import set_study_system_attr, study_system_attrs
from jdsearch.store.checkpoint import checkpoint_from_bytes, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def say(msg: str) -> None:
    """Print ``msg`` for the user (under ``torchrun``, on rank 0 only)."""
    if not distributed.is_main():  # under torchrun, rank 0 speaks for the worker
        return
    print(msg, flush=True)


def ensure_data(spec: StudySpec, *, generate: bool = True) -> tuple[CocoDataset, CocoDataset]:
    """The study's train and val sets, generated from ``data.synth`` first when the files are
    missing (unless ``generate`` is false). Raises :class:`SpecError` when they are missing and
    there is no ``data.synth``."""
    d = spec.data.dir
    missing = missing_files(spec)
    if missing is not None:
        if spec.data.synth is None or not generate:
            named = spec.data.train is not None or spec.data.val is not None  # no data.synth
            tail = "" if named else " and no data.synth to generate them"
            raise SpecError(f"{spec.source}: {missing}{tail}")
        s = spec.data.synth
        say(f"generating the synthetic dataset ({s.images} images, seed {s.seed}) in {d} ...")
        synth.generate(
            d,
            images=s.images,
            seed=s.seed,
            size=s.size,
            classes=s.classes,
            object_size=(s.object_size[0], s.object_size[1]),
        )
        write_made_by(data_cache(spec), data_fields(spec))
    check_cached_data(spec)
    train = CocoDataset(spec.data.annotations("train"), spec.data.images("train"))
    return train, selection_split(spec)


def _study_artifact(study: optuna.Study, store: Any, key: str, path: Path) -> str:
    from optuna.artifacts import upload_artifact

    artifact_id = upload_artifact(study_or_trial=study, file_path=str(path), artifact_store=store)
    study.set_user_attr(key, artifact_id)
    return artifact_id


def new_base_detector(spec: StudySpec, num_classes: int) -> tuple[Detector, str | None]:
    """The untrained base of a study that trains its own: ``base.detector`` seeded by
    ``search.seed``, its body from ``base.backbone_weights`` if given (then also the line that
    says what was loaded)."""
    detector = build_detector(load_spec(spec.base.detector), num_classes, seed=spec.search.seed)
    if spec.base.backbone_weights is None:
        return detector, None
    return detector, load_backbone_weights(detector, spec.base.backbone_weights).line()


def _base_checkpoint(spec: StudySpec, train_set: CocoDataset, progress: bool) -> Path:
    """The base detector's checkpoint file: given, cached, or trained now."""
    if spec.base.checkpoint is not None:
        return spec.existing_base_checkpoint()
    cache = base_cache(spec)
    path = cache.path
    if path.is_file():
        check_cached_base(spec)
        if read_made_by(cache) is None:
            say(f"using {path}, trained by an earlier jdsearch that did not record its settings")
        return path
    announce(BASE)
    with distributed.lockstep("the base detector's training"):
        detector, extra = train_base(spec, train_set, progress)
    save_checkpoint(
        path,
        detector,
        class_names=train_set.class_names,
        extra=extra,
        category_ids=train_set.category_ids,
    )
    write_made_by(cache, base_fields(spec))
    return path


def train_base(
    spec: StudySpec, train_set: CocoDataset, progress: bool
) -> tuple[Detector, dict[str, Any]]:
    """Build the study's base detector and train it (``base.train``, BN sparsity); the detector,
    and what its checkpoint records of the training."""
    detector, loaded = new_base_detector(spec, train_set.num_classes)
    extra: dict[str, Any] = {}
    if loaded is not None:
        say(loaded)
        extra["backbone_weights"] = str(spec.base.backbone_weights)
    say(f"training the base detector {detector.spec.name} ({spec.base.train.epochs:g} epochs) ...")
    config = spec.train_config(spec.base.train, spec.search.seed)
    terms = [BNSparsity(spec.search.bn_sparsity)] if spec.search.bn_sparsity > 0 else []
    try:
        result = train(detector, train_set, config, loss_terms=terms, progress=progress)
    except TrainingDiverged as e:  # the spec's settings (lr…) make it diverge: name them
        raise SpecError(f"{spec.source}: base.train: {e}") from None
    say(
        f"  {result.iterations} iterations in {result.seconds:.0f} s ({result.images_per_s:.1f} img/s)"
    )
    extra["train"] = result.to_dict()
    return detector, extra


def pool_start(spec: StudySpec) -> Detector | None:
    """The base detector a new pool starts from (``pool.init``, :func:`pool_base`), on the CPU;
    ``None``: the pool starts from random weights.

    Raises:
        SpecError: the pool starts from the base and there is no base yet.
    """
    if pool_base(spec) is None:
        return None
    path = base_file(spec)
    if not path.is_file():
        raise SpecError(
            f"{spec.source}: pool.init: base: the pool starts from the base detector, and "
            f"{path} does not exist yet (`jdsearch search` trains it first)"
        )
    return load_checkpoint(path).detector


def _pool_file(
    spec: StudySpec, pool_spec: PoolSpec, train_set: CocoDataset, progress: bool
) -> Path:
    cache = pool_cache(spec)
    base = pool_start(spec)
    start = "the base detector" if base is not None else "random weights"
    say(f"training the elastic teacher pool from {start} (cache {cache.path}) ...")
    announce(POOL)
    fields = pool_fields(spec)
    with distributed.lockstep("the teacher pool's training"):
        train_and_save_pool(
            pool_spec,
            train_set,
            cache.path,
            device=spec.device,
            progress=progress,
            base=base,
            made_by=fields,  # recorded in the file; its key keys the phase state too
        )
    write_made_by(cache, fields)
    return cache.path


def pool_path(spec: StudySpec, train_set: CocoDataset, progress: bool) -> Path:
    """The teacher pool's file: the trained pool ``pool.checkpoint`` names when this spec's
    settings made it (else one line says why it is not used), the cached one, or one trained now.

    Raises:
        SpecError: ``pool.checkpoint`` names a file that does not exist or is not a pool, or a
            cached pool was made by other settings.
    """
    if spec.pool.checkpoint is not None:
        named = spec.existing_pool_checkpoint()
        why = named_pool_unfit(spec)
        if why is None:
            say(f"using the trained teacher pool {named} (pool.checkpoint)")
            return named
        say(f"not using pool.checkpoint {named}: {why}")
    cache = pool_cache(spec).path
    done = cache.is_file() and cached_pool_done(spec)
    return cache if done else _pool_file(spec, spec.pool, train_set, progress)


def record_spec(study: optuna.Study, spec: StudySpec, train_set: CocoDataset) -> None:
    """Store the spec (once) and the dataset's category ids, and warn on a changed spec."""
    stored = study_system_attrs(study)
    if SPEC_SYSATTR not in stored:
        set_study_system_attr(study, SPEC_SYSATTR, spec.to_dict())
        study.set_user_attr(SPEC_FILE_ATTR, spec.source)
        study.set_user_attr(STRATEGY_ATTR, spec.search.strategy)
        study.set_user_attr(KD_MODE_ATTR, spec.kd.mode)
    elif not same_spec(stored[SPEC_SYSATTR], spec):
        log.warning(
            "study %s was created with a different spec; the stored base and pool are kept",
            spec.name,
        )
    if CATEGORIES_SYSATTR not in stored:
        # An export must map labels back to the dataset's ids without the dataset at hand.
        ids, names = train_set.category_ids, train_set.class_names
        categories = [[int(i), n] for i, n in zip(ids, names, strict=True)]
        set_study_system_attr(study, CATEGORIES_SYSATTR, categories)


def require_assets(study: optuna.Study) -> None:
    """A study opened with its own stored spec must hold its base and pool already."""
    for key, what in ((BASE_ATTR, "base detector"), (POOL_ATTR, "teacher pool")):
        if key not in study.user_attrs:
            raise JDSearchError(
                f"study {study.study_name!r} holds no {what} yet; run `jdsearch search SPEC` "
                "(which trains and uploads it) before this command"
            )


def upload_assets(
    study: optuna.Study, store: Any, spec: StudySpec, train_set: CocoDataset, progress: bool
) -> None:
    """The base detector and the pool into the study's artifact store, unless already there."""
    if BASE_ATTR not in study.user_attrs:
        _study_artifact(study, store, BASE_ATTR, _base_checkpoint(spec, train_set, progress))
    if POOL_ATTR not in study.user_attrs:
        _study_artifact(study, store, POOL_ATTR, pool_path(spec, train_set, progress))


def same_spec(stored: Any, spec: StudySpec) -> bool:
    """Whether a study's stored spec describes ``spec`` (once both are read and normalised)."""
    try:
        before = study_from_stored(stored, source="stored spec").to_dict()
    except SpecError:
        return False
    # Each worker may run on its own device (`jdsearch search --device`): not a change.
    return {**before, "device": None} == {**spec.to_dict(), "device": None}


@dataclass(frozen=True)
class StudyAssets:
    """The data, the pool and the base detector's figures as the study's storage holds them: what
    every worker of the study sees."""

    spec: StudySpec
    train_set: CocoDataset
    val_set: CocoDataset
    pool: ElasticPool
    base_artifact: str  # artifact id of the base detector's checkpoint
    base_resolution: Resolution
    base_flops: int


def load_assets(
    study: optuna.Study,
    store: Any,
    spec: StudySpec,
    train_set: CocoDataset,
    val_set: CocoDataset,
    *,
    write: bool = True,
) -> tuple[StudyAssets, Detector]:
    """The pool and base detector as the storage holds them (what every worker sees), and the
    base detector itself. ``write``: also record the base's FLOPs and resolution in the study
    (rank 0).

    Raises:
        JDSearchError: the base detector does not fit the dataset, or an artifact is unreadable.
    """
    base_id = study.user_attrs[BASE_ATTR]
    pool_bytes = read_artifact(store, study.user_attrs[POOL_ATTR], f"study {spec.name}: the pool")
    pool = pool_from_bytes(pool_bytes, source=f"study {spec.name}: pool", device=spec.device)
    source = f"study {spec.name}: base"
    base_bytes = read_artifact(store, base_id, f"study {spec.name}: the base")
    base = checkpoint_from_bytes(base_bytes, source=source, device=spec.device)
    if base.num_classes != train_set.num_classes:
        raise JDSearchError(
            f"base detector has {base.num_classes - 1} classes, "
            f"the dataset {train_set.num_classes - 1}"
        )
    base_res = spec.base.resolution or base.spec.input.size
    base_flops = count_flops(base.detector, size=base_res.hw).total
    if write:
        study.set_user_attr(BASE_FLOPS_ATTR, base_flops)
        study.set_user_attr(BASE_RESOLUTION_ATTR, str(base_res))
    assets = StudyAssets(spec, train_set, val_set, pool, base_id, base_res, base_flops)
    return assets, base.detector
