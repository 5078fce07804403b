"""The search: an Optuna study on an RDB storage, prepared once, then as many workers as you like.

``prepare`` makes sure the study's storage holds what every worker needs — the study spec, the
base detector and the elastic teacher pool (trained here when the storage has none; the local
files under ``runs/<study>/`` are only caches) — and ``run_search`` adds trials. Workers started
on several machines with the same storage URL cooperate on one study: Optuna hands out trials,
heartbeats mark a killed worker's trial failed and ``RetryHeartbeatStaleTrialCallback``
re-queues it with the same parent and move.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from jdsearch import distributed, synth
from jdsearch.config import plain
from jdsearch.data import CocoDataset
from jdsearch.errors import JDSearchError, SpecError, first_line
from jdsearch.flops import count_flops
from jdsearch.models import Detector, build_detector
from jdsearch.models.torchvision_body import load_backbone_weights
from jdsearch.morph.pruning import BNSparsity
from jdsearch.pool import PoolSpec, pool_from_bytes, train_and_save_pool
from jdsearch.search.objective import (
    Objective,
    SearchContext,
    move_vocabulary,
    pool_moves,
    study_vocabulary,
)
from jdsearch.search.optuna_internals import set_study_system_attr, study_system_attrs
from jdsearch.search.queries import create_or_load
from jdsearch.search.ranks import BASE, POOL, READY, STOP, announce
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
from jdsearch.search.storage import (
    ResilientStorage,
    check_dialect,
    public_url,
    root_cause,
    storage_for,
    with_driver,
)
from jdsearch.search.summary import print_trial
from jdsearch.search.teacher_check import apply_teacher_check, use_kd_mode
from jdsearch.spec import load_spec
from jdsearch.store.artifacts import SQLArtifactStore, make_artifact_store, read_artifact
from jdsearch.store.checkpoint import (
    checkpoint_from_bytes,
    read_checkpoint_metadata,
    save_checkpoint,
)
from jdsearch.study import STUDY_SET, StudySpec, check_storage_url, study_from_stored
from jdsearch.train import TrainingDiverged, train

log = logging.getLogger(__name__)


def _say(msg: str) -> None:
    if not distributed.is_main():  # under torchrun, rank 0 speaks for the worker
        return
    print(msg, flush=True)


def run_dir(spec: StudySpec) -> Path:
    """The study's local folder, ``runs/<name>``."""
    return Path("runs") / spec.name


def ensure_data(spec: StudySpec, *, generate: bool = True) -> tuple[CocoDataset, CocoDataset]:
    """The study's train and val sets, generated from ``data.synth`` first when the files are
    missing (unless ``generate`` is false). Raises :class:`SpecError` when they are missing and
    there is no ``data.synth``."""
    d = spec.data.dir
    if not (d / "train.json").is_file() or not (d / "val.json").is_file():
        if spec.data.synth is None or not generate:
            raise SpecError(
                f"{spec.source}: data.dir {d} has no train.json/val.json and no data.synth to generate them"
            )
        s = spec.data.synth
        _say(f"generating the synthetic dataset ({s.images} images, seed {s.seed}) in {d} ...")
        synth.generate(d, images=s.images, seed=s.seed, size=s.size)
        write_made_by(data_cache(spec), data_fields(spec))
    check_cached_data(spec)
    return CocoDataset(d / "train.json", d / "images"), selection_split(spec)


def _study_artifact(study: optuna.Study, store: Any, key: str, path: Path) -> str:
    from optuna.artifacts import upload_artifact

    artifact_id = upload_artifact(study_or_trial=study, file_path=str(path), artifact_store=store)
    study.set_user_attr(key, artifact_id)
    return artifact_id


# ---------------------------------------------------------------------- caches under runs/<name>/
# Each cache (the synthetic data, the base, the pool) is reused only if the spec parts that made
# it are the spec's now: they are recorded, as dotted study fields, with their hash (the cache's
# key) in a JSON file next to it, written when jdsearch makes it. A mismatch is one SpecError
# naming the field, both values and what to delete. A cache without a record (an earlier
# jdsearch, `jdsearch pool train`, a copy) is checked on what its own file records.
MADE_BY = ".made-by.json"
_NOT_MAKING = ("num_workers", "log_every", "history_points")  # train settings that change nothing


@dataclass(frozen=True)
class Cache:
    """A cached artifact, what it is called in messages and what deleting it leads to."""

    path: Path
    made: str  # "the base trained earlier, PATH, started from"
    remedy: str  # "train a new base"

    @property
    def record(self) -> Path:
        """The JSON file that records the spec parts that made it."""
        if self.path.is_dir():
            return self.path / MADE_BY.lstrip(".")
        return self.path.with_name(self.path.name + MADE_BY)

    def stamp(self) -> list[int]:
        """What identifies this very file (size, mtime): a record of another file is stale."""
        target = self.path / "train.json" if self.path.is_dir() else self.path
        st = target.stat()
        return [st.st_size, st.st_mtime_ns]


def cache_key(fields: dict[str, Any]) -> str:
    """The hash of the spec parts (dotted study fields → plain values) that made a cache."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_made_by(cache: Cache, fields: dict[str, Any]) -> None:
    """Record ``fields`` (and their key) as what made ``cache``; atomically."""
    doc = {"key": cache_key(fields), "stamp": cache.stamp(), "fields": fields}
    tmp = cache.record.with_name(cache.record.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, default=str))
    tmp.replace(cache.record)


def read_made_by(cache: Cache) -> dict[str, Any] | None:
    """The recorded fields that made ``cache``; ``None`` when unrecorded, unreadable or stale."""
    try:
        doc = json.loads(cache.record.read_text())
        fresh = doc["stamp"] == cache.stamp()
        return doc["fields"] if fresh and isinstance(doc["fields"], dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_cache(
    spec: StudySpec, cache: Cache, wanted: dict[str, Any], made: dict[str, Any]
) -> None:
    """Refuse ``cache`` unless the fields that ``made`` it are the ones ``wanted`` now (only the
    fields ``made`` knows are compared: an unrecorded cache tells only some)."""
    if cache_key(made) == cache_key({k: wanted.get(k) for k in made}):
        return
    field = next(k for k in sorted(made) if made[k] != wanted.get(k))
    now, then = wanted.get(field), made[field]
    if then is None and field == "base.backbone_weights":
        then = "random weights"
    raise SpecError(
        f"{spec.source}: {field} is {'unset' if now is None else now}, but {cache.made} "
        f"{'unset' if then is None else then}: delete it to {cache.remedy}"
    )


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    """A nested mapping as dotted fields (``base.train`` → ``base.train.lr``, ``pool.phases`` →
    ``pool.phases[1].lr``…); lists of plain values stay one field."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = {f"[{i}]": v for i, v in enumerate(value)}
    elif isinstance(value, dict):
        items = {f".{k}": v for k, v in value.items()}
    else:
        return {prefix: value}
    return {k: v for key, sub in items.items() for k, v in _flat(prefix + key, sub).items()}


def train_data_hash(spec: StudySpec) -> str:
    """The hash of the training annotation file: which data a base or a pool was trained on."""
    path = (spec.data.dir / "train.json").resolve()
    st = path.stat()
    return _file_hash(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_hash(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file, computed once per version of it (a COCO train.json is 0.5 GB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def data_cache(spec: StudySpec) -> Cache:
    """The data folder as a cache of ``data.synth``."""
    return Cache(
        spec.data.dir, f"the data generated earlier in {spec.data.dir} had", "regenerate it"
    )


def data_fields(spec: StudySpec) -> dict[str, Any]:
    """What makes the synthetic data: ``data.synth``."""
    return _flat("data.synth", plain(spec.data.synth))


def check_cached_data(spec: StudySpec) -> None:
    """Synthetic data generated earlier is reused only if ``data.synth`` made it (data not
    generated by jdsearch, or generated by an earlier one, is the user's: taken as it is)."""
    cache = data_cache(spec)
    made = read_made_by(cache) if spec.data.synth is not None else None
    if made is not None:
        check_cache(spec, cache, data_fields(spec), made)


def base_cache(spec: StudySpec) -> Cache:
    """``runs/<name>/base.safetensors``, the base detector a study trains itself."""
    path = run_dir(spec) / "base.safetensors"
    return Cache(path, f"the base trained earlier, {path}, started from", "train a new base")


def base_fields(spec: StudySpec) -> dict[str, Any]:
    """The spec parts that make a base the study trains: the detector (its name and its spec),
    the initial weights, the training settings, the seed, BN sparsity and the training data."""
    train = {k: v for k, v in plain(spec.base.train).items() if k not in _NOT_MAKING}
    for key in STUDY_SET["exclude"]:
        train.pop(key)
    weights = spec.base.backbone_weights
    return {
        "base.detector": spec.base.detector,
        "base.detector's spec": cache_key(load_spec(spec.base.detector).to_dict()),
        "base.backbone_weights": None if weights is None else str(weights),
        **_flat("base.train", train),
        "search.seed": spec.search.seed,
        "search.bn_sparsity": spec.search.bn_sparsity,
        "amp": spec.amp,
        "resolutions": [str(r) for r in spec.resolutions],
        "data (train.json's hash)": train_data_hash(spec),
    }


def _base_made_by_metadata(path: Path) -> dict[str, Any]:
    """What a base without a record tells of what made it: its initial weights and detector."""
    meta = read_checkpoint_metadata(path)
    stored = meta.get("spec") or {}
    return {
        "base.backbone_weights": meta.get("extra", {}).get("backbone_weights"),
        "base.detector's name": stored.get("name"),
    }


def check_cached_base(spec: StudySpec) -> None:
    """A base trained earlier is reused only if this spec's parts made it (:func:`base_fields`).

    Raises:
        SpecError: naming the first field that differs, both values, and the file to delete.
    """
    cache = base_cache(spec)
    wanted = base_fields(spec)
    made = read_made_by(cache)
    if made is None:
        wanted["base.detector's name"] = load_spec(spec.base.detector).name
        made = _base_made_by_metadata(cache.path)
    check_cache(spec, cache, wanted, made)


def pool_cache(spec: StudySpec) -> Cache:
    """``runs/<name>/pool.safetensors``, the elastic teacher pool."""
    path = run_dir(spec) / "pool.safetensors"
    return Cache(path, f"the pool trained earlier, {path}, was trained with", "train a new pool")


def _pool_doc_fields(pool: Any) -> dict[str, Any]:
    """A pool spec's to_dict form as dotted fields, less what changes nothing in its weights
    (the BN recalibration of extracted teachers, logging)."""
    fields = _flat("pool", {k: v for k, v in pool.items() if k != "recalibration_batches"})
    return {k: v for k, v in fields.items() if k.rsplit(".", 1)[-1] not in _NOT_MAKING}


def pool_fields(spec: StudySpec) -> dict[str, Any]:
    """The spec parts that make the pool: the ``pool`` section and the training data."""
    return {
        **_pool_doc_fields(spec.pool.to_dict()),
        "data (train.json's hash)": train_data_hash(spec),
    }


def _pool_metadata(path: Path) -> dict[str, Any]:
    try:
        doc = read_checkpoint_metadata(path).get("extra", {}).get("pool")
    except JDSearchError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict):
        raise SpecError(f"{path}: not a teacher pool: delete it to train the pool")
    return doc


def cached_pool_done(spec: StudySpec) -> bool:
    """Whether the pool trained earlier can serve: it is refused (:class:`SpecError`) unless this
    spec's parts made it; ``False`` when phases are left to train (resumed by the search)."""
    cache = pool_cache(spec)
    doc = _pool_metadata(cache.path)
    made = read_made_by(cache) or _pool_doc_fields(doc["spec"])
    check_cache(spec, cache, pool_fields(spec), made)
    return len(doc.get("record") or []) >= len(spec.pool.phases)


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
    cache = base_cache(spec)
    path = cache.path
    if path.is_file():
        check_cached_base(spec)
        if read_made_by(cache) is None:
            _say(f"using {path}, trained by an earlier jdsearch that did not record its settings")
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
        _say(loaded)
        extra["backbone_weights"] = str(spec.base.backbone_weights)
    _say(f"training the base detector {detector.spec.name} ({spec.base.train.epochs:g} epochs) ...")
    config = spec.train_config(spec.base.train, spec.search.seed)
    terms = [BNSparsity(spec.search.bn_sparsity)] if spec.search.bn_sparsity > 0 else []
    try:
        result = train(detector, train_set, config, loss_terms=terms, progress=progress)
    except TrainingDiverged as e:  # the spec's settings (lr…) make it diverge: name them
        raise SpecError(f"{spec.source}: base.train: {e}") from None
    _say(
        f"  {result.iterations} iterations in {result.seconds:.0f} s ({result.images_per_s:.1f} img/s)"
    )
    extra["train"] = result.to_dict()
    return detector, extra


def _pool_file(
    spec: StudySpec, pool_spec: PoolSpec, train_set: CocoDataset, progress: bool
) -> Path:
    cache = pool_cache(spec)
    _say(f"training the elastic teacher pool (cache {cache.path}) ...")
    announce(POOL)
    with distributed.lockstep("the teacher pool's training"):
        train_and_save_pool(pool_spec, train_set, cache.path, device=spec.device, progress=progress)
    write_made_by(cache, pool_fields(spec))
    return cache.path


def prepare(
    spec: StudySpec,
    storage_url: str | None = None,
    *,
    progress: bool = True,
    stored: bool = False,
) -> tuple[optuna.Study, SearchContext]:
    """Open (or create) the study and make sure its storage holds what every worker needs.

    Its phases: open the study with the hill-climbing sampler, record the spec and the dataset's
    category ids, upload the base detector and the pool (trained here when the storage has
    neither), then load both back from the storage.

    ``stored``: ``spec`` was read from the study itself (``noise``, ``finetune``), so anyone who
    can write the database wrote it: nothing is generated, trained or uploaded from the paths it
    names; the study must already hold its base and pool, and the dataset must be here.

    Returns:
        The study and the :class:`SearchContext` its trials share.

    Raises:
        SpecError: the data, base checkpoint or pool the spec names are missing.
        JDSearchError: the base detector does not fit the dataset, or the storage fails.
    """
    check_device(spec)
    storage, url = open_storage(spec, storage_url)  # first: it creates a SQLite file's folder
    store = make_artifact_store(spec.search.artifacts, url)
    if isinstance(store, SQLArtifactStore):
        # Uploads of workers killed mid-write, older than an hour: nobody will finish them
        # (`jdsearch gc` removes the rest of what no study reads).
        store.purge_incomplete(older_than_s=3600.0)
    train_set, val_set = ensure_data(spec, generate=not stored)
    holder: dict[str, SearchContext] = {}
    study = _open(spec, storage, lambda parent: holder["ctx"].feasible(parent))
    if stored:
        _require_assets(study)
    _record_spec(study, spec, train_set)
    _upload_assets(study, store, spec, train_set, progress)
    ctx = holder["ctx"] = load_assets(study, store, spec, train_set, val_set, progress)
    # With a fixed teacher or none (kd.mode, or the teacher check) there is no teacher to adapt
    # first: no freeze.
    freeze = spec.search.freeze_student if ctx.spec.kd.mode == "dynamic" else 0
    study.sampler.freeze_student = freeze  # type: ignore[attr-defined]
    return study, ctx


def check_device(spec: StudySpec) -> None:
    """The spec's ``device`` exists here (a CUDA device needs a GPU that torch sees).

    Raises:
        SpecError: naming the study file, ``device`` and what torch said.
    """
    import torch

    try:
        dev = torch.device(spec.device)
        count = torch.cuda.device_count() if dev.type == "cuda" else 0
        if dev.type == "cuda" and (dev.index or 0) >= count:
            raise RuntimeError(f"torch sees {count} CUDA device(s) here")
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as e:  # torch's "not compiled with CUDA" is an assert
        why = first_line(e)
        raise SpecError(f"{spec.source}: device: {spec.device!r} is not usable ({why})") from None


def storage_url_for(spec: StudySpec, storage_url: str | None = None) -> str:
    """The URL the search opens: ``storage_url`` (checked as the spec's ``search.storage`` is at
    load) or the spec's, with an installed driver (``postgresql://`` names none).

    Raises:
        JDSearchError: a URL that is not one, an in-memory database, a driver not installed.
    """
    url = storage_url or spec.storage_url
    try:
        if storage_url is not None:
            check_storage_url(storage_url)
        check_dialect(url)
    except ValueError as e:
        where = f"storage {public_url(url)}" if storage_url else f"{spec.source}: search.storage"
        raise JDSearchError(f"{where}: {e}") from None
    return with_driver(url)


def open_storage(spec: StudySpec, storage_url: str | None = None) -> tuple[ResilientStorage, str]:
    """The study's storage, and the URL it was opened with (:func:`storage_url_for`).

    Raises:
        JDSearchError: a bad URL, or a database that cannot be opened (unreachable, refused,
            not writable), with the driver's reason, password masked.
    """
    url = storage_url_for(spec, storage_url)
    try:
        return storage_for(spec, url), url
    except JDSearchError:
        raise
    except Exception as e:  # SQLAlchemy/driver errors: unreachable server, bad credentials
        raise JDSearchError(
            f"{public_url(url)}: cannot open the study's storage ({root_cause(e)})"
        ) from None


def _open(spec: StudySpec, storage: ResilientStorage, feasible: Any) -> optuna.Study:
    sampler = HillClimbingSampler(
        move_vocabulary(),
        feasible,
        top_k=spec.search.top_k,
        freeze_student=0,  # prepare sets it once the teacher check has decided
        p_student=spec.search.p_student,
        seed=spec.search.seed,
        strategy=spec.search.strategy,
    )
    study = create_or_load(spec, storage, sampler)  # score.mode's objectives and their names
    sampler.moves = tuple(study_vocabulary(study))  # an older study keeps its own choices
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


def _require_assets(study: optuna.Study) -> None:
    """A study opened with its own stored spec must hold its base and pool already."""
    for key, what in ((BASE_ATTR, "base detector"), (POOL_ATTR, "teacher pool")):
        if key not in study.user_attrs:
            raise JDSearchError(
                f"study {study.study_name!r} holds no {what} yet; run `jdsearch search SPEC` "
                "(which trains and uploads it) before this command"
            )


def _upload_assets(
    study: optuna.Study, store: Any, spec: StudySpec, train_set: CocoDataset, progress: bool
) -> None:
    """The base detector and the pool into the study's artifact store, unless already there."""
    if BASE_ATTR not in study.user_attrs:
        _study_artifact(study, store, BASE_ATTR, _base_checkpoint(spec, train_set, progress))
    if POOL_ATTR not in study.user_attrs:
        cache = pool_cache(spec).path
        done = cache.is_file() and cached_pool_done(spec)
        path = cache if done else _pool_file(spec, spec.pool, train_set, progress)
        _study_artifact(study, store, POOL_ATTR, path)


def load_assets(
    study: optuna.Study,
    store: Any,
    spec: StudySpec,
    train_set: CocoDataset,
    val_set: CocoDataset,
    progress: bool,
    *,
    write: bool = True,
    kd_mode: str | None = None,
) -> SearchContext:
    """The pool and base detector as the storage holds them (what every worker sees).
    ``write``: also record the base's FLOPs and resolution in the study (rank 0). ``kd_mode``:
    the KD mode rank 0's teacher check decided (a rank under torchrun), used as it is; else this
    worker applies the check (``kd.when``)."""
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
    vocabulary = tuple(study_vocabulary(study))  # the study's own choices, as _open read them
    if spec.search.strategy == "pool" and not set(pool_moves()) <= set(vocabulary):
        raise JDSearchError(
            f"study {spec.name}: created by an older jdsearch whose trials know no pool moves; "
            "search.strategy: pool needs a new study"
        )
    ctx = SearchContext(
        spec, store, train_set, val_set, pool, base_id, base_res, base_flops, progress, vocabulary
    )
    if kd_mode is not None:
        use_kd_mode(ctx, kd_mode)
        return ctx
    check = apply_teacher_check(study, ctx, base.detector, write=write)  # kd.when
    if check is not None and write:
        _say(check.describe())
    return ctx


def _same_spec(stored: Any, spec: StudySpec) -> bool:
    """Whether a study's stored spec describes ``spec`` (once both are read and normalised)."""
    try:
        return study_from_stored(stored, source="stored spec").to_dict() == spec.to_dict()
    except SpecError:
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
    if n_trials is not None and n_trials < 1:
        raise JDSearchError(f"n_trials must be ≥ 1, got {n_trials}")
    # Under torchrun: rank 0 searches, the other ranks train along (jdsearch.search.ranks).
    if distributed.init_from_env(spec.device) and not distributed.is_main():
        from jdsearch.search.follower import follow

        return follow(spec, storage_url)
    try:
        return _search(spec, storage_url, n_trials, progress)
    finally:
        if not distributed.out_of_step():  # else the others wait elsewhere: torchrun stops them
            announce(STOP)


def _search(
    spec: StudySpec, storage_url: str | None, n_trials: int | None, progress: bool
) -> optuna.Study:
    study, ctx = prepare(spec, storage_url, progress=progress)
    announce(READY, kd_mode=ctx.spec.kd.mode)  # the teacher check's decision, for every rank
    n = n_trials if n_trials is not None else spec.search.n_trials
    shown = public_url(storage_url or spec.storage_url)
    _say(f"searching: study {spec.name!r} on {shown}, {n} trials in this worker")
    started = time.perf_counter()
    outcomes = _Outcomes(Objective(ctx))
    optimize(study, outcomes, n, [print_trial, outcomes.finished])
    _say(f"done in {time.perf_counter() - started:.0f} s")
    if outcomes.completed == 0:
        raise JDSearchError(
            f"study {spec.name}: none of the {n} trials of this worker completed; "
            f"the first failed: {outcomes.failure or 'no reason recorded'}"
        )
    return study


def optimize(study: optuna.Study, objective: Any, n_trials: int, callbacks: list[Any]) -> None:
    """``study.optimize``, as a worker adds its trials: a failing trial (a
    :class:`JDSearchError`) is recorded and the next one starts; garbage is collected after each
    trial (a freed trial's tensors go), but what prepare built (data, pool, base) and every module
    imported so far live as long as the search: frozen, the collections do not walk them again."""
    gc.collect()
    gc.freeze()
    try:
        study.optimize(
            objective,
            n_trials=n_trials,
            catch=(JDSearchError,),
            callbacks=callbacks,
            gc_after_trial=True,
        )
    finally:
        gc.unfreeze()


class _Outcomes:
    """The objective, counting this worker's completed trials and keeping the first failure."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.completed = 0
        self.failure: str | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self.objective(trial)
        except JDSearchError as e:
            distributed.check_in_step(e)  # under torchrun, a failure of this rank alone: stop
            self.failure = self.failure or str(e)
            raise

    def finished(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """An ``optimize`` callback: count a completed trial."""
        if trial.state == optuna.trial.TrialState.COMPLETE:
            self.completed += 1
