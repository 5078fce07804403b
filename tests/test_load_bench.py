"""``bench/load.py`` runs: two stand-in workers on one PostgreSQL study lose nothing, decide no
(parent, move) twice, and print the table (a few trials of 0.05 s, so that the bench cannot rot;
its figures are measured by running it, never asserted here)."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import PG_BASE, REPO


def test_load_bench_two_workers(pg_url: str) -> None:  # pg_url: skipped without PostgreSQL
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "bench/load.py", "--workers", "2", "--trial-s", "0.05", "--trials", "3"]
    out = subprocess.run(
        [*cmd, "--pg-url", PG_BASE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["N", "trials"])
    names, cells = lines[head].split(), lines[head + 1].split()
    row = dict(zip(names, cells, strict=True))
    assert (row["N"], row["trials"]) == ("2", "6"), out.stdout
    assert (row["dup"], row["failed"], row["lost"]) == ("0", "0", "0"), out.stdout
    assert int(row["conns"]) >= 2, out.stdout  # both workers' connections were seen
    assert "a worker stopped" not in out.stdout
