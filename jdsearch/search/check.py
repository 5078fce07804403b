"""``jdsearch search SPEC --check``: everything a search needs, checked before anything trains.

The spec itself is validated when it loads. Here the rest is checked: the data (the checks of
``jdsearch data check`` on train, val and test), the selection and held-out splits, the base
checkpoint (it loads and fits the dataset's classes) or the base preset, and the pool's space
(every member fits the super-net). Then the plan is printed: what will be trained, the trials,
each trial's budget, and a time estimate from a few training steps measured here.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from jdsearch.core.errors import SpecError
from jdsearch.search.strategies import kd_mode_named
from jdsearch.spec.study import SPLITS, StudySpec

__all__ = ["CheckReport", "check_study"]


@dataclass
class CheckReport:
    """What :func:`check_study` found, as lines to print, and its time estimates in seconds."""

    lines: list[str] = field(default_factory=list)
    estimate_s: dict[str, float] = field(default_factory=dict)

    def add(self, line: str) -> None:
        """One more line of the report."""
        self.lines.append(line)


def check_study(spec: StudySpec, *, steps: int = 4, storage_url: str | None = None) -> CheckReport:
    """Check ``spec``'s device, storage, data, base detector and pool, and plan its search
    (nothing is trained; nothing is written).

    Args:
        spec: a loaded (hence validated) study.
        steps: training steps timed for the estimate (0: no estimate).
        storage_url: the storage the search will use (default the spec's).

    Returns:
        The report: what was checked and the plan.

    Raises:
        SpecError: missing data, base checkpoint or pool preset, a pool space that does not fit,
            a device that is not here, or a cache under ``runs/<name>/`` made by other settings.
        DataError: an invalid annotation file or image (named with the file and the record).
        JDSearchError: a base checkpoint that does not fit the dataset, a storage URL whose
            driver is missing or whose server does not answer.
    """
    from jdsearch.search.session import check_device

    report = CheckReport()
    report.add(f"study {spec.name} ({spec.source}): the spec is valid")
    check_device(spec)
    report.add(f"device: {spec.device}: available")
    _check_storage(spec, storage_url, report)
    train_set = _check_data(spec, report)
    if train_set is None:
        return report  # synthetic data not generated yet: nothing more to measure on
    base = _check_base(spec, train_set, report)
    pool = _check_pool(spec, train_set, report)
    _plan(spec, train_set, report)
    if steps > 0:
        _estimate(spec, train_set, base, pool, steps, report)
    return report


def _check_storage(spec: StudySpec, storage_url: str | None, report: CheckReport) -> None:
    """The URL is one, its driver is installed and, for a server, it answers (a SQLite file is
    not opened: that would create it)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from jdsearch.core.errors import JDSearchError
    from jdsearch.search.session import storage_url_for
    from jdsearch.storage.rdb import public_url, root_cause

    url = storage_url_for(spec, storage_url)
    if make_url(url).get_backend_name() == "sqlite":
        report.add(f"storage: {public_url(url)} (a SQLite file)")
        return
    engine = create_engine(url)
    try:
        with engine.connect():
            pass
    except Exception as e:  # SQLAlchemy/driver errors: unreachable server, bad credentials
        raise JDSearchError(
            f"{public_url(url)}: cannot open the study's storage ({root_cause(e)})"
        ) from None
    finally:
        engine.dispose()
    report.add(f"storage: {public_url(url)}: reachable")


def _check_data(spec: StudySpec, report: CheckReport) -> Any:
    from jdsearch.data.coco import CocoDataset, check_same_categories, read_categories, validate
    from jdsearch.search.caches import check_cached_data
    from jdsearch.search.splits import heldout_split, missing_files, selection_split

    data = spec.data
    splits = [s for s in SPLITS if data.annotations(s) is not None]
    files = [data.annotations(s) for s in splits]
    missing = missing_files(spec)
    if missing is not None:
        if data.synth is None:
            raise SpecError(f"{spec.source}: {missing}")
        s = data.synth
        what = f"{s.images} synthetic images of {s.size} px, {s.classes} classes, seed {s.seed}"
        report.add(f"data: {data.dir} will be generated ({what})")
        return None
    check_cached_data(spec)  # synthetic data generated earlier by these data.synth settings
    for split, f in zip(splits, files, strict=True):
        summary = validate(f, data.images(split))
        report.add(
            f"data: {f}: {summary.images} images, {summary.annotations} boxes, "
            f"{summary.categories} classes: ok"
        )
    train_cats = [(c.id, c.name) for c in read_categories(files[0])]
    for f in files[1:]:
        check_same_categories(files[0], train_cats, f, [(c.id, c.name) for c in read_categories(f)])
    report.add(f"data: the splits share their {len(train_cats)} categories (ids and names)")
    selection = selection_split(spec)
    heldout = heldout_split(spec, selection)
    held = "none (set data.test or data.max_val_images)" if heldout is None else len(heldout)
    report.add(f"splits: selection {len(selection)} images, held-out {held}")
    return CocoDataset(files[0], data.images("train"))


def _check_base(spec: StudySpec, train_set: Any, report: CheckReport) -> Any:
    from jdsearch.core.errors import JDSearchError
    from jdsearch.search.assets import new_base_detector
    from jdsearch.search.caches import base_cache, check_cached_base
    from jdsearch.store.checkpoint import load_checkpoint

    if spec.base.checkpoint is None:
        cache = base_cache(spec).path
        if cache.is_file():
            check_cached_base(spec)  # these spec parts made it (detector, training, data…)
        detector, loaded = new_base_detector(spec, train_set.num_classes)
        report.add(
            f"base: {detector.spec.name} will be trained for {spec.base.train.epochs:g} epochs "
            f"(no base.checkpoint){' unless the study holds one' if not cache.is_file() else ''}"
            f"{f', or taken from {cache}' if cache.is_file() else ''}"
        )
        if loaded is not None:  # every body tensor mapped
            report.add(loaded)
        return detector
    given = spec.existing_base_checkpoint()
    ck = load_checkpoint(given)
    if ck.num_classes != train_set.num_classes:
        raise JDSearchError(
            f"{given}: the base detector has {ck.num_classes - 1} classes, "
            f"the dataset {train_set.num_classes - 1}"
        )
    report.add(f"base: {given} loads and fits the dataset's classes")
    return ck.detector


def _check_pool(spec: StudySpec, train_set: Any, report: CheckReport) -> Any:
    from jdsearch.methods.pool import ElasticPool
    from jdsearch.search.caches import cached_pool_done, named_pool_unfit, pool_cache
    from jdsearch.spec.study import pool_base

    pool = ElasticPool(spec.pool, train_set.num_classes)  # checks every member fits
    epochs = sum(p.epochs for p in spec.pool.phases)
    cache = pool_cache(spec).path
    named = None if spec.pool.checkpoint is None else spec.existing_pool_checkpoint()
    unfit = None if named is None else named_pool_unfit(spec)
    if named is not None and unfit is None:
        cached = f"by these settings: pool.checkpoint {named}, not trained again"
    elif not cache.is_file():
        cached = "unless the study holds one"
    else:  # refused here if other settings made it
        cached = "or taken from" if cached_pool_done(spec) else "or resumed from"
        cached += f" {cache}"
    if unfit is not None:
        report.add(f"pool: not using pool.checkpoint {named}: {unfit}")
    start = "the base detector" if pool_base(spec) is not None else "random weights"
    report.add(
        f"pool: {spec.pool.space.size()} sub-networks of {spec.pool.detector} fit the super-net, "
        f"which starts from {start} (pool.init); trained for {epochs:g} epochs over {len(spec.pool.phases)} phases {cached}"
    )
    return pool


def _plan(spec: StudySpec, train_set: Any, report: CheckReport) -> None:
    s, fast = spec.search, spec.fast_eval
    images = fast.epochs * len(train_set)
    report.add(
        f"plan: {s.n_trials} trials ({s.strategy}, KD {spec.kd.mode}), each {fast.epochs:g} "
        f"epochs = {images:.0f} training images, then AP at {len(spec.resolutions)} resolutions"
    )


def _estimate(
    spec: StudySpec, train_set: Any, base: Any, pool: Any, steps: int, report: CheckReport
) -> None:
    """Seconds per training image of the base and of the super-net, from ``steps`` timed steps
    (after one untimed), and what the plan's trainings take at that rate."""
    rate = {
        "base": _seconds_per_image(spec, train_set, base, steps),
        "pool": _seconds_per_image(spec, train_set, pool.supernet, steps),
    }
    n = len(train_set)
    pool_epochs = sum(p.epochs for p in spec.pool.phases)
    est = {
        "base": 0.0 if spec.base.checkpoint else spec.base.train.epochs * n * rate["base"],
        "pool": pool_epochs * n * rate["pool"],
        # a trial trains the student with a teacher alongside, whose forward without the backward
        # pass is taken as a third of its training step
        "trials": spec.search.n_trials
        * spec.fast_eval.epochs
        * n
        * (rate["base"] + (rate["pool"] / 3 if kd_mode_named(spec.kd.mode).distils else 0.0)),
    }
    report.estimate_s.update(est)
    report.add(
        f"estimate (training only, {steps} steps timed here): base {est['base'] / 60:.1f} min, "
        f"pool {est['pool'] / 60:.1f} min (both skipped when cached), "
        f"{spec.search.n_trials} trials {est['trials'] / 60:.1f} min"
    )


def _seconds_per_image(spec: StudySpec, train_set: Any, detector: Any, steps: int) -> float:
    from jdsearch.engine.train import train

    config = spec.train_config(spec.fast_eval, spec.search.seed)
    batch = config.batch_size
    warm = dataclasses.replace(config, max_iters=1, warmup_iters=0)
    timed = dataclasses.replace(config, max_iters=steps, warmup_iters=0)
    train(detector, train_set, warm, progress=False)
    t0 = time.perf_counter()
    train(detector, train_set, timed, progress=False)
    return (time.perf_counter() - t0) / (steps * batch)
