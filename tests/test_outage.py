"""Outages longer than the grace period (2 × ``search.heartbeat_s``): a worker cut off from the
database for that long finds, when it is back, that another worker failed its running trial as
stale and re-queued it. It stops that trial, does not tell it, says so in one line and goes on
with the next trial; the retry resumes the training state the stopped attempt saved. So do a
fine-tuning trial (``jdsearch finetune``, which then runs the retry itself) and a trial that was
still waiting in the sampler for another worker's root trial.

The last test stops a PostgreSQL server of its own (``jdsearch.testing.PrivatePostgres``) under
two real workers; the shared server is never touched.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import psycopg2
import pytest
import sqlalchemy as sa
import yaml
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

import jdsearch.storage.rdb as rdb_module
from jdsearch.core.errors import JDSearchError
from jdsearch.search.objective import TrialLost, _StopWhenLost
from jdsearch.search.run import optimize
from jdsearch.storage.optuna_internals import last_heartbeat, lost_trial
from jdsearch.storage.rdb import ResilientStorage
from jdsearch.storage.reconnect import RETRY_WINDOW_ENV

from .conftest import SearchAssets

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed:UserWarning"),
]
optuna.logging.set_verbosity(optuna.logging.WARNING)

STOPPED = f"STOPPED: {TrialLost.REASON}"


def _down() -> Exception:
    """What the storage raises while the server is away."""
    orig = psycopg2.OperationalError("connection to server failed: Connection refused")
    try:
        raise StorageInternalError("cannot commit") from sa.exc.OperationalError("", {}, orig)
    except StorageInternalError as e:
        return e


def _worker_storage(url: str, heartbeat: int = 1, max_retry: int = 3) -> ResilientStorage:
    """What ``storage_for`` opens for a worker: heartbeats, a grace of 2 beats, retries."""
    return ResilientStorage(
        RDBStorage(
            url,
            heartbeat_interval=heartbeat,
            grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
        )
    )


@pytest.fixture
def cut_off(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """``cut_off[0] = True`` and this process's heartbeats meet an unreachable database (as
    when its network is down); the other storages of the test, other workers, are not cut off:
    they fail stale trials without beating."""
    flag = [False]

    def cut(real: Callable[[RDBStorage, int], Any]) -> Callable[[RDBStorage, int], Any]:
        def call(backend: RDBStorage, trial_id: int) -> Any:
            if flag[0]:
                raise _down()
            return real(backend, trial_id)

        return call

    for name in ("beat_if_running", "running_beat_age"):  # the beat, and the read of is_lost
        monkeypatch.setattr(rdb_module, name, cut(getattr(rdb_module, name)))
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


def test_the_check_before_the_upload_reads_and_beats_only_an_overdue_trial(db_url: str) -> None:
    """``is_lost(read=True)`` (asked before a trial's upload) reads the trial: no write for a
    trial whose heartbeat is on time (a commit waits for the disk), a beat for one whose beat is
    overdue (so that it does not go stale as its worker finishes it), lost for one another
    worker failed, which it does not beat."""
    on_time, late = _worker_storage(db_url, heartbeat=30), _worker_storage(db_url, heartbeat=1)
    study = optuna.create_study(storage=on_time, study_name=f"s{uuid.uuid4().hex[:6]}")
    mine, overdue, taken = study.ask(), study.ask(), study.ask()
    for t in (mine, overdue, taken):
        on_time.record_heartbeat(t._trial_id)
    RDBStorage(db_url).set_trial_state_values(taken._trial_id, TrialState.FAIL)
    beats = {t.number: last_heartbeat(study, t) for t in study.get_trials(deepcopy=False)}
    time.sleep(1.1)  # SQLite's clock counts whole seconds; past `late`'s interval
    sql: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sql.append(statement.split(None, 1)[0].upper())

    sa.event.listen(on_time.engine, "before_cursor_execute", note)
    try:
        assert not on_time.is_lost(mine._trial_id, read=True)
        assert on_time.is_lost(taken._trial_id, read=True)
    finally:
        sa.event.remove(on_time.engine, "before_cursor_execute", note)
    assert sql and not {"INSERT", "UPDATE", "DELETE"} & set(sql), sql
    assert not late.is_lost(overdue._trial_id, read=True)
    after = {t.number: last_heartbeat(study, t) for t in study.get_trials(deepcopy=False)}
    assert after[mine.number] == beats[mine.number] and after[taken.number] == beats[taken.number]
    assert after[overdue.number] > beats[overdue.number]


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
    caplog.clear()
    assert not mine.is_lost(trial._trial_id, read=True)  # the read, cut off too: no exception
    (line,) = [r.getMessage() for r in caplog.records if "still unreachable" in r.getMessage()]
    assert line.startswith("storage: is_lost: the database is still unreachable (")
    cut_off[0] = False
    mine.record_heartbeat(trial._trial_id)
    assert not mine.is_lost(trial._trial_id)

    def broken(backend: RDBStorage, trial_id: int) -> bool:
        raise ValueError("not a disconnect")

    monkeypatch.setattr(rdb_module, "beat_if_running", broken)
    with pytest.raises(ValueError, match="not a disconnect"):  # other errors are not hidden
        mine.record_heartbeat(trial._trial_id)


def test_a_state_saved_as_the_trial_is_lost_is_left_to_its_retry_or_removed(
    tmp_path: Path,
) -> None:
    """A save whose record is refused (another worker failed the trial meanwhile) removes the
    state it just uploaded when nothing names it (the attempt's first save); a later one leaves
    the newer state under the id the retry inherited; once lost is known, nothing is saved."""
    import torch

    from jdsearch.search.record import STATE_SYSATTR
    from jdsearch.search.resume import TrialStates
    from jdsearch.storage.artifacts import SQLArtifactStore
    from jdsearch.store.trainstate import TrainState, trainstate_from_bytes

    url = f"sqlite:///{tmp_path / 's.db'}"
    store = SQLArtifactStore(url)
    mine = _worker_storage(url)
    study = optuna.create_study(storage=mine, study_name="s")
    other = RDBStorage(url)

    def state(iteration: int) -> TrainState:
        return TrainState(iteration, {"w": torch.full((2,), float(iteration))}, {})

    first = study.ask()
    states = TrialStates(store, first, every=2)
    other.set_trial_state_values(first._trial_id, TrialState.FAIL)
    states.save(state(2))  # the first save: refused, and removed
    assert states.own is None and store.list_ids() == []

    second = study.ask()
    states = TrialStates(store, second, every=2)
    states.save(state(2))
    (named,) = store.list_ids()
    assert study.get_trials()[1].system_attrs[STATE_SYSATTR]["artifact"] == named
    other.set_trial_state_values(second._trial_id, TrialState.FAIL)
    states.save(state(4))  # refused: the newer state stays where the retry looks
    with store.open_reader(named) as reader:
        assert trainstate_from_bytes(reader.read(), "s").iteration == 4
    mine.record_heartbeat(second._trial_id)  # now known lost: no more saves
    states.save(state(6))
    with store.open_reader(named) as reader:
        assert trainstate_from_bytes(reader.read(), "s").iteration == 4
    assert store.list_ids() == [named]


# ------------------------------------------------------------------------ the worker
class _Spy:
    """Every ``set_trial_state_values`` the worker's storage is asked for: ``(trial id, state)``."""

    def __init__(self, storage: ResilientStorage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, TrialState]] = []
        real = storage.set_trial_state_values

        def spy(trial_id: int, state: TrialState, values: Any = None) -> bool:
            self.calls.append((trial_id, state))
            return real(trial_id, state, values)

        monkeypatch.setattr(storage, "set_trial_state_values", spy)


def _cut_off_past_the_grace(url: str, cut_off: list[bool], max_retry: int = 3) -> None:
    """This worker loses the database for 3.5 s (grace 2 s; SQLite's clock counts whole
    seconds), and another worker, starting a trial meanwhile, fails the stale trials and
    re-queues them (``max_retry`` times at most; 0: it does not)."""
    cut_off[0] = True
    time.sleep(3.5)
    other = optuna.load_study(study_name="s", storage=_worker_storage(url, max_retry=max_retry))
    fail_stale_trials(other)
    cut_off[0] = False


@pytest.mark.parametrize("ends", ["training", "failing", "returning"])
def test_a_trial_failed_as_stale_while_its_worker_was_cut_off_is_stopped_not_told(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cut_off: list[bool],
    capsys: pytest.CaptureFixture[str],
    ends: str,
) -> None:
    """Trial 0 loses its worker's heartbeat past the grace period and another worker fails and
    re-queues it; its worker, back, stops it (``training``: at its next step, once a heartbeat
    found it lost; ``failing``: it failed for a reason of its own meanwhile; ``returning``: it
    ended before any heartbeat came back, so the tell finds it). The worker never tells it, says
    so in one line, and runs its 2 trials: the retry of trial 0 first, then a new one."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = _worker_storage(url)
    study = optuna.create_study(storage=storage, study_name="s")
    spy = _Spy(storage, monkeypatch)
    seen: list[int] = []
    stops: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_categorical("move", ["layer_prune", "add_layer:2"])
        if trial.number != 0:
            return float(trial.number)
        _cut_off_past_the_grace(url, cut_off)
        if ends == "failing":
            raise JDSearchError(f"trial {trial.number}: the disk is full (injected)")
        if ends == "returning":
            return 0.5
        step = _StopWhenLost(trial.number, lambda: lost_trial(trial))
        for i in range(300):  # a training: its steps, as long as the trial is ours
            step(None)  # type: ignore[arg-type]
            stops.append(i)
            time.sleep(0.05)
        raise AssertionError("trial 0 was never stopped")

    optimize(study, objective, 2, [lambda s, t: seen.append(t.number)])

    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[1]) == 0
    assert seen == [1, 2]  # the callbacks (the trial's line, its note) saw the told trials only
    assert [t for t, _ in spy.calls if t == trials[0]._trial_id] == []  # never told
    assert len(spy.calls) == 3  # the retry popped and told, and trial 2 told
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("trial   0")]
    assert len(lines) == 1 and lines[0].endswith(STOPPED), lines
    assert lines[0].startswith(f"trial   0  {trials[0].params['move']}")
    if ends == "training":
        assert 0 < len(stops) < 300  # stopped mid-way, within seconds of the database's return


def test_a_failure_of_the_objective_itself_still_stops_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut_off: list[bool]
) -> None:
    """The safety net for a refused tell takes only a tell refused because another worker failed
    the trial: a bug in the objective (not a ``JDSearchError``) still ends ``optimize``, even
    when the trial was lost meanwhile, and so does a storage error that is not about the trial."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=_worker_storage(url), study_name="s")

    def buggy(trial: optuna.Trial) -> float:
        _cut_off_past_the_grace(url, cut_off)
        raise KeyError("a bug")

    with pytest.raises((KeyError, ValueError, AssertionError)):
        optimize(study, buggy, 1, [])

    def refused(trial: optuna.Trial) -> float:
        raise UpdateFinishedTrialError("a write refused, for another reason")

    with pytest.raises(UpdateFinishedTrialError):
        optimize(optuna.create_study(storage=_worker_storage(url), study_name="t"), refused, 1, [])


# ------------------------------------------------------------------------ fine-tuning
def _trial_lines(out: str, number: int) -> list[str]:
    """The worker's lines on trial ``number`` (a told trial's, or its ``STOPPED`` line)."""
    return [x for x in out.splitlines() if x.startswith(f"trial {number:3d}  ")]


def _finetune_study(url: str) -> tuple[optuna.Study, Any]:
    """A study whose trial 0 is a completed pair with a checkpoint (what ``finetune`` asks
    for), and the little of a ``SearchContext`` that ``finetune`` reads when the objective's
    ``_run`` is replaced: the move vocabulary and the spec's name and metric."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    from jdsearch.search.objective import move_vocabulary

    vocabulary = move_vocabulary()
    study = optuna.create_study(
        storage=_worker_storage(url), study_name="s", sampler=optuna.samplers.RandomSampler()
    )
    study.add_trial(
        create_trial(
            params={"move": "base"},
            distributions={"move": CategoricalDistribution(vocabulary)},
            value=0.5,
            user_attrs={"checkpoint": "trial-0", "parent": None, "move_kind": "base"},
        )
    )
    spec = SimpleNamespace(name="s", score=SimpleNamespace(metric="AP"))
    return study, SimpleNamespace(vocabulary=vocabulary, spec=spec)


@pytest.mark.parametrize("ends", ["training", "returning"])
def test_a_finetune_failed_as_stale_is_stopped_and_its_retry_runs_in_the_same_command(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cut_off: list[bool],
    capsys: pytest.CaptureFixture[str],
    ends: str,
) -> None:
    """``jdsearch finetune`` ran its trial through Optuna's own ``optimize``, which told the
    lost trial FAIL and died of it (``ValueError: Cannot tell a FAIL trial.``). Now the
    fine-tuning trial, failed as stale and re-queued while its worker was cut off, is stopped
    (``training``: at its next step; ``returning``: when its tell is refused) with one line,
    never told, and the command runs the retry of the same request and returns it."""
    from jdsearch.search.finetune import finetune
    from jdsearch.search.objective import Objective

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study, ctx = _finetune_study(url)
    spy = _Spy(study._storage, monkeypatch)
    stops: list[int] = []

    def run(self: Objective, trial: optuna.Trial, move: str, parent: int | None) -> float:
        if trial.number != 1:
            return 0.7
        _cut_off_past_the_grace(url, cut_off)
        if ends == "returning":
            return 0.5
        step = _StopWhenLost(trial.number, lambda: lost_trial(trial))
        for i in range(300):  # the fine-tuning's steps, as long as the trial is ours
            step(None)  # type: ignore[arg-type]
            stops.append(i)
            time.sleep(0.05)
        raise AssertionError("trial 1 was never stopped")

    monkeypatch.setattr(Objective, "_run", run)
    child = finetune(study, ctx, 0, epochs=1.0)  # type: ignore[arg-type]

    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert child.number == 2 and child.value == 0.7  # the retry, run here; no search trial
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(child) == 1
    token = "finetune_request"
    assert child.user_attrs[token] == trials[1].user_attrs[token]
    assert (child.params["move"], child.user_attrs["parent"]) == ("finetune", 0)
    # Popped from the queue (RUNNING), never told.
    assert [s for t, s in spy.calls if t == trials[1]._trial_id] == [TrialState.RUNNING]
    out = capsys.readouterr().out
    (line,) = _trial_lines(out, 1)
    assert line.startswith("trial   1  finetune ") and line.endswith(STOPPED), line
    assert len(_trial_lines(out, 2)) == 1
    assert not (tmp_path / "runs" / "s" / "failed-trials.log").exists()  # not a failure
    if ends == "training":
        assert 0 < len(stops) < 300


def test_a_lost_finetune_that_is_not_retried_ends_the_command_without_a_search_trial(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cut_off: list[bool],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Past ``search.max_retry`` the stale trial has no retry: the command stops it (one line,
    not told) and ends with the request's error; it does not go on to a trial of its own,
    which would be a new search trial."""
    from jdsearch.search.finetune import finetune
    from jdsearch.search.objective import Objective

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study, ctx = _finetune_study(url)
    runs: list[int] = []

    def run(self: Objective, trial: optuna.Trial, move: str, parent: int | None) -> float:
        runs.append(trial.number)
        if trial.number == 1:
            _cut_off_past_the_grace(url, cut_off, max_retry=0)
        return 0.5

    monkeypatch.setattr(Objective, "_run", run)
    with pytest.raises(JDSearchError, match=r"^finetune: trial 1 failed: FAIL$"):
        finetune(study, ctx, 0, epochs=1.0)  # type: ignore[arg-type]
    assert runs == [1]
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.FAIL]
    (line,) = _trial_lines(capsys.readouterr().out, 1)
    assert line.endswith(STOPPED), line


# ------------------------------------------------------------------------ waiting for the root
@pytest.mark.parametrize("root", ["completes", "lost too"])
def test_a_trial_cut_off_while_it_waits_for_the_root_is_stopped_not_told(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cut_off: list[bool],
    capsys: pytest.CaptureFixture[str],
    root: str,
) -> None:
    """Trial 1 waits in the sampler for another worker's root trial (trial 0, the base) to
    finish, beating its heartbeat (``keep_alive``), when its worker is cut off past the grace
    period and another worker fails and re-queues it. Back, the sampler's write of its choice
    is refused and the worker stops the trial: one line, never told, no move; it runs the retry
    next. ``completes``: the root's worker kept its connection and completes the root after;
    ``lost too``: the whole database was away, and the root is failed and re-queued as well
    (the sampler then takes the root: its write is refused just the same). A guard: this path
    stopped cleanly before the fine-tuning's fix as well."""
    import threading

    from jdsearch.search.objective import Objective, move_vocabulary
    from jdsearch.search.sampler import HillClimbingSampler
    from jdsearch.search.summary import print_trial

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 's.db'}"
    vocabulary = move_vocabulary()
    sampler = HillClimbingSampler(
        vocabulary,
        lambda parent: (["layer_prune"], ["teacher.depth1+", "teacher.fpn-"]),
        seed=0,
        root_wait=(0.2, 120.0),
    )
    storage = _worker_storage(url)
    study = optuna.create_study(storage=storage, study_name="s", sampler=sampler)
    spy = _Spy(storage, monkeypatch)
    # The other worker runs the root: trial 0, RUNNING with its move, its heartbeat beaten.
    backend = RDBStorage(url)
    others = optuna.load_study(
        study_name="s", storage=backend, sampler=optuna.samplers.RandomSampler()
    )
    others.enqueue_trial({"move": "base"}, user_attrs={"parent": None, "move_kind": "base"})
    base = others.ask()
    base.suggest_categorical("move", vocabulary)
    finish = threading.Event()

    def root_worker() -> None:
        while not finish.wait(0.5):
            if not (root == "lost too" and cut_off[0]):
                backend.record_heartbeat(base._trial_id)
        if root == "completes":
            others.tell(base, 0.5)

    def the_outage() -> None:
        deadline = time.monotonic() + 60
        while len(study.get_trials(deepcopy=False)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # trial 1 exists: its worker waits for the root
        time.sleep(0.5)
        _cut_off_past_the_grace(url, cut_off)
        time.sleep(1.5)  # back: a heartbeat finds trial 1 lost, while the root still runs
        finish.set()

    ctx = SimpleNamespace(vocabulary=vocabulary, spec=SimpleNamespace(name="s"))
    monkeypatch.setattr(Objective, "_run", lambda self, trial, move, parent: 0.7)
    threads = [threading.Thread(target=f, daemon=True) for f in (root_worker, the_outage)]
    for t in threads:
        t.start()
    seen: list[int] = []
    optimize(study, Objective(ctx), 2, [print_trial, lambda s, t: seen.append(t.number)])  # type: ignore[arg-type]
    for t in threads:
        t.join(30)

    trials = study.get_trials()
    lost = trials[1]
    assert lost.state == TrialState.FAIL and lost.params == {}  # lost while choosing its move
    retry_of = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t): t for t in trials}
    assert retry_of[1].state == TrialState.COMPLETE and retry_of[1].number in seen
    if root == "completes":
        complete, fail = TrialState.COMPLETE, TrialState.FAIL
        assert [t.state for t in trials] == [complete, fail, complete, complete]
        assert trials[0].datetime_complete > lost.datetime_complete  # it was waiting for it
        assert retry_of[1].user_attrs["parent"] == 0
    else:
        assert [t.state for t in trials[:2]] == [TrialState.FAIL, TrialState.FAIL]
        assert retry_of[0].params["move"] == "base" and retry_of[0].state == TrialState.COMPLETE
    assert sorted(seen) == [2, 3] and len(trials) == 4  # told: the 2 trials after the lost
    assert [t for t, _ in spy.calls if t == lost._trial_id] == []  # never told
    (line,) = _trial_lines(capsys.readouterr().out, 1)
    assert line.startswith("trial   1  ?") and line.endswith(STOPPED), line


# ------------------------------------------------------------------------ a real outage
def _wait(what: str, ready: Callable[[], Any], timeout: float, alive: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = ready()
        if found:
            return found
        if alive is not None and alive.proc.poll() is not None:
            pytest.fail(f"worker {alive.name} exited waiting for {what}:\n{alive.output()}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.slow
def test_postgresql_down_past_the_grace_period_no_trial_is_retried_and_told(
    search_assets: SearchAssets, private_pg: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers train (heartbeat 1 s, grace 2 s, each saving its state every 2 iterations);
    PostgreSQL stops for 3.5 s and starts again. A third worker starting a trial just then fails
    the running trials as stale; the two workers, whose network comes back a moment later, stop
    them: one line each, no tell, no upload. Each worker still adds its 2 trials, and the
    retries resume the states the stopped attempts saved."""
    from jdsearch.search.record import STATE_SYSATTR, WORKER_SYSATTR, artifact_holders
    from jdsearch.search.resume import RESUMED_ATTR
    from jdsearch.search.session import open_storage, prepare
    from jdsearch.storage.gc import collect

    from .pgproxy import commit_cutter
    from .test_workers import check_lineage, fresh_trials, workers, write_spec

    monkeypatch.chdir(tmp_path)
    url = private_pg.url
    spec_file, spec = write_spec(
        tmp_path, search_assets, "outage", url, heartbeat_s=1, trial_checkpoint_every=2
    )
    doc = yaml.safe_load(spec_file.read_text())
    doc["fast_eval"]["epochs"] = 2  # 12 iterations: states saved before the outage, some left
    spec_file.write_text(yaml.safe_dump(doc))
    study, _ = prepare(spec, url, progress=False)

    def training() -> list[FrozenTrial]:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        saved = [t for t in running if (t.system_attrs.get(STATE_SYSATTR) or {}).get("artifact")]
        return saved if len(saved) == 2 else []

    monkeypatch.setenv(RETRY_WINDOW_ENV, "60")  # the workers ride the outage out
    with commit_cutter(private_pg.port) as proxy, workers(tmp_path) as spawn:
        via = url.replace(f":{private_pg.port}/", f":{proxy.port}/") + "?sslmode=disable"
        command = ["search", str(spec_file), "--storage", via, "--quiet", "--n-trials", "2"]
        first, second = spawn("first", command), spawn("second", command)
        victims = _wait("both workers to save a training state", training, 150, alive=first)
        proxy.cut()  # the workers' network goes first, then the server itself
        private_pg.stop()
        time.sleep(3.5)  # > the grace period of 2 s
        private_pg.start()
        storage, _ = open_storage(spec, url)
        fail_stale_trials(optuna.load_study(study_name=spec.name, storage=storage))
        proxy.restore()
        first.finish()
        second.finish()

    trials = {t.number: t for t in fresh_trials(spec, url)}
    stale = [trials[t.number] for t in victims]
    assert [t.state for t in stale] == [TrialState.FAIL, TrialState.FAIL]
    retry_of = {
        RetryHeartbeatStaleTrialCallback.retried_trial_number(t): t for t in trials.values()
    }
    logs = {w.marker: w.output() for w in (first, second)}
    for t in stale:
        lines = [
            x
            for x in logs[t.system_attrs[WORKER_SYSATTR]].splitlines()
            if x.startswith(f"trial {t.number:3d}  ")
        ]
        assert len(lines) == 1 and lines[0].endswith(STOPPED), lines  # stopped, never told
        retry = retry_of[t.number]
        assert retry.state == TrialState.COMPLETE
        saved = t.system_attrs[STATE_SYSATTR]["iteration"]  # when it was failed as stale
        assert retry.user_attrs[RESUMED_ATTR] >= saved > 0  # resumed, not started over
    # Each worker added its 2 trials; the stopped ones did not count.
    done = [t for t in trials.values() if t.state == TrialState.COMPLETE]
    assert len(done) == 4 and {t.system_attrs[WORKER_SYSATTR] for t in done} == set(logs)
    assert len(trials) == 6
    check_lineage(list(trials.values()))
    # The stopped attempts left nothing behind: no checkpoint, no training state.
    rdb = RDBStorage(url)
    assert collect(rdb, url, artifact_holders(), older_than_s=0, dry_run=True) == []
