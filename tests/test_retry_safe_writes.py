"""Writes retried after a lost reply happen once: a real PostgreSQL behind a proxy that forwards a
commit and then cuts the connection before the server's answer reaches the client.

The write landed, the client saw its connection die and retried it on a fresh one. Afterwards
there must be no failed upload.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator

import pytest

from jdsearch.storage.artifacts import SQLArtifactStore

from .pgproxy import CommitCutter, commit_cutter


@pytest.fixture
def proxy(pg_url: str) -> Iterator[CommitCutter]:
    with commit_cutter() as cutter:
        yield cutter


def _via(proxy: CommitCutter, pg_url: str) -> str:
    """``pg_url`` (the test's schema) through the proxy, in plain text the proxy can read."""
    assert "@127.0.0.1:5432/" in pg_url
    return pg_url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/") + "&sslmode=disable"


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


@pytest.mark.parametrize(
    ("write", "sql", "pg_copy"),
    [
        ("header", "INSERT INTO jdsearch_artifacts ", True),
        ("chunk by COPY", "COPY ", True),
        ("chunk by INSERT", "INSERT INTO jdsearch_artifact_chunks ", False),
        ("publish", "UPDATE jdsearch_artifacts SET complete", True),
    ],
)
def test_an_upload_whose_write_reply_is_lost_completes(
    pg_url: str, proxy: CommitCutter, write: str, sql: str, pg_copy: bool
) -> None:
    content = bytes(range(256)) * 3 + b"tail"  # four chunks of 256 bytes and a short one
    artifact_id = f"a-{uuid.uuid4().hex}"
    store = SQLArtifactStore(_via(proxy, pg_url), chunk_size=256, pg_copy=pg_copy)
    direct = SQLArtifactStore(pg_url)
    try:
        proxy.arm(sql)
        store.write(artifact_id, io.BytesIO(content))
        assert len(proxy.cuts) == 1, write
        with direct.open_reader(artifact_id) as reader:
            assert reader.read() == content
        assert [i.artifact_id for i in direct.complete()].count(artifact_id) == 1
        assert artifact_id not in [a for a, _ in direct.list_incomplete(older_than_s=-60)]
    finally:
        store.close()
        direct.close()
