"""The search: an Optuna study on an RDB storage, prepared once, then as many workers as you like.

``prepare`` makes sure the study's storage holds what every worker needs — the study spec, the
base detector and the elastic teacher pool (trained here when the storage has none; the local
files under ``runs/<study>/`` are only caches) — and ``run_search`` adds trials. Workers started
on several machines with the same storage URL cooperate on one study: Optuna hands out trials,
heartbeats mark a killed worker's trial failed and ``RetryHeartbeatStaleTrialCallback`` re-queues it with
the same parent and move.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from jdsearch import synth
from jdsearch.artifacts import SQLArtifactStore, make_artifact_store
from jdsearch.checkpoint import Checkpoint, checkpoint_from_bytes, save_checkpoint
from jdsearch.data import CocoDataset
from jdsearch.errors import JDSearchError, SpecError
from jdsearch.flops import count_flops
from jdsearch.models import build_detector
from jdsearch.objective import (
    CHECKPOINT_ATTR,
    Objective,
    SearchContext,
    move_vocabulary,
)
from jdsearch.pool import PoolSpec, load_pool, pool_from_bytes, train_and_save_pool
from jdsearch.pruning import BNSparsity
from jdsearch.sampler import BASE_MOVE, MOVE_PARAM, PARENT_ATTR, HillClimbingSampler
from jdsearch.spec import load_spec
from jdsearch.study import StudySpec, study_from_stored
from jdsearch.train import train

log = logging.getLogger(__name__)

BASE_ATTR = "base_artifact"
POOL_ATTR = "pool_artifact"
SPEC_SYSATTR = "jdsearch:spec"  # the study spec, as a dict (a system attr: too long to print)
CATEGORIES_SYSATTR = "jdsearch:categories"  # [[COCO category id, name], ...] in label order 1..K


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_dir(spec: StudySpec) -> Path:
    return Path("runs") / spec.name


def ensure_data(spec: StudySpec) -> tuple[CocoDataset, CocoDataset]:
    d = spec.data.dir
    if not (d / "train.json").is_file() or not (d / "val.json").is_file():
        if spec.data.synth is None:
            raise SpecError(
                f"{spec.source}: data.dir {d} has no train.json/val.json and no data.synth to generate them"
            )
        s = spec.data.synth
        _say(f"generating the synthetic dataset ({s.images} images, seed {s.seed}) in {d} ...")
        synth.generate(d, images=s.images, seed=s.seed, size=s.size)
    train_set = CocoDataset(d / "train.json", d / "images")
    val_set = CocoDataset(d / "val.json", d / "images", max_images=spec.data.max_val_images)
    return train_set, val_set


def storage_for(spec: StudySpec, url: str | None = None) -> RDBStorage:
    url = url or spec.storage_url
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    hb = spec.search.heartbeat_s
    return RDBStorage(
        url,
        heartbeat_interval=hb,
        grace_period=2 * hb,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
            max_retry=spec.search.max_retry
        ),
        engine_kwargs={"pool_pre_ping": True},
    )


def _study_artifact(study: optuna.Study, store: Any, key: str, path: Path) -> str:
    from optuna.artifacts import upload_artifact

    artifact_id = upload_artifact(study_or_trial=study, file_path=str(path), artifact_store=store)
    study.set_user_attr(key, artifact_id)
    return artifact_id


def _base_checkpoint(
    spec: StudySpec, train_set: CocoDataset, val_set: CocoDataset, progress: bool
) -> Path:
    """The base detector's checkpoint file: given, cached, or trained now."""
    if spec.base.checkpoint is not None:
        if not spec.base.checkpoint.is_file():
            raise SpecError(f"{spec.source}: base.checkpoint {spec.base.checkpoint} does not exist")
        return spec.base.checkpoint
    path = run_dir(spec) / "base.safetensors"
    if path.is_file():
        return path
    det_spec = load_spec(spec.base.detector)
    detector = build_detector(det_spec, train_set.num_classes, seed=spec.search.seed)
    _say(f"training the base detector {det_spec.name} ({spec.base.train.epochs:g} epochs) ...")
    config = spec.train_config(spec.base.train, spec.search.seed)
    terms = [BNSparsity(spec.search.bn_sparsity)] if spec.search.bn_sparsity > 0 else []
    result = train(detector, train_set, config, loss_terms=terms, progress=progress)
    _say(
        f"  {result.iterations} iterations in {result.seconds:.0f} s ({result.images_per_s:.1f} img/s)"
    )
    return save_checkpoint(
        path, detector, class_names=train_set.class_names, extra={"train": result.to_dict()}
    )


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
    """Open (or create) the study and make sure its storage holds the base detector and pool."""
    storage = storage_for(spec, storage_url)
    url = storage_url or spec.storage_url
    store = make_artifact_store(spec.search.artifacts, url)
    if isinstance(store, SQLArtifactStore):
        # Uploads of workers killed mid-write, older than a day: nobody will finish them.
        store.purge_incomplete(older_than_s=24 * 3600.0)
    train_set, val_set = ensure_data(spec)
    pool_spec = spec.pool
    vocabulary = move_vocabulary()
    holder: dict[str, SearchContext] = {}

    def feasible(parent: optuna.trial.FrozenTrial) -> tuple[list[str], list[str]]:
        return holder["ctx"].feasible(parent)

    sampler = HillClimbingSampler(
        vocabulary,
        feasible,
        top_k=spec.search.top_k,
        freeze_student=spec.search.freeze_student,
        p_student=spec.search.p_student,
        seed=spec.search.seed,
    )
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=sampler,
        direction="maximize",
        load_if_exists=True,
    )
    stored_spec = storage.get_study_system_attrs(study._study_id).get(SPEC_SYSATTR)
    if stored_spec is not None and not _same_spec(stored_spec, spec):
        log.warning(
            "study %s was created with a different spec; the stored base and pool are kept",
            spec.name,
        )
    if stored_spec is None:
        storage.set_study_system_attr(study._study_id, SPEC_SYSATTR, spec.to_dict())
        study.set_user_attr("spec_file", spec.source)
    if CATEGORIES_SYSATTR not in storage.get_study_system_attrs(study._study_id):
        # An export must map labels back to the dataset's ids without the dataset at hand.
        categories = [
            [int(i), n] for i, n in zip(train_set.category_ids, train_set.class_names, strict=True)
        ]
        storage.set_study_system_attr(study._study_id, CATEGORIES_SYSATTR, categories)

    if BASE_ATTR not in study.user_attrs:
        path = _base_checkpoint(spec, train_set, val_set, progress)
        _study_artifact(study, store, BASE_ATTR, path)
    base_id = study.user_attrs[BASE_ATTR]
    if POOL_ATTR not in study.user_attrs:
        cache = run_dir(spec) / "pool.safetensors"
        path = (
            cache
            if cache.is_file() and _pool_matches(cache, pool_spec)
            else _pool_file(spec, pool_spec, train_set, progress)
        )
        _study_artifact(study, store, POOL_ATTR, path)
    with store.open_reader(study.user_attrs[POOL_ATTR]) as reader:
        pool = pool_from_bytes(reader.read(), source=f"study {spec.name}: pool", device=spec.device)
    with store.open_reader(base_id) as reader:
        base = checkpoint_from_bytes(
            reader.read(), source=f"study {spec.name}: base", device=spec.device
        )
    if base.num_classes != train_set.num_classes:
        raise JDSearchError(
            f"base detector has {base.num_classes - 1} classes, the dataset {train_set.num_classes - 1}"
        )
    base_res = base.spec.input.size
    base_flops = count_flops(base.detector, size=base_res.hw).total
    study.set_user_attr("base_flops", base_flops)
    study.set_user_attr("base_resolution", str(base_res))
    ctx = SearchContext(
        spec, store, train_set, val_set, pool, base_id, base_res, base_flops, progress
    )
    holder["ctx"] = ctx
    return study, ctx


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
        callbacks=[_print_trial],
        gc_after_trial=True,
    )
    _say(f"done in {time.perf_counter() - started:.0f} s")
    return study


def _print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    move = str(trial.params.get(MOVE_PARAM))
    if trial.state != optuna.trial.TrialState.COMPLETE:
        _say(f"trial {trial.number:3d}  {move:<20} {trial.state.name}")
        return
    c = _cells(trial)
    parent = trial.user_attrs.get(PARENT_ATTR)
    _say(
        f"trial {trial.number:3d}  {move:<20} from {'-' if parent is None else parent:>3}: H {c['H']}  "
        f"AP {c['AP']} at {c['resolution']}  GFLOPs {c['GFLOPs']}  teacher {trial.user_attrs.get('teacher')}"
    )


def completed_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """COMPLETE trials with a finite value (H), by trial number."""
    done = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)
    ]
    return sorted(done, key=lambda t: t.number)


def best_of(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The completed trial with the highest H, the earlier one on a tie (``None``: none yet)."""
    done = completed_trials(trials)
    return max(done, key=lambda t: (float(t.value), -t.number)) if done else None  # type: ignore[arg-type]


def root_of(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The first completed ``base`` trial: the base detector's own fast evaluation."""
    return next(
        (t for t in completed_trials(trials) if t.params.get(MOVE_PARAM) == BASE_MOVE), None
    )


def lineage_of(trials: Sequence[FrozenTrial], number: int) -> list[FrozenTrial]:
    """Trials from the root to ``number`` following ``parent`` links; stops at a parent that is
    missing (or at a loop, which only a hand-edited database can hold)."""
    by_number = {t.number: t for t in trials}
    if number not in by_number:
        raise JDSearchError(f"no trial {number} among the {len(by_number)} trials")
    path: list[FrozenTrial] = []
    current: int | None = number
    while current is not None and current in by_number and all(t.number != current for t in path):
        t = by_number[current]
        path.append(t)
        parent = t.user_attrs.get(PARENT_ATTR)
        current = None if parent is None else int(parent)
    return path[::-1]


def lineage(study: optuna.Study, number: int) -> list[FrozenTrial]:
    """:func:`lineage_of` the study's trials."""
    return lineage_of(study.get_trials(deepcopy=False), number)


def _cells(t: optuna.trial.FrozenTrial) -> dict[str, str]:
    """H, and AP / GFLOPs / params at the resolution where the trial scored best."""
    a = t.user_attrs
    res = a.get("best_resolution", "")
    ap = a.get("metrics", {}).get(res, {}).get("AP")
    flops = a.get("flops_at", {}).get(
        res, a.get("flops", 0)
    )  # older trials: at the base resolution
    return {
        "H": f"{t.value:.4f}",
        "AP": "-" if ap is None else f"{100 * ap:.1f}",
        "GFLOPs": f"{flops / 1e9:.3f}",
        "params (M)": f"{a.get('params', 0) / 1e6:.3f}",
        "resolution": str(res),
    }


def summary(study: optuna.Study) -> str:
    """Base vs best student: H, AP, FLOPs, resolution, and the lineage path of moves."""
    trials = study.get_trials(deepcopy=False)
    root, best = root_of(trials), best_of(trials)
    if root is None or best is None:
        return "no completed trial yet"
    base, top = _cells(root), _cells(best)
    lines = [f"{'':<12}{f'base (trial {root.number})':<20}best (trial {best.number})"]
    lines += [f"{k:<12}{base[k]:<20}{top[k]}" for k in base]
    lines.append(f"student     {root.user_attrs.get('student', '')}")
    lines.append(f"        ->  {best.user_attrs.get('student', '')}")
    lines.append(
        f"teacher     {root.user_attrs.get('teacher', '')}  ->  {best.user_attrs.get('teacher', '')}"
    )
    path = lineage(study, best.number)
    lines.append(
        "lineage     " + " -> ".join(f"{t.params.get(MOVE_PARAM)} (#{t.number})" for t in path)
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------- reading a finished study
@dataclass(frozen=True)
class StudyHandle:
    """An existing study opened for reading (export, report): no training, no trial is added."""

    study: optuna.Study
    spec: StudySpec
    store: Any  # the study's artifact store
    url: str

    def trial(self, number: int | None = None) -> optuna.trial.FrozenTrial:
        """Trial ``number`` (default: the best) — a completed trial with a student checkpoint."""
        if number is None:
            best = best_of(self.study.get_trials(deepcopy=False))
            if best is None:
                raise JDSearchError(f"study {self.study.study_name!r} has no completed trial yet")
            return best
        by_number = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        if number not in by_number:
            raise JDSearchError(
                f"study {self.study.study_name!r} has no trial {number} (trials 0–{len(by_number) - 1})"
            )
        t = by_number[number]
        if t.state != optuna.trial.TrialState.COMPLETE or CHECKPOINT_ATTR not in t.user_attrs:
            raise JDSearchError(
                f"study {self.study.study_name!r}: trial {number} is {t.state.name}, not a completed trial with a checkpoint"
            )
        return t

    def base_trial(self) -> optuna.trial.FrozenTrial:
        """The completed root trial (the base detector, trained briefly like every other trial)."""
        root = root_of(self.study.get_trials(deepcopy=False))
        if root is None:
            raise JDSearchError(f"study {self.study.study_name!r} has no completed base trial")
        return root

    def categories(self) -> list[tuple[int, str]] | None:
        """The dataset's (COCO category id, name) in label order, as recorded by ``prepare``."""
        stored = self.study._storage.get_study_system_attrs(self.study._study_id).get(
            CATEGORIES_SYSATTR
        )
        return None if stored is None else [(int(i), str(n)) for i, n in stored]

    def _read(self, artifact_id: str, what: str) -> bytes:
        try:
            with self.store.open_reader(artifact_id) as reader:
                return reader.read()
        except ArtifactNotFound:
            raise JDSearchError(
                f"study {self.study.study_name!r}: the {what} (artifact {artifact_id}) is missing from its artifact store"
            ) from None

    def checkpoint(self, trial: optuna.trial.FrozenTrial, device: str = "cpu") -> Checkpoint:
        """The student checkpoint a trial uploaded (verified, never unpickled)."""
        data = self._read(trial.user_attrs[CHECKPOINT_ATTR], f"checkpoint of trial {trial.number}")
        return checkpoint_from_bytes(
            data, source=f"study {self.study.study_name!r} trial {trial.number}", device=device
        )

    def study_artifact(self, key: str) -> bytes:
        """A study-level artifact (``base_artifact``, ``pool_artifact``) as bytes."""
        if key not in self.study.user_attrs:
            raise JDSearchError(f"study {self.study.study_name!r} has no {key}")
        return self._read(self.study.user_attrs[key], key)


def public_url(url: str) -> str:
    """``url`` with any password masked, for messages and exported metadata."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: keep only what follows the credentials
        return url.rsplit("@", 1)[-1]


def _root_cause(e: BaseException) -> str:
    """The innermost exception's first line (the driver's own words), credentials masked."""
    while e.__cause__ is not None or getattr(e, "orig", None) is not None:
        e = e.__cause__ or e.orig  # type: ignore[attr-defined]
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {re.sub(r'://[^@/ ]*@', '://***@', text)}"


def open_study(url: str, name: str | None = None) -> StudyHandle:
    """Open an existing jdsearch study on ``url`` (``name`` may be omitted when it holds one).

    Never creates anything: a missing SQLite file or study is an error naming what exists.
    """
    shown = public_url(url)
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file():
            raise JDSearchError(f"{shown}: no such database file {path}")
    try:
        storage = RDBStorage(url, skip_table_creation=True)
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    except Exception as e:  # SQLAlchemy/driver errors: unreachable server, not an Optuna database
        raise JDSearchError(
            f"{shown}: cannot read an Optuna study database ({_root_cause(e)})"
        ) from None
    names = sorted(s.study_name for s in summaries)
    if name is None:
        if len(names) != 1:
            raise JDSearchError(
                f"{shown}: holds {len(names)} studies ({', '.join(names) or 'none'}); name one with --study"
            )
        name = names[0]
    if name not in names:
        raise JDSearchError(f"{shown}: no study {name!r} (studies: {', '.join(names) or 'none'})")
    study = optuna.load_study(study_name=name, storage=storage)
    stored = storage.get_study_system_attrs(study._study_id).get(SPEC_SYSATTR)
    if stored is None:
        raise JDSearchError(
            f"{shown}: study {name!r} was not made by jdsearch (it has no {SPEC_SYSATTR} attribute)"
        )
    spec = study_from_stored(stored, source=f"study {name!r} (stored spec)")
    artifacts = spec.search.artifacts.strip()
    if (
        artifacts.startswith("file:")
        and not Path(os.path.expanduser(artifacts[len("file:") :])).is_dir()
    ):
        raise JDSearchError(
            f"study {name!r} keeps its checkpoints in {artifacts!r}, which is not a folder here "
            f"(relative to {Path.cwd()}); run from the folder the search ran in"
        )
    store = make_artifact_store(spec.search.artifacts, url)
    return StudyHandle(study, spec, store, url)
