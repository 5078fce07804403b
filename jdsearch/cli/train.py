"""``jdsearch train`` and ``jdsearch eval``: train a detector (plain, sparse, distilled) and measure
the COCO AP of a checkpoint."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jdsearch.cli.common import (
    check_output,
    describe,
    finite_float,
    int_range,
    resolution,
    write_output,
)
from jdsearch.cli.data import SPLIT_FILES, add_split_files, data_folder, ensure_data, open_split
from jdsearch.core.errors import JDSearchError
from jdsearch.engine.threads import small_detector_threads


def add_train(sub: Any, name: str) -> None:
    t = sub.add_parser(name, help="train a detector (plain, or distilled with --teacher)")
    t.add_argument("spec", nargs="?", default="tiny-r18-fpn", help="spec YAML or preset name")
    t.add_argument(
        "--data",
        help="dataset folder with images/, train.json, val.json (default: embedded synthetic)",
    )
    add_split_files(t)
    t.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")
    t.add_argument("--init", help="start from this checkpoint's weights and architecture")
    t.add_argument(
        "--backbone-weights",
        help="torchvision classification state_dict (e.g. ImageNet resnet50) for the body",
    )
    t.add_argument("--teacher", help="checkpoint of a teacher detector: knowledge distillation")
    t.add_argument("--epochs", type=finite_float, default=12)
    t.add_argument("--iters", type=int, default=None, help="iterations (overrides --epochs)")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=finite_float, default=0.02)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--grad-clip", type=finite_float, default=10.0)
    t.add_argument(
        "--bn-sparsity", type=finite_float, default=1e-5, help="λ of the BN-γ L1 penalty (0: off)"
    )
    t.add_argument(
        "--resolutions",
        nargs="+",
        type=resolution,
        help="dynamic-resolution set (default: the spec's)",
    )
    t.add_argument("--fixed-size", action="store_true", help="train at the spec's size only")
    t.add_argument("--device", default="cpu")
    t.add_argument("--amp", action="store_true", help="mixed precision (CUDA)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=0)
    t.add_argument("--no-eval", action="store_true")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    """``jdsearch train``: train a detector (with BN sparsity and, given ``--teacher``,
    distillation), save it, then unless ``--no-eval`` evaluate it and save it again with the
    metrics; returns 0."""
    from jdsearch.engine.evaluate import evaluate
    from jdsearch.engine.train import train
    from jdsearch.models.flops import count_flops
    from jdsearch.store.checkpoint import save_checkpoint

    _train_config(args, ())  # the flags, checked before anything is read
    train_set, val_set, source = _train_data(args)  # the validation split before training
    detector, spec = _train_target(args, train_set)
    resolutions = _sizes(args.resolutions) or spec.input.resolutions
    largest = max(resolutions, key=lambda r: r.pixels, default=spec.input.size)
    small_detector_threads(args.threads, count_flops(detector, size=largest.hw).total / 1e9)
    config = _train_config(args, () if args.fixed_size else tuple(resolutions))
    terms = _train_terms(args, detector, train_set)
    print(f"training {spec.name} on {source} ({len(train_set)} images), {config.epochs} epochs")
    result = train(detector, train_set, config, loss_terms=terms, progress=not args.quiet)
    losses = ", ".join(f"{k}={v:.3f}" for k, v in result.final_losses.items())
    print(
        f"trained {result.iterations} iterations in {result.seconds:.1f} s "
        f"({result.images_per_s:.1f} img/s); final losses: {losses}"
    )
    extra: dict[str, Any] = {"train": result.to_dict(), "data": source}
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
    print(describe(detector, spec.input.size.hw))
    return 0


def _train_config(args: argparse.Namespace, resolutions: tuple[Any, ...]) -> Any:
    """The ``TrainConfig`` of ``jdsearch train``'s flags; a bad value is a
    :class:`~jdsearch.core.config.FieldError`, which ``main`` reports at the flag as typed
    (``--epochs: must be a positive number, got 0.0``), not at the field it fills."""
    from jdsearch.spec.settings import TrainConfig

    if args.bn_sparsity < 0:
        raise JDSearchError(f"--bn-sparsity: must be 0 (off) or more, got {args.bn_sparsity}")
    return TrainConfig(
        epochs=args.epochs,
        max_iters=args.iters,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_iters=args.warmup,
        device=args.device,
        amp=args.amp,
        seed=args.seed,
        resolutions=resolutions,
        grad_clip=args.grad_clip,
        num_workers=args.workers,
    )


def _train_target(args: argparse.Namespace, train_set: Any) -> tuple[Any, Any]:
    """The detector ``jdsearch train`` starts from (``--init`` checkpoint or spec) and its spec."""
    from jdsearch.models import build_detector
    from jdsearch.spec.detector import load_spec
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
    names it records; a :class:`~jdsearch.core.errors.DataError` line when they differ."""
    from jdsearch.engine.evaluate import match_categories

    return match_categories(
        dataset, ckpt.num_classes, ckpt.foreground_names, ckpt.category_ids, source=ckpt.source
    )


def _train_terms(args: argparse.Namespace, detector: Any, train_set: Any) -> list[Any]:
    """BN sparsity (``--bn-sparsity``) and distillation (``--teacher``, whose classes must be the
    training set's) loss terms."""
    from jdsearch.store.checkpoint import load_checkpoint

    terms: list[Any] = []
    if args.bn_sparsity > 0:
        from jdsearch.methods.morph.pruning import BNSparsity

        terms.append(BNSparsity(args.bn_sparsity))
    if args.teacher:
        from jdsearch.methods.distill import make_distiller
        from jdsearch.spec.settings import KDConfig

        teacher_ckpt = load_checkpoint(args.teacher, device=args.device)
        _match_checkpoint(train_set, teacher_ckpt)
        teacher = teacher_ckpt.detector
        terms.append(make_distiller(detector, teacher, KDConfig(), seed=args.seed))
        print(f"distilling from {args.teacher} ({teacher.arch.encode()[:60]}...)")
    return terms


def _train_data(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """The training split, the validation split (``None`` with ``--no-eval``) and what they were
    read from: ``--data DIR`` (its ``train.json`` and ``val.json`` over its ``images/``), the
    files ``--train``, ``--val``, ``--images`` name (as ``init`` takes them; ``--data`` gives
    the rest), or the embedded synthetic set."""
    from jdsearch.data.coco import CocoDataset
    from jdsearch.init.init_study import data_files

    named = (args.train, args.val, args.images, args.train_images, args.val_images)
    if all(v is None for v in named):
        folder = ensure_data(args.data, SPLIT_FILES)
        files, source = data_files(folder), str(folder)
    else:
        folder = data_folder(args.data, SPLIT_FILES) if args.data is not None else None
        files = data_files(
            folder,
            args.train,
            args.val,
            args.images,
            train_images=args.train_images,
            val_images=args.val_images,
            command="train",
        )
        source = str(files.train)
    train_set = CocoDataset(files.train, files.train_images)
    if args.no_eval:
        return train_set, None, source
    return train_set, _val_split(CocoDataset(files.val, files.val_images), train_set), source


def _val_split(val_set: Any, train_set: Any) -> Any:
    """``val_set``, checked to hold the training set's categories (ids and names)."""
    from jdsearch.engine.evaluate import match_categories

    match_categories(
        val_set,
        train_set.num_classes,
        train_set.class_names,
        train_set.category_ids,
        source=str(train_set.ann_file),
    )
    return val_set


def add_eval(sub: Any, name: str) -> None:
    e = sub.add_parser(name, help="COCO AP of a checkpoint at one or more sizes")
    e.add_argument("checkpoint")
    e.add_argument("--data", help="dataset dir (default: embedded synthetic)")
    e.add_argument("--split", default="val")
    e.add_argument("--ann", help="annotation file to evaluate on (default DATA/SPLIT.json)")
    e.add_argument("--images", help="folder its file_name paths start in (default DATA/images)")
    e.add_argument(
        "--sizes",
        nargs="+",
        type=resolution,
        help="LONGxSHORT sizes (default: the spec's resolutions)",
    )
    e.add_argument("--batch-size", type=int_range(1), default=8)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", help="also write the metrics here")
    e.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """``jdsearch eval``: print (and with ``--json`` write) a checkpoint's COCO metrics at each
    size; returns 0."""
    from jdsearch.engine.evaluate import evaluate
    from jdsearch.store.checkpoint import load_checkpoint

    if args.data is None and (args.ann is None) != (args.images is None):
        raise JDSearchError("eval: give --ann and --images together (or --data DIR)")
    if args.json:
        check_output("--json", args.json)  # before anything is evaluated
    ckpt = load_checkpoint(args.checkpoint, device=args.device)
    eval_files = "--ann FILE --images DIR"
    data_dir = (
        ensure_data(args.data, eval_files) if args.ann is None or args.images is None else Path()
    )
    dataset = open_split(data_dir, args.split, ann=args.ann, images=args.images)
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
        doc = {k: v.to_dict() for k, v in metrics.items()}
        write_output("--json", args.json, json.dumps(doc, indent=1))
    return 0


def _sizes(texts: Sequence[str] | None) -> tuple[Any, ...] | None:
    from jdsearch.core.resolution import parse_resolutions

    return parse_resolutions(texts) if texts else None


def _print_metrics(metrics: dict[str, Any]) -> None:
    print(
        f"{'size':>10}  {'AP':>6} {'AP50':>6} {'AP75':>6} {'APs':>6} {'APm':>6} {'APl':>6}  {'img/s':>7}"
    )
    for size, m in metrics.items():
        vals = " ".join(f"{100 * v:6.1f}" for v in (m.AP, m.AP50, m.AP75, m.APs, m.APm, m.APl))
        print(f"{size:>10}  {vals}  {m.images_per_s:7.1f}")
