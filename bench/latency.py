"""Batch-1 inference speed, measured in one run, as ratios against a baseline.

Two tables:

1. **Table 4 structure** — each paper baseline at 1333×800 against the paper's upgraded detector
   of that backbone (``detectors/*-jdnas.yaml``, the appendix-B encodings) at its searched
   1080×720: FLOPs ratio and measured FPS ratio, the two timed interleaved. Weights are random
   (speed does not depend on them, except through the number of boxes surviving NMS; the same
   fixed image, resized to each input size, goes to both).
2. **ONNX Runtime vs PyTorch** — the exported inference graph (``jdsearch.store.export``) against
   eager PyTorch for the same detector and image.

    python bench/latency.py                            # r18 pair + ORT table, CPU, ~2 min
    python bench/latency.py --pairs r18 r50 r101 --device cuda --repeats 50
    python bench/latency.py --threads 2
    python bench/latency.py --pairs tiny --onnx --repeats 3 --json latency.json  # a CPU smoke run

CPU figures depend on the thread count (``--threads``; default 1, as the test suite uses).
``--json FILE`` also writes table 1's rows, each with the paper's V100 speed-up beside it where
``PAPER_V100_FPS`` records the paper's FPS of that pair (``bench/gpu_check.sh`` prints both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from jdsearch.core.resolution import Resolution
from jdsearch.engine.latency import measure_latencies, measure_latency
from jdsearch.models import build_detector
from jdsearch.models.flops import count_flops
from jdsearch.spec.detector import load_spec

PAIRS = {
    "r18": ("r18-fpn", "r18-fpn-jdnas", "1333x800", "1080x720"),
    "r50": ("r50-fpn", "r50-fpn-jdnas", "1333x800", "1080x720"),
    "r101": ("r101-fpn", "r101-fpn-jdnas", "1333x800", "1080x720"),
    # A CPU smoke pair, not the paper's: the tiny detector at its size and at a smaller rung of
    # its resolution ladder (what the dry run of bench/gpu_check.sh times).
    "tiny": ("tiny-r18-fpn", "tiny-r18-fpn", "208x128", "176x112"),
}

#: The paper's table-4 FPS (batch 1, one V100) of each pair's base and upgraded detector, as
#: ``(base, upgraded)`` (../shared/joint-detnas-paper.md, table 4; the table-6 † marks say the
#: paper measured them on its own V100).
PAPER_V100_FPS: dict[str, tuple[float, float]] = {
    "r18": (28.2, 33.0),
    "r50": (20.5, 25.4),
    "r101": (15.9, 23.3),
}


def detector(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(load_spec(name), 81).eval()


def image(size: Resolution) -> torch.Tensor:
    h, w = size.hw
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))


def table4(pairs: list[str], device: str, warmup: int, repeats: int) -> list[dict[str, object]]:
    """Print table 1 (base vs upgraded) and return its rows, one per pair."""
    threads = torch.get_num_threads()
    print(
        f"\n== base vs upgraded, batch 1 on {device} ({threads} thread{'s' if threads != 1 else ''}), "
        f"median of {repeats} interleaved runs =="
    )
    print(
        f"{'detector':<16} {'size':>9} {'GFLOPs':>8} {'ms':>9} {'FPS':>7}   {'FLOPs ratio':>11} {'speed-up':>8}"
    )
    rows: list[dict[str, object]] = []
    for key in pairs:
        base_name, up_name, base_size, up_size = PAIRS[key]
        dets = [
            (detector(name), Resolution.parse(size))
            for name, size in ((base_name, base_size), (up_name, up_size))
        ]
        flops = [count_flops(d, size=r.hw).total for d, r in dets]
        lats = measure_latencies(
            dets, device=device, warmup=warmup, repeats=repeats, images=[image(dets[0][1])]
        )
        for name, size, f, lat in zip(
            (base_name, up_name), (base_size, up_size), flops, lats, strict=True
        ):
            print(
                f"{name:<16} {size:>9} {f / 1e9:8.2f} {lat.median_ms:9.1f} {lat.images_per_s:7.2f}   "
                f"{f / flops[0]:10.2f}× {lat.images_per_s / lats[0].images_per_s:7.2f}×"
            )
        paper = PAPER_V100_FPS.get(key)
        rows.append(
            {
                "pair": key,
                "base": base_name,
                "upgraded": up_name,
                "sizes": [base_size, up_size],
                "gflops": [f / 1e9 for f in flops],
                "median_ms": [lat.median_ms for lat in lats],
                "fps": [lat.images_per_s for lat in lats],
                "flops_ratio": flops[1] / flops[0],
                "speedup": lats[1].images_per_s / lats[0].images_per_s,
                "paper_v100_fps": None if paper is None else list(paper),
                "paper_v100_speedup": None if paper is None else paper[1] / paper[0],
            }
        )
        del dets
    return rows


def onnx_vs_torch(names: list[str], warmup: int, repeats: int) -> None:
    import onnxruntime as ort

    from jdsearch.store.onnx import export_onnx

    print(
        f"\n== ONNX Runtime {ort.__version__} vs eager PyTorch, CPU, batch 1, median of {repeats} =="
    )
    print(f"{'detector':<16} {'size':>9} {'torch ms':>9} {'ORT ms':>9} {'ORT speed-up':>12}")
    threads = torch.get_num_threads()
    for name in names:
        det = detector(name)
        res = load_spec(name).input.size
        x = image(res)
        lat = measure_latency(det, res, warmup=warmup, repeats=repeats, images=[x])
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(det, Path(tmp) / "m.onnx")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feed = {"image": x.numpy()}
            times = []
            for i in range(warmup + repeats):
                t = time.perf_counter()
                session.run(None, feed)
                if i >= warmup:
                    times.append((time.perf_counter() - t) * 1000)
        ort_ms = statistics.median(times)
        print(
            f"{name:<16} {res!s:>9} {lat.median_ms:9.1f} {ort_ms:9.1f} {lat.median_ms / ort_ms:11.2f}×"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", default=["r18"], choices=sorted(PAIRS))
    p.add_argument(
        "--onnx",
        nargs="*",
        default=["tiny-r18-fpn", "tiny-r50-fpn"],
        help="detectors for the ORT table",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", metavar="FILE", help="also write table 1's rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = table4(args.pairs, args.device, args.warmup, args.repeats)
    if args.json:
        dev = torch.device(args.device)
        doc = {
            "device": args.device,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "warmup": args.warmup,
            "repeats": args.repeats,
            "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.onnx:
        onnx_vs_torch(args.onnx, args.warmup, max(args.repeats, 20))
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
