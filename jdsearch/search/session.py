"""One search run, built in one pass: :func:`open_run` settles, in order, the spec, the storage,
the assets (base detector and teacher pool), the teacher check, the move vocabulary and the
strategy, and only then builds the sampler and the trials' context with their final settings.
The :class:`SearchRun` it returns is immutable: nothing is set on the sampler or the spec after
construction. A rank other than 0 under ``torchrun`` builds the same run read-only, with the KD
mode rank 0 decided (:mod:`jdsearch.search.follower`).

Imports every layer below the search and the search's own modules but :mod:`jdsearch.search.run`
and the follower.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import optuna

from jdsearch.core.errors import JDSearchError, SpecError, first_line
from jdsearch.models import Detector
from jdsearch.search.assets import (
    StudyAssets,
    ensure_data,
    load_assets,
    record_spec,
    require_assets,
    say,
    upload_assets,
)
from jdsearch.search.notes import note_lost_worker, retry_attrs
from jdsearch.search.objective import (
    Objective,
    SearchContext,
    pool_moves,
    study_vocabulary,
    worker_id,
)
from jdsearch.search.queries import create_or_load
from jdsearch.search.record import WORKER_SYSATTR
from jdsearch.search.sampler import HillClimbingSampler
from jdsearch.search.strategies import (
    KDMode,
    Strategy,
    kd_mode_named,
    score_mode_named,
    strategy_named,
)
from jdsearch.search.teacher_check import TeacherCheck, decide_kd
from jdsearch.spec.study import StudySpec, check_storage_url
from jdsearch.storage.artifacts import SQLArtifactStore, make_artifact_store
from jdsearch.storage.rdb import (
    ResilientStorage,
    check_dialect,
    public_url,
    root_cause,
    storage_for,
    with_driver,
)

log = logging.getLogger(__name__)

__all__ = [
    "SearchRun",
    "check_device",
    "open_run",
    "open_storage",
    "prepare",
    "storage_url_for",
]


@dataclass(frozen=True)
class SearchRun:
    """A study opened for searching, with everything its trials share, settled once.

    ``study`` carries the run's :class:`HillClimbingSampler`; ``ctx`` is what every trial of this
    worker shares; ``check`` is the teacher check that decided ``kd`` (``None``: none applied).
    Stable: ``spec``, ``storage``, ``study``, :meth:`objective` and :meth:`sampler`; the rest may
    change between minor versions.
    """

    spec: StudySpec
    url: str  # the storage URL, with its driver
    storage: ResilientStorage  # the study's storage (heartbeats, retries over outages)
    store: Any  # the study's artifact store
    study: optuna.Study
    ctx: SearchContext
    check: TeacherCheck | None

    @property
    def strategy(self) -> Strategy:
        """The search strategy (``search.strategy``)."""
        return self.ctx.strategy

    @property
    def kd(self) -> KDMode:
        """How the trials distil: ``kd.mode``, or none when the teacher check refused the pool."""
        return self.ctx.kd

    def objective(self) -> Objective:
        """A new objective for ``study.optimize`` over this run's trials (stable)."""
        return Objective(self.ctx)

    def sampler(self) -> HillClimbingSampler:
        """A new :class:`HillClimbingSampler` with this run's settings (strategy, move vocabulary,
        feasible moves, top-k, freeze, seed), for a study of your own (stable)."""
        return _sampler(self.ctx)


def open_run(
    spec: StudySpec,
    storage_url: str | None = None,
    *,
    progress: bool = True,
    stored: bool = False,
    decided_kd: str | None = None,
    device: str | None = None,
) -> SearchRun:
    """Open (or create) the study and build its run in one pass.

    In order: the spec's device; the storage and its artifact store; the data; the study's
    record of the spec; the base detector and the pool (trained and uploaded here when the
    storage holds neither), read back from the storage; the teacher check (``kd.when``); the move
    vocabulary (an older study keeps its own); the strategy. Then the context and the sampler.

    Args:
        spec: the study spec.
        storage_url: default the spec's.
        progress: progress bars while training the base or the pool.
        stored: ``spec`` was read from the study itself (``noise``, ``finetune``), so anyone who
            can write the database wrote it: nothing is generated, trained or uploaded from the
            paths it names; the study must already hold its base and pool.
        decided_kd: a rank other than 0 under ``torchrun``: the KD mode rank 0's teacher check
            decided. The run is then built read-only: nothing is written to the study, the
            artifact store or the run folder.
        device: this worker's device (``jdsearch search --device``), instead of the spec's; the
            study records the spec as given.

    Returns:
        The :class:`SearchRun`.

    Raises:
        SpecError: the data, base checkpoint or pool the spec names are missing.
        JDSearchError: the base detector does not fit the dataset, or the storage fails.
    """
    write = decided_kd is None
    given, spec = spec, spec if device is None else dataclasses.replace(spec, device=device)
    check_device(spec)
    storage, url = open_storage(spec, storage_url)  # first: it creates a SQLite file's folder
    store = make_artifact_store(spec.search.artifacts, url)
    with _dropped_if_refused(storage, spec.name, write):
        handle, assets, base = _assets(
            spec, given, storage, store, progress=progress, stored=stored, write=write
        )
        if decided_kd is None:
            kd, check = decide_kd(handle, assets, base, write=True)  # kd.when
            if check is not None:
                say(check.describe())
        else:
            kd, check = kd_mode_named(decided_kd), None
        del base  # the teacher check's alone: not kept for the search
        ctx = _context(handle, store, assets, kd, progress)
    study = optuna.load_study(study_name=spec.name, storage=storage, sampler=_sampler(ctx))
    return SearchRun(spec, url, storage, store, study, ctx, check)


@contextlib.contextmanager
def _dropped_if_refused(storage: ResilientStorage, name: str, write: bool) -> Iterator[None]:
    """Delete study ``name`` again when the block, which creates it, refuses to start (a
    :class:`JDSearchError`: a cache made by other settings, a base that does not fit the data)
    before the study has a trial, so that a refused start leaves nothing in the storage. A study
    that was there before the block is kept; what was uploaded for it is left to ``jdsearch gc``."""
    created = write and name not in optuna.get_all_study_names(storage)
    try:
        yield
    except JDSearchError:
        if created:
            _drop_if_empty(storage, name)
        raise


def _drop_if_empty(storage: ResilientStorage, name: str) -> None:
    try:
        study = optuna.load_study(
            study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler()
        )
        if not study.get_trials(deepcopy=False):
            optuna.delete_study(study_name=name, storage=storage)
    except Exception as e:  # the refusal is what the user must read; this is a warning at most
        log.warning("study %s: not deleted after the refused start (%s)", name, first_line(e))


def _assets(
    spec: StudySpec,
    given: StudySpec,
    storage: ResilientStorage,
    store: Any,
    *,
    progress: bool,
    stored: bool,
    write: bool,
) -> tuple[optuna.Study, StudyAssets, Detector]:
    """The data, the study's record of the spec (``given``: as the user gave it, whatever device
    this worker runs on), and the base and pool as its storage holds them (trained and uploaded
    first where it holds neither, unless ``stored`` or not ``write``)."""
    if write and isinstance(store, SQLArtifactStore):
        # Uploads of workers killed mid-write, older than an hour: nobody will finish them
        # (`jdsearch gc` removes the rest of what no study reads).
        store.purge_incomplete(older_than_s=3600.0)
    train_set, val_set = ensure_data(spec, generate=write and not stored)
    handle = _handle(spec, storage, write)
    if write:
        if stored:
            require_assets(handle)
        record_spec(handle, given, train_set)
        upload_assets(handle, store, spec, train_set, progress)
    assets, base = load_assets(handle, store, spec, train_set, val_set, write=write)
    return handle, assets, base


def _context(
    handle: optuna.Study, store: Any, assets: StudyAssets, kd: KDMode, progress: bool
) -> SearchContext:
    """What the run's trials share: the assets, the study's move vocabulary (an older study keeps
    its own choices), the strategy, the KD mode and the score mode."""
    spec = assets.spec
    vocabulary = tuple(study_vocabulary(handle))
    strategy = strategy_named(spec.search.strategy)
    if strategy.pool_students and not set(pool_moves()) <= set(vocabulary):
        raise JDSearchError(
            f"study {spec.name}: created by an older jdsearch whose trials know no pool moves; "
            f"search.strategy: {strategy.name} needs a new study"
        )
    return SearchContext(
        spec,
        store,
        assets.train_set,
        assets.val_set,
        assets.pool,
        assets.base_artifact,
        assets.base_resolution,
        assets.base_flops,
        progress,
        vocabulary,
        strategy=strategy,
        kd=kd,
        score=score_mode_named(spec.score.mode),
    )


def _handle(spec: StudySpec, storage: ResilientStorage, write: bool) -> optuna.Study:
    """The study while its run is built: its attrs are read and written through it, but it never
    asks for a trial (the run's study, with its sampler, does)."""
    sampler = optuna.samplers.RandomSampler()
    if write:
        return create_or_load(spec, storage, sampler)  # score.mode's objectives and their names
    return optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler)


def _sampler(ctx: SearchContext) -> HillClimbingSampler:
    """The run's sampler, with its final settings: with a fixed teacher or none (``kd.mode``, or
    the teacher check) there is no teacher to adapt first, so no student freeze."""
    s = ctx.spec.search
    return HillClimbingSampler(
        ctx.vocabulary,
        ctx.feasible,
        top_k=s.top_k,
        freeze_student=s.freeze_student if ctx.kd.moves_teacher else 0,
        p_student=s.p_student,
        seed=s.seed,
        strategy=ctx.strategy,
    )


def prepare(
    spec: StudySpec,
    storage_url: str | None = None,
    *,
    progress: bool = True,
    stored: bool = False,
) -> tuple[optuna.Study, SearchContext]:
    """Open (or create) the study and make sure its storage holds what every worker needs: the
    study and its trials' context of :func:`open_run`.

    Returns:
        The study (with the run's sampler) and the :class:`SearchContext` its trials share.

    Raises:
        SpecError: the data, base checkpoint or pool the spec names are missing.
        JDSearchError: the base detector does not fit the dataset, or the storage fails.
    """
    run = open_run(spec, storage_url, progress=progress, stored=stored)
    return run.study, run.ctx


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
        started = {WORKER_SYSATTR: worker_id()}  # each trial this worker starts says so
        storage = storage_for(
            spec, url, on_stale=note_lost_worker, retry_attrs=retry_attrs, started=started
        )
        return storage, url
    except JDSearchError:
        raise
    except Exception as e:  # SQLAlchemy/driver errors: unreachable server, bad credentials
        raise JDSearchError(
            f"{public_url(url)}: cannot open the study's storage ({root_cause(e)})"
        ) from None
