"""``jdsearch gc``: remove the artifacts that no study will ever read again.

What a shared study's artifact store accumulates when workers die, uploads break or trials fail:

- **partial uploads**: a writer killed halfway (the database store keeps them as incomplete
  versions; a published artifact is never partial);
- **checkpoints of failed trials**: a trial that uploaded its student, then failed (its ``tell``
  never arrived, the database refused an attribute) — nothing reads a failed trial's checkpoint;
- **study-level leftovers**: a base detector or pool uploaded by a worker that lost the race to
  record it (the study's ``base_artifact`` / ``pool_artifact`` attrs name the winners);
- **unreferenced artifacts**: stored in the database's own store, but named by no study or trial
  of the storage (the worker died between the upload and the attribute write, or the study was
  deleted). In a ``file:DIR`` store, which other storages or the user may share, only what this
  storage's studies name as dead is removed.

What is kept: everything a COMPLETE trial, a RUNNING or WAITING trial, or a study's base and pool
attrs name; every artifact of a study that jdsearch did not create; and anything younger than
``older_than_s`` (a live worker may be between its upload and its attribute write). Run it with
``--older-than 0`` only when no worker is running.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from jdsearch.spec.study import artifact_dir
from jdsearch.storage.artifacts import SQLArtifactStore, make_artifact_store

ARTIFACTS_PREFIX = "artifacts:"  # optuna.artifacts.upload_artifact's attr key prefix
_LIVE = (TrialState.RUNNING, TrialState.WAITING, TrialState.COMPLETE)


@dataclass(frozen=True)
class Holders:
    """Which attributes of a study and its trials name artifacts (the search's trial record
    knows them: :func:`jdsearch.search.record.artifact_holders`)."""

    marker: str  # a study system attr that only jdsearch's studies have (their spec)
    study: tuple[str, ...]  # study user attrs naming the artifacts a study keeps (base, pool)
    trial_state: str  # trial system attr of a saved training state, {"artifact": id}


@dataclass
class References:
    """What the storage's studies say about artifacts: ``keep`` (read again), ``dead`` (an id
    with why nothing will read it) and ``known`` (named anywhere)."""

    keep: set[str] = field(default_factory=set)
    dead: dict[str, str] = field(default_factory=dict)
    known: set[str] = field(default_factory=set)

    def mark(self, ids: Iterable[str], *, keep: bool, why: str = "") -> None:
        for artifact_id in ids:
            self.known.add(artifact_id)
            if keep:
                self.keep.add(artifact_id)
            else:
                self.dead.setdefault(artifact_id, why)


@dataclass(frozen=True)
class Removed:
    """One artifact ``gc`` removed (or would remove, in a dry run)."""

    artifact_id: str
    size: int
    why: str


def _uploads(attrs: dict[str, Any]) -> list[str]:
    return [k.removeprefix(ARTIFACTS_PREFIX) for k in attrs if k.startswith(ARTIFACTS_PREFIX)]


def _train_state(attrs: dict[str, Any], key: str) -> list[str]:
    """The mid-trial training state an attempt saved (its retry resumes from it)."""
    state = attrs.get(key)
    artifact = state.get("artifact") if isinstance(state, dict) else None
    return [artifact] if isinstance(artifact, str) else []


def references(storage: RDBStorage, holders: Holders) -> References:
    """Every artifact the storage's studies and trials name, sorted into kept and dead."""
    refs = References()
    for study in storage.get_all_studies():
        system, user = study.system_attrs, study.user_attrs
        if holders.marker not in system:  # not a jdsearch study: its artifacts are its own affair
            refs.mark(_uploads(system), keep=True)
        else:
            named = {str(user[k]) for k in holders.study if user.get(k)}
            refs.mark(named, keep=True)
            leftovers = [a for a in _uploads(system) if a not in named]
            refs.mark(leftovers, keep=False, why=f"study {study.study_name}: an unused upload")
        trials = optuna.load_study(study_name=study.study_name, storage=storage)
        for t in trials.get_trials(deepcopy=False):
            ids = _uploads(t.system_attrs) + _train_state(t.system_attrs, holders.trial_state)
            if t.state in _LIVE:
                refs.mark(ids, keep=True)
            else:
                why = f"study {study.study_name}: trial {t.number} is {t.state.name}"
                refs.mark(ids, keep=False, why=why)
    return refs


def collect(
    storage: RDBStorage,
    storage_url: str,
    holders: Holders,
    *,
    older_than_s: float = 3600.0,
    dry_run: bool = False,
) -> list[Removed]:
    """Remove what :func:`references` says no study reads, and partial uploads, when older than
    ``older_than_s``, from every artifact store the storage's studies use (the database's own,
    and each ``file:DIR`` that exists here); returns what was removed (nothing is removed with
    ``dry_run``). ``holders``: the attributes that name artifacts."""
    refs = references(storage, holders)
    removed: list[Removed] = []
    for artifacts in _store_specs(storage, holders.marker):
        store = make_artifact_store(artifacts, storage_url)
        removed += _partial_uploads(store, older_than_s, dry_run)
        cutoff = time.time() - older_than_s
        owned = isinstance(store, SQLArtifactStore)  # a file:DIR may hold other storages' files
        for artifact_id, size, stamp in _stored(store, artifact_dir(artifacts)):
            if artifact_id in refs.keep or stamp > cutoff:
                continue
            if not owned and artifact_id not in refs.dead:
                continue  # named by no study here: perhaps another storage's, or not ours at all
            why = refs.dead.get(artifact_id, "named by no study or trial")
            if not dry_run:
                store.remove(artifact_id)
            removed.append(Removed(artifact_id, size, why))
        if isinstance(store, SQLArtifactStore):
            store.close()
    return removed


def _store_specs(storage: RDBStorage, marker: str) -> list[str]:
    """``search.artifacts`` of the storage's jdsearch studies (``db`` always; a ``file:DIR``
    only where DIR is a folder here)."""
    specs = {"db"}
    for study in storage.get_all_studies():
        stored = study.system_attrs.get(marker)
        artifacts = stored.get("search", {}).get("artifacts") if isinstance(stored, dict) else None
        try:
            directory = artifact_dir(artifacts) if isinstance(artifacts, str) else None
        except ValueError:  # a stored spec this version cannot read: nothing to collect there
            continue
        if directory is not None and Path(os.path.expanduser(directory)).is_dir():
            specs.add(str(artifacts))
    return sorted(specs)


def _partial_uploads(
    store: SQLArtifactStore | FileSystemArtifactStore, older_than_s: float, dry_run: bool
) -> list[Removed]:
    if not isinstance(store, SQLArtifactStore):  # a file store has no partial state to tell
        return []
    found = [
        Removed(artifact_id, size, "a partial upload (its writer died or failed)")
        for artifact_id, size in store.list_incomplete(older_than_s)
    ]
    if not dry_run:
        store.purge_incomplete(older_than_s)
    return found


def _stored(
    store: SQLArtifactStore | FileSystemArtifactStore, directory: str | None
) -> list[tuple[str, int, float]]:
    """``(artifact id, bytes, when it was written)`` of every stored artifact."""
    if isinstance(store, SQLArtifactStore):
        return [(i.artifact_id, i.size, i.completed_at or i.created_at) for i in store.complete()]
    assert directory is not None
    base = Path(os.path.expanduser(directory))
    files = [p for p in sorted(base.iterdir()) if p.is_file()] if base.is_dir() else []
    return [(p.name, p.stat().st_size, p.stat().st_mtime) for p in files]


def summary(removed: list[Removed], dry_run: bool) -> str:
    """The closing line of ``jdsearch gc``."""
    verb = "would remove" if dry_run else "removed"
    total = sum(r.size for r in removed)
    return f"gc: {verb} {len(removed)} artifact(s), {total / 2**20:.1f} MiB"


def describe(r: Removed, dry_run: bool) -> str:
    """One line per removed artifact."""
    verb = "would remove" if dry_run else "removed"
    return f"{verb} {r.artifact_id} ({r.size / 2**20:.2f} MiB): {r.why}"
