"""Table 12 of Joint-DetNAS at CPU scale: which KD component helps the student, on synthetic data.

A teacher is trained first, for ``--teacher-factor`` times the student's iterations (the paper's
teacher has a 2x schedule, the student 1x). The default teacher, ``wide``, is the tiny R18 with
twice the widths and a 64-wide FPN (student FPN 32: the adapter maps 32 → 64); ``--teacher`` also
takes a preset name (e.g. ``tiny-r50-fpn``, weaker than the tiny R18 at these lengths). Then the
student preset (default ``tiny-r18-fpn``) is trained from the same initialisation, data order and
number of iterations, five ways: alone, + proposal-feature KD, + classification KD, + class-aware
localisation KD, and all three. Each is evaluated (COCO AP and AP50 on the synthetic validation
split at ``--size``); the table also gives the detection loss over the last 20 training
iterations (``L_det``, KD terms excluded), a less noisy signal than AP at this scale.

    python bench/kd_ablation.py            # ~10 min on a loaded 2-core CPU (1 thread)
    python bench/kd_ablation.py --quick    # ~1-2 min smoke run: APs are at the noise floor

Small-scale caveat: tiny detectors reach only ~1 % AP after a few hundred CPU iterations on this
data, so AP differences below ~0.5 points are noise (``--seeds 3`` averages three seeds at three
times the cost; ``--iters 1000`` gives a more telling run). Training uses gradient clipping
(``--grad-clip``, as the quickstart's pool training does): with all three KD terms at lr 0.02 and a
barely trained teacher, unclipped SGD can diverge.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import CocoDataset, set_resolution
from jdsearch.data.synth import generate
from jdsearch.engine.evaluate import evaluate
from jdsearch.engine.train import train
from jdsearch.methods.distill import make_distiller
from jdsearch.models.detector import Detector, build_detector
from jdsearch.spec.arch import BASIC, BackboneArch
from jdsearch.spec.detector import load_spec
from jdsearch.spec.settings import KDConfig, TrainConfig


@dataclass(frozen=True)
class Row:
    name: str
    feat: bool
    cls: bool
    loc: bool


ROWS = (
    Row("student alone", False, False, False),
    Row("+ feature KD", True, False, False),
    Row("+ cls KD", False, True, False),
    Row("+ loc KD", False, False, True),
    Row("+ all three", True, True, True),
)


WIDE = "wide"  # tiny-r18-fpn with doubled widths and FPN


def build(preset: str, num_classes: int, size: Resolution, seed: int) -> Detector:
    torch.manual_seed(seed)
    if preset == WIDE:
        arch = BackboneArch.resnet(
            [2, 2, 2, 2], kind=BASIC, widths=(32, 64, 128, 256), stem=32, fpn=64
        )
        spec = load_spec("tiny-r18-fpn").with_arch(arch)
        spec = dataclasses.replace(spec, name="tiny-r18-fpn-wide")
    else:
        spec = load_spec(preset)
    det = build_detector(spec, num_classes)
    set_resolution(det, size)
    return det


def ap_of(det: Detector, val: CocoDataset, size: Resolution) -> tuple[float, float]:
    m = evaluate(det, val, [size], batch_size=8)[str(size)]
    return m.AP, m.AP50


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny run: fewer images and iterations")
    ap.add_argument("--student", default="tiny-r18-fpn")
    ap.add_argument(
        "--teacher", default=WIDE, help=f"a preset name, or '{WIDE}' (tiny R18, 2x widths)"
    )
    ap.add_argument("--images", type=int, default=None, help="synthetic images (train + val)")
    ap.add_argument("--iters", type=int, default=None, help="student iterations")
    ap.add_argument("--teacher-factor", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument(
        "--size", default="128x128", help="train/eval resolution (synthetic images are 128 px)"
    )
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--grad-clip", type=float, default=10.0)
    ap.add_argument("--feat-weight", type=float, default=1.0)
    ap.add_argument("--cls-weight", type=float, default=1.0)
    ap.add_argument("--loc-weight", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is fastest on a shared, oversubscribed CPU)",
    )
    ap.add_argument(
        "--workdir", default=None, help="where to write the synthetic data (default: temp)"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    images = args.images or (80 if args.quick else 400)
    iters = args.iters or (30 if args.quick else 200)
    size = Resolution.parse(args.size)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        info = generate(root / "synth", images=images, seed=0, val_fraction=0.25)
        train_ds = CocoDataset(info.train_json, info.image_dir)
        val_ds = CocoDataset(info.val_json, info.image_dir)
        k = train_ds.num_classes

        def config(n: int, seed: int) -> TrainConfig:
            return TrainConfig(
                max_iters=n,
                batch_size=args.batch,
                lr=args.lr,
                warmup_iters=min(50, n // 4),
                seed=seed,
                log_every=10**9,
                grad_clip=args.grad_clip,
            )

        results: dict[str, list[tuple[float, float, float, float]]] = {r.name: [] for r in ROWS}
        teacher_aps: list[tuple[float, float]] = []
        teacher_iters = max(1, round(iters * args.teacher_factor))
        for seed in range(args.seeds):
            teacher = build(args.teacher, k, size, seed + 1000)
            t0 = time.perf_counter()
            train(teacher, train_ds, config(teacher_iters, seed + 1000))
            teacher_aps.append(ap_of(teacher, val_ds, size))
            print(
                f"[seed {seed}] teacher {args.teacher}: AP {teacher_aps[-1][0]:.3f} "
                f"({teacher_iters} iters, {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            for row in ROWS:
                student = build(args.student, k, size, seed)
                terms = []
                if row.feat or row.cls or row.loc:
                    kd_cfg = KDConfig(
                        feat_weight=args.feat_weight if row.feat else 0.0,
                        cls_weight=args.cls_weight if row.cls else 0.0,
                        loc_weight=args.loc_weight if row.loc else 0.0,
                        temperature=args.temperature,
                    )
                    terms.append(make_distiller(student, teacher, kd_cfg))
                t0 = time.perf_counter()
                result = train(student, train_ds, config(iters, seed), loss_terms=terms)
                seconds = time.perf_counter() - t0
                det_loss = sum(
                    v for k, v in result.final_losses.items() if not k.startswith("loss_kd")
                )
                a, a50 = ap_of(student, val_ds, size)
                results[row.name].append((a, a50, det_loss, seconds))
                print(
                    f"[seed {seed}] {row.name:<14} AP {a:.3f}  L_det {det_loss:.3f}  ({seconds:.0f} s)",
                    flush=True,
                )

    def mean(values: list[float]) -> float:
        return statistics.fmean(values)

    print()
    print(
        f"KD ablation (paper table 12 shape): student {args.student}, teacher {args.teacher}; "
        f"{info.train_images} train / {info.val_images} val synthetic images at {size}; "
        f"student {iters} iters, teacher {teacher_iters}; batch {args.batch}; "
        f"{args.seeds} seed(s); AP in %"
    )
    header = f"{'':<16}{'feat':>5}{'cls':>5}{'loc':>5}{'AP':>8}{'ΔAP':>7}{'AP50':>8}{'L_det':>8}{'train s':>9}"
    print(header)
    print("-" * len(header))
    base = mean([r[0] for r in results[ROWS[0].name]])
    for row in ROWS:
        rs = results[row.name]
        a, a50 = mean([r[0] for r in rs]), mean([r[1] for r in rs])
        det_loss, sec = mean([r[2] for r in rs]), mean([r[3] for r in rs])
        marks = "".join(f"{'✓' if on else '-':>5}" for on in (row.feat, row.cls, row.loc))
        delta = "" if row is ROWS[0] else f"{(a - base) * 100:+.2f}"
        print(
            f"{row.name:<16}{marks}{a * 100:>8.2f}{delta:>7}{a50 * 100:>8.2f}{det_loss:>8.3f}{sec:>9.0f}"
        )
    t_ap, t_ap50 = mean([t[0] for t in teacher_aps]), mean([t[1] for t in teacher_aps])
    print(f"{'teacher':<16}{'':>15}{t_ap * 100:>8.2f}{'':>7}{t_ap50 * 100:>8.2f}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
