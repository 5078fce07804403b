"""Quality of the elastic teacher pool (paper table 1, at CPU scale).

On the synthetic dataset (:func:`jdsearch.data.synth.generate`) a tiny pool (``tiny-r50-fpn`` heads,
base widths 8..64, depths ≤ [2,2,3,2], widths 1.0/1.25/1.5, FPN 16/24/32) is trained with
integrated progressive shrinking. For three sub-networks (smallest, a middle one, largest) it
prints the validation AP

* as extracted from the pool, *without* BN recalibration (the super-net's mixed statistics),
* as extracted, *with* BN recalibration (:func:`jdsearch.methods.pool.recalibrate_bn`),
* of the same architecture trained alone from scratch, with the plain detection loss, dynamic
  resolution and the same number of epochs as the pool's whole schedule (``--alone-epochs``).

Defaults (160 images, 8/4/4 epochs) took about 6 minutes on one core of a loaded CPU; ``--quick``
about 1.5 minutes (a smoke run). Both are far too short for tiny from-scratch detectors to learn
much: expect AP of a few tenths of a point, i.e. noise. ``--images 400 --epochs 16 4 4`` (15–25
minutes) is where the standalone baselines reach 7–16 AP and the table starts to mean
something. Threads default to 1: on a shared, loaded CPU, OpenMP threads spin against each other
and training gets tens of times slower.

    python bench/pool_quality.py --quick
    python bench/pool_quality.py --images 400 --epochs 16 4 4
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch

from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import CocoDataset
from jdsearch.data.synth import generate
from jdsearch.engine.evaluate import evaluate
from jdsearch.methods.pool import ElasticPool, recalibrate_bn, train_pool
from jdsearch.models.detector import build_detector
from jdsearch.models.flops import count_flops
from jdsearch.spec.pool import PoolSpec
from jdsearch.spec.pool_space import SubnetConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small data and schedule (smoke run)")
    ap.add_argument("--images", type=int, default=None, help="synthetic images (75%% train)")
    ap.add_argument(
        "--epochs",
        type=float,
        nargs=3,
        default=None,
        metavar=("E0", "E1", "E2"),
        help="epochs of the super-net phase and the two shrinking phases",
    )
    ap.add_argument(
        "--alone-epochs",
        type=float,
        default=None,
        help="epochs of the standalone baselines (default: the pool's total)",
    )
    ap.add_argument(
        "--lr",
        type=float,
        default=0.02,
        help="lr of phase 0 and the baselines; shrinking phases use half",
    )
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--recal-batches", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--data", type=Path, default=None, help="dataset folder (default: a temporary one)"
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    torch.set_num_threads(args.threads)
    images = args.images or (80 if args.quick else 160)
    epochs = tuple(args.epochs or ((2, 1, 1) if args.quick else (8, 4, 4)))
    alone_epochs = args.alone_epochs or sum(epochs)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp)
        info = generate(root, images=images, seed=args.seed)
        train_ds = CocoDataset(info.train_json, info.image_dir)
        val_ds = CocoDataset(info.val_json, info.image_dir)
        run(args, train_ds, val_ds, epochs, alone_epochs)


def run(
    args: argparse.Namespace,
    train_ds: CocoDataset,
    val_ds: CocoDataset,
    epochs: tuple[float, ...],
    alone_epochs: float,
) -> None:
    base = PoolSpec.tiny(epochs=(epochs[0], epochs[1], epochs[2]), lr=args.lr)
    train = dataclasses.replace(base.train, batch_size=args.batch_size, seed=args.seed)
    spec = dataclasses.replace(base, train=train, recalibration_batches=args.recal_batches)
    torch.manual_seed(args.seed)
    pool = ElasticPool(spec, train_ds.num_classes, class_names=train_ds.class_names)
    sizes = [Resolution(128, 96), Resolution(208, 128)]  # 96 px and 128 px on 128-px images
    print(
        f"# pool quality — {platform.processor() or platform.machine()}, {args.threads} thread(s), "
        f"device {args.device}"
    )
    print(f"# data: {len(train_ds)} train / {len(val_ds)} val synthetic images (128 px)")
    print(
        f"# pool: space {spec.space.describe()} = {spec.space.size()} sub-networks "
        f"(× {len(pool.resolutions)} resolutions = {spec.space.size(len(pool.resolutions))})"
    )
    paper = PoolSpec.paper().space
    print(
        f"# paper's space (A.1.3): {paper.describe()} = {paper.size()} sub-networks "
        f"(× 4 resolutions = {paper.size(4)}; the paper says about 765000)"
    )
    phases = " / ".join(f"{p.name} {p.epochs:g} ep lr {p.lr:g}" for p in spec.phases)
    print(
        f"# schedule: phases {phases}; "
        f"batch {args.batch_size}, dynamic resolution {', '.join(map(str, pool.resolutions))}"
    )
    start = time.perf_counter()
    records = train_pool(pool, train_ds, device=args.device)
    pool_s = time.perf_counter() - start
    print(
        f"# pool trained in {pool_s:.0f} s ({sum(r.iterations for r in records)} iterations; "
        + ", ".join(f"{r.name}: {r.subnets_sampled} sub-networks" for r in records)
        + ")"
    )

    configs = [spec.space.smallest(), SubnetConfig((2, 2, 2, 2), (1.25,) * 4, 24), spec.largest]
    rows = []
    for cfg in configs:
        det = pool.extract(cfg, device=args.device)
        flops = count_flops(det, (128, 128)).total / 1e6
        raw = evaluate(det, val_ds, sizes, device=args.device)
        recalibrate_bn(
            det,
            train_ds,
            batches=args.recal_batches,
            batch_size=args.batch_size,
            resolutions=pool.resolutions,
            device=args.device,
            seed=args.seed,
        )
        recal = evaluate(det, val_ds, sizes, device=args.device)
        torch.manual_seed(args.seed)
        alone = build_detector(pool.spec_of(cfg), train_ds.num_classes)
        t0 = time.perf_counter()
        train(
            alone,
            train_ds,
            dataclasses.replace(
                spec.train,
                epochs=alone_epochs,
                lr=args.lr,
                device=args.device,
                resolutions=pool.resolutions,
            ),
        )
        alone_s = time.perf_counter() - t0
        base = evaluate(alone, val_ds, sizes, device=args.device)
        rows.append((cfg, flops, raw, recal, base, alone_s))

    print()
    print(
        f"COCO AP / AP50 (×100) on {len(val_ds)} val images, input {sizes[0].short} px | "
        f"{sizes[1].short} px; standalone: {alone_epochs:g} epochs from scratch"
    )
    columns = [
        "sub-network",
        "MMACs",
        "pool, BN as extracted",
        "pool, BN recalibrated",
        "standalone",
    ]
    table = []
    for cfg, flops, raw, recal, base, _ in rows:
        cells = [str(cfg), f"{flops:.1f}"]
        for metrics in (raw, recal, base):
            cells.append(
                " | ".join(
                    f"{100 * metrics[str(s)].AP:.1f}/{100 * metrics[str(s)].AP50:.1f}"
                    for s in sizes
                )
            )
        table.append(cells)
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    total = time.perf_counter() - start
    alone = ", ".join(f"{r[5]:.0f} s" for r in rows)
    print(f"\n# standalone training: {alone}; whole run {total:.0f} s")


if __name__ == "__main__":
    main()
