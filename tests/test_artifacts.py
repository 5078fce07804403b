"""SQL artifact store: round trips, streaming memory, integrity, atomicity, Optuna, concurrency.

PostgreSQL tests run against ``postgresql+psycopg2://postgres@127.0.0.1:5432/test`` inside a
fresh schema per test run (selected through ``search_path`` in the URL, so Optuna's own tables
land there too) and with a unique table prefix; the schema is dropped at the end.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
import os
import random
import shutil
import sqlite3
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
from optuna.artifacts import (
    FileSystemArtifactStore,
    download_artifact,
    get_all_artifact_meta,
    upload_artifact,
)
from optuna.artifacts.exceptions import ArtifactNotFound

from jdsearch.core.errors import CheckpointError, SpecError
from jdsearch.storage.artifacts import ArtifactIntegrityError, SQLArtifactStore, make_artifact_store

CHUNK = 64
RUN = uuid.uuid4().hex[:8]
PREFIX = f"t{RUN}_"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
def store(db_url: str) -> Iterator[SQLArtifactStore]:
    s = SQLArtifactStore(db_url, chunk_size=CHUNK, table_prefix=PREFIX)
    yield s
    s.drop_tables()
    s.close()


def count_rows(store: SQLArtifactStore) -> tuple[int, int]:
    with store.engine.connect() as conn:
        headers = conn.scalar(sa.select(sa.func.count()).select_from(store.headers))
        chunks = conn.scalar(sa.select(sa.func.count()).select_from(store.chunks))
    return int(headers or 0), int(chunks or 0)


def read_in_pieces(reader: io.BufferedIOBase, piece: int) -> bytes:
    out = bytearray()
    while block := reader.read(piece):
        out += block
    return bytes(out)


# -------------------------------------------------------------------- round trip
@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 7])
def test_round_trip_sizes(store: SQLArtifactStore, size: int) -> None:
    data = payload(size, seed=size)
    store.write("a", io.BytesIO(data))
    info = store.stat("a")
    assert (info.size, info.n_chunks) == (size, -(-size // CHUNK))
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert count_rows(store) == (1, info.n_chunks)
    with store.open_reader("a") as r:
        assert r.read() == data
        assert r.read() == b""
    with store.open_reader("a") as r:
        assert read_in_pieces(r, 7) == data  # pieces that straddle chunk boundaries
    with store.open_reader("a") as r, io.BytesIO() as sink:
        shutil.copyfileobj(r, sink)
        assert sink.getvalue() == data


@pytest.mark.parametrize(
    ("size", "transactions"),
    [
        (0, 1),
        (1, 1),
        (CHUNK - 1, 1),
        (CHUNK, 1),
        (CHUNK + 1, 2),
        (3 * CHUNK, 3),
        (3 * CHUNK + 1, 4),
    ],
)
def test_an_upload_commits_once_per_chunk(
    store: SQLArtifactStore, size: int, transactions: int
) -> None:
    """The header goes with the first chunk and the publish with the last: content that fits
    one chunk is one transaction (each commit waits for the disk), n chunks are n."""
    store.write("a", io.BytesIO(payload(CHUNK + 3, seed=7)))  # a version to replace
    commits: list[object] = []
    on_commit = commits.append  # one bound method, to remove the same one
    sa.event.listen(store.engine, "commit", on_commit)
    try:
        store.write("a", io.BytesIO(payload(size, seed=size)))
    finally:
        sa.event.remove(store.engine, "commit", on_commit)
    assert len(commits) == transactions
    assert store.open_reader("a").read() == payload(size, seed=size)
    assert count_rows(store) == (1, -(-size // CHUNK))


def test_short_reads_from_input_still_make_full_chunks(tmp_path: Path) -> None:
    class Dribble(io.RawIOBase):
        """Returns at most 5 bytes per read, like a pipe or socket."""

        def __init__(self, data: bytes) -> None:
            self._src = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            chunk = self._src.read(min(len(b), 5))
            b[: len(chunk)] = chunk
            return len(chunk)

    s = SQLArtifactStore(f"sqlite:///{tmp_path / 'd.db'}", chunk_size=CHUNK)
    data = payload(3 * CHUNK + 3)
    s.write("a", Dribble(data))  # type: ignore[arg-type]
    with s.engine.connect() as conn:
        lengths = conn.scalars(
            sa.select(sa.func.length(s.chunks.c.data)).order_by(s.chunks.c.seq)
        ).all()
    assert lengths == [CHUNK, CHUNK, CHUNK, 3]
    assert s.open_reader("a").read() == data


# ------------------------------------------------------------------------ memory
class GeneratedStream(io.RawIOBase):
    """``total`` pseudo-random bytes produced on demand; never held as a whole."""

    def __init__(self, total: int, seed: int) -> None:
        self._left = total
        self._rng = random.Random(seed)
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._left, 256 * 1024)
        block = self._rng.randbytes(n)
        self.sha256.update(block)
        b[:n] = block
        self._left -= n
        return n


class HashSink(io.RawIOBase):
    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.sha256.update(b)
        self.size += len(b)
        return len(b)


def test_streaming_write_and_read_do_not_materialise(tmp_path: Path) -> None:
    total, chunk = 64 * 1024 * 1024, 1024 * 1024
    s = SQLArtifactStore(f"sqlite:///{tmp_path / 'big.db'}", chunk_size=chunk)
    source = GeneratedStream(total, seed=1)
    tracemalloc.start()
    try:
        s.write("big", io.BufferedReader(source, buffer_size=64 * 1024))  # type: ignore[arg-type]
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        sink = HashSink()
        with s.open_reader("big") as r:
            shutil.copyfileobj(r, sink)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert s.stat("big").size == total == sink.size
    assert sink.sha256.hexdigest() == source.sha256.hexdigest() == s.stat("big").sha256
    # A few chunks at most (input buffer, chunk, driver binding) — not the 64 MiB payload.
    assert write_peak < 8 * chunk, f"write peak {write_peak / 2**20:.1f} MiB"
    assert read_peak < 8 * chunk, f"read peak {read_peak / 2**20:.1f} MiB"


# --------------------------------------------------------------------- integrity
def _tamper(store: SQLArtifactStore, seq: int, how: str) -> None:
    blob_id = store.stat("a").blob_id
    c = store.chunks.c
    where = sa.and_(c.blob_id == blob_id, c.seq == seq)
    with store.engine.begin() as conn:
        if how == "delete":
            conn.execute(sa.delete(store.chunks).where(where))
            return
        data = bytes(conn.scalar(sa.select(c.data).where(where)))
        new = data[:-1] if how == "truncate" else bytes([data[0] ^ 0x01]) + data[1:]
        conn.execute(sa.update(store.chunks).where(where).values(data=new))


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("seq", [0, 2])
def test_tampered_chunk_is_detected(store: SQLArtifactStore, how: str, seq: int) -> None:
    data = payload(2 * CHUNK + 10)
    store.write("a", io.BytesIO(data))
    _tamper(store, seq, how)
    with store.open_reader("a") as r, pytest.raises(ArtifactIntegrityError, match="'a'") as exc:
        r.read()
    assert isinstance(exc.value, CheckpointError)
    # Byte by byte: the last chunk's bytes are never handed out when the hash fails.
    delivered = bytearray()
    with store.open_reader("a") as r, pytest.raises(ArtifactIntegrityError):
        while block := r.read(1):
            delivered += block
    assert len(delivered) <= 2 * CHUNK
    assert data.startswith(bytes(delivered)) or how == "flip"


def test_tampered_header_hash_is_detected(store: SQLArtifactStore) -> None:
    for name, size in (("a", CHUNK + 1), ("empty", 0)):
        store.write(name, io.BytesIO(payload(size)))
        h = store.headers.c
        with store.engine.begin() as conn:
            conn.execute(
                sa.update(store.headers).where(h.artifact_id == name).values(sha256="0" * 64)
            )
        with store.open_reader(name) as r, pytest.raises(ArtifactIntegrityError, match="sha256"):
            r.read()


# ------------------------------------------------------------ missing, remove, overwrite
def test_missing_id_raises_artifact_not_found(store: SQLArtifactStore) -> None:
    with pytest.raises(ArtifactNotFound):
        store.open_reader("nope")
    with pytest.raises(ArtifactNotFound):
        store.remove("nope")
    with pytest.raises(ArtifactNotFound):
        store.stat("nope")
    assert not store.exists("nope")


def test_remove_deletes_header_and_chunks_only_of_that_artifact(store: SQLArtifactStore) -> None:
    store.write("a", io.BytesIO(payload(3 * CHUNK, seed=1)))
    store.write("b", io.BytesIO(payload(2 * CHUNK, seed=2)))
    assert count_rows(store) == (2, 5)
    store.remove("a")
    assert count_rows(store) == (1, 2)
    assert store.list_ids() == ["b"]
    with pytest.raises(ArtifactNotFound):
        store.open_reader("a")
    assert store.open_reader("b").read() == payload(2 * CHUNK, seed=2)
    with pytest.raises(ArtifactNotFound):
        store.remove("a")


def test_overwrite_replaces_content_and_frees_old_chunks(store: SQLArtifactStore) -> None:
    # optuna's FileSystemArtifactStore overwrites an existing id; so do we.
    store.write("a", io.BytesIO(payload(4 * CHUNK, seed=1)))
    store.write("a", io.BytesIO(payload(CHUNK + 1, seed=2)))
    assert store.open_reader("a").read() == payload(CHUNK + 1, seed=2)
    assert count_rows(store) == (1, 2)


class FailingStream(io.RawIOBase):
    """Yields ``good`` bytes, then fails (or kills the process) on the next read."""

    def __init__(self, good: bytes, kill: bool = False) -> None:
        self._src = io.BytesIO(good)
        self._kill = kill

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        chunk = self._src.read(len(b))
        if not chunk:
            if self._kill:
                os._exit(3)
            raise OSError("disk vanished")
        b[: len(chunk)] = chunk
        return len(chunk)


def test_failed_overwrite_keeps_old_version_and_leaves_nothing(store: SQLArtifactStore) -> None:
    old = payload(2 * CHUNK + 5, seed=1)
    store.write("a", io.BytesIO(old))
    with pytest.raises(OSError, match="disk vanished"):
        store.write("a", FailingStream(payload(3 * CHUNK)))  # type: ignore[arg-type]
    assert store.open_reader("a").read() == old
    assert count_rows(store) == (1, 3)


def _killed_writer(url: str, prefix: str, artifact_id: str) -> None:
    s = SQLArtifactStore(url, chunk_size=CHUNK, table_prefix=prefix)
    s.write(artifact_id, FailingStream(payload(3 * CHUNK), kill=True))  # type: ignore[arg-type]


def test_killed_writer_leaves_an_invisible_incomplete_upload(store: SQLArtifactStore) -> None:
    old = payload(CHUNK + 5, seed=9)
    store.write("a", io.BytesIO(old))
    url = store.engine.url.render_as_string(hide_password=False)
    proc = mp.get_context("spawn").Process(target=_killed_writer, args=(url, PREFIX, "a"))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 3
    # The dead process inserted its header and 2 of its 3 chunks (a chunk is written once the
    # next one is read: the read that killed it would have said whether the third was the last),
    # but never published them.
    assert count_rows(store) == (2, 2 + 2)
    assert store.open_reader("a").read() == old
    assert store.stat("a").size == len(old)
    assert store.list_ids() == ["a"]
    assert store.purge_incomplete(older_than_s=3600) == 0
    assert store.purge_incomplete(older_than_s=0) == 1
    assert count_rows(store) == (1, 2)
    assert store.open_reader("a").read() == old


# ------------------------------------------------------------------------ optuna
def test_optuna_upload_download_same_database(db_url: str, tmp_path: Path) -> None:
    study = optuna.create_study(storage=db_url, study_name=f"art-{uuid.uuid4().hex[:8]}")
    store = SQLArtifactStore(db_url, chunk_size=CHUNK, table_prefix=PREFIX)
    try:
        trial = study.ask()
        src = tmp_path / "student.safetensors"
        src.write_bytes(payload(7 * CHUNK + 3, seed=5))
        artifact_id = upload_artifact(
            study_or_trial=trial, file_path=str(src), artifact_store=store
        )
        study.tell(trial, 1.0)

        # Another worker: only the URL in hand.
        again = optuna.load_study(study_name=study.study_name, storage=db_url)
        metas = get_all_artifact_meta(again.trials[0], storage=again._storage)
        assert [m.artifact_id for m in metas] == [artifact_id]
        assert metas[0].filename == "student.safetensors"
        other = SQLArtifactStore(db_url, chunk_size=CHUNK, table_prefix=PREFIX)
        dst = tmp_path / "downloaded.safetensors"
        download_artifact(artifact_store=other, file_path=str(dst), artifact_id=artifact_id)
        assert dst.read_bytes() == src.read_bytes()
        other.close()

        # Study and bytes live in one database.
        names = set(sa.inspect(store.engine).get_table_names())
        assert {"trials", "trial_system_attributes", store.headers.name, store.chunks.name} <= names
    finally:
        store.drop_tables()
        store.close()
        optuna.delete_study(study_name=study.study_name, storage=db_url)


def test_postgresql_copy_and_bound_parameter_paths_interoperate(pg_url: str) -> None:
    fast = SQLArtifactStore(pg_url, chunk_size=CHUNK, table_prefix=PREFIX)
    plain = SQLArtifactStore(pg_url, chunk_size=CHUNK, table_prefix=PREFIX, pg_copy=False)
    try:
        assert fast._pg_copy and not plain._pg_copy
        for size in (0, 1, CHUNK, 3 * CHUNK + 1):
            data = payload(size, seed=size)
            fast.write("f", io.BytesIO(data))
            plain.write("p", io.BytesIO(data))
            assert plain.open_reader("f").read() == data
            assert fast.open_reader("p").read() == data
    finally:
        fast.drop_tables()
        fast.close()
        plain.close()


def test_pickled_store_reads_the_same_artifacts(store: SQLArtifactStore) -> None:
    import pickle

    store.write("a", io.BytesIO(payload(CHUNK * 2)))
    clone = pickle.loads(pickle.dumps(store))
    assert clone.chunk_size == CHUNK and clone.table_prefix == PREFIX
    assert clone.open_reader("a").read() == payload(CHUNK * 2)
    clone.close()


# ------------------------------------------------------------------- concurrency
class MeetingStream(io.RawIOBase):
    """Serves ``data``; on reaching offset ``at`` waits until the other writer got there too."""

    def __init__(self, data: bytes, at: int, barrier: Any) -> None:
        self._src = io.BytesIO(data)
        self._at = at
        self._barrier = barrier

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._src.tell() == self._at:
            self._barrier.wait(60)
        chunk = self._src.read(min(len(b), max(self._at - self._src.tell(), 0) or len(b)))
        b[: len(chunk)] = chunk
        return len(chunk)


CONC_CHUNK = 4096
CONC_SIZE = 24 * CONC_CHUNK + 11


def _concurrent_writer(url: str, prefix: str, name: str, seed: int, barrier: Any) -> None:
    barrier.wait(60)
    # Constructed after the barrier: both processes race to create the tables too.
    s = SQLArtifactStore(url, chunk_size=CONC_CHUNK, table_prefix=prefix)
    # Both uploads meet half-way, so each is in progress while the other one writes.
    stream = MeetingStream(payload(CONC_SIZE, seed=seed), 12 * CONC_CHUNK, barrier)
    s.write(name, stream)  # type: ignore[arg-type]


def test_two_processes_write_concurrently(db_url: str) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}_"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_concurrent_writer, args=(db_url, prefix, f"w{i}", i, barrier))
        for i in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    store = SQLArtifactStore(db_url, chunk_size=CONC_CHUNK, table_prefix=prefix)
    try:
        assert [p.exitcode for p in procs] == [0, 0]
        assert store.list_ids() == ["w0", "w1"]
        for i in range(2):
            assert store.open_reader(f"w{i}").read() == payload(CONC_SIZE, seed=i)
    finally:
        store.drop_tables()
        store.close()


def test_sqlite_locked_database_is_retried(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    s = SQLArtifactStore(f"sqlite:///{path}", chunk_size=CHUNK, busy_timeout_s=0.01)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(0.4, lambda: holder.execute("COMMIT"))
    release.start()
    start = time.monotonic()
    try:
        # The busy handler gives up after 10 ms; the retry loop must carry the write through.
        s.write("a", io.BytesIO(payload(3 * CHUNK)))
    finally:
        release.join()
        holder.close()
    assert time.monotonic() - start >= 0.3
    assert s.open_reader("a").read() == payload(3 * CHUNK)


# -------------------------------------------------------------------- factory & args
def test_make_artifact_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    for spec in ("db", ""):
        db = make_artifact_store(spec, url)
        assert isinstance(db, SQLArtifactStore)
        assert db.engine.url.database == str(tmp_path / "s.db")
        db.close()
    fs = make_artifact_store(f"file:{tmp_path / 'ckpt' / 'deep'}", url)
    assert isinstance(fs, FileSystemArtifactStore)
    assert (tmp_path / "ckpt" / "deep").is_dir()
    fs.write("x", io.BytesIO(b"abc"))
    assert fs.open_reader("x").read() == b"abc"
    (tmp_path / "afile").write_text("")
    for bad in ("s3:bucket", "file:", f"file:{tmp_path / 'afile'}"):
        with pytest.raises(SpecError, match="artifact store"):
            make_artifact_store(bad, url)
    with pytest.raises(SpecError, match="URL"):
        make_artifact_store("db", "not a url")


def test_invalid_arguments(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    with pytest.raises(SpecError, match="chunk_size"):
        SQLArtifactStore(url, chunk_size=0)
    with pytest.raises(SpecError, match="table_prefix"):
        SQLArtifactStore(url, table_prefix="drop table;")
    s = SQLArtifactStore(url)
    with pytest.raises(CheckpointError, match="artifact id"):
        s.write("", io.BytesIO(b""))
    with pytest.raises(TypeError, match="binary"):
        s.write("t", io.StringIO("text"))  # type: ignore[arg-type]
    assert s.list_ids() == []
