"""Helpers of ``bench/gpu_check.sh``: the device line, the cut-down quickstart study, its summary,
the 2-process DDP check and the final table. Not meant to be run by hand, though each part can be:

    python bench/gpu_check.py device --json device.json [--dry-run]
    python bench/gpu_check.py study --out DIR [--dry-run]            # prints the spec's path
    python bench/gpu_check.py study-summary --spec SPEC --json quickstart.json
    python -m torch.distributed.run --standalone --nproc_per_node=2 bench/gpu_check.py ddp \\
        --device cuda --preset r18-fpn --size 1333x800 --json ddp.json
    python bench/gpu_check.py table --out DIR                         # after the steps ran

Every step of the shell script leaves ``DIR/<step>.log`` and, where it measured something, a JSON
file there; ``DIR/steps.tsv`` holds one line per step (name, exit status, start, end, what).
``table`` turns them into the one table the script ends with, and exits 1 when a step failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Exit statuses of a step (bench/gpu_check.sh): the script skipped it, or ``timeout`` killed it.
SKIPPED, TIMED_OUT = 125, 124


# ---------------------------------------------------------------------- device
def device(args: argparse.Namespace) -> int:
    """Print what torch sees (device names, torch / CUDA / cuDNN versions); write it as JSON.
    Exit 1 when a real run finds no CUDA device."""
    import platform

    import torch

    cuda = torch.cuda.is_available()
    names = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    )
    info: dict[str, Any] = {
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpus": names,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info["capability"] = f"{props.major}.{props.minor}"
        info["memory_gib"] = props.total_memory / 2**30
    print(f"torch {info['torch']}, built for CUDA {info['cuda']}, cuDNN {info['cudnn']}")
    for i, name in enumerate(names):
        print(f"cuda:{i}: {name}")
    print(f"CPU: {info['cpu']}, {info['cpu_count']} cores, torch uses {info['threads']} threads")
    if args.dry_run:
        print("dry run: every step runs on the CPU at toy sizes, in float32")
    ok = args.dry_run or cuda
    info["figures"] = _device_figures(info)
    info["ok"] = ok
    Path(args.json).write_text(json.dumps(info, indent=1))
    if not ok:
        print("no CUDA device: torch.cuda.is_available() is False (use --dry-run on a CPU)")
    return 0 if ok else 1


def _device_figures(info: dict[str, Any]) -> list[str]:
    versions = f"torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}"
    if info["dry_run"]:
        return [f"CPU {info['cpu']} ({info['cpu_count']} cores), dry run", versions]
    if not info["gpus"]:
        return ["no CUDA device", versions]
    gpus = f"{len(info['gpus'])}× {info['gpus'][0]} ({info['memory_gib']:.0f} GiB, sm {info['capability']})"
    return [gpus, versions]


# ---------------------------------------------------------------------- quickstart study
def study_dict(out: Path, dry_run: bool) -> dict[str, Any]:
    """``studies/quickstart.yaml`` cut down: on CUDA with AMP at a few minutes' size, or on the CPU
    at seconds' size (``dry_run``, float32). Data, caches and storage all live under ``out``."""
    import yaml

    from jdsearch.testing import Shrink, quickstart_path, shrunk_quickstart

    name = "gpu-check-dry" if dry_run else "gpu-check"
    storage = f"sqlite:///{out / 'study.db'}"
    if dry_run:  # the test suite's sizes, but 5 warm-up iterations for the base
        dry = Shrink(base_warmup_iters=5)
        spec = shrunk_quickstart(name, out / "data", dry, storage=storage, n_trials=3)
        spec["device"], spec["amp"] = "cpu", False
    else:
        spec = yaml.safe_load(quickstart_path().read_text())
        spec["name"] = name
        spec["search"]["storage"] = storage
        spec["data"] = {"dir": str(out / "data"), "synth": {"images": 400, "seed": 0, "size": 128}}
        spec["data"]["max_val_images"] = 50
        # Its own 400 images, not the shipped base's data: the check trains (and times) a base.
        spec["base"].pop("checkpoint", None)
        spec["pool"].pop("checkpoint", None)  # the shipped pool: trained on the shipped base
        spec["base"]["train"].update({"epochs": 3, "warmup_iters": 20})
        phase_epochs = [1.0, 0.5, 0.5]
        spec["fast_eval"].update({"epochs": 0.5})
        spec["search"].update({"n_trials": 4, "freeze_student": 2})
        spec["device"], spec["amp"] = "cuda", True
        for phase, epochs in zip(spec["pool"]["phases"], phase_epochs, strict=True):
            phase["epochs"] = epochs
    # The study-level `amp` covers the base and the trials; the pool's training has its own.
    spec["pool"].setdefault("train", {})["amp"] = spec["amp"]
    # The check distils with the teacher under AMP: a pool of minutes would fail the teacher check.
    spec["kd"]["when"] = "always"
    return spec


def study(args: argparse.Namespace) -> int:
    """Write the cut-down quickstart spec under ``--out``; print its path."""
    import yaml

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "study.yaml"
    path.write_text(yaml.safe_dump(study_dict(out, args.dry_run), sort_keys=False))
    print(path)
    return 0


def study_summary(args: argparse.Namespace) -> int:
    """Trials completed, base vs best H and AP of the study ``--spec`` ran; as JSON."""
    import optuna

    from jdsearch.search.queries import best_of, completed_trials, root_of
    from jdsearch.search.summary import summary_cells
    from jdsearch.spec.study import load_study

    spec = load_study(args.spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name=spec.name, storage=spec.storage_url).get_trials()
    done = completed_trials(trials)
    root, best = root_of(trials), best_of(trials)
    want = spec.search.n_trials
    figures = [f"{len(done)}/{want} trials complete on {spec.device}{' AMP' if spec.amp else ''}"]
    ok = len(done) == want and root is not None and best is not None
    if root is not None and best is not None:
        b, t = summary_cells(root), summary_cells(best)
        figures.append(
            f"base H {b['H']} AP {b['AP']} -> best H {t['H']} AP {t['AP']} (#{best.number})"
        )
        ok = ok and all(math.isfinite(float(x.value)) for x in done)  # type: ignore[arg-type]
    train_s = [x.user_attrs.get("train_s") for x in done if x.user_attrs.get("train_s")]
    if train_s:
        figures.append(f"trial training {sum(train_s) / len(train_s):.1f} s on average")
    Path(args.json).write_text(json.dumps({"figures": figures, "ok": ok}, indent=1))
    print("\n".join(figures))
    return 0 if ok else 1


# ---------------------------------------------------------------------- DDP
def ddp(args: argparse.Namespace) -> int:
    """One rank of a torchrun job: jdsearch's own data-parallel training (:func:`jdsearch.engine.train.
    train` under torchrun: DistributedDataParallel, batch norm over the global batch), each rank
    on its share of every batch; afterwards the weights must be identical on every rank (the
    gradients were averaged, the BN statistics synchronized) and differ from the initial ones."""
    import torch
    import torch.distributed as dist
    from train_throughput import RandomBoxes  # bench/ is this script's directory

    from jdsearch.core.resolution import Resolution
    from jdsearch.engine import distributed
    from jdsearch.engine.train import train
    from jdsearch.models.detector import build_detector
    from jdsearch.spec.detector import load_spec
    from jdsearch.spec.settings import TrainConfig

    cuda = args.device == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    distributed.init_from_env(args.device)
    rank, world = distributed.rank(), distributed.world_size()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    size = Resolution.parse(args.size)
    det = build_detector(load_spec(args.preset), 6, seed=0)
    start = [p.detach().clone().to(dev) for p in det.parameters()]
    steps = args.warmup + args.iters
    data = RandomBoxes(args.batch * world * steps, size.short, size.long, seed=1)
    amp = args.amp and cuda
    config = TrainConfig(
        max_iters=steps, batch_size=args.batch, lr=0.005, warmup_iters=0, device=args.device,
        resolutions=(size,), amp=amp, seed=0, hflip=0.0,
    )  # fmt: skip
    marks: dict[int, float] = {0: 0.0}
    losses: list[float] = []

    def mark(info: Any) -> None:
        if cuda:
            torch.cuda.synchronize(dev)
        marks[info.iteration] = info.seconds
        losses.append(info.loss)

    train(det, data, config, callback=mark)
    seconds = marks[steps] - marks[args.warmup]
    flat = torch.cat(
        [t.detach().flatten() for t in det.state_dict().values() if t.is_floating_point()]
    )
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    moved = max(
        float((p.detach() - s).abs().max()) for p, s in zip(det.parameters(), start, strict=True)
    )
    if rank == 0:
        img_s = world * args.batch * args.iters / seconds
        finite = all(math.isfinite(x) for x in losses)
        ok = finite and float(diff) == 0.0 and moved > 0
        where = (
            f"{world}× {torch.cuda.get_device_name(dev)}"
            if cuda
            else f"{world} CPU processes (gloo)"
        )
        figures = [
            f"{where}: {args.preset} {size} batch {args.batch}/rank{' AMP' if amp else ''}: {img_s:.2f} img/s",
            f"weights and BN statistics equal on all ranks (max |diff| {float(diff):.0e}, moved {moved:.0e})",
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps",
        ]
        doc = {
            "figures": figures,
            "ok": ok,
            "img_s": img_s,
            "world": world,
            "max_diff": float(diff),
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))
        print("\n".join(figures))
    distributed.shutdown()
    return 0


# ---------------------------------------------------------------------- the table
def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _finite(*values: Any) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def _figures_of(doc: Any) -> tuple[list[str], str | None]:
    """A step that wrote ``{"figures": [...], "ok": bool}`` itself."""
    if doc is None:
        return [], "wrote no result"
    return list(doc["figures"]), None if doc["ok"] else "its check failed"


def _cuda_tests(out: Path, dry_run: bool) -> tuple[list[str], str | None]:
    xml = out / "cuda_tests.xml"
    if not xml.is_file():
        return [], "pytest wrote no report"
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert suite is not None
    n, failed = (
        int(suite.get("tests", 0)),
        int(suite.get("failures", 0)) + int(suite.get("errors", 0)),
    )
    skipped = int(suite.get("skipped", 0))
    line = f"{n - failed - skipped} passed, {failed} failed, {skipped} skipped of {n}"
    if n == 0:
        return [line], "no test marked cuda was collected"
    if failed:
        return [line], "a test failed"
    if skipped and not dry_run:
        return [line], "a cuda test skipped on a CUDA machine"
    return [line + (" (no GPU: skipped, as they should)" if dry_run else "")], None


def _throughput(out: Path, dry_run: bool) -> tuple[list[str], str | None]:
    doc = _load(out / "throughput.json")
    if doc is None:
        return [], "wrote no result"
    lines, bad = [f"{doc['size']}, batch {doc['batch_size']}, {doc['iters']} timed iters"], None
    by_preset: dict[str, dict[bool, dict[str, Any]]] = {}
    for r in doc["rows"]:
        by_preset.setdefault(r["preset"], {})[r["amp"]] = r
        if not _finite(r["img_s"], r["loss"]):
            bad = f"{r['preset']}: non-finite figures"
    for preset, rows in by_preset.items():
        cells = []
        for amp, r in sorted(rows.items()):
            mem = "" if r["peak_mib"] is None else f", {r['peak_mib'] / 1024:.1f} GiB peak"
            cells.append(f"{'AMP' if amp else 'fp32'} {r['img_s']:.1f} img/s{mem}")
        if True in rows and False in rows:
            cells.append(f"AMP {rows[True]['img_s'] / rows[False]['img_s']:.2f}× fp32")
        elif not dry_run:
            bad = f"{preset}: no AMP figure"
        lines.append(f"{preset}: " + "; ".join(cells))
    return lines, bad


def _kd(out: Path, dry_run: bool) -> tuple[list[str], str | None]:
    doc = _load(out / "kd_overhead.json")
    if doc is None:
        return [], "wrote no result"
    lines, bad = [], None
    for r in doc["rows"]:
        lines.append(
            f"{r['student']} <- {r['teacher']} {r['size']}: {r['ratio']:.2f}× "
            f"({r['plain_ms']:.0f} -> {r['kd_ms']:.0f} ms, teacher fwd {r['teacher_ms']:.0f})"
        )
        if not _finite(r["ratio"], r["plain_ms"], r["kd_ms"]):
            bad = "non-finite figures"
    return lines, bad


def _latency(out: Path, dry_run: bool) -> tuple[list[str], str | None]:
    doc = _load(out / "latency.json")
    if doc is None:
        return [], "wrote no result"
    lines, bad = [], None
    for r in doc["rows"]:
        paper = r["paper_v100_speedup"]
        paper_s = "n/a (not recorded)" if paper is None else f"{paper:.2f}×"
        lines.append(f"{r['base']} {r['sizes'][0]} -> {r['upgraded']} {r['sizes'][1]}:")
        lines.append(
            f"  FPS {r['fps'][0]:.1f} -> {r['fps'][1]:.1f} = {r['speedup']:.2f}× "
            f"(FLOPs {r['flops_ratio']:.2f}×); paper V100 {paper_s}"
        )
        if not _finite(*r["fps"]):
            bad = "non-finite figures"
    return lines, bad


def _ddp(out: Path, dry_run: bool) -> tuple[list[str], str | None]:
    figures, bad = _figures_of(_load(out / "ddp.json"))
    doc, tp = _load(out / "ddp.json"), _load(out / "throughput.json")
    if doc and tp and bad is None:  # scaling against one device's fp32 figure, when comparable
        ddp_line = figures[0]
        one = [
            r for r in tp["rows"] if not r["amp"] and f" {r['preset']} {tp['size']} " in ddp_line
        ]
        if one and f"batch {tp['batch_size']}/rank:" in ddp_line:
            figures.append(
                f"{doc['img_s'] / one[0]['img_s']:.2f}× one device's fp32 img/s (ideal 2×)"
            )
    return figures, bad


#: How ``table`` reads each step's result: its figures, and why it failed (``None``: it passed).
READERS: dict[str, Callable[[Path, bool], tuple[list[str], str | None]]] = {
    "device": lambda out, dry: _figures_of(_load(out / "device.json")),
    "cuda-tests": _cuda_tests,
    "quickstart": lambda out, dry: _figures_of(_load(out / "quickstart.json")),
    "throughput": _throughput,
    "kd-overhead": _kd,
    "latency": _latency,
    "ddp": _ddp,
}


def _row(out: Path, fields: list[str], dry_run: bool) -> tuple[str, str, list[str], str, float]:
    name, rc, t0, t1, what = (
        fields[0],
        int(fields[1]),
        float(fields[2]),
        float(fields[3]),
        fields[4],
    )
    seconds = t1 - t0
    if rc == SKIPPED:  # skipped on purpose, or not run for lack of time: that fails the check
        why = out / f"{name}.skip"
        reason = why.read_text().strip() if why.is_file() else ""
        return name, what, [reason], "FAIL" if reason.startswith("time limit") else "skip", seconds
    try:
        figures, bad = READERS[name](out, dry_run)
    except Exception as e:  # a half-written result: say so in the table, not as a traceback
        figures, bad = [], f"unreadable result ({type(e).__name__}: {e})"
    if rc == TIMED_OUT:
        bad = "timed out"
    elif rc != 0:
        bad = f"exit status {rc}" + (f"; {bad}" if bad else "")
    if bad:
        figures.append(f"FAILED: {bad} (log: {out / (name + '.log')})")
    return name, what, figures or ["-"], "FAIL" if bad else "pass", seconds


def table(args: argparse.Namespace) -> int:
    """The one table: step, what was measured, figures, pass/fail/skip, seconds."""
    out = Path(args.out)
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines() if line]
    rows = [_row(out, fields, args.dry_run) for fields in steps]
    w_name = max(len("step"), *(len(r[0]) for r in rows))
    w_what = max(len("measured"), *(len(r[1]) for r in rows))
    w_fig = max(len("figures"), *(len(f) for r in rows for f in r[2]))
    head = (
        f"{'step':<{w_name}}  {'measured':<{w_what}}  {'figures':<{w_fig}}  {'result':<6}  {'s':>6}"
    )
    rule = "-" * len(head)
    print(rule)
    print(head)
    print(rule)
    for name, what, figures, result, seconds in rows:
        print(
            f"{name:<{w_name}}  {what:<{w_what}}  {figures[0]:<{w_fig}}  {result:<6}  {seconds:6.1f}"
        )
        for more in figures[1:]:
            print(f"{'':<{w_name}}  {'':<{w_what}}  {more}")
    print(rule)
    failed = [r[0] for r in rows if r[3] == "FAIL"]
    total = float(steps[-1][3]) - float(steps[0][2]) if steps else 0.0  # wall, first to last
    mode = "dry run (CPU, toy sizes)" if args.dry_run else "CUDA"
    verdict = f"FAILED: {', '.join(failed)}" if failed else "all steps passed or skipped"
    print(f"{mode}: {len(rows)} steps in {total:.0f} s; {verdict}")
    return 1 if failed else 0


# ---------------------------------------------------------------------- command line
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("device")
    d.add_argument("--json", required=True)
    d.add_argument("--dry-run", action="store_true")
    s = sub.add_parser("study")
    s.add_argument("--out", required=True)
    s.add_argument("--dry-run", action="store_true")
    q = sub.add_parser("study-summary")
    q.add_argument("--spec", required=True)
    q.add_argument("--json", required=True)
    r = sub.add_parser("ddp")
    r.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    r.add_argument("--preset", default="r18-fpn")
    r.add_argument("--size", default="1333x800")
    r.add_argument("--batch", type=int, default=2, help="images per rank")
    r.add_argument("--iters", type=int, default=10)
    r.add_argument("--warmup", type=int, default=3)
    r.add_argument("--amp", action="store_true")
    r.add_argument("--json", required=True)
    t = sub.add_parser("table")
    t.add_argument("--out", required=True)
    t.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    commands = {
        "device": device,
        "study": study,
        "study-summary": study_summary,
        "ddp": ddp,
        "table": table,
    }
    if args.command != "table":
        return commands[args.command](args)
    try:
        return table(args)
    except Exception:  # the shell script then prints the raw record instead
        import traceback

        traceback.print_exc()
        return 3


if __name__ == "__main__":
    sys.exit(main())
