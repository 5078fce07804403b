"""Writes retried after a lost reply happen once: a real PostgreSQL behind a proxy that forwards a
commit and then cuts the connection before the server's answer reaches the client.

The write landed, the client saw its connection die and retried it on a fresh one. Afterwards
there must be no duplicate trial, no RUNNING trial that nobody runs (a trial created or popped
twice leaves one behind, without a heartbeat) and no failed upload. The trial writes are also
tested on SQLite, with the lost answer simulated, where PostgreSQL is not at hand.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from jdsearch.storage import optuna_internals, rdb
from jdsearch.storage.artifacts import SQLArtifactStore
from jdsearch.storage.rdb import ResilientStorage

from .pgproxy import CommitCutter, commit_cutter

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.fixture
def proxy(pg_url: str) -> Iterator[CommitCutter]:
    with commit_cutter() as cutter:
        yield cutter


def _via(proxy: CommitCutter, pg_url: str) -> str:
    """``pg_url`` (the test's schema) through the proxy, in plain text the proxy can read."""
    assert "@127.0.0.1:5432/" in pg_url
    return pg_url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/") + "&sslmode=disable"


def _storage(url: str) -> ResilientStorage:
    """What ``storage_for`` opens for a worker: heartbeats, pre-ping, the resilient wrapper."""
    return ResilientStorage(
        RDBStorage(
            url, heartbeat_interval=60, grace_period=120, engine_kwargs={"pool_pre_ping": True}
        )
    )


def _objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0.0, 1.0)


def _trials(pg_url: str, name: str) -> list[tuple[int, TrialState, dict[str, float]]]:
    """The study's trials as the database holds them, read past the proxy."""
    study = optuna.load_study(study_name=name, storage=RDBStorage(pg_url))
    return [(t.number, t.state, t.params) for t in study.get_trials()]


def test_the_proxy_loses_the_reply_of_a_commit_that_happened(
    pg_url: str, proxy: CommitCutter
) -> None:
    """The fault is real: the client's commit fails with a dropped connection, yet the row is
    there, and the next connection through the proxy works."""
    import psycopg2

    libpq = _via(proxy, pg_url).replace("postgresql+psycopg2://", "postgresql://")
    table = f"cut_{uuid.uuid4().hex[:8]}"
    with psycopg2.connect(libpq) as conn:
        conn.cursor().execute(f"CREATE TABLE {table} (k int)")
    proxy.arm(f"INSERT INTO {table}")
    conn = psycopg2.connect(libpq)
    conn.cursor().execute(f"INSERT INTO {table} VALUES (1)")
    with pytest.raises(psycopg2.OperationalError, match="server closed the connection"):
        conn.commit()
    assert len(proxy.cuts) == 1 and b"COMMIT" in proxy.swallowed[0]
    with psycopg2.connect(libpq) as again:
        cursor = again.cursor()
        cursor.execute(f"SELECT k FROM {table}")
        assert cursor.fetchall() == [(1,)]
        cursor.execute(f"DROP TABLE {table}")


@pytest.mark.parametrize("how", ["ask", "enqueue"])
def test_a_trial_whose_creation_reply_is_lost_is_created_once(
    pg_url: str, proxy: CommitCutter, how: str
) -> None:
    """``ask`` creates a RUNNING trial, ``enqueue_trial`` (and the retry of a stale trial) a
    WAITING one: either is there once, and the worker runs it."""
    name = f"create-{how}-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=_storage(_via(proxy, pg_url)))
    proxy.arm("INSERT INTO trials ")
    if how == "enqueue":
        study.enqueue_trial({"x": 0.25})
    study.optimize(_objective, n_trials=1)
    assert len(proxy.cuts) == 1
    trials = _trials(pg_url, name)
    assert [(n, s) for n, s, _ in trials] == [(0, TrialState.COMPLETE)]
    if how == "enqueue":
        assert trials[0][2] == {"x": 0.25}


def test_a_waiting_trial_whose_pop_reply_is_lost_is_run_by_its_worker(
    pg_url: str, proxy: CommitCutter
) -> None:
    """The worker whose pop landed runs the popped trial rather than leave it RUNNING with no
    heartbeat and start another."""
    name = f"pop-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=_storage(_via(proxy, pg_url)))
    study.enqueue_trial({"x": 0.75})
    proxy.arm("UPDATE trials SET state")
    study.optimize(_objective, n_trials=1)
    assert len(proxy.cuts) == 1
    assert _trials(pg_url, name) == [(0, TrialState.COMPLETE, {"x": 0.75})]


@pytest.mark.parametrize(
    ("write", "sql", "pg_copy", "times"),
    [
        ("header, with the first chunk", "INSERT INTO jdsearch_artifacts ", True, 1),
        ("first chunk by COPY", "COPY ", True, 1),
        ("first chunk and the next by COPY", "COPY ", True, 2),
        ("first chunk by INSERT", "INSERT INTO jdsearch_artifact_chunks ", False, 1),
        ("publish, with the last chunk", "UPDATE jdsearch_artifacts SET complete", True, 1),
    ],
)
def test_an_upload_whose_write_reply_is_lost_completes(
    pg_url: str, proxy: CommitCutter, write: str, sql: str, pg_copy: bool, times: int
) -> None:
    content = bytes(range(256)) * 3 + b"tail"  # three chunks of 256 bytes and a short one
    artifact_id = f"a-{uuid.uuid4().hex}"
    store = SQLArtifactStore(_via(proxy, pg_url), chunk_size=256, pg_copy=pg_copy)
    direct = SQLArtifactStore(pg_url)
    try:
        proxy.arm(sql, times=times)
        store.write(artifact_id, io.BytesIO(content))
        assert len(proxy.cuts) == times, write
        with direct.open_reader(artifact_id) as reader:
            assert reader.read() == content
        assert [i.artifact_id for i in direct.complete()].count(artifact_id) == 1
        assert artifact_id not in [a for a, _ in direct.list_incomplete(older_than_s=-60)]
    finally:
        store.close()
        direct.close()


@pytest.mark.parametrize("pg_copy", [True, False])
def test_a_one_chunk_upload_whose_reply_is_lost_is_found_not_repeated(
    pg_url: str, proxy: CommitCutter, pg_copy: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint that fits one chunk is one transaction (header, chunk, publish, the old
    version's removal); its retry after the lost reply finds it published and writes nothing."""
    artifact_id = f"a-{uuid.uuid4().hex}"
    store = SQLArtifactStore(_via(proxy, pg_url), chunk_size=256, pg_copy=pg_copy)
    direct = SQLArtifactStore(pg_url)
    try:
        direct.write(artifact_id, io.BytesIO(b"old version"))
        proxy.arm("INSERT INTO jdsearch_artifacts ")
        with caplog.at_level("INFO", logger="jdsearch.storage.artifacts"):
            store.write(artifact_id, io.BytesIO(b"new version"))
        assert len(proxy.cuts) == 1
        cut = " ".join(proxy.cuts[0])
        chunk = "COPY " if pg_copy else "INSERT INTO jdsearch_artifact_chunks "
        for part in ("INSERT INTO jdsearch_artifacts ", chunk, "DELETE FROM jdsearch_artifacts "):
            assert part in cut, part
        assert caplog.text.count("an earlier attempt's write had arrived") == 1
        with direct.open_reader(artifact_id) as reader:
            assert reader.read() == b"new version"
        headers = [i for i in direct.complete() if i.artifact_id == artifact_id]
        assert len(headers) == 1 and headers[0].n_chunks == 1
        assert artifact_id not in [a for a, _ in direct.list_incomplete(older_than_s=-60)]
    finally:
        store.close()
        direct.close()


# ------------------------------------------------------------- the same, simulated on SQLite
def _lost_answer(real: Callable[..., Any]) -> Callable[..., Any]:
    """``real``, whose first call takes effect and then fails as a commit whose answer was lost
    does (what Optuna raises when the driver's connection dropped)."""
    calls = [0]

    def call(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 1:
            dropped = Exception("server closed the connection unexpectedly")
            db = sa.exc.OperationalError("COMMIT", {}, dropped, connection_invalidated=True)
            raise StorageInternalError("An exception is raised during the commit.") from db
        return result

    return call


@pytest.mark.parametrize("write", ["create", "pop"])
def test_a_trial_write_whose_answer_is_lost_happens_once_on_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: str
) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="s", storage=_storage(url))
    if write == "create":
        monkeypatch.setattr(
            optuna_internals, "_create_trial", _lost_answer(optuna_internals._create_trial)
        )
    else:
        study.enqueue_trial({"x": 0.75})
        monkeypatch.setattr(rdb, "pop_waiting_trial", _lost_answer(rdb.pop_waiting_trial))
    study.optimize(_objective, n_trials=1)
    trials = _trials(url, "s")
    assert [(n, s) for n, s, _ in trials] == [(0, TrialState.COMPLETE)]
    if write == "pop":
        assert trials[0][2] == {"x": 0.75}
