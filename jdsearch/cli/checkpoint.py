"""``jdsearch import`` and ``jdsearch evolve``: a checkpoint made from a torchvision or detectron2
model, or from another checkpoint by one morph action."""

from __future__ import annotations

import argparse
from typing import Any

from jdsearch.cli.common import describe, finite_float, int_range
from jdsearch.core.errors import JDSearchError
from jdsearch.core.files import read_text


def add_import(sub: Any, name: str) -> None:
    im = sub.add_parser(
        name,
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
    im.add_argument(
        "--check-images", type=int_range(1), default=2, help="images both models must agree on"
    )
    im.set_defaults(func=cmd_import)


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
    print(describe(result.detector, result.spec.input.size.hw))
    return 0


def _import_categories(args: argparse.Namespace) -> tuple[list[str] | None, list[int] | None]:
    """Class names from ``--classes`` (one a line) or ``--ann`` (COCO categories, in label
    order: label k is the k-th smallest category id), and with ``--ann`` the category ids."""
    if args.classes:
        try:
            lines = read_text(args.classes).splitlines()
        except OSError as e:
            raise JDSearchError(f"{args.classes}: cannot read class names: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise JDSearchError(
                f"{args.classes}: cannot read class names: byte {e.start} is not UTF-8"
            ) from None
        return [line.strip() for line in lines if line.strip()], None
    if args.ann:  # only its categories are read
        from jdsearch.data.coco import read_categories

        cats = read_categories(args.ann)
        return [c.name for c in cats], [c.id for c in cats]
    return None, None


def _import_file(args: argparse.Namespace, names: Any, ids: Any) -> Any:
    """The :class:`~jdsearch.models.torchvision_import.Imported` of ``import``'s sources."""
    from jdsearch.spec.detector import load_spec

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


def add_evolve(sub: Any, name: str) -> None:
    v = sub.add_parser(name, help="apply one weight-inheriting action to a checkpoint")
    v.add_argument("checkpoint")
    v.add_argument("action", help="channel_prune | layer_prune | add_layer:S | rearrange:S->T")
    v.add_argument("--out", required=True)
    v.add_argument(
        "--fraction",
        type=finite_float,
        default=0.1,
        help="channel_prune: share of prunable channels",
    )
    v.set_defaults(func=cmd_evolve)


def cmd_evolve(args: argparse.Namespace) -> int:
    """``jdsearch evolve``: apply one morph action to a checkpoint and save the child, with the
    action appended to its lineage; returns 0."""
    from jdsearch.methods.morph.actions import MorphConfig, evolve_with_report
    from jdsearch.store.checkpoint import load_checkpoint, save_checkpoint

    config = MorphConfig(channel_fraction=args.fraction)  # the flag, checked before the file
    ckpt = load_checkpoint(args.checkpoint)
    parent = ckpt.detector
    child, report = evolve_with_report(parent, args.action, config=config)
    size = ckpt.spec.input.size.hw
    print(f"parent {describe(parent, size)}")
    print(
        f"action {args.action}: {report.inherited_params:,} parameters inherited, "
        f"{report.new_params:,} new, {report.dropped_params:,} dropped"
    )
    print(f"child  {describe(child, size)}")
    extra = dict(ckpt.extra)
    extra["lineage"] = [*extra.get("lineage", []), args.action]
    out = save_checkpoint(
        args.out, child, class_names=ckpt.class_names, extra=extra, category_ids=ckpt.category_ids
    )
    print(f"saved {out}")
    return 0
