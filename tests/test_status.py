"""``jdsearch status`` on a study built by hand: live and lost workers, counts, best H, lineage
and the time left. The CLI on a real two-worker PostgreSQL search while it runs is checked in
``tests/test_workers.py``."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from jdsearch.cli import main
from jdsearch.search.record import BASE_MOVE, MOVE_PARAM, WORKER_SYSATTR, decision_attrs
from jdsearch.search.status import study_status
from jdsearch.storage import optuna_internals as oi

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed:UserWarning"),
]
optuna.logging.set_verbosity(optuna.logging.WARNING)
MOVES = CategoricalDistribution([BASE_MOVE, "layer_prune"])
T0 = datetime.datetime(2026, 1, 1, 12, 0, 0)


def _done(
    move: str, parent: int | None, h: float, seconds: float, state: TrialState
) -> FrozenTrial:
    return FrozenTrial(
        number=0,  # renumbered by add_trial
        state=state,
        value=h if state == TrialState.COMPLETE else None,
        datetime_start=T0,
        datetime_complete=T0 + datetime.timedelta(seconds=seconds),
        params={MOVE_PARAM: move},
        distributions={MOVE_PARAM: MOVES},
        user_attrs={**decision_attrs(parent, "student"), "best_resolution": "96x96"},
        system_attrs={WORKER_SYSATTR: "node1:11"},
        intermediate_values={},
        trial_id=0,
    )


def test_status_tells_live_from_lost_workers_and_estimates_the_time_left(tmp_path: Path) -> None:
    storage = RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.add_trial(_done(BASE_MOVE, None, 0.1, 10, TrialState.COMPLETE))  # 0
    study.add_trial(_done("layer_prune", 0, 0.3, 30, TrialState.COMPLETE))  # 1: the best
    study.add_trial(_done("layer_prune", 1, 0.0, 5, TrialState.FAIL))  # 2
    lost, live, choosing = study.ask(), study.ask(), study.ask()  # 3, 4, 5
    for trial, worker in ((lost, "node2:22"), (live, "node1:11")):
        trial.suggest_categorical(MOVE_PARAM, MOVES.choices)
        oi.set_trial_system_attr(trial, WORKER_SYSATTR, worker)
    study.enqueue_trial({MOVE_PARAM: "layer_prune"})  # 6
    storage.record_heartbeat(lost._trial_id)
    time.sleep(3.2)  # past the grace period of heartbeat_s 1 (2 s; SQLite counts whole seconds)
    storage.record_heartbeat(live._trial_id)

    status = study_status(study, n_trials=4, heartbeat_s=1)
    assert status.counts == {"COMPLETE": 2, "FAIL": 1, "RUNNING": 3, "WAITING": 1}
    by_number = {r.number: r for r in status.running}
    assert by_number[3].stale and by_number[3].heartbeat_age_s > 2
    assert not by_number[4].stale and by_number[4].heartbeat_age_s < 2
    assert by_number[5].worker is None and by_number[5].heartbeat_age_s is None
    assert not by_number[5].stale  # choosing its move: no heartbeat yet
    assert status.live_workers == 2 and [r.number for r in status.live] == [4, 5]
    assert (status.best, status.best_h, status.best_resolution) == (1, 0.3, "96x96")
    assert status.lineage == "base (#0) -> layer_prune (#1)"
    # node1:11 started 3 of its 4 trials; trial 5's worker its first: 3 more of 20 s each.
    assert status.mean_trial_s == 20.0
    r4, r5 = by_number[4], by_number[5]
    assert status.left_s == pytest.approx(
        max(1 * 20 + max(20 - r4.running_s, 0), 3 * 20 + max(20 - r5.running_s, 0))
    )
    text = status.format()
    assert "trials      2 COMPLETE, 1 FAIL, 3 RUNNING, 1 WAITING" in text
    assert "workers     2 live" in text
    assert (
        "node2:22" in text.splitlines()[3] and "STALE: its worker is lost" in text.splitlines()[3]
    )
    assert "worker not recorded yet" in text and "choosing its move" in text
    assert "best        trial 1: H 0.3000 at 96x96" in text
    assert (
        f"time left   about {status.left_s:.0f} s (each live worker runs search.n_trials = 4; "
        "a trial takes 20 s on average)" in text
    )

    for trial in (lost, live, choosing):
        study.tell(trial, state=TrialState.FAIL)
    done = study_status(study, n_trials=4, heartbeat_s=1)
    assert done.live_workers == 0 and done.left_s == 0.0
    assert done.format().endswith("time left   none: no live worker")


def test_status_of_a_missing_database_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--storage", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"jdsearch: error: sqlite:///{tmp_path / 'none.db'}: no such database file {tmp_path / 'none.db'}"
    )
