"""Write/read throughput of the SQL artifact store (SQLite, PostgreSQL) against plain file copies.

Usage::

    python bench/artifact_throughput.py [--mb 100] [--chunk-mib 4] [--repeat 2] [--pg-url URL]

Every figure comes from this one run, on the same random payload. ``write`` is
``store.write(open(src))`` (what ``optuna.artifacts.upload_artifact`` does); ``read`` streams
``store.open_reader(id)`` into a file with ``shutil.copyfileobj`` (what ``download_artifact`` does,
sha256 check included). The baseline is ``shutil.copyfile`` of the same bytes (page cache, no
fsync), plus the same copy followed by ``os.fsync`` — the database commits are durable, so that row
is the fairer one. Best of ``--repeat`` runs; ratios are store MB/s over baseline MB/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from jdsearch.storage.artifacts import SQLArtifactStore

PG_DEFAULT = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
MiB = 1024 * 1024


def best_seconds(fn: Callable[[int], None], repeat: int) -> float:
    best = float("inf")
    for i in range(repeat):
        t0 = time.perf_counter()
        fn(i)
        best = min(best, time.perf_counter() - t0)
    return best


def make_payload(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n


def fsync_copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def bench_files(src: Path, work: Path, repeat: int, sync: bool) -> tuple[float, float]:
    copy = fsync_copy if sync else shutil.copyfile
    stored = work / "stored.bin"

    def write(i: int) -> None:
        stored.unlink(missing_ok=True)
        copy(src, stored)

    def read(i: int) -> None:
        out = work / f"out-file-{i}.bin"
        copy(stored, out)
        out.unlink()

    return best_seconds(write, repeat), best_seconds(read, repeat)


def bench_store(store: SQLArtifactStore, src: Path, work: Path, repeat: int) -> tuple[float, float]:
    def write(i: int) -> None:
        with open(src, "rb") as f:
            store.write(f"bench-{i}", f)

    def read(i: int) -> None:
        out = work / f"out-db-{i}.bin"
        with store.open_reader(f"bench-{i}") as r, open(out, "wb") as w:
            shutil.copyfileobj(r, w, 1 * MiB)
        assert out.stat().st_size == src.stat().st_size
        out.unlink()

    return best_seconds(write, repeat), best_seconds(read, repeat)


def pg_schema_url(base: str) -> tuple[str, Callable[[], None]] | str:
    """A fresh schema on the server (URL, cleanup), or the reason it is unreachable."""
    import sqlalchemy as sa

    schema = f"jdsearch_bench_{uuid.uuid4().hex[:8]}"
    try:
        admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    except Exception as e:  # any connection failure means "skip this row"
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()

    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}", drop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=100, help="payload size in MiB (default 100)")
    ap.add_argument("--chunk-mib", type=float, default=4.0, help="store chunk size in MiB")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; best is kept")
    ap.add_argument("--pg-url", default=PG_DEFAULT, help="PostgreSQL URL ('' to skip)")
    ap.add_argument("--dir", default=None, help="scratch directory (default: system temp)")
    args = ap.parse_args()
    size = args.mb * MiB
    chunk = int(args.chunk_mib * MiB)

    rows: list[tuple[str, float, float, str]] = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="jdsearch-bench-") as tmp:
        work = Path(tmp)
        src = work / "payload.bin"
        make_payload(src, size)

        w, r = bench_files(src, work, args.repeat, sync=False)
        rows.append(("file copy (shutil.copyfile)", w, r, ""))
        w, r = bench_files(src, work, args.repeat, sync=True)
        rows.append(("file copy + fsync", w, r, ""))

        db = work / "study.db"
        sqlite = SQLArtifactStore(f"sqlite:///{db}", chunk_size=chunk)
        w, r = bench_store(sqlite, src, work, args.repeat)
        sqlite.close()
        rows.append(
            (
                "SQLArtifactStore sqlite",
                w,
                r,
                f"db file {db.stat().st_size / MiB:.0f} MiB ({args.repeat} copies)",
            )
        )

        if args.pg_url:
            got = pg_schema_url(args.pg_url)
            if isinstance(got, str):
                rows.append(("SQLArtifactStore postgresql", float("nan"), float("nan"), got))
            else:
                url, drop = got
                try:
                    for copy, label in ((True, "binary COPY"), (False, "bound params")):
                        prefix = "copy_" if copy else "bind_"
                        pg = SQLArtifactStore(
                            url, chunk_size=chunk, table_prefix=prefix, pg_copy=copy
                        )
                        w, r = bench_store(pg, src, work, args.repeat)
                        pg.close()
                        rows.append(("SQLArtifactStore postgresql", w, r, label))
                finally:
                    drop()

    base_w, base_r = rows[0][1], rows[0][2]
    sync_w, sync_r = rows[1][1], rows[1][2]
    print(
        f"payload {args.mb} MiB, chunk {args.chunk_mib:g} MiB, best of {args.repeat}; "
        "ratio = MB/s ÷ baseline MB/s (baseline: plain copy | copy + fsync)"
    )
    header = (
        f"{'backend':<30} {'write MB/s':>10} {'read MB/s':>10} "
        f"{'write ratio':>17} {'read ratio':>17}  note"
    )
    print(header)
    print("-" * len(header))
    mb = size / 1e6
    for name, w, r, note in rows:
        wr = f"{base_w / w:.2f} | {sync_w / w:.2f}"
        rr = f"{base_r / r:.2f} | {sync_r / r:.2f}"
        print(f"{name:<30} {mb / w:>10.0f} {mb / r:>10.0f} {wr:>17} {rr:>17}  {note}")


if __name__ == "__main__":
    main()
