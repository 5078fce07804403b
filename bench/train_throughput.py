"""Training throughput (images/s) of two detector presets at one input size, in one run.

Random images (with a few random boxes each) are resized by the detector's own transform to
``--size``, exactly as in training; each preset trains ``--warmup`` untimed iterations, then
``--iters`` timed ones through :func:`jdsearch.engine.train.train`. Prints a table and the ratio.

    python bench/train_throughput.py --size 1333x800 --iters 3 --batch-size 2 --device cpu
    python bench/train_throughput.py --size 208x128 --iters 20 --presets tiny-r18-fpn tiny-r50-fpn

r18-fpn at 1333x800 on a CPU takes seconds per image: keep ``--iters`` small there.

``--amp-compare`` trains each preset twice, in float32 and with AMP (float16 autocast +
``GradScaler``, CUDA only: on a CPU the AMP rows are left out), and prints images/s, the AMP
speed-up and, on CUDA, the peak memory (``torch.cuda.max_memory_allocated``) of each; ``--json
FILE`` also writes every measured row (``bench/gpu_check.sh`` reads it):

    python bench/train_throughput.py --size 1333x800 --presets r18-fpn r50-fpn --device cuda \
        --iters 10 --warmup 3 --amp-compare --json throughput.json

``--contend`` measures, for each preset, images/s with 1 thread, 2 threads and torch's default,
each with OpenMP's default wait policy and with ``OMP_WAIT_POLICY=PASSIVE``, alone and next to
one competing busy process. Every cell runs in a fresh process (the wait policy is read when
OpenMP starts); cells are interleaved so that drifting load hits every row alike:

    python bench/train_throughput.py --contend --size 208x128 --iters 20 --batch-size 4 \
        --presets tiny-r18-fpn r18-fpn

``--loader`` trains on real image files (a synthetic COCO set of ``--loader-images`` PNGs at
``--size``, read through :class:`~jdsearch.data.coco.CocoDataset`) for two epochs, and prints the
second epoch's images/s and the share of its wall time spent waiting for batches (reading,
decoding, collating; ``StepInfo.data_seconds``), with the decoded-image cache off and on:

    python bench/train_throughput.py --loader --size 208x128 --batch-size 4 \
        --presets tiny-r18-fpn r18-fpn
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import time
from typing import Any

import torch
from torch.utils.data import Dataset

from jdsearch.core.resolution import Resolution
from jdsearch.engine.train import train
from jdsearch.models.detector import build_detector
from jdsearch.spec.detector import load_spec
from jdsearch.spec.settings import TrainConfig


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


def measure(
    preset: str, size: Resolution, args: argparse.Namespace, amp: bool | None = None
) -> dict[str, Any]:
    """Images/s of ``preset`` training at ``size`` (``amp``: default ``args.amp``); on CUDA also
    the peak memory allocated over its warm-up and timed iterations."""
    amp = args.amp if amp is None else amp
    spec = load_spec(preset)
    torch.manual_seed(0)
    det = build_detector(spec, 6)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:  # the previous measurement's memory is gone before this one's peak is tracked
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(args.device)
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
        amp=amp,
        seed=0,
    )
    if args.warmup:
        train(det, data, TrainConfig(max_iters=args.warmup, **common))  # type: ignore[arg-type]
    start = time.perf_counter()
    result = train(det, data, TrainConfig(max_iters=args.iters, **common))  # type: ignore[arg-type]
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(args.device) if cuda else None
    return {
        "preset": preset,
        "amp": amp,
        "params_m": params / 1e6,
        "images": result.images,
        "seconds": result.seconds,
        "wall": wall,
        "img_s": result.images_per_s,
        "loss": sum(result.final_losses.values()),
        "peak_mib": None if peak is None else peak / 2**20,
    }


def amp_compare(size: Resolution, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The --amp-compare table: each preset in float32 and (on CUDA) with AMP."""
    cuda = torch.device(args.device).type == "cuda"
    rows = []
    for preset in args.presets:
        rows.append(measure(preset, size, args, amp=False))
        if cuda:
            rows.append(measure(preset, size, args, amp=True))
    print(
        f"{'preset':<16} {'precision':<9} {'images':>6} {'seconds':>8} {'img/s':>8} "
        f"{'loss':>7} {'peak MiB':>9} {'AMP/fp32':>8}"
    )
    fp32 = {r["preset"]: r["img_s"] for r in rows if not r["amp"]}
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        gain = f"{r['img_s'] / fp32[r['preset']]:.2f}x" if r["amp"] else ""
        print(
            f"{r['preset']:<16} {'AMP' if r['amp'] else 'fp32':<9} {r['images']:>6d} "
            f"{r['seconds']:>8.2f} {r['img_s']:>8.2f} {r['loss']:>7.3f} {peak:>9} {gain:>8}"
        )
    if not cuda:
        print("(AMP needs CUDA: float32 only on this device)")
    return rows


def write_json(path: str, size: Resolution, args: argparse.Namespace, rows: list[Any]) -> None:
    """The measured rows and the settings they were measured with, as JSON."""
    doc = {
        "size": str(size),
        "batch_size": args.batch_size,
        "iters": args.iters,
        "warmup": args.warmup,
        "device": args.device,
        "device_name": (
            torch.cuda.get_device_name(args.device)
            if torch.device(args.device).type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


#: (label, thread count or None for torch's default, OMP_WAIT_POLICY or None) of --contend.
CONTEND_SETTINGS = [
    ("1 thread", 1, None),
    ("2 threads", 2, None),
    ("default", None, None),
    ("1 thread, PASSIVE", 1, "PASSIVE"),
    ("2 threads, PASSIVE", 2, "PASSIVE"),
    ("default, PASSIVE", None, "PASSIVE"),
]


def _cell(preset: str, threads: int | None, policy: str | None, args: argparse.Namespace) -> float:
    """Images/s of ``preset`` measured in a fresh process with that thread count and policy."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, __file__, "--cell", preset, "--threads", str(threads or 0)]
    cmd += ["--size", args.size, "--iters", str(args.iters), "--warmup", str(args.warmup)]
    cmd += ["--batch-size", str(args.batch_size)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["img_s"])


def contend(args: argparse.Namespace) -> None:
    """The --contend table: img/s per preset, thread setting and load, and the ratios."""
    results: dict[tuple[str, str, bool], float] = {}
    for busy in (False, True):
        hog = None
        if busy:  # one competing process that never sleeps
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            for label, threads, policy in CONTEND_SETTINGS:
                for preset in args.presets:
                    results[(preset, label, busy)] = r = _cell(preset, threads, policy, args)
                    print(f"# {preset}, {label}, busy={busy}: {r:.2f} img/s", file=sys.stderr)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    print(
        f"# --contend: size {args.size}, batch {args.batch_size}, {args.iters} timed iters, "
        f"{os.cpu_count()} CPUs, torch default threads {torch.get_num_threads()}"
    )
    print(
        f"{'preset':<14} {'setting':<20} {'alone img/s':>11} {'+1 busy img/s':>13} {'busy/alone':>10}"
    )
    for preset in args.presets:
        for label, _, _ in CONTEND_SETTINGS:
            alone, busy = results[(preset, label, False)], results[(preset, label, True)]
            print(f"{preset:<14} {label:<20} {alone:>11.2f} {busy:>13.2f} {busy / alone:>10.2f}")


def _loader_row(
    preset: str, data: Any, size: Resolution, args: argparse.Namespace
) -> dict[str, float]:
    """The second of two epochs on ``data``: images/s and the share spent waiting for batches."""
    torch.manual_seed(0)
    det = build_detector(load_spec(preset), data.num_classes)
    per_epoch = -(-len(data) // args.batch_size)
    marks: dict[int, tuple[float, float, int]] = {}

    def mark(info: Any) -> None:
        if info.iteration in (per_epoch, 2 * per_epoch):
            marks[info.iteration] = (info.seconds, info.data_seconds, info.images)

    config = TrainConfig(
        max_iters=2 * per_epoch,
        batch_size=args.batch_size,
        lr=0.005,
        warmup_iters=0,
        device=args.device,
        resolutions=(size,),
        seed=0,
    )
    train(det, data, config, callback=mark)
    (s1, d1, n1), (s2, d2, n2) = marks[per_epoch], marks[2 * per_epoch]
    return {"img_s": (n2 - n1) / (s2 - s1), "share": (d2 - d1) / (s2 - s1)}


def loader(size: Resolution, args: argparse.Namespace) -> None:
    """:func:`_loader_row` for each preset, the decoded-image cache off and on, interleaved."""
    import tempfile
    from pathlib import Path

    from jdsearch.data.coco import CocoDataset
    from jdsearch.data.synth import generate

    with tempfile.TemporaryDirectory() as tmp:
        info = generate(Path(tmp), images=args.loader_images, seed=0, size=(size.short, size.long))
        print(f"{'preset':<16} {'cache':<5} {'img/s':>8} {'loader share':>12}")
        for preset in args.presets:
            for cache in ("off", "on"):
                os.environ["JDSEARCH_IMAGE_CACHE_MB"] = "0" if cache == "off" else "1024"
                data = CocoDataset(info.train_json, info.image_dir)
                row = _loader_row(preset, data, size, args)
                print(f"{preset:<16} {cache:<5} {row['img_s']:>8.2f} {row['share']:>11.1%}")


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
    ap.add_argument(
        "--contend", action="store_true", help="threads × wait policy × one busy process"
    )
    ap.add_argument(
        "--amp-compare",
        action="store_true",
        help="each preset in float32 and with AMP (CUDA), with peak memory on CUDA",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the measured rows here")
    ap.add_argument(
        "--loader", action="store_true", help="the data loader's share of a step, on PNG files"
    )
    ap.add_argument("--loader-images", type=int, default=48, help="images of the --loader set")
    ap.add_argument("--cell", metavar="PRESET", help=argparse.SUPPRESS)  # one --contend cell
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = Resolution.parse(args.size)
    if args.contend:
        contend(args)
        return
    if args.cell:
        print(json.dumps(measure(args.cell, size, args)))
        return
    if args.loader:
        loader(size, args)
        return

    print(
        f"# train throughput: size {size}, batch {args.batch_size}, {args.iters} timed iters "
        f"(+{args.warmup} warm-up), device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    if args.amp_compare:
        rows = amp_compare(size, args)
        if args.json:
            write_json(args.json, size, args, rows)
        return
    rows = [measure(p, size, args) for p in args.presets]
    if args.json:
        write_json(args.json, size, args, rows)
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
