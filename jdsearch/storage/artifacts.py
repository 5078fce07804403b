"""An Optuna artifact store that keeps the bytes in the study's own SQL database (SQLite or
PostgreSQL): chunked streaming writes published atomically, sha256-checked reads, safe for
several workers. Design notes: ``docs/storage.md``, "The study's artifact store".
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import os
import re
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import sqlalchemy as sa
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine

from jdsearch.core.errors import CheckpointError, JDSearchError, SpecError
from jdsearch.spec.study import artifact_dir
from jdsearch.storage.reconnect import with_reconnect

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ArtifactInfo",
    "ArtifactIntegrityError",
    "SQLArtifactStore",
    "check_artifact_id",
    "make_artifact_store",
    "read_artifact",
]

_logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
_MAX_CHUNK_SIZE = 256 * 1024 * 1024  # PostgreSQL bytea tops out at 1 GB; keep far below
_MAX_ID_LEN = 255
_PREFIX_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
# Lock/serialisation failures that a retry of the whole (short) transaction resolves.
_TRANSIENT = (
    "database is locked",
    "database table is locked",
    "deadlock detected",
    "could not serialize access",
    "lock wait timeout",
)
_T = TypeVar("_T")


class ArtifactIntegrityError(CheckpointError):
    """Stored artifact bytes do not match their header (tampered, truncated or missing chunk)."""


@dataclass(frozen=True)
class ArtifactInfo:
    """Header of one complete artifact."""

    artifact_id: str
    blob_id: str
    size: int
    sha256: str
    n_chunks: int
    chunk_size: int
    created_at: float
    completed_at: float


def _is_transient(exc: sa.exc.DBAPIError) -> bool:
    text = str(exc.orig).lower()
    return any(marker in text for marker in _TRANSIENT)


def _check_id(artifact_id: str) -> None:
    if not isinstance(artifact_id, str) or not artifact_id or len(artifact_id) > _MAX_ID_LEN:
        raise CheckpointError(
            f"artifact id {artifact_id!r}: must be a non-empty string of at most "
            f"{_MAX_ID_LEN} characters"
        )


_READ_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def check_artifact_id(artifact_id: Any, what: str) -> str:
    """``artifact_id`` as read from a study attr, if it is a plain name (what optuna's uploads
    make: a uuid4), so that no store takes it for a path; else one-line :class:`CheckpointError`
    naming ``what`` it was read for."""
    if isinstance(artifact_id, str) and _READ_ID_RE.fullmatch(artifact_id):
        return artifact_id
    raise CheckpointError(
        f"{what}: artifact id {str(artifact_id)[:80]!r} is not a plain name (letters, digits, "
        "'.', '_', '-'; not starting with '.'); the study's record is damaged or was tampered with"
    )


def read_artifact(store: Any, artifact_id: Any, what: str) -> bytes:
    """The bytes of the artifact a study attr names (``what``, in errors), read whole from
    ``store``: the id checked first (:func:`check_artifact_id`), a missing artifact one line.

    Raises:
        CheckpointError: the id is not a plain name, or the bytes fail their sha256.
        JDSearchError: the store has no such artifact.
    """
    checked = check_artifact_id(artifact_id, what)
    try:
        with store.open_reader(checked) as reader:
            return reader.read()
    except ArtifactNotFound:
        raise JDSearchError(
            f"{what} (artifact {checked}) is missing from its artifact store"
        ) from None


def _read_chunks(stream: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    """Yield exactly ``chunk_size`` bytes per chunk (the last may be shorter, never empty)."""
    while True:
        parts: list[bytes] = []
        have = 0
        while have < chunk_size:
            piece = stream.read(chunk_size - have)
            if not piece:
                break
            if not isinstance(piece, bytes | bytearray | memoryview):
                raise TypeError(f"artifact content stream must be binary, got {type(piece)}")
            parts.append(bytes(piece))
            have += len(piece)
        if not have:
            return
        yield parts[0] if len(parts) == 1 else b"".join(parts)
        if have < chunk_size:
            return


@dataclass
class _Upload:
    """What one :meth:`SQLArtifactStore.write` has written so far."""

    artifact_id: str
    blob_id: str
    size: int = 0
    n_chunks: int = 0
    digest: Any = dataclasses.field(default_factory=hashlib.sha256)


def _info(row: Any) -> ArtifactInfo:
    """The :class:`ArtifactInfo` of a header row."""
    return ArtifactInfo(**{f.name: getattr(row, f.name) for f in dataclasses.fields(ArtifactInfo)})


class SQLArtifactStore:
    """An :class:`optuna.artifacts` store over SQL tables (SQLAlchemy 2 Core).

    Args:
        url_or_engine: a SQLAlchemy URL (the Optuna storage URL, e.g. ``sqlite:///study.db``,
            ``postgresql+psycopg2://user@host/db``) or an existing :class:`~sqlalchemy.Engine`
            (e.g. ``RDBStorage.engine``). An engine passed in is used as is and never disposed.
        chunk_size: bytes per stored chunk (the unit of streaming, memory and transactions).
        table_prefix: prefix of the two table names (letters, digits, ``_``).
        busy_timeout_s: SQLite only, for engines built here — how long a statement waits on a
            locked database file before failing (and then being retried).
        max_retries: how many times one short transaction is retried on a lock/serialisation
            failure (SQLite "database is locked", PostgreSQL deadlock) before giving up.
        pg_copy: with PostgreSQL through psycopg2, move chunks with binary ``COPY`` instead of
            bound parameters (psycopg2 sends ``bytea`` as hex text that the server must lex and
            returns it as hex that the client must decode; ``COPY … (FORMAT binary)`` moves raw
            bytes, several times faster). Ignored for other databases/drivers.
    """

    def __init__(
        self,
        url_or_engine: str | sa.URL | Engine,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        table_prefix: str = "jdsearch_",
        busy_timeout_s: float = 60.0,
        max_retries: int = 8,
        pg_copy: bool = True,
    ) -> None:
        if not 1 <= chunk_size <= _MAX_CHUNK_SIZE:
            raise SpecError(f"chunk_size={chunk_size}: must be in [1, {_MAX_CHUNK_SIZE}] bytes")
        if not _PREFIX_RE.fullmatch(table_prefix):
            raise SpecError(
                f"table_prefix={table_prefix!r}: must match {_PREFIX_RE.pattern} "
                "(letters, digits and '_', at most 40 characters)"
            )
        assert busy_timeout_s > 0 and max_retries >= 1
        self.chunk_size = chunk_size
        self.table_prefix = table_prefix
        self._busy_timeout_s = busy_timeout_s
        self._max_retries = max_retries
        if isinstance(url_or_engine, Engine):
            self._owns_engine = False
            self.engine = url_or_engine
        else:
            self._owns_engine = True
            self.engine = self._create_engine(url_or_engine, busy_timeout_s)
        dialect = self.engine.dialect
        self._pg_copy = pg_copy and dialect.name == "postgresql" and dialect.driver == "psycopg2"
        self._define_tables()
        self._create_tables()

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _create_engine(url: str | sa.URL, busy_timeout_s: float) -> Engine:
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError as e:
            raise SpecError(f"artifact store URL {str(url)!r}: not a SQLAlchemy URL") from e
        kwargs: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            # The busy handler makes a writer wait for the file lock instead of failing at once.
            kwargs["connect_args"] = {"timeout": busy_timeout_s}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            return sa.create_engine(parsed, **kwargs)
        except (ImportError, sa.exc.ArgumentError) as e:
            raise SpecError(
                f"artifact store URL {parsed.render_as_string(hide_password=True)!r}: {e}"
            ) from e

    def _define_tables(self) -> None:
        p = self.table_prefix
        self.metadata = sa.MetaData()
        self.headers = sa.Table(
            f"{p}artifacts",
            self.metadata,
            sa.Column("blob_id", sa.String(32), primary_key=True),
            sa.Column("artifact_id", sa.String(_MAX_ID_LEN), nullable=False, index=True),
            sa.Column("complete", sa.Boolean, nullable=False),
            sa.Column("size", sa.BigInteger, nullable=False),
            sa.Column("sha256", sa.String(64), nullable=False),
            sa.Column("n_chunks", sa.Integer, nullable=False),
            sa.Column("chunk_size", sa.Integer, nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("completed_at", sa.Float, nullable=True),
        )
        self.chunks = sa.Table(
            f"{p}artifact_chunks",
            self.metadata,
            sa.Column("blob_id", sa.String(32), primary_key=True),
            sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
            # MySQL's plain BLOB holds 64 KiB only.
            sa.Column(
                "data", sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql"), nullable=False
            ),
        )

    def _create_tables(self) -> None:
        # create_all checks then creates; two processes starting together can both pass the
        # check, and the loser fails with "already exists" (PostgreSQL may also report it as a
        # unique violation on pg_type). Checking again settles it.
        for attempt in range(self._max_retries):
            try:
                self.metadata.create_all(self.engine, checkfirst=True)
                return
            except sa.exc.DBAPIError as e:
                if attempt == self._max_retries - 1:
                    raise JDSearchError(
                        f"artifact store {self._url_text()}: cannot create tables "
                        f"{self.headers.name}/{self.chunks.name}: {e.orig}"
                    ) from e
                _logger.debug("create_all race on %s (%s); retrying", self._url_text(), e.orig)
                time.sleep(0.05 * (attempt + 1))

    def _url_text(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        """Dispose of the engine's connections (only if this store created the engine)."""
        if self._owns_engine:
            self.engine.dispose()

    def drop_tables(self) -> None:
        """Drop both tables and every artifact in them (tests, benchmarks, teardown)."""
        self.metadata.drop_all(self.engine, checkfirst=True)

    def __getstate__(self) -> dict[str, Any]:
        # Engines do not pickle; workers started with spawn rebuild one from the URL.
        state = {k: v for k, v in self.__dict__.items() if k not in ("engine", "metadata")}
        state.pop("headers", None)
        state.pop("chunks", None)
        state["_url"] = self.engine.url.render_as_string(hide_password=False)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        url = state.pop("_url")
        self.__dict__.update(state)
        self._owns_engine = True
        self.engine = self._create_engine(url, self._busy_timeout_s)
        self._define_tables()

    # ------------------------------------------------------------ transactions
    def _transaction(self, body: Callable[[Connection], _T]) -> _T:
        """Run ``body`` in one transaction, retrying the whole of it on lock contention, and
        while the database is unreachable (:func:`~jdsearch.storage.reconnect.with_reconnect`)."""
        return with_reconnect(lambda: self._contended(body), f"artifact store {self._url_text()}")

    def _read(self, body: Callable[[Connection], _T]) -> _T:
        """Run ``body`` on a connection, retried while the database is unreachable."""

        def once() -> _T:
            with self.engine.connect() as conn:
                return body(conn)

        return with_reconnect(once, f"artifact store {self._url_text()}")

    def _contended(self, body: Callable[[Connection], _T]) -> _T:
        delay = 0.05
        for attempt in range(self._max_retries):
            try:
                with self.engine.begin() as conn:
                    return body(conn)
            except sa.exc.OperationalError as e:
                if not _is_transient(e) or attempt == self._max_retries - 1:
                    raise
                _logger.debug("transient database error (%s); retry %d", e.orig, attempt + 1)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    def _complete_header(self, conn: Connection, artifact_id: str) -> ArtifactInfo | None:
        h = self.headers.c
        row = conn.execute(
            sa.select(self.headers)
            .where(h.artifact_id == artifact_id, h.complete.is_(True))
            # Two writers of one id racing can both publish; the later one wins.
            .order_by(h.completed_at.desc(), h.blob_id.desc())
            .limit(1)
        ).first()
        return None if row is None else _info(row)

    def _delete_where(self, conn: Connection, condition: sa.ColumnElement[bool]) -> int:
        """Delete the versions whose header matches ``condition``, chunks first; the count.

        Both statements are writes, so on SQLite the file's write lock is taken before the
        versions are chosen and nothing published in between is missed.
        """
        versions = sa.select(self.headers.c.blob_id).where(condition)
        conn.execute(sa.delete(self.chunks).where(self.chunks.c.blob_id.in_(versions)))
        return conn.execute(sa.delete(self.headers).where(condition)).rowcount

    # --------------------------------------------------------- ArtifactStore
    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        """Store ``content_body`` (read to EOF, chunk by chunk) under ``artifact_id``.

        One transaction per chunk: the first also inserts the (incomplete) header, the last also
        publishes it, so content that fits one chunk is one transaction. A chunk is written once
        the next one is read (two chunks are held at most): only then is it known to be last.
        """
        _check_id(artifact_id)
        up = _Upload(artifact_id, uuid.uuid4().hex)  # blob_id: this upload's token
        chunks = _read_chunks(content_body, self.chunk_size)
        try:
            data = next(chunks, None)
            for following in chunks:
                self._write_step(up, data)
                data = following
            self._write_step(up, data, last=True)
        except BaseException:
            self._discard(up.blob_id)
            raise
        _logger.debug("artifact %s: wrote %d bytes in %d chunks", artifact_id, up.size, up.n_chunks)

    def _write_step(self, up: _Upload, data: bytes | None, last: bool = False) -> None:
        """One transaction of upload ``up``: its header first if not yet written, then chunk
        ``data`` (``None``: an empty upload has none), then, if ``last``, the publish. Written
        once although retried (:meth:`_write_once`): what this step writes is keyed by the
        upload's ``blob_id``, and a retry looks for it first."""
        seq, with_header = up.n_chunks, not up.n_chunks
        if data is not None:
            up.digest.update(data)
            up.size += len(data)
            up.n_chunks += 1
        final = (up.size, up.digest.hexdigest(), up.n_chunks) if last else None

        def body(conn: Connection) -> None:
            if with_header:
                conn.execute(self._header_insert(up, final))
            if data is not None:
                self._insert_chunk(conn, up.blob_id, seq, data)
            if final is not None:
                self._publish(conn, up, final, inserted=with_header)

        def landed(conn: Connection) -> bool:
            if final is not None:
                return self._published(conn, up.blob_id, final[0], final[1])
            if with_header:
                h = self.headers.c
                return conn.scalar(sa.select(h.blob_id).where(h.blob_id == up.blob_id)) is not None
            c = self.chunks.c
            stored = sa.select(sa.func.length(c.data)).where(c.blob_id == up.blob_id, c.seq == seq)
            return conn.scalar(stored) == len(data)  # type: ignore[arg-type]

        self._write_once(body, landed)

    def _header_insert(self, up: _Upload, final: tuple[int, str, int] | None) -> sa.Insert:
        """The insert of ``up``'s header: published at once when ``final`` (size, sha256,
        chunks) is known, else incomplete until :meth:`_publish`."""
        size, sha, n = final if final is not None else (0, "", 0)
        now = time.time()
        return sa.insert(self.headers).values(
            blob_id=up.blob_id,
            artifact_id=up.artifact_id,
            complete=final is not None,
            size=size,
            sha256=sha,
            n_chunks=n,
            chunk_size=self.chunk_size,
            created_at=now,
            completed_at=now if final is not None else None,
        )

    def _insert_chunk(self, conn: Connection, blob_id: str, seq: int, data: bytes) -> None:
        if self._pg_copy:
            _pg_copy_in(conn, self._chunks_sql(), blob_id, seq, data)
        else:
            conn.execute(sa.insert(self.chunks).values(blob_id=blob_id, seq=seq, data=data))

    def _write_once(
        self, body: Callable[[Connection], Any], landed: Callable[[Connection], bool]
    ) -> None:
        """``body`` in a transaction (:meth:`_transaction`), written once although retried:
        ``body`` writes a row whose key no other writer uses (the upload's ``blob_id``), and
        ``landed(conn)`` says whether that row is there. Each attempt after the first asks it
        first: a commit whose answer was lost with the connection did happen. A retry that
        collides with that row (a unique key: the lost commit was still under way) asks again."""
        tries = [0]

        def attempt(conn: Connection) -> None:
            tries[0] += 1
            if tries[0] > 1 and landed(conn):
                _logger.info("artifact store: an earlier attempt's write had arrived")
                return
            body(conn)

        try:
            self._transaction(attempt)
        except Exception as e:
            if not (tries[0] > 1 and self._is_duplicate(e) and self._read(landed)):
                raise

    def _is_duplicate(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a unique-key violation (through SQLAlchemy, or from the driver
        itself: ``COPY`` runs on the driver's cursor)."""
        dbapi = getattr(self.engine.dialect, "loaded_dbapi", None)
        raw = getattr(dbapi, "IntegrityError", sa.exc.IntegrityError)
        return isinstance(exc, sa.exc.IntegrityError | raw)

    def _chunks_sql(self) -> str:
        return self.engine.dialect.identifier_preparer.format_table(self.chunks)

    def _publish(
        self, conn: Connection, up: _Upload, final: tuple[int, str, int], inserted: bool
    ) -> None:
        """Publish ``up`` with its ``final`` size, sha256 and chunk count (already so when its
        header was ``inserted`` in this transaction) and delete the artifact's other versions."""
        h = self.headers.c
        if not inserted:
            size, sha, n = final
            done = conn.execute(
                sa.update(self.headers)
                .where(h.blob_id == up.blob_id, h.complete.is_(False))
                .values(complete=True, size=size, sha256=sha, n_chunks=n, completed_at=time.time())
            )
            if done.rowcount != 1 and self._published(conn, up.blob_id, size, sha):
                return  # an earlier attempt's, committed while this one waited on its row
            if done.rowcount != 1:
                raise CheckpointError(
                    f"artifact {up.artifact_id!r}: its incomplete upload {up.blob_id} vanished "
                    "before it was published (purged by purge_incomplete?); upload it again"
                )
        self._delete_where(
            conn,
            sa.and_(h.artifact_id == up.artifact_id, h.complete.is_(True), h.blob_id != up.blob_id),
        )

    def _published(self, conn: Connection, blob_id: str, size: int, sha: str) -> bool:
        """Whether the version ``blob_id`` is published with this size and sha256 (read after
        the update: on PostgreSQL, once a concurrent publish of it has committed)."""
        h = self.headers.c
        found = conn.execute(
            sa.select(h.size, h.sha256).where(h.blob_id == blob_id, h.complete.is_(True))
        ).first()
        return found is not None and (found.size, found.sha256) == (size, sha)

    def _discard(self, blob_id: str) -> None:
        try:
            self._transaction(
                # Never a published version (an interrupt right after the final commit).
                lambda conn: self._delete_where(
                    conn,
                    sa.and_(self.headers.c.blob_id == blob_id, self.headers.c.complete.is_(False)),
                )
            )
        except Exception:  # best effort: purge_incomplete() reclaims what is left
            _logger.warning("could not discard incomplete artifact upload %s", blob_id)

    def open_reader(self, artifact_id: str) -> BinaryIO:
        """A buffered stream over the artifact's bytes, checked against its sha256."""
        info = self.stat(artifact_id)
        raw = _ChunkReader(self, info)
        return io.BufferedReader(raw, buffer_size=min(info.chunk_size, 1024 * 1024))  # type: ignore[return-value]

    def remove(self, artifact_id: str) -> None:
        """Delete the artifact (header and chunks); :class:`ArtifactNotFound` if absent."""
        _check_id(artifact_id)
        h = self.headers.c

        removed = self._transaction(
            lambda conn: self._delete_where(
                conn, sa.and_(h.artifact_id == artifact_id, h.complete.is_(True))
            )
        )
        if removed == 0:
            raise ArtifactNotFound(f"artifact {artifact_id!r} not found in {self.headers.name}")

    # ----------------------------------------------------------------- extras
    def stat(self, artifact_id: str) -> ArtifactInfo:
        """The header of a complete artifact; :class:`ArtifactNotFound` if absent."""
        _check_id(artifact_id)
        info = self._read(lambda conn: self._complete_header(conn, artifact_id))
        if info is None:
            raise ArtifactNotFound(f"artifact {artifact_id!r} not found in {self.headers.name}")
        return info

    def exists(self, artifact_id: str) -> bool:
        """Whether a complete artifact ``artifact_id`` is stored; :class:`CheckpointError` for a
        malformed id."""
        try:
            self.stat(artifact_id)
        except ArtifactNotFound:
            return False
        return True

    def list_ids(self) -> list[str]:
        """Ids of all complete artifacts, sorted."""
        h = self.headers.c
        query = sa.select(h.artifact_id).where(h.complete.is_(True)).distinct()
        return sorted(self._read(lambda conn: conn.scalars(query).all()))

    def complete(self) -> list[ArtifactInfo]:
        """The headers of every complete artifact version, by artifact id."""
        h = self.headers.c
        query = sa.select(self.headers).where(h.complete.is_(True)).order_by(h.artifact_id)
        rows = self._read(lambda conn: conn.execute(query).all())
        return [_info(r) for r in rows]

    def list_incomplete(self, older_than_s: float = 24 * 3600.0) -> list[tuple[str, int]]:
        """``(artifact id, bytes written so far)`` of the uploads that :meth:`purge_incomplete`
        would delete."""
        h, c = self.headers.c, self.chunks.c
        written = sa.func.coalesce(sa.func.sum(sa.func.length(c.data)), 0)
        query = (
            sa.select(h.artifact_id, written)
            .select_from(self.headers.outerjoin(self.chunks, c.blob_id == h.blob_id))
            .where(h.complete.is_(False), h.created_at <= time.time() - older_than_s)
            .group_by(h.blob_id, h.artifact_id)
            .order_by(h.artifact_id)
        )
        rows = self._read(lambda conn: conn.execute(query).all())
        return [(str(a), int(n)) for a, n in rows]

    def purge_incomplete(self, older_than_s: float = 24 * 3600.0) -> int:
        """Delete uploads left incomplete (a killed writer) for longer than ``older_than_s``.

        Keep ``older_than_s`` well above the slowest upload: a live writer whose upload is purged
        fails at the end with :class:`~jdsearch.core.errors.CheckpointError`. Returns the count.
        """
        h = self.headers.c
        cutoff = time.time() - older_than_s

        n = self._transaction(
            lambda conn: self._delete_where(
                conn, sa.and_(h.complete.is_(False), h.created_at <= cutoff)
            )
        )
        if n:
            _logger.info("purged %d incomplete artifact upload(s) from %s", n, self.headers.name)
        return n

    # --------------------------------------------------------- reader support
    def _fetch_chunk(self, blob_id: str, seq: int) -> bytes | memoryview | None:
        c = self.chunks.c
        if self._pg_copy:
            return self._read(lambda conn: _pg_copy_out(conn, self._chunks_sql(), blob_id, seq))
        query = sa.select(c.data).where(c.blob_id == blob_id, c.seq == seq)
        return self._read(lambda conn: conn.scalar(query))


# ------------------------------------------------------- PostgreSQL binary COPY
# Format: https://www.postgresql.org/docs/current/sql-copy.html ("Binary Format").
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_COPY_HEADER = _COPY_SIGNATURE + struct.pack("!ii", 0, 0)  # flags, header-extension length
_COPY_TRAILER = struct.pack("!h", -1)
_COPY_IO_SIZE = 1024 * 1024
_BLOB_ID_RE = re.compile(r"[0-9a-f]{32}")


class _PiecesReader:
    """``read(n)`` over a sequence of byte strings, without joining them first."""

    def __init__(self, pieces: list[bytes | memoryview]) -> None:
        self._pieces = [memoryview(p) for p in pieces]
        self._index = 0
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        while self._index < len(self._pieces):
            piece = self._pieces[self._index]
            if self._pos < len(piece):
                end = len(piece) if size < 0 else min(len(piece), self._pos + size)
                out = bytes(piece[self._pos : end])
                self._pos = end
                return out
            self._index += 1
            self._pos = 0
        return b""


def _pg_copy_in(conn: Connection, table_sql: str, blob_id: str, seq: int, data: bytes) -> None:
    """Insert one chunk row with ``COPY … FROM STDIN (FORMAT binary)``."""
    key = blob_id.encode("ascii")
    row_head = struct.pack("!hi", 3, len(key)) + key + struct.pack("!iii", 4, seq, len(data))
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.copy_expert(
            f"COPY {table_sql} (blob_id, seq, data) FROM STDIN WITH (FORMAT binary)",
            _PiecesReader([_COPY_HEADER, row_head, data, _COPY_TRAILER]),
            size=_COPY_IO_SIZE,
        )
    finally:
        cursor.close()


class _ByteSink:
    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        return len(data)


def _pg_copy_out(conn: Connection, table_sql: str, blob_id: str, seq: int) -> memoryview | None:
    """Fetch one chunk's bytes with ``COPY (SELECT …) TO STDOUT (FORMAT binary)``."""
    # COPY takes no bind parameters: only a well-formed id ever reaches the statement text.
    assert _BLOB_ID_RE.fullmatch(blob_id), blob_id
    sink = _ByteSink()
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.copy_expert(
            f"COPY (SELECT data FROM {table_sql} WHERE blob_id = '{blob_id}' AND seq = {int(seq)})"
            " TO STDOUT WITH (FORMAT binary)",
            sink,
            size=_COPY_IO_SIZE,
        )
    finally:
        cursor.close()
    buf = memoryview(sink.buffer)
    assert bytes(buf[: len(_COPY_SIGNATURE)]) == _COPY_SIGNATURE, "not a binary COPY stream"
    (ext_len,) = struct.unpack_from("!i", buf, len(_COPY_SIGNATURE) + 4)
    pos = len(_COPY_SIGNATURE) + 8 + ext_len
    (n_fields,) = struct.unpack_from("!h", buf, pos)
    if n_fields == -1:  # trailer straight away: no such row
        return None
    assert n_fields == 1, n_fields
    (length,) = struct.unpack_from("!i", buf, pos + 2)
    assert length >= 0, "data is NOT NULL"
    start = pos + 6
    return buf[start : start + length]


class _ChunkReader(io.RawIOBase):
    """Raw stream over one artifact version: one query per chunk, sha256 checked at the end."""

    def __init__(self, store: SQLArtifactStore, info: ArtifactInfo) -> None:
        super().__init__()
        self._store = store
        self._info = info
        self._digest = hashlib.sha256()
        self._next_seq = 0
        self._buf = memoryview(b"")
        self._pos = 0
        self._verified = False
        if not _BLOB_ID_RE.fullmatch(info.blob_id):
            raise self._error(f"malformed version id {info.blob_id!r}")
        expected = math.ceil(info.size / info.chunk_size) if info.chunk_size > 0 else -1
        if info.n_chunks != expected:
            raise self._error(
                f"header says {info.n_chunks} chunks for {info.size} bytes at chunk size "
                f"{info.chunk_size} (expected {expected})"
            )

    def _error(self, what: str) -> ArtifactIntegrityError:
        return ArtifactIntegrityError(
            f"artifact {self._info.artifact_id!r} (version {self._info.blob_id} in "
            f"{self._store.chunks.name}): {what}"
        )

    def readable(self) -> bool:
        return True

    def _verify(self) -> None:
        actual = self._digest.hexdigest()
        if actual != self._info.sha256:
            raise self._error(f"sha256 {actual} does not match stored {self._info.sha256}")
        self._verified = True

    def _load_next(self) -> bool:
        """Fetch the next chunk into the buffer; False at EOF (after verifying the hash)."""
        info = self._info
        if self._next_seq >= info.n_chunks:
            if not self._verified:  # only reachable here for an empty artifact
                self._verify()
            return False
        seq = self._next_seq
        data = self._store._fetch_chunk(info.blob_id, seq)
        if data is None:
            raise self._error(
                f"chunk {seq} of {info.n_chunks} is missing (corrupted, or the artifact was "
                "overwritten/removed while being read)"
            )
        last = seq == info.n_chunks - 1
        want = info.size - seq * info.chunk_size if last else info.chunk_size
        if len(data) != want:
            raise self._error(f"chunk {seq} holds {len(data)} bytes, expected {want}")
        self._digest.update(data)
        if last:
            self._verify()  # before any byte of the last chunk leaves the reader
        self._buf = memoryview(data)
        self._pos = 0
        self._next_seq += 1
        return True

    def readinto(self, buffer: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed artifact reader")
        if self._pos >= len(self._buf) and not self._load_next():
            return 0
        out = memoryview(buffer).cast("B")
        n = min(len(out), len(self._buf) - self._pos)
        out[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def readall(self) -> bytes:
        parts = [bytes(self._buf[self._pos :])]
        self._pos = len(self._buf)
        while self._load_next():
            parts.append(bytes(self._buf))
            self._pos = len(self._buf)
        return b"".join(parts)

    def close(self) -> None:
        self._buf = memoryview(b"")
        super().close()


def make_artifact_store(spec: str, storage_url: str) -> SQLArtifactStore | FileSystemArtifactStore:
    """Artifact store from a study spec value.

    ``"db"`` (the default) keeps artifacts in the study's own database (``storage_url``);
    ``"file:DIR"`` uses optuna's ``FileSystemArtifactStore`` in ``DIR`` (created if absent) —
    for checkpoints too large to want in the database.
    """
    try:
        directory = artifact_dir(spec)
    except ValueError as e:
        raise SpecError(f"artifact store {spec!r}: {e}") from None
    if directory is None:
        return SQLArtifactStore(storage_url)
    path = Path(os.path.expanduser(directory))
    if path.exists() and not path.is_dir():
        raise SpecError(f"artifact store {spec!r}: {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(path)
