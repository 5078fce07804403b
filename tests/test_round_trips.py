"""What one search trial asks of the study's database, counted (``bench/load.py`` times it).

Each shortcut a worker takes is checked against the long way it replaces: the trial ``ask``
keeps as created, the waiting trials read without the cache, the note written in one
transaction, the claim check's narrow read, the set-aside marks read alone, the checkpoint's
attribute written with the record. Then one trial's transactions and statements are bounded.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
from optuna.distributions import CategoricalDistribution
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState, create_trial
from optuna_dashboard import get_note, save_note
from sqlalchemy import event

from jdsearch.search import objective
from jdsearch.search.notes import NoteWriter
from jdsearch.search.objective import write_record
from jdsearch.search.record import (
    BASE_MOVE,
    DECISION_SYSATTR,
    MOVE_PARAM,
    PARENT_ATTR,
    SET_ASIDE_PREFIX,
    WORKER_SYSATTR,
    decision_attrs,
)
from jdsearch.search.strategies import tried_moves
from jdsearch.storage import optuna_internals as oi
from jdsearch.storage.rdb import ResilientStorage

from .test_sampler import VOCAB, add, ask_move, make, racing

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed:UserWarning"),
]
optuna.logging.set_verbosity(optuna.logging.WARNING)
DIST = {MOVE_PARAM: CategoricalDistribution(VOCAB)}


@pytest.fixture
def storage(db_url: str) -> Iterator[ResilientStorage]:
    s = ResilientStorage(RDBStorage(db_url), started={WORKER_SYSATTR: "me:1"})
    yield s
    s.remove_session()
    s.engine.dispose()


class Statements:
    """The statements the calling thread sends through ``engine``, and the transactions it
    commits that wrote something (Optuna commits its reads too)."""

    WRITES = ("INSERT", "UPDATE", "DELETE")

    def __init__(self, engine: Any) -> None:
        self.engine, self.sql, self.writes = engine, [], 0
        self.thread, self._dirty = threading.current_thread(), False

    def _execute(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.current_thread() is self.thread:
            self.sql.append(" ".join(statement.split()))
            self._dirty = self._dirty or statement.split(None, 1)[0].upper() in self.WRITES

    def _commit(self, conn: Any) -> None:
        if threading.current_thread() is self.thread:
            self.writes += self._dirty
            self._dirty = False

    def _rollback(self, conn: Any) -> None:
        if threading.current_thread() is self.thread:
            self._dirty = False

    def __enter__(self) -> Statements:
        event.listen(self.engine, "before_cursor_execute", self._execute)
        event.listen(self.engine, "commit", self._commit)
        event.listen(self.engine, "rollback", self._rollback)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._execute)
        event.remove(self.engine, "commit", self._commit)
        event.remove(self.engine, "rollback", self._rollback)

    def reads_of_all(self, table: str) -> list[str]:
        """SELECTs of ``table`` that do not pick keys by their start (``LIKE``)."""
        return [q for q in self.sql if q.startswith("SELECT") and table in q and "LIKE" not in q]


def _fields(t: FrozenTrial) -> tuple[Any, ...]:
    return (
        t.number,
        t.state,
        t.params,
        t.distributions,
        t.user_attrs,
        t.system_attrs,
        t.datetime_start,
        t.values,
        t.intermediate_values,
    )


def test_ask_keeps_the_trial_it_created_as_the_database_holds_it(
    storage: ResilientStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = optuna.create_study(storage=storage, study_name="ask")
    reads: list[int] = []
    read = storage._cached.get_trial
    monkeypatch.setattr(storage._cached, "get_trial", lambda i: reads.append(i) or read(i))
    with Statements(storage.engine) as s:
        trial = study.ask()
    assert reads == [] and s.writes == 1  # the creation, with the worker's name; no read back
    kept = oi.stored_trial(trial)
    assert _fields(kept) == _fields(storage.backend.get_trial(trial._trial_id))
    assert kept.system_attrs[WORKER_SYSATTR] == "me:1"
    trial.set_user_attr("later", 1)  # a write: the next read goes to the database
    assert storage.get_trial(trial._trial_id).user_attrs == {"later": 1}
    assert reads == [trial._trial_id]


def test_a_popped_trial_names_the_worker_that_pops_it(
    storage: ResilientStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = optuna.create_study(storage=storage, study_name="pop")
    study.add_trial(create_trial(state=TrialState.WAITING, system_attrs={WORKER_SYSATTR: "old"}))
    sid, only = study._study_id, (TrialState.WAITING,)
    cached = storage._cached.get_all_trials(sid, deepcopy=False, states=only)
    monkeypatch.setattr(storage._cached, "get_all_trials", None)  # not through the cache
    waiting = storage.get_all_trials(sid, deepcopy=False, states=only)
    assert [_fields(t) for t in waiting] == [_fields(t) for t in cached] != []
    monkeypatch.undo()
    trial = study.ask()
    assert trial.number == 0  # the waiting trial, popped
    assert storage.backend.get_trial(trial._trial_id).system_attrs[WORKER_SYSATTR] == "me:1"


def test_a_note_saved_in_one_transaction_is_the_dashboards_own(storage: ResilientStorage) -> None:
    ours = optuna.create_study(storage=storage, study_name="ours")
    theirs = optuna.create_study(storage=storage, study_name="theirs")
    a, b = ours.ask(), theirs.ask()
    for body in ("é" * 5000, "short", "**x**\n" * 400):  # 3 chunks, then 1 (2 emptied), then 2
        with Statements(storage.engine) as s:
            oi.save_dashboard_note(ours, oi.stored_trial(a), body)
        save_note(b, body)
        assert get_note(a) == get_note(b) == body
        assert s.writes == 1 and not s.reads_of_all("study_system_attributes")
        mine = {
            k.replace(f":{a._trial_id}:", ":T:"): v for k, v in oi.study_system_attrs(ours).items()
        }
        dashboards = {
            k.replace(f":{b._trial_id}:", ":T:"): v
            for k, v in oi.study_system_attrs(theirs).items()
        }
        assert mine == dashboards


def _claims_study(storage: Any) -> optuna.Study:
    """Trials of every kind the claim check meets: finished with their move, running with a
    claim only, running with the move, failed, waiting (a retry), and one without a parent."""
    study = optuna.create_study(storage=storage, study_name="claims", direction="maximize")
    add(study, BASE_MOVE, None, 1.0)
    add(study, "layer_prune", 0, 0.5)
    add(study, "channel_prune", 0, None, TrialState.FAIL)
    claim = study.ask()
    claimed = {DECISION_SYSATTR: "add_layer:1"}
    oi.set_running_attrs(study, oi.stored_trial(claim), decision_attrs(0, "student"), claimed)
    moved = study.ask()
    moved.suggest_categorical(MOVE_PARAM, VOCAB)
    moved.set_user_attr(PARENT_ATTR, 1)
    study.ask()  # a trial without a parent yet
    study.add_trial(
        create_trial(
            state=TrialState.WAITING,
            params={MOVE_PARAM: "teacher:fpn=16"},
            distributions=DIST,
            user_attrs={PARENT_ATTR: 1},
            system_attrs={DECISION_SYSATTR: "teacher:fpn=16"},
        )
    )
    return study


def test_the_claim_checks_narrow_read_sees_what_a_full_read_sees(
    storage: ResilientStorage,
) -> None:
    study = _claims_study(storage)
    names = ((PARENT_ATTR,), (MOVE_PARAM,), (DECISION_SYSATTR,))
    with Statements(storage.engine) as s:
        narrow = oi.trials_with(study, *names)
    assert len(s.sql) <= 2  # the query (and a pool's ping)
    full = study.get_trials(deepcopy=False)
    assert [(t.number, t.state) for t in narrow] == [(t.number, t.state) for t in full]
    for n, f in zip(narrow, full, strict=True):
        assert n.user_attrs == {k: f.user_attrs[k] for k in names[0] if k in f.user_attrs}
        assert n.params == {k: f.params[k] for k in names[1] if k in f.params}
        assert n.system_attrs == {k: f.system_attrs[k] for k in names[2] if k in f.system_attrs}
    for parent in (None, 0, 1, 2):
        assert tried_moves(narrow, parent) == tried_moves(full, parent)
    assert tried_moves(narrow, 0) == {"layer_prune", "channel_prune", "add_layer:1"}


def test_a_claim_made_at_once_elsewhere_is_seen_through_the_narrow_read(db_url: str) -> None:
    storage = ResilientStorage(RDBStorage(db_url))
    study, sampler = make(top_k=1, freeze_student=0)
    study = optuna.create_study(storage=storage, direction="maximize", sampler=sampler)
    add(study, BASE_MOVE, None, 1.0)
    choices = racing(study, sampler)
    trial = ask_move(study)
    assert len(choices) == 2  # the first choice lost the race: chosen again
    assert trial.params[MOVE_PARAM] == choices[1][1] != choices[0][1]
    storage.remove_session()
    storage.engine.dispose()


def test_only_the_set_aside_marks_are_read(storage: ResilientStorage) -> None:
    study = optuna.create_study(storage=storage, study_name="aside")
    for key in (f"{SET_ASIDE_PREFIX}3", f"{SET_ASIDE_PREFIX}12", "dashboard:1:note_ver", "x"):
        oi.set_study_system_attr(study, key, "reason" if key != "x" else 1)
    with Statements(storage.engine) as s:
        marks = oi.study_system_attrs(study, SET_ASIDE_PREFIX)
    assert marks == {f"{SET_ASIDE_PREFIX}3": "reason", f"{SET_ASIDE_PREFIX}12": "reason"}
    assert not s.reads_of_all("study_system_attributes") and len(s.sql) <= 2
    memory = optuna.create_study()  # a storage that reads all: the same, filtered
    oi.set_study_system_attr(memory, f"{SET_ASIDE_PREFIX}3", "r")
    oi.set_study_system_attr(memory, "other", "r")
    assert oi.study_system_attrs(memory, SET_ASIDE_PREFIX) == {f"{SET_ASIDE_PREFIX}3": "r"}


def test_the_checkpoints_attribute_written_with_the_record_names_it(
    storage: ResilientStorage, tmp_path: Path
) -> None:
    study = optuna.create_study(storage=storage, study_name="held")
    (tmp_path / "store").mkdir()
    store = FileSystemArtifactStore(str(tmp_path / "store"))
    trial = study.ask()
    path = tmp_path / "trial-0.safetensors"
    path.write_bytes(b"weights")
    held: dict[str, Any] = {}
    aid = upload_artifact(
        study_or_trial=trial, file_path=str(path), artifact_store=store, storage=oi.HeldAttrs(held)
    )
    assert list(held) == [f"artifacts:{aid}"]
    assert get_all_artifact_meta(trial) == []  # held, not written
    with Statements(storage.engine) as s:
        write_record(trial, {"h_value": 0.5}, {"jdsearch:arch": {"d": 1}}, held)
    assert s.writes == 1
    (meta,) = get_all_artifact_meta(trial)
    assert (meta.artifact_id, meta.filename) == (aid, "trial-0.safetensors")


def test_a_refused_record_still_names_its_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def refuse_the_record(trial: Any, user: dict, system: dict) -> None:
        calls.append((dict(user), dict(system)))
        if user:
            raise ValueError("refused")

    monkeypatch.setattr(objective, "set_trial_attrs", refuse_the_record)
    held = {"artifacts:a": "{}"}
    with pytest.raises(ValueError, match="refused"):
        write_record(optuna.create_study().ask(), {"h_value": 1.0}, {"s": 2}, held)
    assert calls == [({"h_value": 1.0}, {"artifacts:a": "{}", "s": 2}), ({}, held)]


def _bench_like_trial(trial: optuna.Trial) -> float:
    """What a search trial does with the storage (``Objective``), training left out."""
    if oi.stored_trial(trial).system_attrs.get(WORKER_SYSATTR) != "me:1":
        oi.set_trial_system_attr(trial, WORKER_SYSATTR, "me:1")
    move = trial.suggest_categorical(MOVE_PARAM, VOCAB)
    parent = trial.user_attrs[PARENT_ATTR]
    h = 0.5 if parent is None else oi.trial_by_number(trial.study, parent).value - 0.01
    user = {"h_value": h, **{f"a{i}": i for i in range(20)}, "move": move}
    write_record(trial, user, {"jdsearch:arch": {"d": 1}}, {"artifacts:x": "{}"})
    return h


def test_a_trials_transactions_and_reads_are_bounded(storage: ResilientStorage) -> None:
    """One trial after the root writes in 6 transactions (its creation with the worker's name,
    the claim, the move, the record with its checkpoint's name, the tell, the note), reads no
    study attribute it does not need, and sends a bounded number of statements (the study's
    trials are read twice: the sampler's choice, then the narrow check of its claim). The time
    it takes: ``bench/load.py``."""
    study, sampler = make(top_k=2, freeze_student=0)
    study = optuna.create_study(storage=storage, direction="maximize", sampler=sampler)
    study.optimize(_bench_like_trial, n_trials=3, callbacks=[NoteWriter()])
    with Statements(storage.engine) as s:
        study.optimize(_bench_like_trial, n_trials=1, callbacks=[NoteWriter()])
    assert study.trials[-1].state == TrialState.COMPLETE
    assert s.writes == 6, "\n".join(s.sql)
    assert not s.reads_of_all("study_system_attributes")
    assert len(s.sql) <= 50, "\n".join(s.sql)
