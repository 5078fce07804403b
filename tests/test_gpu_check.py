"""bench/gpu_check.sh --dry-run: every step of the GPU check runs on the CPU at toy sizes, so that
the script cannot rot between the runs on a GPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = ("device", "cuda-tests", "quickstart", "throughput", "kd-overhead", "latency", "ddp")


@pytest.mark.slow
def test_dry_run_runs_every_step_and_ends_with_one_table(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    done = subprocess.run(
        [
            "bash",
            str(REPO / "bench" / "gpu_check.sh"),
            "--dry-run",
            "--ddp",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    # the table is the end of the output: a rule, the header, a rule, the rows, a rule, a verdict
    lines = done.stdout.rstrip().splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("----")]
    assert len(rules) >= 3 and lines[rules[-3] + 1].split()[:2] == ["step", "measured"], output
    rows = lines[rules[-2] + 1 : rules[-1]]
    named = [line.split()[0] for line in rows if line and not line.startswith(" ")]
    assert named == list(STEPS), rows
    results = {line.split()[0]: line.split()[-2] for line in rows if line and line[0] != " "}
    assert all(results[s] == "pass" for s in STEPS), rows  # the cuda tests skip inside a pass
    assert "all steps passed or skipped" in lines[-1]
    assert "no GPU: skipped" in done.stdout  # the cuda tests were collected, and skipped
