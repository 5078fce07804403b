"""What weight inheritance buys: AP of a student before an action, right after it, after a short
fine-tune, and of the same child architecture trained from scratch for the same steps.

On the synthetic shapes dataset, a tiny detector (``--preset``, default ``tiny-r18-fpn``) is trained
briefly with the BN sparsity term (λ = ``--lam``, paper 1e-5). Then, for each action (one per kind
by default), the child is built with :func:`jdsearch.methods.morph.evolve` and evaluated with no training,
then fine-tuned for ``--ft-iters``; the same child arch is also trained from a fresh init for
``--ft-iters``. A ``parent`` row fine-tunes the unchanged parent for the same steps, as the control
for "more training". FLOPs are multiply-adds at the evaluation size (``jdsearch.models.flops``); "loss" is
the detection loss over the last ≤ 20 training iterations, a less noisy signal than AP at this
scale (APs of a few hundred CPU iterations sit near the noise floor: read differences below ~0.005
as noise). Prints a table; asserts nothing.

    python bench/morph_quality.py                      # ~8 min on one CPU thread (494 s measured)
    python bench/morph_quality.py --base-iters 100 --ft-iters 30 --actions channel_prune
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import CocoDataset
from jdsearch.data.synth import generate
from jdsearch.engine.evaluate import evaluate
from jdsearch.engine.train import train
from jdsearch.methods.morph.actions import MorphConfig, evolve_with_report
from jdsearch.methods.morph.pruning import BNSparsity
from jdsearch.models.detector import Detector, build_detector
from jdsearch.models.flops import count_flops
from jdsearch.spec.detector import load_spec
from jdsearch.spec.settings import TrainConfig

DEFAULT_ACTIONS = ("channel_prune", "layer_prune", "add_layer:3", "rearrange:3->4")


def ap(det: Detector, data: CocoDataset, res: Resolution) -> tuple[float, float]:
    m = evaluate(det, data, [res])[str(res)]
    return m.AP, m.AP50


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny-r18-fpn")
    p.add_argument("--actions", nargs="+", default=list(DEFAULT_ACTIONS))
    p.add_argument("--images", type=int, default=1200, help="synthetic images (75%% train)")
    p.add_argument("--size", type=int, default=128, help="image side and evaluation size")
    p.add_argument("--base-iters", type=int, default=1500)
    p.add_argument("--ft-iters", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--lam", type=float, default=1e-5, help="BN sparsity weight")
    p.add_argument("--fraction", type=float, default=0.1, help="channel_prune fraction")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (tiny convs: 1 is fastest)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    res = Resolution(args.size, args.size)
    with tempfile.TemporaryDirectory(prefix="morph_quality_") as tmp:
        info = generate(Path(tmp), images=args.images, seed=args.seed, size=args.size)
        train_ds = CocoDataset(info.train_json, info.image_dir)
        val_ds = CocoDataset(info.val_json, info.image_dir)
        spec = load_spec(args.preset)

        def config(iters: int, seed: int, warmup: int) -> TrainConfig:
            return TrainConfig(
                max_iters=iters,
                batch_size=args.batch_size,
                lr=args.lr,
                warmup_iters=warmup,
                resolutions=(res,),
                seed=seed,
            )

        def fit(det: Detector, iters: int, seed: int, warmup: int) -> float:
            """Train; return the detection loss (mean of the last ≤ 20 iterations)."""
            result = train(
                det, train_ds, config(iters, seed, warmup), loss_terms=[BNSparsity(args.lam)]
            )
            return sum(v for k, v in result.final_losses.items() if k != "loss_bn_sparsity")

        torch.manual_seed(args.seed)
        parent = build_detector(spec, train_ds.num_classes)
        fit(parent, args.base_iters, args.seed, warmup=min(50, args.base_iters // 4))
        base_ap = ap(parent, val_ds, res)
        print(
            f"# {args.preset}: {len(train_ds)} train / {len(val_ds)} val synthetic images at {res}; "
            f"base trained {args.base_iters} iters (batch {args.batch_size}, lr {args.lr}, λ {args.lam:g}); "
            f"fine-tune and scratch: {args.ft_iters} iters"
        )
        print(f"# parent arch: {parent.arch.encode()}")
        header = (
            f"{'action':<16}{'params':>9}{'new':>7}{'MFLOPs':>9}"
            f"{'AP before':>11}{'AP action':>11}{'AP ft':>9}{'AP scratch':>12}"
            f"{'AP50 ft':>9}{'AP50 scr':>10}{'loss ft':>9}{'loss scr':>10}"
        )
        print(header)
        print("-" * len(header))
        rows = ["parent", *args.actions]
        for i, action in enumerate(rows):
            if action == "parent":
                child = build_detector(spec, train_ds.num_classes)
                child.load_state_dict(parent.state_dict())
                new = 0
            else:
                child, report = evolve_with_report(
                    parent, action, config=MorphConfig(channel_fraction=args.fraction)
                )
                new = report.new_params
            flops = count_flops(child, size=(args.size, args.size)).total / 1e6
            params = sum(q.numel() for q in child.parameters())
            after = ap(child, val_ds, res)
            loss_ft = fit(child, args.ft_iters, args.seed + 1 + i, warmup=0)
            tuned = ap(child, val_ds, res)
            torch.manual_seed(args.seed + 100 + i)
            scratch = build_detector(child.spec, train_ds.num_classes)
            loss_scratch = fit(
                scratch, args.ft_iters, args.seed + 1 + i, warmup=min(50, args.ft_iters // 4)
            )
            fresh = ap(scratch, val_ds, res)
            print(
                f"{action:<16}{params:>9}{new:>7}{flops:>9.1f}"
                f"{base_ap[0]:>11.4f}{after[0]:>11.4f}{tuned[0]:>9.4f}{fresh[0]:>12.4f}"
                f"{tuned[1]:>9.4f}{fresh[1]:>10.4f}{loss_ft:>9.3f}{loss_scratch:>10.3f}",
                flush=True,
            )
    print(f"# total {time.perf_counter() - started:.0f} s on {torch.get_num_threads()} thread(s)")


if __name__ == "__main__":
    main()
