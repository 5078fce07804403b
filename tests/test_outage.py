"""Outages longer than the grace period (2 × ``search.heartbeat_s``): a worker cut off from the
database for that long finds, when it is back, that another worker failed its running trial as
stale and re-queued it. Its heartbeat tells it so.
"""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import psycopg2
import pytest
import sqlalchemy as sa
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

import jdsearch.storage.rdb as rdb_module
from jdsearch.storage.optuna_internals import last_heartbeat, lost_trial
from jdsearch.storage.rdb import ResilientStorage
from jdsearch.storage.reconnect import RETRY_WINDOW_ENV

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed:UserWarning"),
]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _down() -> Exception:
    """What the storage raises while the server is away."""
    orig = psycopg2.OperationalError("connection to server failed: Connection refused")
    try:
        raise StorageInternalError("cannot commit") from sa.exc.OperationalError("", {}, orig)
    except StorageInternalError as e:
        return e


def _worker_storage(url: str, heartbeat: int = 1) -> ResilientStorage:
    """What ``storage_for`` opens for a worker: heartbeats, a grace of 2 beats, retries."""
    return ResilientStorage(
        RDBStorage(
            url,
            heartbeat_interval=heartbeat,
            grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
    )


@pytest.fixture
def cut_off(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """``cut_off[0] = True`` and this process's heartbeats meet an unreachable database (as
    when its network is down); the other storages of the test, other workers, are not cut off:
    they fail stale trials without beating."""
    flag = [False]
    real = rdb_module.beat_if_running

    def beat(backend: RDBStorage, trial_id: int) -> bool:
        if flag[0]:
            raise _down()
        return real(backend, trial_id)

    monkeypatch.setattr(rdb_module, "beat_if_running", beat)
    return flag


# ------------------------------------------------------------------------ the storage
def test_a_heartbeat_finds_its_trial_failed_as_stale_and_does_not_beat_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    mine = _worker_storage(url)
    study = optuna.create_study(storage=mine, study_name="s")
    kept, taken = study.ask(), study.ask()
    for t in (kept, taken):
        mine.record_heartbeat(t._trial_id)
    assert not mine.is_lost(kept._trial_id) and not mine.is_lost(taken._trial_id)
    beat = last_heartbeat(study, study.get_trials(deepcopy=False)[1])

    other = RDBStorage(url)  # another worker fails it (fail_stale_trials does this)
    other.set_trial_state_values(taken._trial_id, TrialState.FAIL)
    assert not mine.is_lost(taken._trial_id)  # not known until a heartbeat or a read
    time.sleep(1.1)  # the database clock moves on: a beat would move the heartbeat
    mine.record_heartbeat(kept._trial_id)
    mine.record_heartbeat(taken._trial_id)
    assert mine.is_lost(taken._trial_id) and not mine.is_lost(kept._trial_id)
    trials = study.get_trials(deepcopy=False)
    assert last_heartbeat(study, trials[1]) == beat  # its last beat still says when it fell silent
    assert last_heartbeat(study, trials[0]) > beat

    fresh = _worker_storage(url)  # what a read says, without a heartbeat first
    assert fresh.is_lost(taken._trial_id, read=True)
    assert not fresh.is_lost(kept._trial_id, read=True)
    assert lost_trial(taken, mine) and not lost_trial(kept, mine)
    assert not lost_trial(kept, RDBStorage(url), read=True)  # a storage that cannot tell


def test_a_heartbeat_past_the_retry_window_warns_and_the_next_one_tries_again(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cut_off: list[bool],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Raising would end Optuna's heartbeat thread for the rest of the trial."""
    monkeypatch.setenv(RETRY_WINDOW_ENV, "0.3")
    mine = _worker_storage(f"sqlite:///{tmp_path / 's.db'}")
    trial = optuna.create_study(storage=mine, study_name="s").ask()
    cut_off[0] = True
    mine.record_heartbeat(trial._trial_id)  # no exception
    (line,) = [r.getMessage() for r in caplog.records if "still unreachable" in r.getMessage()]
    assert line.startswith("storage: record_heartbeat: the database is still unreachable (")
    assert "\n" not in line and not mine.is_lost(trial._trial_id)
    cut_off[0] = False
    mine.record_heartbeat(trial._trial_id)
    assert not mine.is_lost(trial._trial_id)

    def broken(backend: RDBStorage, trial_id: int) -> bool:
        raise ValueError("not a disconnect")

    monkeypatch.setattr(rdb_module, "beat_if_running", broken)
    with pytest.raises(ValueError, match="not a disconnect"):  # other errors are not hidden
        mine.record_heartbeat(trial._trial_id)
