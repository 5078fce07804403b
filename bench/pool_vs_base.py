"""A teacher pool started from the base against one started from random weights (issue 27, 1).

On the quickstart study with its shipped base (``studies/quickstart-base.safetensors``) the pool
is trained twice with the quickstart's phases, once with ``pool.init: base`` (the super-net starts
from the base by function-preserving expansion) and once with ``pool.init: random``. For each,
and for the base-started pool before any training (step 0), it prints the teacher check's own
figures (:func:`jdsearch.search.teacher_check.measure_teacher`): the largest sub-network's AP
(BN-recalibrated, as every teacher is) and the base's, both on the selection split at the base
resolution, their ratio, and whether the check passes (the teacher beats the base, so the search
distils). All rows are measured in one run.

    OMP_NUM_THREADS=1 python bench/pool_vs_base.py                 # the quickstart's phases
    OMP_NUM_THREADS=1 python bench/pool_vs_base.py --epochs 0.05 0.05 0.05   # a smoke run
    OMP_NUM_THREADS=1 python bench/pool_vs_base.py --lr 0.01 0.005 0.005 --inits base   # another lr
    OMP_NUM_THREADS=1 python bench/pool_vs_base.py --no-reorder --pool-kd 0 --inits base
                                                   # shrinking phases without re-ordering or KD
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import tempfile
import time
from pathlib import Path

import torch

from jdsearch.methods.pool import ElasticPool, train_and_save_pool
from jdsearch.search.assets import StudyAssets, ensure_data
from jdsearch.search.teacher_check import TeacherCheck, measure_teacher
from jdsearch.spec.pool import PoolSpec
from jdsearch.store.checkpoint import load_checkpoint
from jdsearch.testing import tiny_study


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--epochs",
        type=float,
        nargs="+",
        default=None,
        help="epochs of each phase (default: the quickstart's)",
    )
    ap.add_argument(
        "--lr",
        type=float,
        nargs="+",
        default=None,
        help="learning rate of each phase (default: the quickstart's)",
    )
    ap.add_argument(
        "--inits",
        nargs="+",
        choices=("base", "random"),
        default=["base", "random"],
        help="which pools to train (default both)",
    )
    ap.add_argument(
        "--no-reorder",
        action="store_true",
        help="pool.reorder: false (no channel re-ordering before the shrinking phases)",
    )
    ap.add_argument(
        "--pool-kd",
        type=float,
        default=None,
        help="pool.kd's feature, soft-logit and localization weights (default: the study's)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--root", type=Path, default=None, help="work folder (default: a temporary one)"
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if args.pool_kd is not None and not (math.isfinite(args.pool_kd) and args.pool_kd >= 0):
        raise SystemExit(f"--pool-kd {args.pool_kd:g}: must be a number ≥ 0")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.root is None:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp), args)
    else:
        run(args.root, args)


def _phases(pool: PoolSpec, field: str, values: list[float] | None) -> PoolSpec:
    """``pool`` with each phase's ``field`` (``epochs`` or ``lr``) replaced by ``values``."""
    if values is None:
        return pool
    if len(values) != len(pool.phases):
        raise SystemExit(f"--{field}: {len(pool.phases)} values, one per phase")
    phases = tuple(
        dataclasses.replace(p, **{field: v}) for p, v in zip(pool.phases, values, strict=True)
    )
    return dataclasses.replace(pool, phases=phases)


def run(root: Path, args: argparse.Namespace) -> None:
    spec = tiny_study(root, "pool-vs-base", f"sqlite:///{root}/bench.db", None, 1, "quickstart")
    train_set, val_set = ensure_data(spec)
    checkpoint = load_checkpoint(spec.base_checkpoint)
    base = checkpoint.detector
    resolution = spec.base.resolution or checkpoint.spec.input.size
    pool_spec = _phases(_phases(spec.pool, "epochs", args.epochs), "lr", args.lr)
    if args.no_reorder:
        pool_spec = dataclasses.replace(pool_spec, reorder=False)
    if args.pool_kd is not None:
        w = args.pool_kd
        kd = dataclasses.replace(pool_spec.kd, feat_weight=w, cls_weight=w, loc_weight=w)
        pool_spec = dataclasses.replace(pool_spec, kd=kd)

    def check(pool: ElasticPool) -> TeacherCheck:
        assets = StudyAssets(spec, train_set, val_set, pool, "", resolution, 0)
        return measure_teacher(assets, base)

    rows: list[tuple[str, float, TeacherCheck]] = []
    start = time.perf_counter()
    step0 = ElasticPool(
        dataclasses.replace(pool_spec, init="base"), train_set.num_classes, base=base
    )
    rows.append(("base, step 0", 0.0, check(step0)))
    for init in args.inits:
        t = time.perf_counter()
        pool = train_and_save_pool(
            dataclasses.replace(pool_spec, init=init),
            train_set,
            root / f"pool-{init}.safetensors",
            progress=args.verbose,
            resume=False,
            base=base if init == "base" else None,
        )
        rows.append((f"{init}, trained", time.perf_counter() - t, check(pool)))
    wall = time.perf_counter() - start

    phases = ", ".join(f"{p.name} {p.epochs:g} ep lr {p.lr:g}" for p in pool_spec.phases)
    print(f"quickstart pool {pool_spec.space.describe()}; phases: {phases}")
    kd = pool_spec.kd
    print(
        f"re-ordering {'on' if pool_spec.reorder else 'off'}; shrinking phases' KD weights "
        f"{kd.feat_weight:g} / {kd.cls_weight:g} / {kd.loc_weight:g} (feature / logits / loc)"
    )
    print(
        f"teacher check at {rows[0][2].resolution} on the selection split ({len(val_set)} images)"
    )
    print()
    print("| pool init | training s | largest sub-network AP | base AP | ratio | check |")
    print("|---|---|---|---|---|---|")
    for name, seconds, c in rows:
        ratio = c.teacher_ap / c.base_ap if c.base_ap else float("nan")
        verdict = "passes (distils)" if c.stronger else "refuses"
        print(
            f"| {name} | {seconds:.0f} | {100 * c.teacher_ap:.1f} | {100 * c.base_ap:.1f} "
            f"| {ratio:.3f} | {verdict} |"
        )
    print()
    print(f"wall time {wall:.0f} s, {torch.get_num_threads()} torch thread(s)")


if __name__ == "__main__":
    main()
