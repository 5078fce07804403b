"""The base detector a study ships (``studies/quickstart-base.safetensors``): train it, record it,
and check the record.

A shipped base sits beside its study spec with a JSON record: the command that trained it, its
weights' sha256, the digest of the data it was trained and measured on, and its AP on the
selection and held-out splits at each of the study's resolutions. ``tests/test_shipped_base.py``
regenerates the data and checks the same figures, so that a change of the data generator cannot
silently invalidate the base.

    python bench/ship_base.py quickstart                # measure; compare with the record
    python bench/ship_base.py quickstart --train        # train it (the recorded command), record it
    python bench/ship_base.py quickstart --write        # measure an existing file, record it

Training runs the study's ``base.train`` (epochs, lr, batch size, warm-up), its BN sparsity
(``search.bn_sparsity``), its resolutions and seed, on one thread: one thread gives the same
weights on every run (the weights' sha256 is recorded and compared).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any


def train_command(spec: Any, out: Path) -> list[str]:
    """The ``jdsearch train`` command line that trains ``spec``'s base into ``out``."""
    t = spec.base.train
    return [
        "jdsearch",
        "--threads",
        "1",
        "train",
        spec.base.detector,
        "--data",
        str(spec.data.dir),
        "--epochs",
        f"{t.epochs:g}",
        "--lr",
        f"{t.lr:g}",
        "--warmup",
        str(t.warmup_iters),
        "--batch-size",
        str(t.batch_size),
        "--bn-sparsity",
        f"{spec.search.bn_sparsity:g}",
        "--resolutions",
        *(str(r) for r in spec.resolutions),
        "--seed",
        str(spec.search.seed),
        "--out",
        str(out),
        "--quiet",
    ]


def main(argv: list[str] | None = None) -> int:
    from jdsearch.spec.study import load_study
    from jdsearch.testing import SHIPPED_BASE_TOLERANCE, measure_base, shipped_base_record

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="study spec YAML or preset name (quickstart)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--train", action="store_true", help="train the base, then record it")
    how.add_argument("--write", action="store_true", help="record the base as it is")
    args = parser.parse_args(argv)

    spec = load_study(args.study)
    if spec.base.checkpoint is None:
        raise SystemExit(f"{spec.source}: base.checkpoint is not set: the study ships no base")
    checkpoint = spec.base_checkpoint
    record_path = shipped_base_record(spec)
    command = train_command(spec, Path("runs") / spec.name / "shipped-base.safetensors")
    if args.train:
        from jdsearch.search.assets import ensure_data

        ensure_data(spec)
        print("$", shlex.join(command), flush=True)
        subprocess.run(command, check=True)
        checkpoint.write_bytes(Path(command[-2]).read_bytes())
    measured: dict[str, Any] = {"command": shlex.join(command), **measure_base(spec)}
    print(json.dumps(measured, indent=2))
    if args.train or args.write:
        record_path.write_text(json.dumps(measured, indent=2) + "\n")
        print(f"recorded {record_path}")
        return 0
    recorded = json.loads(record_path.read_text())
    worst = max(
        abs(measured["ap"][split][size] - ap)
        for split, by_size in recorded["ap"].items()
        for size, ap in by_size.items()
    )
    same = {k: measured[k] == recorded[k] for k in ("weights_sha256", "data_sha256")}
    print(f"against {record_path}: {same}, largest AP difference {worst:.2f}")
    ok = all(same.values()) and worst <= SHIPPED_BASE_TOLERANCE
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
