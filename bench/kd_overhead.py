"""KD training-step overhead: (student step + KD) time over the plain student step time.

One training step = forward with targets, backward, SGD step, batch of ``--batch`` random images
with a few boxes each. The KD step adds what distillation costs: recording the student's RoI
outputs, the frozen teacher's backbone forward on the student's image batch, its box head on the
student's sampled proposals, and the three KD losses (their backward included). Plain and KD steps
alternate in one run so that machine load hits both alike; the medians are reported, plus the
teacher's forward (timed inside the KD step), so the excess over that unavoidable forward shows.
The default run takes ~10 min on 2 busy CPU cores (r18-fpn's 1024-RoI box head dominates at small
sizes); ``--only tiny`` takes ~2 min.

    python bench/kd_overhead.py                 # tiny preset at its size, r18-fpn at 512x320
    python bench/kd_overhead.py --size 1333x800 --device cuda --steps 30
    python bench/kd_overhead.py --only tiny --steps 2 --json kd.json   # also write the rows

Pairs: each student with a same-architecture teacher (pure KD machinery + one extra forward) and
with the R50-style teacher the paper uses for it (tiny-r50-fpn / r50-fpn).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import set_resolution
from jdsearch.methods.distill import make_distiller
from jdsearch.models.detector import build_detector
from jdsearch.models.heads import start_recording, stop_recording
from jdsearch.spec.detector import load_spec
from jdsearch.spec.settings import KDConfig

NUM_CLASSES = 7


def make_batch(
    n: int, res: Resolution, device: torch.device
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    h, w = res.short, res.long
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, h, w, generator=g).to(device))
        k = 4
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = (0.1 + 0.25 * torch.rand(k, 2, generator=g)) * torch.tensor([w, h])
        boxes = torch.cat([xy, (xy + wh).clamp(max=torch.tensor([w - 1.0, h - 1.0]))], 1)
        labels = torch.randint(1, NUM_CLASSES, (k,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def measure(
    student_name: str, teacher_name: str, res: Resolution, args: argparse.Namespace
) -> dict[str, float]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    student = build_detector(load_spec(student_name), NUM_CLASSES).to(device)
    teacher = (
        copy.deepcopy(student)
        if teacher_name == student_name
        else build_detector(load_spec(teacher_name), NUM_CLASSES).to(device)
    )
    for det in (student, teacher):
        set_resolution(det, res)
    kd = make_distiller(student, teacher, KDConfig())
    params = [*student.parameters(), *kd.adapter.parameters()]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    images, targets = make_batch(args.batch, res, device)
    student.train()
    kd.train()

    def plain() -> None:
        loss = sum(student(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def with_kd() -> None:
        losses = dict(student(images, targets))
        losses.update(kd(student))
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # The teacher's share of the KD step, timed inside it: backbone entry to box-predictor exit.
    marks: dict[str, float] = {}

    def mark(name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:
            sync(device)
            marks[name] = time.perf_counter()

        return hook

    teacher.backbone.register_forward_pre_hook(mark("teacher_in"))
    teacher.roi_heads.box_predictor.register_forward_hook(mark("teacher_out"))

    times: dict[str, list[float]] = {"plain": [], "kd": [], "teacher": []}
    for i in range(args.warmup + args.steps):
        stop_recording(student)
        t_plain = timed(plain, device)
        start_recording(student)
        t_kd = timed(with_kd, device)
        if i >= args.warmup:
            times["plain"].append(t_plain)
            times["kd"].append(t_kd)
            times["teacher"].append(marks["teacher_out"] - marks["teacher_in"])
    stop_recording(student)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="512x320", help="input size for r18-fpn (LONGxSHORT)")
    ap.add_argument(
        "--tiny-size", default=None, help="input size for the tiny preset (default: its own)"
    )
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps of each kind")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 gives steadier timings on a shared CPU)",
    )
    ap.add_argument("--only", choices=["tiny", "r18"], default=None)
    ap.add_argument("--json", metavar="FILE", help="also write the measured rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tiny_res = (
        Resolution.parse(args.tiny_size) if args.tiny_size else load_spec("tiny-r18-fpn").input.size
    )
    big_res = Resolution.parse(args.size)
    pairs = []
    if args.only in (None, "tiny"):
        pairs += [
            ("tiny-r18-fpn", "tiny-r18-fpn", tiny_res),
            ("tiny-r18-fpn", "tiny-r50-fpn", tiny_res),
        ]
    if args.only in (None, "r18"):
        pairs += [("r18-fpn", "r18-fpn", big_res), ("r18-fpn", "r50-fpn", big_res)]

    dev = torch.device(args.device)
    where = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"KD step overhead ({where}; batch {args.batch}; median of {args.steps} interleaved steps)"
    )
    header = f"{'student':<14}{'teacher':<14}{'size':>9}{'plain ms':>10}{'KD ms':>9}{'ratio':>7}"
    header += f"{'teacher fwd ms':>16}{'excess':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    for student, teacher, res in pairs:
        t = measure(student, teacher, res, args)
        excess = (t["kd"] - t["plain"] - t["teacher"]) / t["plain"]
        rows.append(
            {
                "student": student,
                "teacher": teacher,
                "size": str(res),
                "plain_ms": t["plain"] * 1e3,
                "kd_ms": t["kd"] * 1e3,
                "teacher_ms": t["teacher"] * 1e3,
                "ratio": t["kd"] / t["plain"],
                "excess": excess,
            }
        )
        print(
            f"{student:<14}{teacher:<14}{res!s:>9}{t['plain'] * 1e3:>10.1f}{t['kd'] * 1e3:>9.1f}"
            f"{t['kd'] / t['plain']:>6.2f}x{t['teacher'] * 1e3:>16.1f}{excess:>+7.0%}"
        )
    print(
        "ratio = KD step / plain step; excess = (KD − plain − teacher forward) / plain: the adapter,"
        " the KD losses and their backward"
    )
    if args.json:
        doc = {"device": where, "batch": args.batch, "steps": args.steps, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
