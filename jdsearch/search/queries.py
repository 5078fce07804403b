"""Reading a study: which trials completed, the best, the root, lineages, and a finished study
opened for export and report (:class:`StudyHandle`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial

from jdsearch.core.errors import JDSearchError
from jdsearch.search.pareto import first_front
from jdsearch.search.record import (
    BASE_MOVE,
    CATEGORIES_SYSATTR,
    SPEC_SYSATTR,
    TrialRecord,
    h_of,
    is_complete,
)
from jdsearch.search.strategies import ScoreMode, score_mode_named
from jdsearch.spec.study import StudySpec, study_from_stored
from jdsearch.storage.artifacts import make_artifact_store, read_artifact
from jdsearch.storage.optuna_internals import study_system_attrs, trial_by_number
from jdsearch.storage.rdb import public_url, root_cause, with_driver

if TYPE_CHECKING:
    from jdsearch.store.checkpoint import Checkpoint


def completed_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """COMPLETE trials with a finite value (H), by trial number."""
    return sorted((t for t in trials if is_complete(t)), key=lambda t: t.number)


def best_of(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The completed trial with the highest H, the earlier one on a tie (``None``: none yet)."""
    done = completed_trials(trials)
    return max(done, key=lambda t: (float(h_of(t)), -t.number)) if done else None  # type: ignore[arg-type]


def front_of(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The completed trials whose (AP, cost) where they scored best (:meth:`TrialRecord.point`:
    a Pareto study's values) no other completed trial's dominates, by ascending cost (then
    descending AP, then number). Trials recorded before the cost was take no part."""
    done = [t for t in completed_trials(trials) if TrialRecord.from_trial(t).point() is not None]
    points = [TrialRecord.from_trial(t).point() for t in done]
    front = [(points[i], done[i]) for i in first_front([(-p[0], p[1]) for p in points])]  # type: ignore[index]
    front.sort(key=lambda x: (x[0][1], -x[0][0], x[1].number))  # type: ignore[index]
    return [t for _, t in front]


def create_or_load(spec: StudySpec, storage: Any, sampler: Any) -> optuna.Study:
    """The spec's study in ``storage`` with ``sampler``, created with the objectives of its
    ``score.mode`` (H; or AP and the cost) and their names, which optuna-dashboard and the
    ``optuna`` CLI show.

    Raises:
        JDSearchError: the study exists with another score mode (:func:`check_score_mode`).
    """
    score, mode = spec.score, score_mode_named(spec.score.mode)
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=sampler,
        directions=list(mode.directions),
        load_if_exists=True,
    )
    check_score_mode(study, spec)
    if study.metric_names is None:
        study.set_metric_names(mode.metric_names(score.metric, score.cost))
    return study


def check_score_mode(study: optuna.Study, spec: StudySpec) -> None:
    """The study was created for the spec's ``score.mode`` (Optuna cannot change a study's
    objectives).

    Raises:
        JDSearchError: naming both modes and what to do.
    """
    have = tuple(d.name.lower() for d in study.directions)
    if have != score_mode_named(spec.score.mode).directions:
        modes = {cls.directions: name for name, cls in ScoreMode.registry.items()}
        found = (
            f"score.mode {modes[have]}"
            if have in modes
            else f"the directions {list(have)} (not by jdsearch)"
        )
        raise JDSearchError(
            f"{spec.source}: score.mode is {spec.score.mode}, but study {study.study_name!r} was "
            f"created with {found}; a study keeps its objectives: give the search another name "
            "(or storage)"
        )


def root_of(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The first completed ``base`` trial: the base detector's own fast evaluation."""
    done = completed_trials(trials)
    return next((t for t in done if TrialRecord.from_trial(t).move == BASE_MOVE), None)


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
        current = TrialRecord.from_trial(t).parent
    return path[::-1]


def lineage(study: optuna.Study, number: int) -> list[FrozenTrial]:
    """:func:`lineage_of` the study's trials."""
    return lineage_of(study.get_trials(deepcopy=False), number)


def ancestry(study: optuna.Study, trial: FrozenTrial) -> list[FrozenTrial]:
    """``trial`` and the trials it descends from (``parent`` links), each read by its number
    (:func:`~jdsearch.storage.optuna_internals.trial_by_number`): enough for
    :func:`lineage_of` ``trial``, at the cost of no round trip where the storage's cache holds
    the ancestors (finished trials that the sampler's reads brought in), where
    ``study.get_trials`` reads every running and new trial again. Stops where :func:`lineage_of`
    does: at a missing parent or a loop."""
    path, seen = [trial], {trial.number}
    parent = TrialRecord.from_trial(trial).parent
    while parent is not None and parent not in seen:
        found = trial_by_number(study, parent)
        if found is None:
            break
        path.append(found)
        seen.add(parent)
        parent = TrialRecord.from_trial(found).parent
    return path


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
        if not is_complete(t) or TrialRecord.from_trial(t).checkpoint is None:
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
        stored = study_system_attrs(self.study).get(CATEGORIES_SYSATTR)
        return None if stored is None else [(int(i), str(n)) for i, n in stored]

    def _read(self, artifact_id: str, what: str) -> bytes:
        return read_artifact(
            self.store, artifact_id, f"study {self.study.study_name!r}: the {what}"
        )

    def checkpoint(self, trial: optuna.trial.FrozenTrial, device: str = "cpu") -> Checkpoint:
        """The student checkpoint a trial uploaded (verified, never unpickled)."""
        artifact = TrialRecord.from_trial(trial).checkpoint
        if artifact is None:
            raise JDSearchError(
                f"study {self.study.study_name!r}: trial {trial.number} has no checkpoint"
            )
        from jdsearch.store.checkpoint import checkpoint_from_bytes  # torch: only when read

        data = self._read(artifact, f"checkpoint of trial {trial.number}")
        return checkpoint_from_bytes(
            data, source=f"study {self.study.study_name!r} trial {trial.number}", device=device
        )

    def study_artifact(self, key: str) -> bytes:
        """A study-level artifact (``base_artifact``, ``pool_artifact``) as bytes."""
        if key not in self.study.user_attrs:
            raise JDSearchError(f"study {self.study.study_name!r} has no {key}")
        return self._read(self.study.user_attrs[key], key)


def open_storage(url: str) -> tuple[RDBStorage, list[optuna.study.StudySummary]]:
    """An existing Optuna storage (never created here) and its studies' summaries.

    Raises:
        JDSearchError: a missing SQLite file, or an unreachable or non-Optuna database (the
            driver's reason, password masked).
    """
    url = with_driver(url)
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
            f"{shown}: cannot read an Optuna study database ({root_cause(e)})"
        ) from None
    return storage, summaries


def read_study(url: str, name: str | None = None) -> tuple[optuna.Study, StudySpec]:
    """An existing jdsearch study and its stored spec, read only (no artifact store is opened:
    ``jdsearch status`` runs anywhere the database is reachable); never creates anything.

    Args:
        url: the study's storage URL (``sqlite:///…``, ``postgresql://…``).
        name: the study; may be left out when the storage holds one.

    Raises:
        JDSearchError: a missing SQLite file, an unreachable or non-Optuna database (the driver's
            reason, password masked), no or several studies, or a study not made by jdsearch.
    """
    url = with_driver(url)
    shown = public_url(url)
    storage, summaries = open_storage(url)
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
    stored = study_system_attrs(study).get(SPEC_SYSATTR)
    if stored is None:
        raise JDSearchError(
            f"{shown}: study {name!r} was not made by jdsearch (it has no {SPEC_SYSATTR} attribute)"
        )
    return study, study_from_stored(stored, source=f"study {name!r} (stored spec)")


def open_study(url: str, name: str | None = None) -> StudyHandle:
    """Open an existing jdsearch study for reading (export, report); never creates anything.

    Args:
        url: the study's storage URL (``sqlite:///…``, ``postgresql://…``).
        name: the study; may be left out when the storage holds one.

    Returns:
        The study, its stored spec and its artifact store.

    Raises:
        JDSearchError: what :func:`read_study` raises, or a ``file:`` artifact folder that is
            not here.
    """
    url = with_driver(url)
    study, spec = read_study(url, name)
    name = study.study_name
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
