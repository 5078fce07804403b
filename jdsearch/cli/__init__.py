"""The ``jdsearch`` command line: parse, call the modules, print. No logic lives here.

The app layer: it may import every jdsearch layer (``docs/architecture.md``), but only inside the
command handlers, so that ``jdsearch --help`` imports neither torch nor optuna; nothing below the
app layer imports it. ``python -m jdsearch`` and ``python -m jdsearch.cli`` run :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jdsearch.errors import JDSearchError, RanksOutOfStep
from jdsearch.threads import passive_openmp_threads, small_detector_threads, study_gflops

log = logging.getLogger("jdsearch")

DEFAULT_DATA = Path("runs/synth")
DEFAULT_SYNTH_IMAGES = 640
DEFAULT_SYNTH_SEED = 0


# ---------------------------------------------------------------------- helpers
def _sizes(texts: Sequence[str] | None) -> tuple[Any, ...] | None:
    from jdsearch.resolution import parse_resolutions

    return parse_resolutions(texts) if texts else None


def ensure_data(data: str | None) -> Path:
    """``--data DIR`` or, when absent, the embedded synthetic dataset (generated once)."""
    from jdsearch import synth

    if data is not None:
        return Path(data)
    return synth.ensure_dataset(DEFAULT_DATA, images=DEFAULT_SYNTH_IMAGES, seed=DEFAULT_SYNTH_SEED)


def open_split(data_dir: Path, split: str) -> Any:
    """The :class:`~jdsearch.data.CocoDataset` of ``DATA_DIR/SPLIT.json`` over the images in
    ``DATA_DIR/images``."""
    from jdsearch.data import CocoDataset

    return CocoDataset(data_dir / f"{split}.json", data_dir / "images")


def _print_metrics(metrics: dict[str, Any]) -> None:
    print(
        f"{'size':>10}  {'AP':>6} {'AP50':>6} {'AP75':>6} {'APs':>6} {'APm':>6} {'APl':>6}  {'img/s':>7}"
    )
    for size, m in metrics.items():
        vals = " ".join(f"{100 * v:6.1f}" for v in (m.AP, m.AP50, m.AP75, m.APs, m.APm, m.APl))
        print(f"{size:>10}  {vals}  {m.images_per_s:7.1f}")


def _describe(detector: Any, size: tuple[int, int]) -> str:
    from jdsearch.flops import count_flops

    report = count_flops(detector, size=size)
    return (
        f"arch: {detector.arch.encode()}\n"
        f"params: {report.params / 1e6:.3f} M   FLOPs at {size[1]}x{size[0]}: {report.total / 1e9:.3f} G"
        f" (backbone {report.backbone / 1e9:.3f} G)"
    )


# ---------------------------------------------------------------------- commands
def cmd_flops(args: argparse.Namespace) -> int:
    """``jdsearch flops``: print the FLOPs report of a checkpoint, or of a spec counted on the meta
    device; returns 0."""
    from jdsearch.flops import count_flops, count_spec_flops, format_report
    from jdsearch.resolution import Resolution
    from jdsearch.spec import load_spec
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


def cmd_data_synth(args: argparse.Namespace) -> int:
    """``jdsearch data synth``: write a synthetic COCO dataset and print what it holds; returns 0.
    Raises :class:`JDSearchError` unless ``--size`` has one or two values."""
    from jdsearch import synth

    if len(args.size) not in (1, 2):
        raise JDSearchError(f"--size: give one side or MIN MAX, got {args.size}")
    size = args.size[0] if len(args.size) == 1 else (args.size[0], args.size[1])
    info = synth.generate(args.out, images=args.images, seed=args.seed, size=size)
    print(f"wrote {info.images} images to {info.image_dir}")
    print(f"  {info.train_json}: {info.train_images} images, {info.train_annotations} objects")
    print(f"  {info.val_json}: {info.val_images} images, {info.val_annotations} objects")
    print(f"  classes: {', '.join(info.class_names)}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    """``jdsearch data check``: validate an annotation file and its images and print the summary;
    returns 0."""
    from jdsearch.data import validate

    summary = validate(args.ann, args.images)
    print("\n".join(summary.lines()))
    print("ok")
    return 0


def _train_target(args: argparse.Namespace, train_set: Any) -> tuple[Any, Any]:
    """The detector ``jdsearch train`` starts from (``--init`` checkpoint or spec) and its spec."""
    from jdsearch.models import build_detector
    from jdsearch.spec import load_spec
    from jdsearch.store.checkpoint import load_checkpoint

    if args.init:
        if args.backbone_weights:
            raise JDSearchError("--backbone-weights initialises a new detector; not with --init")
        init = load_checkpoint(args.init)
        _match_checkpoint(train_set, init)
        detector = init.detector
        spec = detector.spec
    else:
        spec = load_spec(args.spec)
        detector = build_detector(spec, train_set.num_classes, seed=args.seed)
        if args.backbone_weights:
            from jdsearch.models.torchvision_body import load_backbone_weights

            print(load_backbone_weights(detector, args.backbone_weights).line())
    classes = detector.roi_heads.box_predictor.cls_score.out_features
    if classes != train_set.num_classes:
        raise JDSearchError(
            f"{train_set.ann_file}: {train_set.num_classes - 1} categories but the detector has "
            f"{classes - 1} classes"
        )
    return detector, spec


def _match_checkpoint(dataset: Any, ckpt: Any) -> tuple[int, ...]:
    """The dataset's category id of each class of checkpoint ``ckpt``, matched by the ids and
    names it records; a :class:`~jdsearch.errors.DataError` line when they differ."""
    from jdsearch.evaluate import match_categories

    return match_categories(
        dataset, ckpt.num_classes, ckpt.foreground_names, ckpt.category_ids, source=ckpt.source
    )


def _train_terms(args: argparse.Namespace, detector: Any, train_set: Any) -> list[Any]:
    """BN sparsity (``--bn-sparsity``) and distillation (``--teacher``, whose classes must be the
    training set's) loss terms."""
    from jdsearch.store.checkpoint import load_checkpoint

    terms: list[Any] = []
    if args.bn_sparsity > 0:
        from jdsearch.morph.pruning import BNSparsity

        terms.append(BNSparsity(args.bn_sparsity))
    if args.teacher:
        from jdsearch.distill import make_distiller
        from jdsearch.settings import KDConfig

        teacher_ckpt = load_checkpoint(args.teacher, device=args.device)
        _match_checkpoint(train_set, teacher_ckpt)
        teacher = teacher_ckpt.detector
        terms.append(make_distiller(detector, teacher, KDConfig(), seed=args.seed))
        print(f"distilling from {args.teacher} ({teacher.arch.encode()[:60]}...)")
    return terms


def _val_split(data_dir: Path, train_set: Any) -> Any:
    """``val.json``, checked to hold the training set's categories (ids and names)."""
    from jdsearch.evaluate import match_categories

    val_set = open_split(data_dir, "val")
    match_categories(
        val_set,
        train_set.num_classes,
        train_set.class_names,
        train_set.category_ids,
        source=str(train_set.ann_file),
    )
    return val_set


def cmd_train(args: argparse.Namespace) -> int:
    """``jdsearch train``: train a detector (with BN sparsity and, given ``--teacher``,
    distillation), save it, then unless ``--no-eval`` evaluate it and save it again with the
    metrics; returns 0."""
    from jdsearch.evaluate import evaluate
    from jdsearch.flops import count_flops
    from jdsearch.settings import TrainConfig
    from jdsearch.store.checkpoint import save_checkpoint
    from jdsearch.train import train

    data_dir = ensure_data(args.data)
    train_set = open_split(data_dir, "train")
    val_set = None if args.no_eval else _val_split(data_dir, train_set)  # before training
    detector, spec = _train_target(args, train_set)
    resolutions = _sizes(args.resolutions) or spec.input.resolutions
    largest = max(resolutions, key=lambda r: r.pixels, default=spec.input.size)
    small_detector_threads(args.threads, count_flops(detector, size=largest.hw).total / 1e9)
    config = TrainConfig(
        epochs=args.epochs,
        max_iters=args.iters,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_iters=args.warmup,
        device=args.device,
        amp=args.amp,
        seed=args.seed,
        resolutions=() if args.fixed_size else tuple(resolutions),
        grad_clip=args.grad_clip,
        num_workers=args.workers,
    )
    terms = _train_terms(args, detector, train_set)
    print(f"training {spec.name} on {data_dir} ({len(train_set)} images), {config.epochs} epochs")
    result = train(detector, train_set, config, loss_terms=terms, progress=not args.quiet)
    losses = ", ".join(f"{k}={v:.3f}" for k, v in result.final_losses.items())
    print(
        f"trained {result.iterations} iterations in {result.seconds:.1f} s "
        f"({result.images_per_s:.1f} img/s); final losses: {losses}"
    )
    extra: dict[str, Any] = {"train": result.to_dict(), "data": str(data_dir)}
    if args.backbone_weights:
        extra["backbone_weights"] = str(args.backbone_weights)
    classes = {"class_names": train_set.class_names, "category_ids": train_set.category_ids}
    out = save_checkpoint(args.out, detector, extra=extra, **classes)  # before eval
    print(f"saved {out}")
    if val_set is not None:
        metrics = evaluate(
            detector, val_set, resolutions, device=args.device, category_ids=train_set.category_ids
        )
        _print_metrics(metrics)
        extra["eval"] = {k: v.to_dict() for k, v in metrics.items()}
        save_checkpoint(args.out, detector, extra=extra, **classes)
    print(_describe(detector, spec.input.size.hw))
    return 0


def _import_categories(args: argparse.Namespace) -> tuple[list[str] | None, list[int] | None]:
    """Class names from ``--classes`` (one a line) or ``--ann`` (COCO categories, in label
    order: label k is the k-th smallest category id), and with ``--ann`` the category ids."""
    if args.classes:
        try:
            lines = Path(args.classes).read_text().splitlines()
        except OSError as e:
            raise JDSearchError(f"{args.classes}: cannot read class names: {e.strerror}") from None
        return [line.strip() for line in lines if line.strip()], None
    if args.ann:  # only its categories are read
        from jdsearch.data import read_categories

        cats = read_categories(args.ann)
        return [c.name for c in cats], [c.id for c in cats]
    return None, None


def _import_file(args: argparse.Namespace, names: Any, ids: Any) -> Any:
    """The :class:`~jdsearch.models.torchvision_import.Imported` of ``import``'s sources."""
    from jdsearch.spec import load_spec

    arch = load_spec(args.arch) if args.arch else None
    want = 2 if args.source == "detectron2" else 1
    if len(args.src) != want:
        what = "CONFIG.yaml WEIGHTS" if want == 2 else "one torch.save file"
        raise JDSearchError(
            f"import --from {args.source}: expected {what}, got {len(args.src)} paths: "
            f"{' '.join(args.src)}"
        )
    if args.source == "torchvision":
        from jdsearch.models.torchvision_import import import_torchvision

        return import_torchvision(
            args.src[0], arch=arch, class_names=names, category_ids=ids, images=args.check_images
        )
    from jdsearch.models.detectron2_import import import_detectron2

    return import_detectron2(*args.src, arch=arch, class_names=names, images=args.check_images)


def cmd_import(args: argparse.Namespace) -> int:
    """``jdsearch import``: convert a torchvision Faster R-CNN file (or a detectron2 config and
    its weights) into a checkpoint, after both models gave the same detections on check images;
    returns 0."""
    from jdsearch.store.checkpoint import save_checkpoint

    names, ids = _import_categories(args)
    result = _import_file(args, names, ids)
    check = result.check
    print(
        f"{result.source} ({result.kind}): {result.spec.name}, "
        f"{result.spec.num_classes - 1} classes, input {result.spec.input.size}"
    )
    print(
        f"check: {check.detections} detections on {check.images} images agree "
        f"(largest box diff {check.max_box_diff:.2g}, score diff {check.max_score_diff:.2g})"
    )
    if result.kept_ids:
        print(
            f"outputs indexed by category id: kept ids {result.kept_ids[0]}..{result.kept_ids[-1]} "
            f"as classes 1..{len(result.kept_ids)}"
        )
    out = save_checkpoint(
        args.out,
        result.detector,
        class_names=names,
        extra={"import": result.record()},
        category_ids=result.kept_ids or None,
    )
    print(f"saved {out}")
    print(_describe(result.detector, result.spec.input.size.hw))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``jdsearch eval``: print (and with ``--json`` write) a checkpoint's COCO metrics at each
    size; returns 0."""
    from jdsearch.evaluate import evaluate
    from jdsearch.store.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint, device=args.device)
    dataset = open_split(ensure_data(args.data), args.split)
    ids = _match_checkpoint(dataset, ckpt)
    sizes = _sizes(args.sizes) or ckpt.spec.input.resolutions
    metrics = evaluate(
        ckpt.detector,
        dataset,
        sizes,
        device=args.device,
        batch_size=args.batch_size,
        category_ids=ids,
    )
    _print_metrics(metrics)
    if args.json:
        Path(args.json).write_text(
            json.dumps({k: v.to_dict() for k, v in metrics.items()}, indent=1)
        )
    return 0


def cmd_evolve(args: argparse.Namespace) -> int:
    """``jdsearch evolve``: apply one morph action to a checkpoint and save the child, with the
    action appended to its lineage; returns 0."""
    from jdsearch.morph.actions import MorphConfig, evolve_with_report
    from jdsearch.store.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    parent = ckpt.detector
    config = MorphConfig(channel_fraction=args.fraction)
    child, report = evolve_with_report(parent, args.action, config=config)
    size = ckpt.spec.input.size.hw
    print(f"parent {_describe(parent, size)}")
    print(
        f"action {args.action}: {report.inherited_params:,} parameters inherited, "
        f"{report.new_params:,} new, {report.dropped_params:,} dropped"
    )
    print(f"child  {_describe(child, size)}")
    extra = dict(ckpt.extra)
    extra["lineage"] = [*extra.get("lineage", []), args.action]
    out = save_checkpoint(
        args.out, child, class_names=ckpt.class_names, extra=extra, category_ids=ckpt.category_ids
    )
    print(f"saved {out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """``jdsearch search``: add trials to the study spec's search and print the study summary;
    returns 0 (a search in which none of this worker's trials completed raises instead)."""
    from jdsearch.search.run import run_search
    from jdsearch.search.summary import summary
    from jdsearch.study import load_study

    if args.n_trials is not None and args.n_trials < 1:
        raise JDSearchError(f"--n-trials must be ≥ 1, got {args.n_trials}")
    spec = load_study(args.study)
    small_detector_threads(args.threads, study_gflops(spec))
    if args.check:
        from jdsearch.search.check import check_study

        print("\n".join(check_study(spec, storage_url=args.storage).lines))
        print("ok: nothing was trained")
        return 0
    from jdsearch import distributed

    try:
        study = run_search(spec, args.storage, n_trials=args.n_trials, progress=not args.quiet)
        if distributed.is_main():  # under torchrun, rank 0 speaks for the worker
            print(summary(study))
    finally:
        if not distributed.out_of_step():  # else a collective may never return: just exit
            distributed.shutdown()
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """``jdsearch init``: write a commented study spec for a dataset and a base detector and
    print what it chose; returns 0."""
    from jdsearch.search.init_study import data_files, init_study

    name = args.name or Path(args.out).stem
    files = data_files(name, args.data, args.train, args.val, args.images)
    result = init_study(
        args.out, files, base=args.base, name=name, device=args.study_device, force=args.force
    )
    print("\n".join(result.lines))
    return 0


def cmd_pool_train(args: argparse.Namespace) -> int:
    """``jdsearch pool train``: train the study's elastic teacher pool and save it (default
    ``runs/NAME/pool.safetensors``); returns 0."""
    from jdsearch.pool import train_and_save_pool
    from jdsearch.search.run import ensure_data, run_dir
    from jdsearch.study import load_study

    spec = load_study(args.study)
    pool_spec = spec.pool
    train_set, _ = ensure_data(spec)
    out = Path(args.out) if args.out else run_dir(spec) / "pool.safetensors"
    pool = train_and_save_pool(
        pool_spec, train_set, out, device=spec.device, progress=not args.quiet
    )
    print(f"saved {out}: space {pool.space.describe()} ({pool.space.size()} sub-networks)")
    return 0


def _storage(args: argparse.Namespace) -> str:
    """``--storage`` or, with only ``--study``, the default ``sqlite:///runs/NAME.db``."""
    if args.storage:
        return str(args.storage)
    if args.study:
        return f"sqlite:///runs/{args.study}.db"
    raise JDSearchError("give --storage URL (and --study NAME when it holds several studies)")


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


def cmd_export(args: argparse.Namespace) -> int:
    """``jdsearch export``: export a trial of a study (default: the best) as a self-contained
    detector folder and print what it holds; returns 0."""
    from jdsearch.search.export import export_trial
    from jdsearch.search.queries import open_study

    handle = open_study(_storage(args), args.study)
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
        heldout=_heldout(handle),
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
        heldout=_heldout(handle),
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


def _image_files(items: Sequence[str]) -> list[Path]:
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in exts))
        elif p.is_file():
            files.append(p)
        else:
            raise JDSearchError(f"{p}: no such image file or folder")
    if not files:
        raise JDSearchError(f"no image files in {' '.join(items)}")
    return files


def _match_export(dataset: Any, exported: Any) -> None:
    """Refuse an annotation file whose categories are not the export's (by id, or by name when
    the export's ids were only assumed), which would make its AP silently wrong."""
    from jdsearch.evaluate import match_categories
    from jdsearch.store.export import ASSUMED_IDS

    assumed = exported.info.get("categories_source") == ASSUMED_IDS
    ids = None if assumed else exported.category_ids
    k = len(exported.class_names) + 1
    match_categories(dataset, k, exported.class_names, ids, source=str(exported.path))


def cmd_predict(args: argparse.Namespace) -> int:
    """``jdsearch predict``: write an exported detector's detections on images as JSON; with
    ``--ann``, only on the images it lists, and print their AP. Returns 0; :class:`JDSearchError`
    when ``--ann`` lists none of them."""
    from jdsearch.data import set_resolution
    from jdsearch.store.export import load_exported, predict_images

    exported = load_exported(args.detector, device=args.device)
    if args.size:
        from jdsearch.resolution import Resolution

        set_resolution(exported.detector, Resolution.parse(args.size))
    files = _image_files(args.images)
    image_ids = None
    gt = None
    if args.ann:
        from jdsearch.data import CocoDataset

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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows))
    print(f"wrote {len(rows)} detections on {len(files)} images to {out}")
    if gt is not None:
        from jdsearch.evaluate import coco_metrics

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


def _latency_target(target: str, num_classes: int | None) -> tuple[str, Any, Any]:
    """(label, detector on the CPU, default size) of an export folder, a checkpoint, or a
    spec/preset; :func:`jdsearch.latency.measure_latencies` moves it to the device."""
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
    from jdsearch.spec import load_spec

    spec = load_spec(target)
    det = build_detector(spec, num_classes or spec.num_classes or 81)  # random weights: timing only
    return spec.name, det, spec.input.size


def _hw(text: str) -> tuple[int, int]:
    """``HxW`` as (height, width), in that order."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if m is None or min(int(m[1]), int(m[2])) < 1:
        raise JDSearchError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 800x1333")
    return int(m[1]), int(m[2])


def cmd_latency(args: argparse.Namespace) -> int:
    """``jdsearch latency``: time each target at batch 1 and print its images/s and GFLOPs, with a
    speed-up table against the first when there are several; returns 0."""
    from jdsearch.data import load_image
    from jdsearch.flops import count_flops
    from jdsearch.latency import measure_latencies

    images = (
        [load_image(f) for f in _image_files(args.images)[: args.max_images]]
        if args.images
        else None
    )
    image_hw = _hw(args.size) if args.size else None
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


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _heldout(handle: Any) -> Any:
    """The study's held-out split, or ``None`` (with a line saying why) when there is none here."""
    from jdsearch.search.splits import heldout_split

    try:
        split = heldout_split(handle.spec)
    except JDSearchError as e:
        print(f"no held-out judgement: {e}")
        return None
    if split is None:
        print("no held-out judgement: the study sets neither data.test nor data.max_val_images")
    return split


def cmd_noise(args: argparse.Namespace) -> int:
    """``jdsearch noise``: re-run a trial (default: the best) with other training seeds, print
    and store the spread of its H and AP; returns 0."""
    from jdsearch.search.noise import measure_noise
    from jdsearch.search.queries import open_study
    from jdsearch.search.run import prepare

    url = _storage(args)
    handle = open_study(url, args.study)
    study, ctx = prepare(handle.spec, url, progress=False, stored=True)
    floor = measure_noise(study, ctx, args.trial, seeds=args.seeds)
    print(
        f"trial {floor.trial}: recorded H {floor.recorded_h:.4f}, AP {100 * floor.recorded_ap:.1f}"
    )
    for seed, h, ap in zip(floor.seeds, floor.h, floor.ap, strict=True):
        print(f"  seed {seed}: H {h:.4f}, AP {100 * ap:.1f}")
    print(floor.describe())
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """``jdsearch finetune``: train a trial's pair (default: the best) longer as a child trial of
    the study, print it beside its parent; returns 0."""
    from jdsearch.search.finetune import finetune
    from jdsearch.search.queries import open_study
    from jdsearch.search.record import TrialRecord
    from jdsearch.search.run import prepare
    from jdsearch.search.summary import summary_cells

    url = _storage(args)
    handle = open_study(url, args.study)
    study, ctx = prepare(handle.spec, url, progress=not args.quiet, stored=True)
    child = finetune(study, ctx, args.trial, epochs=args.epochs, lr=args.lr)
    parent = next(t for t in study.get_trials() if t.number == TrialRecord.from_trial(child).parent)
    before, after = summary_cells(parent), summary_cells(child)
    print(f"{'':<12}{f'trial {parent.number}':<20}fine-tuned (trial {child.number})")
    for key in before:
        print(f"{key:<12}{before[key]:<20}{after[key]}")
    print(f"export it: jdsearch export --study {study.study_name} --trial {child.number} --out DIR")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``jdsearch report``: write a study's HTML report and print its summary and the
    base-vs-upgraded table; returns 0."""
    from jdsearch.report.compare import compare_study
    from jdsearch.report.html import write_report
    from jdsearch.search.queries import open_study
    from jdsearch.search.summary import summary

    handle = open_study(_storage(args), args.study)
    comparison = compare_study(
        handle,
        args.trial,
        fps=not args.no_fps,
        device=args.device,
        repeats=args.repeats,
        heldout=_heldout(handle),
    )
    files = write_report(
        handle,
        args.out,
        trial=args.trial,
        comparison=comparison,
        png=not args.no_png,
        attach=not args.no_attach,
    )
    print(summary(handle.study))
    print()
    print(comparison.format())
    print()
    print(f"report: {files.html}")
    print(files.png_summary())
    return 0


# ---------------------------------------------------------------------- parser
def _study_options(p: argparse.ArgumentParser, trial_help: str) -> None:
    """--storage / --study / --trial of the commands that read a finished study."""
    p.add_argument("--storage", help="the study's storage URL (default sqlite:///runs/NAME.db)")
    p.add_argument("--study", help="study name (optional when the storage holds one study)")
    p.add_argument("--trial", type=int, default=None, help=f"{trial_help} (default: the best)")


def build_parser() -> argparse.ArgumentParser:
    """The ``jdsearch`` argument parser with every sub-command; each sets ``func`` to its
    ``cmd_*``."""
    p = argparse.ArgumentParser(
        prog="jdsearch",
        description="Upgrade a Faster R-CNN FPN detector with joint NAS, pruning and dynamic distillation.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is fastest for tiny detectors on a busy machine)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for add in (
        _add_flops,
        _add_data,
        _add_train,
        _add_import,
        _add_eval,
        _add_evolve,
        _add_init,
        _add_search,
        _add_pool,
        _add_export,
        _add_predict,
        _add_latency,
        _add_report,
        _add_noise,
        _add_finetune,
        _add_gc,
    ):
        add(sub)
    return p


def _add_flops(sub: Any) -> None:
    f = sub.add_parser("flops", help="count multiply-adds and parameters of a detector")
    f.add_argument("spec", help="detector spec YAML, preset name, or checkpoint (.safetensors)")
    f.add_argument("--size", help="input LONGxSHORT, e.g. 1333x800 (default: the spec's size)")
    f.add_argument(
        "--num-classes", type=int, default=None, help="classes incl. background (default 81)"
    )
    f.set_defaults(func=cmd_flops)


def _add_data(sub: Any) -> None:
    d = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    s = d.add_parser("synth", help="write a deterministic synthetic COCO dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--images", type=int, default=DEFAULT_SYNTH_IMAGES)
    s.add_argument("--seed", type=int, default=DEFAULT_SYNTH_SEED)
    s.add_argument("--size", type=int, nargs="+", default=[128], help="side, or MIN MAX")
    s.set_defaults(func=cmd_data_synth)
    c = d.add_parser("check", help="validate a COCO annotation file and its images")
    c.add_argument("--ann", required=True)
    c.add_argument("--images", required=True)
    c.set_defaults(func=cmd_data_check)


def _add_train(sub: Any) -> None:
    t = sub.add_parser("train", help="train a detector (plain, or distilled with --teacher)")
    t.add_argument("spec", nargs="?", default="tiny-r18-fpn", help="spec YAML or preset name")
    t.add_argument(
        "--data",
        help="dataset dir with images/, train.json, val.json (default: embedded synthetic)",
    )
    t.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")
    t.add_argument("--init", help="start from this checkpoint's weights and architecture")
    t.add_argument(
        "--backbone-weights",
        help="torchvision classification state_dict (e.g. ImageNet resnet50) for the body",
    )
    t.add_argument("--teacher", help="checkpoint of a teacher detector: knowledge distillation")
    t.add_argument("--epochs", type=float, default=12)
    t.add_argument("--iters", type=int, default=None, help="iterations (overrides --epochs)")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=0.02)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--grad-clip", type=float, default=10.0)
    t.add_argument(
        "--bn-sparsity", type=float, default=1e-5, help="λ of the BN-γ L1 penalty (0: off)"
    )
    t.add_argument("--resolutions", nargs="+", help="dynamic-resolution set (default: the spec's)")
    t.add_argument("--fixed-size", action="store_true", help="train at the spec's size only")
    t.add_argument("--device", default="cpu")
    t.add_argument("--amp", action="store_true", help="mixed precision (CUDA)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=0)
    t.add_argument("--no-eval", action="store_true")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)


def _add_import(sub: Any) -> None:
    im = sub.add_parser(
        "import",
        help="turn a torchvision Faster R-CNN (state_dict or saved model) or a detectron2 "
        "Faster R-CNN (config + weights) into a checkpoint",
    )
    im.add_argument(
        "src",
        nargs="+",
        help="torch.save file of fasterrcnn_resnet50_fpn or a ResNet-FPN FasterRCNN; with "
        "--from detectron2: CONFIG.yaml WEIGHTS (.pth or model-zoo .pkl)",
    )
    im.add_argument(
        "--from",
        dest="source",
        choices=("torchvision", "detectron2"),
        default="torchvision",
        help="what SRC is (default torchvision)",
    )
    im.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")
    im.add_argument(
        "--arch",
        help="detector spec or preset (r50-fpn…) to take the name and, for a state_dict, the "
        "input and head settings from (default: read from the file, torchvision's defaults)",
    )
    names = im.add_mutually_exclusive_group()
    names.add_argument("--classes", help="class names, one a line (without the background)")
    names.add_argument("--ann", help="COCO annotation file whose categories name the classes")
    im.add_argument("--check-images", type=int, default=2, help="images both models must agree on")
    im.set_defaults(func=cmd_import)


def _add_eval(sub: Any) -> None:
    e = sub.add_parser("eval", help="COCO AP of a checkpoint at one or more sizes")
    e.add_argument("checkpoint")
    e.add_argument("--data", help="dataset dir (default: embedded synthetic)")
    e.add_argument("--split", default="val")
    e.add_argument("--sizes", nargs="+", help="LONGxSHORT sizes (default: the spec's resolutions)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", help="also write the metrics here")
    e.set_defaults(func=cmd_eval)


def _add_evolve(sub: Any) -> None:
    v = sub.add_parser("evolve", help="apply one weight-inheriting action to a checkpoint")
    v.add_argument("checkpoint")
    v.add_argument("action", help="channel_prune | layer_prune | add_layer:S | rearrange:S->T")
    v.add_argument("--out", required=True)
    v.add_argument(
        "--fraction", type=float, default=0.1, help="channel_prune: share of prunable channels"
    )
    v.set_defaults(func=cmd_evolve)


def _add_search(sub: Any) -> None:
    q = sub.add_parser("search", help="run (or resume, or join) a Joint-DetNAS search")
    q.add_argument("study", help="study spec YAML or preset name (e.g. quickstart)")
    q.add_argument(
        "--storage", help="Optuna storage URL (default: the spec's, sqlite:///runs/NAME.db)"
    )
    q.add_argument(
        "--n-trials", type=int, default=None, help="trials this worker adds (default: the spec's)"
    )
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.add_argument(
        "--check",
        action="store_true",
        help="check the spec, data, base checkpoint and pool space and print the plan with a "
        "time estimate; trains nothing",
    )
    q.set_defaults(func=cmd_search)


def _add_init(sub: Any) -> None:
    i = sub.add_parser("init", help="write a commented study spec for your COCO dataset")
    i.add_argument("--data", help="dataset folder with images/, train.json and val.json")
    i.add_argument("--train", help="training annotation file (default DATA/train.json)")
    i.add_argument("--val", help="validation annotation file (default DATA/val.json)")
    i.add_argument("--images", help="folder the files' file_name paths start in (DATA/images)")
    i.add_argument(
        "--base",
        default="r50-fpn",
        help="trained checkpoint (.safetensors), or detector preset/YAML the study trains "
        "(default r50-fpn)",
    )
    i.add_argument("--out", required=True, help="study spec to write, e.g. studies/NAME.yaml")
    i.add_argument("--name", help="study name (default: the --out file's stem)")
    i.add_argument(
        "--device", dest="study_device", help="the study's device (default: cuda if seen, else cpu)"
    )
    i.add_argument("--force", action="store_true", help="overwrite --out and what it needs")
    i.set_defaults(func=cmd_init)


def _add_pool(sub: Any) -> None:
    pl = sub.add_parser("pool", help="elastic teacher pool").add_subparsers(
        dest="pool_command", required=True
    )
    pt = pl.add_parser(
        "train", help="train a study's teacher pool with integrated progressive shrinking"
    )
    pt.add_argument("study")
    pt.add_argument("--out", help="pool file (default runs/NAME/pool.safetensors)")
    pt.add_argument("--quiet", action="store_true")
    pt.set_defaults(func=cmd_pool_train)


def _add_export(sub: Any) -> None:
    x = sub.add_parser(
        "export", help="write a study's best (or chosen) student as a self-contained detector"
    )
    _study_options(x, "trial to export")
    x.add_argument(
        "--out", required=True, help="export folder (detector.json, model.safetensors, model.onnx)"
    )
    x.add_argument("--size", help="input size LONGxSHORT (default: the trial's best resolution)")
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
        type=float,
        metavar="X",
        help="the most accurate trial whose batch-1 latency, measured here on --device, is ≤ X ms",
    )
    x.add_argument(
        "--max-flops",
        type=float,
        metavar="G",
        help="the most accurate trial of at most G GFLOPs at its best resolution",
    )
    x.add_argument("--device", default="cpu", help="where latency and FPS are measured")
    x.add_argument("--repeats", type=int, default=10, help="timed runs per detector")
    x.set_defaults(func=cmd_export)


def _add_predict(sub: Any) -> None:
    pr = sub.add_parser("predict", help="COCO-style detections of an exported detector on images")
    pr.add_argument("detector", help="export folder")
    pr.add_argument("images", nargs="+", help="image files or folders")
    pr.add_argument(
        "--out", required=True, help="detections JSON (COCO results format + file_name)"
    )
    pr.add_argument("--ann", help="COCO annotation file: use its image ids and print AP")
    pr.add_argument(
        "--score-thresh", type=float, default=None, help="drop detections below this score"
    )
    pr.add_argument("--size", help="override the export's input size LONGxSHORT")
    pr.add_argument("--device", default="cpu")
    pr.set_defaults(func=cmd_predict)


def _add_latency(sub: Any) -> None:
    la = sub.add_parser(
        "latency", help="batch-1 images/s of detectors (export folders, checkpoints or specs)"
    )
    la.add_argument(
        "targets",
        nargs="+",
        help="export folder, checkpoint .safetensors, spec YAML or preset; the first is the baseline",
    )
    la.add_argument(
        "--size",
        help="input image HEIGHTxWIDTH, e.g. 800x1333 (default: each detector's input size, landscape)",
    )
    la.add_argument("--device", default="cpu", help="cpu or cuda")
    la.add_argument("--repeats", type=int, default=30)
    la.add_argument("--warmup", type=int, default=5)
    la.add_argument(
        "--images", nargs="+", help="real images to time on (default: a fixed noise image)"
    )
    la.add_argument("--max-images", type=int, default=8)
    la.add_argument("--amp", action="store_true", help="float16 autocast (CUDA)")
    la.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="for a spec: classes incl. background (default 81)",
    )
    la.set_defaults(func=cmd_latency)


def _add_noise(sub: Any) -> None:
    n = sub.add_parser(
        "noise", help="re-run a trial with other seeds: the spread of H and AP (the noise floor)"
    )
    _study_options(n, "trial to re-run")
    n.add_argument("--seeds", type=int, default=3, help="re-runs (other training seeds)")
    n.set_defaults(func=cmd_noise)


def _add_finetune(sub: Any) -> None:
    ft = sub.add_parser(
        "finetune",
        help="train a trial's student longer with its teacher: a child trial export can pick",
    )
    _study_options(ft, "trial to fine-tune")
    ft.add_argument("--epochs", type=float, required=True, help="training epochs")
    ft.add_argument("--lr", type=float, default=None, help="peak lr (default: the fast eval's)")
    ft.add_argument("--quiet", action="store_true", help="no progress bars")
    ft.set_defaults(func=cmd_finetune)


def cmd_gc(args: argparse.Namespace) -> int:
    """``jdsearch gc``: remove the artifacts no study of a storage reads again (partial uploads,
    failed trials' checkpoints, unreferenced uploads), printing each; returns 0."""
    from jdsearch.search.gc import collect, describe, summary
    from jdsearch.search.queries import open_storage
    from jdsearch.search.storage import with_driver

    if not args.older_than >= 0:
        raise JDSearchError(f"--older-than must be a number of seconds ≥ 0, got {args.older_than}")
    url = with_driver(args.storage)
    storage, _ = open_storage(url)
    removed = collect(storage, url, older_than_s=args.older_than, dry_run=args.dry_run)
    for r in removed:
        print(describe(r, args.dry_run))
    print(summary(removed, args.dry_run))
    return 0


def _add_gc(sub: Any) -> None:
    g = sub.add_parser(
        "gc",
        help="remove artifacts no study reads again: partial uploads, failed trials' checkpoints",
    )
    g.add_argument("--storage", required=True, help="the studies' storage URL")
    g.add_argument(
        "--older-than",
        type=float,
        default=3600.0,
        metavar="S",
        help="only what is older than S seconds (default 3600; 0 only when no worker runs)",
    )
    g.add_argument("--dry-run", action="store_true", help="print what would go, remove nothing")
    g.set_defaults(func=cmd_gc)


def _add_report(sub: Any) -> None:
    rp = sub.add_parser(
        "report", help="HTML report with the paper's figures and the base-vs-upgraded table"
    )
    _study_options(rp, "the upgraded trial")
    rp.add_argument("--out", required=True, help="report folder (report.html, figures/)")
    rp.add_argument("--device", default="cpu", help="where FPS is measured")
    rp.add_argument("--repeats", type=int, default=20, help="timed runs per detector for FPS")
    rp.add_argument("--no-fps", action="store_true", help="do not measure FPS")
    rp.add_argument("--no-png", action="store_true", help="do not write PNGs")
    rp.add_argument(
        "--no-attach",
        action="store_true",
        help="do not attach the figures to the study (optuna-dashboard)",
    )
    rp.set_defaults(func=cmd_report)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``). Returns the exit status: the
    command's, 2 after printing a :class:`JDSearchError`, 130 when interrupted."""
    args = build_parser().parse_args(argv)
    passive_openmp_threads()
    import warnings

    # optuna marks heartbeats and artifacts experimental; the CLI relies on them on purpose.
    warnings.filterwarnings("ignore", message=".*is experimental.*")
    warnings.filterwarnings("ignore", message=".*experimental feature.*")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if getattr(args, "device", None) is not None:
            from jdsearch.latency import check_device

            check_device(args.device)
        if args.threads is not None:
            if args.threads < 1:
                raise JDSearchError(f"--threads must be ≥ 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        return int(args.func(args) or 0)
    except JDSearchError as e:
        print(f"jdsearch: error: {e}", file=sys.stderr)
        return 2
    except RanksOutOfStep as e:  # under torchrun: torchrun stops the other ranks
        print(f"jdsearch: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jdsearch: interrupted", file=sys.stderr)
        return 130
