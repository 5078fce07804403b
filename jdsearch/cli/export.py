"""``jdsearch export`` and ``jdsearch predict``: write a study's student (the best, a chosen one,
the front; jdsearch or detectron2 files) and run an exported detector on images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from jdsearch.cli.common import (
    check_output,
    heldout,
    image_files,
    int_range,
    positive_float,
    probability,
    resolution,
    storage_url,
    study_options,
    write_output,
)
from jdsearch.core.errors import JDSearchError


def add_export(sub: Any, name: str) -> None:
    x = sub.add_parser(
        name, help="write a study's best (or chosen) student as a self-contained detector"
    )
    study_options(x, "trial to export")
    x.add_argument(
        "--out", required=True, help="export folder (detector.json, model.safetensors, model.onnx)"
    )
    x.add_argument(
        "--size",
        type=resolution,
        help="input size LONGxSHORT (default: the trial's best resolution)",
    )
    x.add_argument("--no-onnx", action="store_true", help="skip the ONNX graph and its check")
    x.add_argument(
        "--format",
        choices=("jdsearch", "detectron2"),
        default="jdsearch",
        help="jdsearch: the export folder; detectron2: config.yaml, model_final.pth and "
        "jdsearch_backbone.py (checked in detectron2 when it is installed)",
    )
    x.add_argument(
        "--front",
        action="store_true",
        help="every non-dominated trial (AP vs cost) into OUT/trial-N, and OUT/front.json",
    )
    x.add_argument(
        "--max-latency-ms",
        type=positive_float,
        metavar="X",
        help="the most accurate trial whose batch-1 latency, measured here on --device, is ≤ X ms",
    )
    x.add_argument(
        "--max-flops",
        type=positive_float,
        metavar="G",
        help="the most accurate trial of at most G GFLOPs at its best resolution",
    )
    x.add_argument("--device", default="cpu", help="where latency and FPS are measured")
    x.add_argument("--repeats", type=int_range(1), default=10, help="timed runs per detector")
    x.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """``jdsearch export``: export a trial of a study (default: the best) as a self-contained
    detector folder and print what it holds; returns 0."""
    from jdsearch.search.export import export_trial
    from jdsearch.search.queries import open_study

    handle = open_study(storage_url(args), args.study)
    if args.format == "detectron2":
        return _export_detectron2(args, handle)
    if args.front:
        return _export_front(args, handle)
    exported = export_trial(
        handle,
        args.out,
        trial=_chosen_trial(args, handle),
        input_size=args.size,
        onnx=not args.no_onnx,
        heldout=heldout(handle),
    )
    info = exported.info
    src = info["source"]
    print(
        f"exported trial {src['trial']} of study {src['study']!r} (H {src['H']:.4f}) to {exported.path}"
    )
    print(f"  arch        {info['arch']}")
    print(
        f"  input size  {info['input_size']}   GFLOPs {info['flops'] / 1e9:.3f}   params {info['params'] / 1e6:.3f} M"
    )
    print(f"  classes     {', '.join(info['class_names'])}")
    print("  lineage     " + " -> ".join(f"{s['move']} (#{s['trial']})" for s in src["lineage"]))
    held = src.get("heldout")
    if held is not None:
        chosen, judged = (src.get("metrics") or {}).get("AP"), held["metrics"]["AP"]
        print(
            f"  AP          {_pct(chosen)} on the selection split; {_pct(judged)} on the "
            f"held-out split ({held['images']} images the search never saw)"
        )
    check = info["onnx_check"]
    if check is not None:
        print(
            f"  ONNX        {info['files']['onnx']['path']}: onnxruntime {check['onnxruntime']} matches PyTorch on "
            f"{check['images']} images ({check['detections']} detections; boxes within {check['max_box_diff']:.2g} px, "
            f"scores within {check['max_score_diff']:.2g})"
        )
    return 0


def _export_detectron2(args: argparse.Namespace, handle: Any) -> int:
    """``jdsearch export --format detectron2``: the trial's student as detectron2 files, checked
    in detectron2 when it is installed; returns 0."""
    from jdsearch.search.record import TrialRecord
    from jdsearch.store.detectron2_export import export_detectron2
    from jdsearch.store.export import foreground_names

    if args.front:
        raise JDSearchError("export: --format detectron2 writes one trial, not --front")
    t = handle.trial(_chosen_trial(args, handle))
    ckpt = handle.checkpoint(t)
    size = args.size or TrialRecord.from_trial(t).best_resolution
    names = foreground_names(ckpt.class_names, ckpt.num_classes)
    done = export_detectron2(ckpt.detector, args.out, class_names=names, input_size=size)
    print(f"exported trial {t.number} of study {handle.study.study_name!r} to {done.path}")
    print(f"  files       {', '.join(done.files)} (detectron2)")
    print(f"  arch        {ckpt.detector.arch.encode()}")
    print(f"  input size  {done.input_size} (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST), BGR 0-255")
    c = done.check
    if c is None:
        print(f"  check       not run: {done.unchecked}")
    else:
        print(
            f"  check       detectron2's build_model agrees on {c.detections} detections of "
            f"{c.images} images (boxes within {c.max_box_diff:.2g} px, scores within "
            f"{c.max_score_diff:.2g})"
        )
    return 0


def _chosen_trial(args: argparse.Namespace, handle: Any) -> int | None:
    """``--trial``, or the most accurate trial within ``--max-latency-ms`` / ``--max-flops``."""
    if args.max_latency_ms is None and args.max_flops is None:
        return args.trial
    if args.trial is not None:
        raise JDSearchError("export: --trial or --max-latency-ms/--max-flops, not both")
    from jdsearch.search.front import choose_trial

    choice = choose_trial(
        handle,
        max_latency_ms=args.max_latency_ms,
        max_gflops=args.max_flops,
        device=args.device,
        repeats=args.repeats,
    )
    print(choice.describe())
    return choice.trial


def _export_front(args: argparse.Namespace, handle: Any) -> int:
    """``jdsearch export --front``: every non-dominated trial, and ``front.json``."""
    from jdsearch.search.front import export_front

    if args.trial is not None or args.size or args.max_latency_ms or args.max_flops:
        raise JDSearchError("export --front exports every front trial at its best resolution")
    front = export_front(
        handle,
        args.out,
        device=args.device,
        repeats=args.repeats,
        onnx=not args.no_onnx,
        heldout=heldout(handle),
    )
    doc = front.doc
    n, cost = len(doc["front"]), doc["score"]["cost"]
    print(f"{n} non-dominated trials (AP, {cost} cost) -> {front.path}")
    print(f"{'trial':>6} {'AP':>6} {'cost':>7} {'GFLOPs':>8} {'FPS':>8}  folder")
    rows = [*doc["front"], *([{**doc["base"], "folder": "(base)"}] if doc["base"] else [])]
    for e in rows:
        cost = "-" if e["cost"] is None else f"{e['cost']:.3f}"
        print(
            f"{e['trial']:>6} {_pct(e['AP']):>6} {cost:>7} {e['GFLOPs']:>8.3f} "
            f"{e['FPS']:>8.1f}  {e['folder']}"
        )
    print(f"FPS: batch 1 on {doc['fps']['device']}")
    return 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def add_predict(sub: Any, name: str) -> None:
    pr = sub.add_parser(name, help="COCO-style detections of an exported detector on images")
    pr.add_argument("detector", help="export folder")
    pr.add_argument("images", nargs="+", help="image files or folders")
    pr.add_argument(
        "--out", required=True, help="detections JSON (COCO results format + file_name)"
    )
    pr.add_argument("--ann", help="COCO annotation file: use its image ids and print AP")
    pr.add_argument(
        "--score-thresh", type=probability, default=None, help="drop detections below this score"
    )
    pr.add_argument("--size", type=resolution, help="override the export's input size LONGxSHORT")
    pr.add_argument("--device", default="cpu")
    pr.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    """``jdsearch predict``: write an exported detector's detections on images as JSON; with
    ``--ann``, only on the images it lists, and print their AP. Returns 0; :class:`JDSearchError`
    when ``--ann`` lists none of them."""
    from jdsearch.data.coco import set_resolution
    from jdsearch.store.export import load_exported, predict_images

    check_output("--out", args.out)  # before any image is read
    exported = load_exported(args.detector, device=args.device)
    if args.size:
        from jdsearch.core.resolution import Resolution

        set_resolution(exported.detector, Resolution.parse(args.size))
    files = image_files(args.images)
    image_ids = None
    gt = None
    if args.ann:
        from jdsearch.data.coco import CocoDataset

        gt = CocoDataset(args.ann, files[0].parent)
        _match_export(gt, exported)
        image_ids = {
            Path(gt.image_record(i).file_name).name: gt.image_record(i).id for i in range(len(gt))
        }
        listed = [f for f in files if f.name in image_ids]
        if not listed:
            raise JDSearchError(f"{args.ann}: none of the {len(files)} images is listed in it")
        if len(listed) < len(files):
            print(
                f"{len(files) - len(listed)} of {len(files)} images are not in {args.ann}: skipped"
            )
        files = listed
    rows = predict_images(
        exported, files, image_ids=image_ids, score_thresh=args.score_thresh, device=args.device
    )
    out = write_output("--out", args.out, json.dumps(rows))
    print(f"wrote {len(rows)} detections on {len(files)} images to {out}")
    if gt is not None:
        from jdsearch.engine.evaluate import coco_metrics

        ids = sorted({image_ids[f.name] for f in files if f.name in image_ids})
        m = coco_metrics(gt.coco_gt(), rows, ids)
        print(
            "  "
            + "  ".join(
                f"{k} {100 * getattr(m, k):.1f}"
                for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")
            )
        )
    return 0


def _match_export(dataset: Any, exported: Any) -> None:
    """Refuse an annotation file whose categories are not the export's (by id, or by name when
    the export's ids were only assumed), which would make its AP silently wrong."""
    from jdsearch.engine.evaluate import match_categories
    from jdsearch.store.export import ASSUMED_IDS

    assumed = exported.info.get("categories_source") == ASSUMED_IDS
    ids = None if assumed else exported.category_ids
    k = len(exported.class_names) + 1
    match_categories(dataset, k, exported.class_names, ids, source=str(exported.path))
