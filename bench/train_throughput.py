"""Training throughput (images/s) of two detector presets at one input size, in one run.

Random images (with a few random boxes each) are resized by the detector's own transform to
``--size``, exactly as in training; each preset trains ``--warmup`` untimed iterations, then
``--iters`` timed ones through :func:`jdsearch.train.train`. Prints a table and the ratio.

    python bench/train_throughput.py --size 1333x800 --iters 3 --batch-size 2 --device cpu
    python bench/train_throughput.py --size 208x128 --iters 20 --presets tiny-r18-fpn tiny-r50-fpn

r18-fpn at 1333x800 on a CPU takes seconds per image: keep ``--iters`` small there.
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from typing import Any

import torch
from torch.utils.data import Dataset

from jdsearch.models.detector import build_detector
from jdsearch.resolution import Resolution
from jdsearch.settings import TrainConfig
from jdsearch.spec import load_spec
from jdsearch.train import train


class RandomBoxes(Dataset[tuple[torch.Tensor, dict[str, Any]]]):
    """``n`` random ``height x width`` images with 1..5 random boxes of 1..5 classes each."""

    def __init__(self, n: int, height: int, width: int, seed: int = 0) -> None:
        self.n, self.height, self.width, self.seed = n, height, width, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        image = torch.rand(3, self.height, self.width, generator=g)
        k = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * torch.tensor([self.width * 0.7, self.height * 0.7])
        wh = (0.05 + 0.25 * torch.rand(k, 2, generator=g)) * torch.tensor([self.width, self.height])
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(1, 6, (k,), generator=g)
        return image, {"boxes": boxes, "labels": labels, "image_id": i}


def measure(preset: str, size: Resolution, args: argparse.Namespace) -> dict[str, Any]:
    spec = load_spec(preset)
    torch.manual_seed(0)
    det = build_detector(spec, 6)
    params = sum(p.numel() for p in det.parameters())
    # Images come in already at the target size: the transform's resize is then ~free, as
    # with a data pipeline that pre-scales; the timing is the network's.
    data = RandomBoxes(args.batch_size * (args.iters + args.warmup), size.short, size.long)
    common = dict(
        batch_size=args.batch_size,
        lr=0.005,
        warmup_iters=0,
        device=args.device,
        resolutions=(size,),
        amp=args.amp,
        seed=0,
    )
    if args.warmup:
        train(det, data, TrainConfig(max_iters=args.warmup, **common))  # type: ignore[arg-type]
    start = time.perf_counter()
    result = train(det, data, TrainConfig(max_iters=args.iters, **common))  # type: ignore[arg-type]
    wall = time.perf_counter() - start
    return {
        "preset": preset,
        "params_m": params / 1e6,
        "images": result.images,
        "seconds": result.seconds,
        "wall": wall,
        "img_s": result.images_per_s,
        "loss": sum(result.final_losses.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="1333x800", help="input resolution LONGxSHORT")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per preset")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations per preset")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--presets", nargs=2, default=["tiny-r18-fpn", "r18-fpn"], metavar="PRESET")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = Resolution.parse(args.size)

    print(
        f"# train throughput: size {size}, batch {args.batch_size}, {args.iters} timed iters "
        f"(+{args.warmup} warm-up), device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    rows = [measure(p, size, args) for p in args.presets]
    print(f"{'preset':<16} {'params(M)':>9} {'images':>6} {'seconds':>8} {'img/s':>8} {'loss':>7}")
    for r in rows:
        print(
            f"{r['preset']:<16} {r['params_m']:>9.2f} {r['images']:>6d} {r['seconds']:>8.2f} "
            f"{r['img_s']:>8.2f} {r['loss']:>7.3f}"
        )
    a, b = rows
    print(f"ratio {a['preset']} / {b['preset']}: {a['img_s'] / b['img_s']:.2f}x images/s")


if __name__ == "__main__":
    main()
