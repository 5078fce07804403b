"""Record this machine's run of the 0.1 search for tests/data/study_v0_1_runs.json.

Run it against the 0.1 code (its conftest provides ``small_study``):

    git worktree add /tmp/v01 08bac1d
    cp tests/data/dump_v0_1_run.py /tmp/v01/tests/test_dump_v0_1_run.py
    (cd /tmp/v01 && python -m pytest -q -p no:cacheprovider tests/test_dump_v0_1_run.py)
    python tests/data/dump_v0_1_run.py --merge /tmp/v0_1_run.json   # adds it under this machine
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path("/tmp/v0_1_run.json")
KEYS = ("parent", "student", "teacher", "flops", "flops_at", "params", "stage_flops", "h")


def test_dump(small_study) -> None:  # collected only inside the 0.1 worktree
    import optuna

    study = optuna.load_study(study_name="small", storage=small_study.url)
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    out = [
        {
            "number": t.number,
            "state": t.state.name,
            "move": t.params.get("move"),
            "value": t.value,
            **{k: t.user_attrs.get(k) for k in KEYS},
        }
        for t in trials
    ]
    OUT.write_text(json.dumps(out, indent=1))


if __name__ == "__main__" and sys.argv[1:2] == ["--merge"]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.test_legacy_study import LEGACY_RUNS, machine_fingerprint

    runs = json.loads(LEGACY_RUNS.read_text())
    runs["runs"][machine_fingerprint()] = json.loads(Path(sys.argv[2]).read_text())
    LEGACY_RUNS.write_text(json.dumps(runs, indent=1) + "\n")
