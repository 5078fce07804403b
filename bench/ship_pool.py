"""The trained teacher pool a study ships (``studies/quickstart-pool.safetensors``): train it,
record it, and check the record.

A shipped pool sits beside its study spec (``pool.checkpoint``) with a JSON record: the command
that trained it, the pool cache key its file records (the hash of the study fields that make the
pool: the ``pool`` section, the base's weights it starts from, the training data), its weights'
sha256, the base's and the data's digests, and the teacher check the search makes of it (the
largest sub-network's AP against the base's). A study uses the file instead of training its pool
only while its own key is the recorded one; ``tests/test_shipped_pool.py`` regenerates the data
and checks that it is, so that a change of the spec, the base or the data generator cannot leave
a stale pool shipped.

    python bench/ship_pool.py quickstart                # measure; compare with the record
    python bench/ship_pool.py quickstart --train        # train it (the recorded command), record it
    python bench/ship_pool.py quickstart --write        # measure an existing file, record it

Training runs ``jdsearch pool train``, which trains what ``jdsearch search`` trains for the study
(the same function, data, base and key), on one thread, as the search trains a small detector:
one thread gives the same weights on every run (their sha256 is recorded and compared).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

#: What must be equal to the record (the teacher check's APs may drift by the base's tolerance).
EXACT = ("pool_key", "weights_sha256", "base_sha256", "data_sha256")


def train_command(study: str, out: Path) -> list[str]:
    """The ``jdsearch pool train`` command line that trains ``study``'s pool into ``out``."""
    return ["jdsearch", "--threads", "1", "pool", "train", study, "--out", str(out), "--quiet"]


def beside_spec(spec: Any) -> Path:
    """Where the study's ``pool.checkpoint`` is written: a bare file name beside the spec file,
    where the study reads it from any working directory (:attr:`StudySpec.pool_checkpoint`)."""
    given = spec.pool.checkpoint
    return Path(spec.source).parent / given if given.name == str(given) else given


def compare(measured: dict[str, Any], recorded: dict[str, Any]) -> tuple[bool, str]:
    """Whether ``measured`` is the record (and the key the study gives now its recorded one), and
    a line that says how far."""
    from jdsearch.testing import SHIPPED_BASE_TOLERANCE

    same = {k: measured[k] == recorded.get(k) for k in EXACT}
    same["key_now"] = measured["key_now"] == recorded.get("pool_key")
    check, was = measured["teacher_check"], recorded.get("teacher_check", {})
    worst = max(abs(check[k] - was.get(k, float("inf"))) for k in ("teacher_ap", "base_ap"))
    ok = all(same.values()) and worst <= SHIPPED_BASE_TOLERANCE
    return ok, f"{same}, largest AP difference {worst:.2f}"


def main(argv: list[str] | None = None) -> int:
    from jdsearch.spec.study import load_study
    from jdsearch.testing import measure_pool, shipped_pool_record

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="study spec YAML or preset name (quickstart)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--train", action="store_true", help="train the pool, then record it")
    how.add_argument("--write", action="store_true", help="record the pool as it is")
    args = parser.parse_args(argv)

    spec = load_study(args.study)
    if spec.pool.checkpoint is None:
        raise SystemExit(f"{spec.source}: pool.checkpoint is not set: the study ships no pool")
    shipped = beside_spec(spec)
    record_path = shipped_pool_record(spec)
    out = Path("runs") / spec.name / "shipped-pool.safetensors"
    command = train_command(args.study, out)
    if args.train:
        for stale in (out, out.with_name(out.name + ".phase-state")):  # else it resumes them
            if stale.is_dir():
                shutil.rmtree(stale)
            stale.unlink(missing_ok=True)
        print("$", shlex.join(command), flush=True)
        subprocess.run(command, check=True)
        shutil.copyfile(out, shipped)
    measured: dict[str, Any] = {"command": shlex.join(command), **measure_pool(spec)}
    measured["size_bytes"] = shipped.stat().st_size
    print(json.dumps(measured, indent=2))
    if args.train or args.write:
        recorded = {k: v for k, v in measured.items() if k != "key_now"}
        record_path.write_text(json.dumps(recorded, indent=2) + "\n")
        print(f"recorded {record_path}")
        return 0 if measured["key_now"] == measured["pool_key"] else 1
    ok, how_far = compare(measured, json.loads(record_path.read_text()))
    print(f"against {record_path}: {how_far}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
