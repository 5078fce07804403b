"""Faults a shared study must survive, one at a time: the database going away mid-trial (a real
restart of a PostgreSQL server of the test's own), an artifact upload that breaks halfway, a
trial that runs out of memory and a parent whose checkpoint became unreadable; and ``jdsearch
gc``, which removes what they leave.

``bench/faults.py`` throws all of them at a multi-worker search at once and counts what survives.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import optuna
import psycopg2
import pytest
import sqlalchemy as sa
import torch
from optuna.artifacts import upload_artifact
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage
from optuna.trial import TrialState

import jdsearch.search.objective
import jdsearch.search.session
from bench.faults import BreakingStore, BreaksAfter
from jdsearch.cli import main
from jdsearch.search.objective import Objective
from jdsearch.search.record import FAIL_REASON_ATTR, PARENT_ATTR, SET_ASIDE_PREFIX, TrialRecord
from jdsearch.search.run import run_search
from jdsearch.search.session import prepare
from jdsearch.storage.artifacts import SQLArtifactStore
from jdsearch.storage.optuna_internals import study_system_attrs
from jdsearch.storage.rdb import ResilientStorage
from jdsearch.storage.reconnect import RETRY_WINDOW_ENV, is_disconnect, with_reconnect
from jdsearch.testing import PrivatePostgres

from .conftest import SearchAssets
from .test_workers import check_checkpoints, check_lineage, fresh_trials, write_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------ telling a disconnect apart
def _wrapped(message: str, *, invalidated: bool = False) -> Exception:
    """What optuna raises when the driver fails: StorageInternalError from SQLAlchemy's error."""
    orig = psycopg2.OperationalError(message)
    db = sa.exc.OperationalError("SELECT 1", {}, orig, connection_invalidated=invalidated)
    try:
        raise StorageInternalError("An exception is raised during the commit.") from db
    except StorageInternalError as e:
        return e


@pytest.mark.parametrize(
    "message",
    [
        "server closed the connection unexpectedly\n\tThis probably means the server terminated",
        "terminating connection due to administrator command",
        'connection to server at "127.0.0.1", port 5432 failed: Connection refused',
        "FATAL:  the database system is shutting down",
        "FATAL:  the database system is starting up",
    ],
)
def test_what_a_restarting_server_says_is_a_disconnect(message: str) -> None:
    assert is_disconnect(_wrapped(message))


def test_statement_errors_are_not_disconnects() -> None:
    assert not is_disconnect(_wrapped('relation "trials" does not exist'))
    assert not is_disconnect(_wrapped("value too long for type character varying(512)"))
    assert not is_disconnect(ValueError("connection"))
    assert is_disconnect(_wrapped("anything at all", invalidated=True))


def test_with_reconnect_retries_a_disconnect_and_nothing_else() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise _wrapped("server closed the connection unexpectedly")
        return "done"

    assert with_reconnect(flaky, "test", window_s=30) == "done" and len(calls) == 3

    def wrong() -> None:
        calls.append(1)
        raise _wrapped("syntax error at or near SELEKT")

    calls.clear()
    with pytest.raises(StorageInternalError):
        with_reconnect(wrong, "test", window_s=30)
    assert len(calls) == 1  # not retried

    def down() -> None:
        raise _wrapped("Connection refused")

    started = time.monotonic()
    with pytest.raises(StorageInternalError):
        with_reconnect(down, "test", window_s=0.5)
    assert time.monotonic() - started < 5  # gives up once the window has passed


def test_the_storage_retries_a_dropped_write_and_a_tell_that_did_arrive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = ResilientStorage(RDBStorage(f"sqlite:///{tmp_path / 's.db'}"))
    study = optuna.create_study(storage=storage, study_name="s")
    assert study._storage is storage  # used as it is: Optuna wraps only a bare RDBStorage
    trial = study.ask()
    real_set = RDBStorage.set_trial_user_attr
    drops = [2]

    def dropping(self: RDBStorage, *args: Any, **kwargs: Any) -> None:
        if drops[0]:
            drops[0] -= 1
            raise _wrapped("server closed the connection unexpectedly")
        real_set(self, *args, **kwargs)

    monkeypatch.setattr(RDBStorage, "set_trial_user_attr", dropping)
    trial.set_user_attr("k", 1)
    assert drops == [0] and storage.get_trial(trial._trial_id).user_attrs == {"k": 1}

    # A tell whose commit arrived although the connection dropped before the answer.
    real_tell = RDBStorage.set_trial_state_values

    def lost_answer(self: RDBStorage, trial_id: int, state: TrialState, values: Any = None) -> bool:
        real_tell(self, trial_id, state, values)
        monkeypatch.setattr(RDBStorage, "set_trial_state_values", real_tell)
        raise _wrapped("server closed the connection unexpectedly")

    monkeypatch.setattr(RDBStorage, "set_trial_state_values", lost_answer)
    assert storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [1.0])
    assert storage.get_trial(trial._trial_id).state == TrialState.COMPLETE
    with pytest.raises(RuntimeError):  # a second, genuine tell still fails as optuna's does
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def test_every_storage_call_a_study_makes_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every call Optuna makes on a study's storage (the abstract methods of ``BaseStorage`` and
    ``BaseHeartbeat``, and whatever its ``_CachedStorage`` overrides) is one the resilient storage
    defines and retries, now and after an optuna upgrade: with ``with_reconnect`` replaced by a
    spy that refuses to run anything, each such call reaches the spy before the database."""
    import inspect

    from optuna.storages import BaseStorage, _CachedStorage
    from optuna.storages._heartbeat import BaseHeartbeat

    from jdsearch.storage import rdb as storage_module
    from jdsearch.storage.rdb import NOT_RETRIED

    class Refused(Exception):
        pass

    def spy(fn: Any, what: str, **kwargs: Any) -> Any:
        raise Refused(what)

    called = BaseStorage.__abstractmethods__ | BaseHeartbeat.__abstractmethods__
    called |= {n for n, v in vars(_CachedStorage).items() if callable(v) and n[:2] != "__"}
    called -= {"_get_cached_trial", "_read_trials_from_remote_storage", "_add_trials_to_cache"}
    assert {"create_new_trial", "get_all_trials", "_get_stale_trial_ids"} <= called
    storage = ResilientStorage(RDBStorage(f"sqlite:///{tmp_path / 's.db'}"))
    monkeypatch.setattr(storage_module, "with_reconnect", spy)
    unretried = []
    for name in sorted(set(called) - set(NOT_RETRIED)):
        method = getattr(storage, name)
        args = [None] * sum(
            p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD
            for p in inspect.signature(method).parameters.values()
        )
        try:
            method(*args)
        except Refused:
            continue
        except Exception:
            pass
        unretried.append(name)
    assert unretried == []
    assert not ResilientStorage.__abstractmethods__


# ------------------------------------------------------------------ a real PostgreSQL restart
def _accepts_connections(url: str) -> bool:
    engine = sa.create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


@pytest.mark.slow
def test_a_postgresql_restart_during_a_trial_fails_nothing(
    search_assets: SearchAssets,
    private_pg: PrivatePostgres,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The search runs on a PostgreSQL server of the test's own, stopped and started again while
    trial 1 uploads and records (the shared server is never touched)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(RETRY_WINDOW_ENV, "120")
    url = private_pg.url
    _, spec = write_spec(tmp_path, search_assets, "pg-restart", url, heartbeat_s=1)
    real_record = Objective.record
    stopped: list[float] = []
    threads: list[threading.Thread] = []

    def record(self: Objective, trial: optuna.Trial, *args: Any) -> Any:
        if trial.number == 1:  # the server goes down just as the trial uploads and records
            down = threading.Event()

            def restart() -> None:
                private_pg.stop()
                stopped.append(time.time())
                down.set()
                time.sleep(3.0)  # > the heartbeat interval: a heartbeat also meets the outage
                private_pg.start()

            threads.append(threading.Thread(target=restart, daemon=True))
            threads[0].start()
            assert down.wait(60), "PostgreSQL did not stop"
        return real_record(self, trial, *args)

    monkeypatch.setattr(Objective, "record", record)
    study = run_search(spec, url, n_trials=3, progress=False)
    threads[0].join(120)

    assert stopped and _accepts_connections(url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    # Trial 1 recorded its result only once the server was back.
    assert trials[1].datetime_complete.timestamp() > stopped[0] + 2.5
    check_lineage(trials)
    ctx = prepare(spec, url, progress=False)[1]
    check_checkpoints(ctx, trials)


# ------------------------------------------------------------------ an upload that breaks
def _breaking_store(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> list[BreakingStore]:
    """The search's artifact store wrapped by the fault bench's: the first checkpoint upload of
    a trial numbered 1 or more breaks after half its bytes."""
    made: list[BreakingStore] = []
    real = jdsearch.search.session.make_artifact_store

    def make(spec: str, url: str) -> Any:
        made.append(BreakingStore(real(spec, url), {"upload": 1}, workdir))
        return made[-1]

    monkeypatch.setattr(jdsearch.search.session, "make_artifact_store", make)
    return made


@pytest.mark.slow
def test_an_upload_that_breaks_halfway_fails_its_trial_only(
    search_assets: SearchAssets,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    _, spec = write_spec(tmp_path, search_assets, "upload", url)
    stores = _breaking_store(monkeypatch, tmp_path)
    study = run_search(spec, n_trials=4, progress=False)

    trials = study.get_trials()
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    reason = trials[1].user_attrs[FAIL_REASON_ATTR]
    assert reason.startswith("trial 1: uploading its checkpoint failed (OSError"), reason
    assert TrialRecord.from_trial(trials[1]).checkpoint is None
    assert all(t.user_attrs.get(PARENT_ATTR) != 1 for t in trials)
    store = stores[0].inner
    assert store.list_incomplete(0.0) == []  # the broken upload discarded its chunks
    check_lineage(trials)


@pytest.mark.slow
def test_gc_removes_partial_uploads_and_failed_trials_checkpoints(
    small_study_copy: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = small_study_copy
    store = SQLArtifactStore(url)
    study = optuna.load_study(study_name="small", storage=url)
    kept = {TrialRecord.from_trial(t).checkpoint for t in study.get_trials()}
    kept |= {study.user_attrs["base_artifact"], study.user_attrs["pool_artifact"]}
    before = set(store.list_ids())
    assert kept <= before

    # A worker killed mid-upload (nothing discards its chunks) ... in chunks of 1 KiB: an upload
    # that fits one chunk is one transaction, and one killed before it commits leaves nothing.
    class Killed(Exception):
        pass

    def dies(*_: Any) -> None:
        raise Killed

    chunked = SQLArtifactStore(url, chunk_size=1024)
    chunked._discard = dies  # type: ignore[method-assign]
    with pytest.raises(Killed):
        chunked.write(
            "partial-upload", io.BufferedReader(BreaksAfter(io.BytesIO(b"x" * 9000), 5000))
        )
    chunked.close()
    # ... and a trial that uploaded its checkpoint, then failed.
    failed = study.ask()
    path = _file(Path(url.removeprefix("sqlite:///")).parent)
    upload_artifact(study_or_trial=failed, file_path=path, artifact_store=store)
    study.tell(failed, state=TrialState.FAIL)
    assert len(store.list_incomplete(0.0)) == 1 and len(store.list_ids()) == len(before) + 1

    assert main(["gc", "--storage", url, "--dry-run", "--older-than", "0"]) == 0
    dry = capsys.readouterr().out
    assert "would remove 2 artifact(s)" in dry and set(store.list_ids()) > before
    assert main(["gc", "--storage", url, "--older-than", "3600"]) == 0  # all too young
    assert "removed 0 artifact(s)" in capsys.readouterr().out

    assert main(["gc", "--storage", url, "--older-than", "0"]) == 0
    out = capsys.readouterr().out
    assert "removed partial-upload" in out and "a partial upload" in out
    assert f"trial {failed.number} is FAIL" in out
    assert "removed 2 artifact(s)" in out
    assert set(store.list_ids()) == before and store.list_incomplete(0.0) == []
    for artifact_id in kept:  # everything a study reads is still whole
        with store.open_reader(artifact_id) as r:
            r.read()


def _file(folder: Path) -> str:
    path = folder / "trial-x.safetensors"
    path.write_bytes(os.urandom(3000))
    return str(path)


def test_gc_refuses_a_missing_database_and_a_negative_age(tmp_path: Path, capsys: Any) -> None:
    assert main(["gc", "--storage", f"sqlite:///{tmp_path / 'nope.db'}"]) == 2
    assert "no such database file" in capsys.readouterr().err
    assert main(["gc", "--storage", f"sqlite:///{tmp_path / 'nope.db'}", "--older-than", "-1"]) == 2
    assert "--older-than must be" in capsys.readouterr().err


# ------------------------------------------------------------------ out of memory
@pytest.mark.slow
def test_an_out_of_memory_trial_fails_alone_and_the_worker_goes_on(
    search_assets: SearchAssets,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    _, spec = write_spec(tmp_path, search_assets, "oom", f"sqlite:///{tmp_path / 'study.db'}")
    real_train = jdsearch.search.objective.train
    calls: list[int] = []
    freed: list[int] = []

    students: list[weakref.ref[Any]] = []

    def train(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            students.append(weakref.ref(args[0]))  # the student being trained
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.15 GiB total)"
            )
        return real_train(*args, **kwargs)

    real_free = jdsearch.search.objective.free_memory
    monkeypatch.setattr(jdsearch.search.objective, "train", train)

    def free() -> None:
        real_free()
        freed.append(students[0]() is None)  # the failed trial's student is gone by now

    monkeypatch.setattr(jdsearch.search.objective, "free_memory", free)
    study = run_search(spec, n_trials=3, progress=False)

    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert freed == [True]
    reason = study.get_trials()[1].user_attrs[FAIL_REASON_ATTR]
    assert reason.startswith("trial 1 (") and "out of memory on cpu (CUDA out of memory." in reason


def test_other_runtime_errors_are_not_taken_for_out_of_memory() -> None:
    from jdsearch.search.objective import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(
        RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")
    )
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


# ------------------------------------------------------------------ an unreadable parent
@pytest.mark.slow
def test_a_parent_with_an_unreadable_checkpoint_is_set_aside(
    search_assets: SearchAssets,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    # greedy: every trial's parent is the best pair, so the damaged one is asked for next.
    _, spec = write_spec(tmp_path, search_assets, "unreadable", url, strategy="greedy")
    study = run_search(spec, n_trials=3, progress=False)
    best = study.best_trial
    artifact_id = TrialRecord.from_trial(best).checkpoint
    store = SQLArtifactStore(url)
    blob = store.stat(artifact_id).blob_id
    with store.engine.begin() as conn:  # one flipped chunk: the sha256 no longer matches
        conn.execute(
            sa.update(store.chunks)
            .where(store.chunks.c.blob_id == blob, store.chunks.c.seq == 0)
            .values(data=b"\x00" * 64)
        )

    study = run_search(spec, n_trials=3, progress=False)

    trials = study.get_trials()
    new = trials[3:]
    assert new[0].state == TrialState.FAIL and new[0].user_attrs[PARENT_ATTR] == best.number
    message = f"trial {new[0].number}: the checkpoint of its parent, trial {best.number} (artifact {artifact_id}), is unreadable"
    assert new[0].user_attrs[FAIL_REASON_ATTR].startswith(message)
    assert f"{artifact_id} is unreadable" in caplog.text  # the worker's log says it too
    attrs = study_system_attrs(study)
    assert attrs[f"{SET_ASIDE_PREFIX}{best.number}"]["artifact"] == artifact_id
    assert all(t.state == TrialState.COMPLETE for t in new[1:])
    assert all(t.user_attrs[PARENT_ATTR] != best.number for t in new[1:])


def test_gc_keeps_a_training_state_that_a_retry_will_resume_from(tmp_path: Path) -> None:
    """A killed attempt's mid-trial state (``jdsearch:train_state``) is kept while a retry that
    will resume from it waits, and removed once nothing will."""
    from jdsearch.search.record import STATE_SYSATTR, artifact_holders
    from jdsearch.storage.gc import collect

    url = f"sqlite:///{tmp_path / 's.db'}"
    store = SQLArtifactStore(url)
    store.write("trainstate-abc", io.BytesIO(b"state"))
    study = optuna.create_study(study_name="s", storage=url)
    storage = study._storage
    killed, retry = study.ask(), study.ask()
    for t in (killed, retry):
        storage.set_trial_system_attr(t._trial_id, STATE_SYSATTR, {"artifact": "trainstate-abc"})
    study.tell(killed, state=TrialState.FAIL)
    rdb = RDBStorage(url)
    assert collect(rdb, url, artifact_holders(), older_than_s=0) == [] and store.exists(
        "trainstate-abc"
    )
    study.tell(retry, state=TrialState.FAIL)  # the retry failed too, and is not retried
    (removed,) = collect(rdb, url, artifact_holders(), older_than_s=0)
    assert removed.artifact_id == "trainstate-abc" and not store.exists("trainstate-abc")


def test_gc_removes_from_a_file_store_only_what_its_studies_name_as_dead(tmp_path: Path) -> None:
    """A ``file:DIR`` folder may be shared with other storages (or hold the user's own files):
    gc removes a failed trial's upload there, never a file that no study of this storage names."""
    from jdsearch.search.record import SPEC_SYSATTR, artifact_holders
    from jdsearch.storage.gc import collect
    from jdsearch.storage.optuna_internals import set_study_system_attr

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "someone-elses.safetensors").write_bytes(b"x" * 10)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="s", storage=url)
    set_study_system_attr(study, SPEC_SYSATTR, {"search": {"artifacts": f"file:{folder}"}})
    failed = study.ask()
    upload_artifact(
        study_or_trial=failed,
        file_path=_file(tmp_path),
        artifact_store=optuna.artifacts.FileSystemArtifactStore(folder),
    )
    study.tell(failed, state=TrialState.FAIL)
    (removed,) = collect(RDBStorage(url), url, artifact_holders(), older_than_s=0)
    assert "is FAIL" in removed.why
    assert [p.name for p in folder.iterdir()] == ["someone-elses.safetensors"]


def test_a_parent_read_while_short_of_memory_is_not_set_aside() -> None:
    from jdsearch.core.errors import CheckpointError
    from jdsearch.search.objective import _short_of_memory

    def wrapped(cause: BaseException) -> CheckpointError:
        try:
            raise CheckpointError("trial 3: cannot load the checkpoint") from cause
        except CheckpointError as e:
            return e

    assert _short_of_memory(wrapped(MemoryError()))
    assert _short_of_memory(wrapped(RuntimeError("DefaultCPUAllocator: can't allocate memory")))
    assert not _short_of_memory(wrapped(ValueError("sha256 mismatch")))


# ------------------------------------------------------------------ a failed trial's output
_FAILING_WORKER = """
import sys
from jdsearch.cli import main
from jdsearch.search.objective import Objective, TrialFailed

real = Objective._run

def deep_inside(number):
    raise TrialFailed(f"trial {number}: the disk is full (injected)")

def run(self, trial, move, parent):
    if trial.number % 2:  # 1, 3, ...
        deep_inside(trial.number)
    return real(self, trial, move, parent)

Objective._run = run
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_failed_trial_prints_one_line_naming_the_log_that_holds_its_traceback(
    search_assets: SearchAssets, tmp_path: Path
) -> None:
    """The worker's output (stdout and stderr) says one line on the failed trial: its
    fail_reason and the log file; no traceback. The file holds it; ``--verbose`` prints it too."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec_file, spec = write_spec(tmp_path, search_assets, "failing", url)

    def worker(*flags: str) -> subprocess.CompletedProcess[str]:
        command = ["search", str(spec_file), "--quiet", "--n-trials", "2", *flags]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        return subprocess.run(
            [sys.executable, "-c", _FAILING_WORKER, "--threads", "1", *command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    done = worker()
    assert done.returncode == 0, done.stderr[-3000:]
    reason = "trial 1: the disk is full (injected)"
    log = Path("runs") / "failing" / "failed-trials.log"
    about = [line for line in (done.stdout + done.stderr).splitlines() if "trial 1" in line.lower()]
    assert len(about) == 1 and about[0].startswith("trial   1  "), about
    assert about[0].endswith(f"FAIL: {reason} (traceback in {log})"), about
    assert "Traceback" not in done.stderr + done.stdout
    text = (tmp_path / log).read_text()
    assert text.startswith("=== trial 1 of study 'failing', worker ")
    assert f": {reason}\nTraceback (most recent call last):\n" in text
    assert "in deep_inside\n" in text and text.rstrip().endswith(f"TrialFailed: {reason}")
    (failed,) = (t for t in fresh_trials(spec, url) if t.state == TrialState.FAIL)
    assert failed.number == 1 and failed.user_attrs[FAIL_REASON_ATTR] == reason

    verbose = worker("--verbose")  # trials 2 and 3: 3 fails
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    line = (
        "FAIL: trial 3: the disk is full (injected) (traceback in runs/failing/failed-trials.log)"
    )
    assert line in verbose.stdout
    assert "Traceback (most recent call last):" in verbose.stderr
    assert "in deep_inside" in verbose.stderr
    assert (tmp_path / log).read_text().count("=== trial ") == 2
