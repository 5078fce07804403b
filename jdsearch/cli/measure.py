"""``jdsearch flops`` and ``jdsearch latency``: the multiply-adds and the batch-1 speed of a
detector given as a spec, a checkpoint or (``latency``) an export folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from jdsearch.cli.common import height_width, image_files, int_range, resolution
from jdsearch.core.errors import JDSearchError

#: What ``latency`` and ``flops`` read, by file name suffix ("" is a preset's name).
_SPEC_SUFFIXES = ("", ".yaml", ".yml")
_MODEL_FILES = "a detector spec (.yaml/.yml or a preset name) or a checkpoint (.safetensors)"


def _model_file(target: str, *, export: bool) -> Path:
    """``target`` as a path, refused unless it is a kind of file the command reads (a torchvision
    ``.pt`` file, say, is converted with ``jdsearch import`` first)."""
    p = Path(target)
    if export and (p.is_dir() or p.name == "detector.json"):
        return p
    if p.suffix.lower() in (*_SPEC_SUFFIXES, ".safetensors") and not p.is_dir():
        return p
    what = _MODEL_FILES + (", or an export folder" if export else "")
    raise JDSearchError(
        f"{target}: not {what}; convert a torchvision .pt/.pth file with `jdsearch import`"
    )


def add_flops(sub: Any, name: str) -> None:
    f = sub.add_parser(name, help="count multiply-adds and parameters of a detector")
    f.add_argument("spec", help="detector spec YAML, preset name, or checkpoint (.safetensors)")
    f.add_argument(
        "--size",
        type=resolution,
        help="input LONGxSHORT, e.g. 1333x800 (default: the spec's size)",
    )
    f.add_argument(
        "--num-classes", type=int, default=None, help="classes incl. background (default 81)"
    )
    f.set_defaults(func=cmd_flops)


def cmd_flops(args: argparse.Namespace) -> int:
    """``jdsearch flops``: print the FLOPs report of a checkpoint, or of a spec counted on the meta
    device; returns 0."""
    from jdsearch.core.resolution import Resolution
    from jdsearch.models.flops import count_flops, count_spec_flops, format_report
    from jdsearch.spec.detector import load_spec
    from jdsearch.store.checkpoint import load_checkpoint

    if _model_file(args.spec, export=False).suffix == ".safetensors":
        detector = load_checkpoint(args.spec).detector
        spec = detector.spec
        size = Resolution.parse(args.size) if args.size else spec.input.size
        report = count_flops(detector, size=size.hw)
    else:  # a spec: counted on the meta device, no weights allocated
        spec = load_spec(args.spec)
        size = Resolution.parse(args.size) if args.size else spec.input.size
        report = count_spec_flops(spec, size=size.hw, num_classes=args.num_classes)
    encoding = spec.arch.encode()
    print(f"{spec.name}: {encoding if len(encoding) <= 90 else encoding[:87] + '...'}")
    print(format_report(report))
    return 0


def add_latency(sub: Any, name: str) -> None:
    la = sub.add_parser(
        name, help="batch-1 images/s of detectors (export folders, checkpoints or specs)"
    )
    la.add_argument(
        "targets",
        nargs="+",
        help="export folder, checkpoint .safetensors, spec YAML or preset; the first is the baseline",
    )
    la.add_argument(
        "--size",
        type=height_width,
        help="input image HEIGHTxWIDTH, e.g. 800x1333 (default: each detector's input size, landscape)",
    )
    la.add_argument("--device", default="cpu", help="cpu or cuda")
    la.add_argument("--repeats", type=int_range(1), default=30)
    la.add_argument("--warmup", type=int_range(0), default=5)
    la.add_argument(
        "--images", nargs="+", help="real images to time on (default: a fixed noise image)"
    )
    la.add_argument("--max-images", type=int_range(1), default=8)
    la.add_argument("--amp", action="store_true", help="float16 autocast (CUDA)")
    la.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="for a spec: classes incl. background (default 81)",
    )
    la.set_defaults(func=cmd_latency)


def cmd_latency(args: argparse.Namespace) -> int:
    """``jdsearch latency``: time each target at batch 1 and print its images/s and GFLOPs, with a
    speed-up table against the first when there are several; returns 0."""
    from jdsearch.data.coco import load_image
    from jdsearch.engine.latency import measure_latencies
    from jdsearch.models.flops import count_flops

    images = (
        [load_image(f) for f in image_files(args.images)[: args.max_images]]
        if args.images
        else None
    )
    image_hw = args.size
    targets = [_latency_target(t, args.num_classes) for t in args.targets]
    lats = measure_latencies(
        [(det, size) for _, det, size in targets],
        device=args.device,
        warmup=args.warmup,
        repeats=args.repeats,
        images=images,
        image_hw=image_hw,
        amp=args.amp,
    )
    rows = []
    for (label, det, _), lat in zip(targets, lats, strict=True):
        h, w = (int(v) for v in lat.image.split("x"))
        flops = count_flops(det, size=(h, w)).total
        rows.append((label, lat, flops))
        print(f"{label}: {lat.describe()}; {flops / 1e9:.3f} GFLOPs")
    if len(rows) > 1:
        base = rows[0]
        width = max(len(r[0]) for r in rows)
        print(
            f"\n{'detector':<{width}}  {'image HxW':>10}  {'GFLOPs':>8}  {'FPS':>8}  {'speed-up':>8}"
        )
        for label, lat, flops in rows:
            print(
                f"{label:<{width}}  {lat.image:>10}  {flops / 1e9:8.3f}  {lat.images_per_s:8.1f}  "
                f"{lat.images_per_s / base[1].images_per_s:7.2f}×"
            )
        print(f"(timed interleaved: one call of each detector in turn, {lats[0].repeats} rounds)")
    return 0


def _latency_target(target: str, num_classes: int | None) -> tuple[str, Any, Any]:
    """(label, detector on the CPU, default size) of an export folder, a checkpoint, or a
    spec/preset; :func:`jdsearch.engine.latency.measure_latencies` moves it to the device."""
    p = _model_file(target, export=True)
    if p.is_dir() or p.name == "detector.json":
        from jdsearch.store.export import load_exported

        e = load_exported(p)
        return e.info.get("name", p.name) + f" ({p})", e.detector, e.input_size
    if p.suffix == ".safetensors":
        from jdsearch.store.checkpoint import load_checkpoint

        ck = load_checkpoint(p)
        return f"{ck.spec.name} ({p})", ck.detector, ck.spec.input.size
    from jdsearch.models import build_detector
    from jdsearch.spec.detector import load_spec

    spec = load_spec(target)
    n = num_classes if num_classes is not None else (spec.num_classes or 81)
    det = build_detector(spec, n)  # random weights: timing only
    return spec.name, det, spec.input.size
