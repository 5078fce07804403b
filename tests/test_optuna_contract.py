"""What jdsearch relies on in Optuna, pinned: these fail first when an Optuna release changes it.

Every use of Optuna internals goes through :mod:`jdsearch.storage.optuna_internals`; this file
tests those calls and the public behaviour the search is built on (heartbeats, retried trials,
system attributes kept out of ``optuna trials``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import (
    BaseStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
    fail_stale_trials,
)
from optuna.trial import TrialState

from jdsearch.storage import optuna_internals as oi
from jdsearch.storage.rdb import CREATE_TOKEN_ATTR, ResilientStorage

from .conftest import optuna_cli

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed:UserWarning"),
]


def _storage(tmp_path: Path, heartbeat: int = 1, wrapped: bool = False) -> BaseStorage:
    """An RDB storage with heartbeats; ``wrapped``: inside the search's ``ResilientStorage``
    (optuna's heartbeat and trial-cache machinery through the adapter's classes)."""
    rdb = RDBStorage(
        f"sqlite:///{tmp_path / 'o.db'}",
        heartbeat_interval=heartbeat,
        grace_period=heartbeat,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
    )
    return ResilientStorage(rdb) if wrapped else rdb


def _running(study: optuna.Study, parent: int) -> optuna.Trial:
    trial = study.ask()
    trial.suggest_categorical("move", ["base", "layer_prune"])
    trial.set_user_attr("parent", parent)
    oi.set_trial_system_attr(trial, "jdsearch:worker", "host:1")
    return trial


def test_system_attributes_of_studies_and_trials_round_trip(tmp_path: Path) -> None:
    study = optuna.create_study(storage=_storage(tmp_path), study_name="s")
    oi.set_study_system_attr(study, "jdsearch:spec", {"name": "s", "n": [1, 2]})
    assert oi.study_system_attrs(study)["jdsearch:spec"] == {"name": "s", "n": [1, 2]}
    trial = _running(study, parent=0)
    frozen = study.get_trials(deepcopy=False)[0]
    oi.set_running_user_attr(study, frozen, "move_kind", "student")
    assert frozen.user_attrs["move_kind"] == "student"  # the frozen copy the objective reads
    stored = study.get_trials()[0]
    assert stored.system_attrs["jdsearch:worker"] == "host:1"
    assert stored.user_attrs["move_kind"] == "student"  # and the storage other workers read
    study.tell(trial, 1.0)


@pytest.mark.parametrize("wrapped", [False, True], ids=["rdb", "resilient"])
def test_a_stale_trial_is_failed_and_retried_with_its_parameters_and_attributes(
    tmp_path: Path, wrapped: bool
) -> None:
    """The lineage of a killed worker's trial survives: same move, same parent, new number; the
    search's wrapper of the storage keeps Optuna's heartbeats."""
    study = optuna.create_study(storage=_storage(tmp_path, wrapped=wrapped), study_name="s")
    victim = _running(study, parent=7)
    oi.keep_alive(study, study.get_trials(deepcopy=False)[0])  # a heartbeat, then silence
    time.sleep(2.5)
    fail_stale_trials(study)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    retry = trials[1]
    assert retry.params == victim.params and retry.user_attrs["parent"] == 7
    assert retry.system_attrs["jdsearch:worker"] == "host:1"  # so the objective sets it first
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == victim.number

    seen = {}

    def objective(trial: optuna.Trial) -> float:
        seen["user_attrs"] = dict(trial.user_attrs)
        seen["move"] = trial.suggest_categorical("move", ["base", "layer_prune"])
        return 0.0

    study.optimize(objective, n_trials=1)  # the WAITING retry runs first, parameters fixed
    assert seen == {"user_attrs": {"parent": 7}, "move": victim.params["move"]}


def test_keep_alive_beats_the_waiting_trial_and_fails_the_dead_ones(tmp_path: Path) -> None:
    study = optuna.create_study(storage=_storage(tmp_path, heartbeat=2), study_name="s")
    _running(study, parent=0)
    _running(study, parent=1)
    alive, dead = study.get_trials(deepcopy=False)
    oi.keep_alive(study, dead)
    for _ in range(16):  # the live trial beats every 0.3 s (grace 2 s); the dead one went quiet
        time.sleep(0.3)
        oi.keep_alive(study, alive)
    states = {t.number: t.state for t in study.get_trials()}
    assert states[alive.number] == TrialState.RUNNING
    assert states[dead.number] == TrialState.FAIL


def test_optuna_trials_shows_user_attributes_and_hides_system_ones(tmp_path: Path) -> None:
    study = optuna.create_study(storage=_storage(tmp_path, heartbeat=60), study_name="s")
    trial = _running(study, parent=0)
    study.tell(trial, 0.5)
    url = f"sqlite:///{tmp_path / 'o.db'}"
    out = optuna_cli("trials", "--study-name", "s", "--storage", url, "-f", "json")
    (row,) = json.loads(out)
    assert row["user_attrs"] == {"parent": 0} and row["params"] == {"move": trial.params["move"]}
    assert "jdsearch:worker" not in out


def _journal(tmp_path: Path) -> BaseStorage:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))


@pytest.mark.parametrize("kind", ["rdb", "resilient", "journal"])
def test_a_note_is_saved_on_a_trial_after_tell(tmp_path: Path, kind: str) -> None:
    """optuna-dashboard's notes are study system attributes, which Optuna accepts after a trial
    finished (trial attributes it refuses): jdsearch writes a trial's note after ``tell``."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna_dashboard import get_note, save_note

    storage = _journal(tmp_path) if kind == "journal" else _storage(tmp_path, wrapped=kind != "rdb")
    study = optuna.create_study(storage=storage, study_name="s")
    for value in (0.5, None):
        trial = _running(study, parent=0)
        study.tell(trial, value, state=TrialState.FAIL if value is None else None)
    done, failed = study.get_trials(deepcopy=False)
    with pytest.raises(UpdateFinishedTrialError):  # a trial attr after tell: refused
        oi.set_trial_system_attr(trial, "late", 1)
    for frozen, body in ((done, "**H** 0.5"), (failed, "x" * 5000)):  # 5000: split in chunks
        save_note(oi.trial_of(study, frozen), body)
        assert get_note(oi.trial_of(study, frozen)) == body
    save_note(oi.trial_of(study, failed), "second version")  # a shorter one replaces it whole
    assert get_note(oi.trial_of(study, failed)) == "second version"
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.FAIL]


def test_heartbeat_ages_of_running_trials(tmp_path: Path) -> None:
    study = optuna.create_study(storage=_storage(tmp_path, heartbeat=60, wrapped=True))
    beating, silent = _running(study, parent=0), _running(study, parent=1)
    oi.keep_alive(study, study.get_trials(deepcopy=False)[0])
    time.sleep(1.2)
    ages = oi.heartbeat_ages(study)
    assert list(ages) == [beating.number] and 1.0 <= ages[beating.number] < 30
    study.tell(beating, 1.0)
    assert oi.heartbeat_ages(study) == {}  # finished: no longer running
    assert silent.number not in oi.heartbeat_ages(study)
    with pytest.raises(TypeError, match="keeps no heartbeats"):
        oi.heartbeat_ages(optuna.create_study(storage=_journal(tmp_path)))


class _Kept(logging.Handler):
    """The messages of the records that reach Optuna's own handler."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage() + ("\n<traceback>" if record.exc_info else ""))


def test_optunas_warnings_on_a_failed_trial_are_muted_for_the_trials_named() -> None:
    """Optuna warns twice on a failed trial, the traceback on the first line, through the logger
    that ``muted_trial_failures`` filters; muted are the trials named, inside the ``with`` only."""

    def objective(trial: optuna.Trial) -> float:
        raise ValueError(f"trial {trial.number} refused")

    kept = _Kept()
    optuna.logging.get_logger("optuna").addHandler(kept)
    try:
        study = optuna.create_study()
        with oi.muted_trial_failures(lambda n: n == 1):
            study.optimize(objective, n_trials=3, catch=(ValueError,))
        study.optimize(objective, n_trials=1, catch=(ValueError,))
    finally:
        optuna.logging.get_logger("optuna").removeHandler(kept)
    failed = [m for m in kept.messages if m.startswith("Trial ")]
    numbers = [int(m.split()[1]) for m in failed]
    assert numbers == [0, 0, 2, 2, 3, 3]  # trial 1's two are gone
    assert "because of the following error: ValueError('trial 0 refused')" in failed[0]
    assert failed[0].endswith("<traceback>") and failed[1] == "Trial 0 failed with value None."


def test_a_trial_is_found_by_its_token_and_a_pop_is_taken_once(tmp_path: Path) -> None:
    """What the retry of a trial's creation or of a WAITING trial's pop relies on (its commit may
    have taken effect): a trial created through the wrapper carries its token, by which it is
    found; a pop takes a WAITING trial once, again only with its own token, and refuses a finished
    trial as Optuna's ``set_trial_state_values`` does."""
    from optuna.exceptions import UpdateFinishedTrialError

    storage = _storage(tmp_path, heartbeat=60, wrapped=True)
    assert isinstance(storage, ResilientStorage)
    backend = storage.backend
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    token = study.get_trials()[0].system_attrs[CREATE_TOKEN_ATTR]
    sid = study._study_id
    assert oi.trial_id_by_system_attr(backend, sid, CREATE_TOKEN_ATTR, token) == trial._trial_id
    assert oi.trial_id_by_system_attr(backend, sid, CREATE_TOKEN_ATTR, "another") is None

    study.enqueue_trial({"move": "base"})
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    assert waiting.system_attrs[CREATE_TOKEN_ATTR] != token
    assert oi.pop_waiting_trial(backend, waiting._trial_id, "k", "mine")
    assert oi.pop_waiting_trial(backend, waiting._trial_id, "k", "mine")  # its own retry
    assert not oi.pop_waiting_trial(backend, waiting._trial_id, "k", "another worker's")
    popped = storage.get_trial(waiting._trial_id)
    assert popped.state == TrialState.RUNNING and popped.system_attrs["k"] == "mine"
    assert waiting.datetime_start is None and popped.datetime_start is not None
    study.tell(trial, 1.0)
    with pytest.raises(UpdateFinishedTrialError):
        oi.pop_waiting_trial(backend, trial._trial_id, "k", "mine")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_trials_attributes_written_at_once_are_those_written_one_by_one(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'a.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    storage = ResilientStorage(RDBStorage(url))
    study = optuna.create_study(storage=storage, study_name="attrs")
    user = {"h": {"80x80": 0.5}, "flops": 123, "student": "x", "none": None, "moves": ["a"]}
    system = {"jdsearch:student_moves": ["a", "b"], "jdsearch:arch": {"d": [1, 2]}}
    one, many = study.ask(), study.ask()
    for key, value in user.items():
        one.set_user_attr(key, value)
    for key, value in system.items():
        oi.set_trial_system_attr(one, key, value)
    many.set_user_attr("h", "an older value, replaced")
    oi.set_trial_attrs(many, user, system)
    assert many.user_attrs == user  # the trial's own copy too
    a, b = storage.get_trial(one._trial_id), storage.get_trial(many._trial_id)
    assert a.user_attrs == b.user_attrs == user
    assert {k: b.system_attrs[k] for k in system} == system
    study.tell(many, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_attrs(many._trial_id, {"late": 1}, {})
    storage.remove_session()
    storage.engine.dispose()
