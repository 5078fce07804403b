"""The search: an Optuna study on an RDB storage, prepared once, then as many workers as you like.

``prepare`` makes sure the study's storage holds what every worker needs — the study spec, the
base detector and the elastic teacher pool (trained here when the storage has none; the local
files under ``runs/<study>/`` are only caches) — and ``run_search`` adds trials. Workers started
on several machines with the same storage URL cooperate on one study: Optuna hands out trials,
heartbeats mark a killed worker's trial failed and ``RetryHeartbeatStaleTrialCallback``
re-queues it with the same parent and move.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage

from jdsearch import synth
from jdsearch.data import CocoDataset
from jdsearch.errors import JDSearchError, SpecError
from jdsearch.flops import count_flops
from jdsearch.models import Detector, build_detector
from jdsearch.models.torchvision_body import load_backbone_weights
from jdsearch.morph.pruning import BNSparsity
from jdsearch.pool import PoolSpec, load_pool, pool_from_bytes, train_and_save_pool
from jdsearch.search.objective import (
    Objective,
    SearchContext,
    move_vocabulary,
    pool_moves,
    study_vocabulary,
)
from jdsearch.search.optuna_internals import set_study_system_attr, study_system_attrs
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
from jdsearch.search.sampler import HillClimbingSampler
from jdsearch.search.splits import selection_split
from jdsearch.search.storage import storage_for
from jdsearch.search.summary import print_trial
from jdsearch.spec import load_spec
from jdsearch.store.artifacts import SQLArtifactStore, make_artifact_store
from jdsearch.store.checkpoint import (
    checkpoint_from_bytes,
    read_checkpoint_metadata,
    save_checkpoint,
)
from jdsearch.study import StudySpec, study_from_stored
from jdsearch.train import train

log = logging.getLogger(__name__)


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_dir(spec: StudySpec) -> Path:
    """The study's local folder, ``runs/<name>``."""
    return Path("runs") / spec.name


def ensure_data(spec: StudySpec) -> tuple[CocoDataset, CocoDataset]:
    """The study's train and val sets, generated from ``data.synth`` first when the files are
    missing. Raises :class:`SpecError` when they are missing and there is no ``data.synth``."""
    d = spec.data.dir
    if not (d / "train.json").is_file() or not (d / "val.json").is_file():
        if spec.data.synth is None:
            raise SpecError(
                f"{spec.source}: data.dir {d} has no train.json/val.json and no data.synth to generate them"
            )
        s = spec.data.synth
        _say(f"generating the synthetic dataset ({s.images} images, seed {s.seed}) in {d} ...")
        synth.generate(d, images=s.images, seed=s.seed, size=s.size)
    return CocoDataset(d / "train.json", d / "images"), selection_split(spec)


def _study_artifact(study: optuna.Study, store: Any, key: str, path: Path) -> str:
    from optuna.artifacts import upload_artifact

    artifact_id = upload_artifact(study_or_trial=study, file_path=str(path), artifact_store=store)
    study.set_user_attr(key, artifact_id)
    return artifact_id


def check_cached_base(spec: StudySpec, path: Path) -> None:
    """A base trained earlier is reused only if it started from the spec's backbone weights."""
    used = read_checkpoint_metadata(path).get("extra", {}).get("backbone_weights")
    wanted = None if spec.base.backbone_weights is None else str(spec.base.backbone_weights)
    if used != wanted:
        raise SpecError(
            f"{spec.source}: base.backbone_weights is {wanted}, but the base trained earlier, "
            f"{path}, started from {used or 'random weights'}: delete it to train a new base"
        )


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
        if not spec.base.checkpoint.is_file():
            raise SpecError(f"{spec.source}: base.checkpoint {spec.base.checkpoint} does not exist")
        return spec.base.checkpoint
    path = run_dir(spec) / "base.safetensors"
    if path.is_file():
        check_cached_base(spec, path)
        return path
    detector, loaded = new_base_detector(spec, train_set.num_classes)
    extra: dict[str, Any] = {}
    if loaded is not None:
        _say(loaded)
        extra["backbone_weights"] = str(spec.base.backbone_weights)
    _say(f"training the base detector {detector.spec.name} ({spec.base.train.epochs:g} epochs) ...")
    config = spec.train_config(spec.base.train, spec.search.seed)
    terms = [BNSparsity(spec.search.bn_sparsity)] if spec.search.bn_sparsity > 0 else []
    result = train(detector, train_set, config, loss_terms=terms, progress=progress)
    _say(
        f"  {result.iterations} iterations in {result.seconds:.0f} s ({result.images_per_s:.1f} img/s)"
    )
    extra["train"] = result.to_dict()
    return save_checkpoint(path, detector, class_names=train_set.class_names, extra=extra)


def _pool_file(
    spec: StudySpec, pool_spec: PoolSpec, train_set: CocoDataset, progress: bool
) -> Path:
    path = run_dir(spec) / "pool.safetensors"
    _say(f"training the elastic teacher pool (cache {path}) ...")
    train_and_save_pool(pool_spec, train_set, path, device=spec.device, progress=progress)
    return path


def prepare(
    spec: StudySpec, storage_url: str | None = None, *, progress: bool = True
) -> tuple[optuna.Study, SearchContext]:
    """Open (or create) the study and make sure its storage holds what every worker needs.

    Its phases: open the study with the hill-climbing sampler, record the spec and the dataset's
    category ids, upload the base detector and the pool (trained here when the storage has
    neither), then load both back from the storage.

    Returns:
        The study and the :class:`SearchContext` its trials share.

    Raises:
        SpecError: the data, base checkpoint or pool the spec names are missing.
        JDSearchError: the base detector does not fit the dataset, or the storage fails.
    """
    storage = storage_for(spec, storage_url)  # first: it creates a SQLite file's folder
    store = make_artifact_store(spec.search.artifacts, storage_url or spec.storage_url)
    if isinstance(store, SQLArtifactStore):
        # Uploads of workers killed mid-write, older than a day: nobody will finish them.
        store.purge_incomplete(older_than_s=24 * 3600.0)
    train_set, val_set = ensure_data(spec)
    holder: dict[str, SearchContext] = {}
    study = _open(spec, storage, lambda parent: holder["ctx"].feasible(parent))
    _record_spec(study, spec, train_set)
    _upload_assets(study, store, spec, train_set, progress)
    holder["ctx"] = _load_assets(study, store, spec, train_set, val_set, progress)
    return study, holder["ctx"]


def _open(spec: StudySpec, storage: RDBStorage, feasible: Any) -> optuna.Study:
    # With a fixed teacher or none there is no teacher to adapt first: no freeze.
    freeze = spec.search.freeze_student if spec.kd.mode == "dynamic" else 0
    sampler = HillClimbingSampler(
        move_vocabulary(),
        feasible,
        top_k=spec.search.top_k,
        freeze_student=freeze,
        p_student=spec.search.p_student,
        seed=spec.search.seed,
        strategy=spec.search.strategy,
    )
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=sampler,
        direction="maximize",
        load_if_exists=True,
    )
    sampler.moves = tuple(study_vocabulary(study))  # an older study keeps its own choices
    if study.metric_names is None:  # the dashboard and `optuna` CLI call the value "H"
        study.set_metric_names(["H"])
    return study


def _record_spec(study: optuna.Study, spec: StudySpec, train_set: CocoDataset) -> None:
    """Store the spec (once) and the dataset's category ids, and warn on a changed spec."""
    stored = study_system_attrs(study)
    if SPEC_SYSATTR not in stored:
        set_study_system_attr(study, SPEC_SYSATTR, spec.to_dict())
        study.set_user_attr(SPEC_FILE_ATTR, spec.source)
        study.set_user_attr(STRATEGY_ATTR, spec.search.strategy)
        study.set_user_attr(KD_MODE_ATTR, spec.kd.mode)
    elif not _same_spec(stored[SPEC_SYSATTR], spec):
        log.warning(
            "study %s was created with a different spec; the stored base and pool are kept",
            spec.name,
        )
    if CATEGORIES_SYSATTR not in stored:
        # An export must map labels back to the dataset's ids without the dataset at hand.
        ids, names = train_set.category_ids, train_set.class_names
        categories = [[int(i), n] for i, n in zip(ids, names, strict=True)]
        set_study_system_attr(study, CATEGORIES_SYSATTR, categories)


def _upload_assets(
    study: optuna.Study, store: Any, spec: StudySpec, train_set: CocoDataset, progress: bool
) -> None:
    """The base detector and the pool into the study's artifact store, unless already there."""
    if BASE_ATTR not in study.user_attrs:
        _study_artifact(study, store, BASE_ATTR, _base_checkpoint(spec, train_set, progress))
    if POOL_ATTR not in study.user_attrs:
        cache = run_dir(spec) / "pool.safetensors"
        matches = cache.is_file() and _pool_matches(cache, spec.pool)
        path = cache if matches else _pool_file(spec, spec.pool, train_set, progress)
        _study_artifact(study, store, POOL_ATTR, path)


def _load_assets(
    study: optuna.Study,
    store: Any,
    spec: StudySpec,
    train_set: CocoDataset,
    val_set: CocoDataset,
    progress: bool,
) -> SearchContext:
    """The pool and base detector as the storage holds them (what every worker sees)."""
    base_id = study.user_attrs[BASE_ATTR]
    with store.open_reader(study.user_attrs[POOL_ATTR]) as reader:
        pool = pool_from_bytes(reader.read(), source=f"study {spec.name}: pool", device=spec.device)
    with store.open_reader(base_id) as reader:
        source = f"study {spec.name}: base"
        base = checkpoint_from_bytes(reader.read(), source=source, device=spec.device)
    if base.num_classes != train_set.num_classes:
        raise JDSearchError(
            f"base detector has {base.num_classes - 1} classes, "
            f"the dataset {train_set.num_classes - 1}"
        )
    base_res = spec.base.resolution or base.spec.input.size
    base_flops = count_flops(base.detector, size=base_res.hw).total
    study.set_user_attr(BASE_FLOPS_ATTR, base_flops)
    study.set_user_attr(BASE_RESOLUTION_ATTR, str(base_res))
    vocabulary = tuple(study.sampler.moves)  # the study's own choices, as _open read them
    if spec.search.strategy == "pool" and not set(pool_moves()) <= set(vocabulary):
        raise JDSearchError(
            f"study {spec.name}: created by an older jdsearch whose trials know no pool moves; "
            "search.strategy: pool needs a new study"
        )
    return SearchContext(
        spec, store, train_set, val_set, pool, base_id, base_res, base_flops, progress, vocabulary
    )


def _same_spec(stored: Any, spec: StudySpec) -> bool:
    """Whether a study's stored spec describes ``spec`` (once both are read and normalised)."""
    try:
        return study_from_stored(stored, source="stored spec").to_dict() == spec.to_dict()
    except SpecError:
        return False


def _pool_matches(path: Path, pool_spec: PoolSpec) -> bool:
    try:
        return load_pool(path).spec.same_architecture(pool_spec)
    except JDSearchError:
        return False


def run_search(
    spec: StudySpec,
    storage_url: str | None = None,
    *,
    n_trials: int | None = None,
    progress: bool = True,
) -> optuna.Study:
    """Run, resume or join a search: prepare the study, then add trials in this worker.

    Args:
        spec: the study spec (:func:`jdsearch.load_study`).
        storage_url: default the spec's (``sqlite:///runs/<name>.db``); workers with the same URL
            cooperate on one study.
        n_trials: trials this worker adds; default the spec's ``search.n_trials``.
        progress: progress bars and one line per trial.

    Returns:
        The Optuna study.

    Raises:
        SpecError: the data, base checkpoint or pool the spec names are missing.
        JDSearchError: the base detector does not fit the dataset, or the storage fails. A trial
            that fails (a user error inside it) is recorded FAIL and the search goes on.
    """
    study, ctx = prepare(spec, storage_url, progress=progress)
    n = n_trials if n_trials is not None else spec.search.n_trials
    _say(
        f"searching: study {spec.name!r} on {storage_url or spec.storage_url}, {n} trials in this worker"
    )
    started = time.perf_counter()
    study.optimize(
        Objective(ctx),
        n_trials=n,
        catch=(JDSearchError,),
        callbacks=[print_trial],
        gc_after_trial=True,
    )
    _say(f"done in {time.perf_counter() - started:.0f} s")
    return study
