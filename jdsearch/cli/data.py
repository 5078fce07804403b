"""``jdsearch data synth`` and ``jdsearch data check``, and the dataset ``train`` and ``eval`` read
without ``--data``: the embedded synthetic one, generated on first use under ``runs/synth``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from jdsearch.cli.common import finite_float, int_range
from jdsearch.core.errors import JDSearchError
from jdsearch.spec.synth import (
    MAX_CLASSES,
    MAX_IMAGES,
    MAX_SIDE,
    MIN_SIDE,
    OBJECT_SIZE,
    SHAPES,
    classes_problem,
    object_size_problem,
)

DEFAULT_DATA = Path("runs/synth")
DEFAULT_SYNTH_IMAGES = 640
DEFAULT_SYNTH_SEED = 0


def add_data(sub: Any, name: str) -> None:
    d = sub.add_parser(name, help="datasets").add_subparsers(dest="data_command", required=True)
    s = d.add_parser("synth", help="write a deterministic synthetic COCO dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--images", type=int_range(2, MAX_IMAGES), default=DEFAULT_SYNTH_IMAGES)
    s.add_argument("--seed", type=int_range(0), default=DEFAULT_SYNTH_SEED)
    s.add_argument("--size", type=int, nargs="+", default=[128], help="side, or MIN MAX")
    s.add_argument(
        "--classes",
        type=int,
        default=len(SHAPES),
        help=f"number of classes, 1 to {MAX_CLASSES} (default {len(SHAPES)}: shapes of any "
        "colour; more: shapes in given colours, 'red disc', ...)",
    )
    s.add_argument(
        "--object-size",
        type=finite_float,
        nargs=2,
        default=list(OBJECT_SIZE),
        metavar=("MIN", "MAX"),
        help="range of a shape's side, as fractions of the image's shorter side "
        f"(default {OBJECT_SIZE[0]} {OBJECT_SIZE[1]}; 0 < MIN < MAX <= 1)",
    )
    s.add_argument(
        "--workers",
        type=int,
        help="processes that draw the images (default: the CPUs available); the files are the "
        "same for any number",
    )
    s.set_defaults(func=cmd_data_synth)
    c = d.add_parser("check", help="validate a COCO annotation file and its images")
    c.add_argument("--ann", required=True)
    c.add_argument("--images", required=True)
    c.set_defaults(func=cmd_data_check)


def cmd_data_synth(args: argparse.Namespace) -> int:
    """``jdsearch data synth``: write a synthetic COCO dataset and print what it holds; returns 0.
    Raises :class:`JDSearchError` naming the flag unless ``--size``, ``--classes``,
    ``--object-size`` and ``--workers`` hold values the generator takes."""
    from jdsearch.data import synth

    size = _synth_size(args.size)
    why = classes_problem(args.classes)
    if why is not None:
        raise JDSearchError(f"--classes: {why}, got {args.classes}")
    why = object_size_problem(args.object_size)
    if why is not None:
        raise JDSearchError(f"--object-size: {why}, got {' '.join(map(str, args.object_size))}")
    if args.workers is not None and args.workers < 1:
        raise JDSearchError(f"--workers: must be at least 1, got {args.workers}")
    info = synth.generate(
        args.out,
        images=args.images,
        seed=args.seed,
        size=size,
        classes=args.classes,
        object_size=tuple(args.object_size),
        workers=args.workers,
    )
    print(f"wrote {info.images} images to {info.image_dir}")
    print(f"  {info.train_json}: {info.train_images} images, {info.train_annotations} objects")
    print(f"  {info.val_json}: {info.val_images} images, {info.val_annotations} objects")
    print(f"  classes: {', '.join(info.class_names)}")
    return 0


def _synth_size(sides: list[int]) -> int | tuple[int, int]:
    """``--size``: one side, or a ``(MIN, MAX)`` range; :class:`JDSearchError` naming the flag
    otherwise."""
    ok = len(sides) in (1, 2) and all(MIN_SIDE <= v <= MAX_SIDE for v in sides)
    if not ok or sides[0] > sides[-1]:
        got = " ".join(map(str, sides))
        raise JDSearchError(
            f"--size: give one side or MIN MAX, from {MIN_SIDE} to {MAX_SIDE} px, got {got}"
        )
    return sides[0] if len(sides) == 1 else (sides[0], sides[1])


def cmd_data_check(args: argparse.Namespace) -> int:
    """``jdsearch data check``: validate an annotation file and its images and print the summary;
    returns 0."""
    from jdsearch.data.coco import validate

    summary = validate(args.ann, args.images)
    print("\n".join(summary.lines()))
    print("ok")
    return 0


#: How ``init`` and ``train`` take annotation files that are not ``DATA/train.json`` and
#: ``DATA/val.json`` (COCO 2017's, each split with its own image folder).
SPLIT_FILES = "--train FILE --val FILE --images DIR (or --train-images DIR --val-images DIR)"


def add_split_files(p: argparse.ArgumentParser) -> None:
    """``--train``, ``--val``, ``--images``, ``--train-images`` and ``--val-images``: a data set's
    annotation files and image folders wherever they lie, as ``init`` and ``train`` take them
    (:func:`jdsearch.init.init_study.data_files` reads them)."""
    p.add_argument("--train", help="training annotation file (default DATA/train.json)")
    p.add_argument("--val", help="validation annotation file (default DATA/val.json)")
    p.add_argument(
        "--images", help="folder both files' file_name paths start in (default DATA/images)"
    )
    p.add_argument(
        "--train-images", help="folder the training file's file_name paths start in (--images)"
    )
    p.add_argument(
        "--val-images", help="folder the validation file's file_name paths start in (--images)"
    )


def data_folder(data: str, files: str) -> Path:
    """``--data DIR``, refused in one line when it names a file (a COCO JSON, say): ``--data``
    is a folder holding ``images/``, ``train.json`` and ``val.json``, and ``files`` says how the
    command takes annotation files that lie elsewhere."""
    p = Path(data)
    if p.is_file():
        raise JDSearchError(
            f"--data {data}: a dataset folder (images/, train.json, val.json), not a file; "
            f"give annotation files with {files}"
        )
    return p


def ensure_data(data: str | None, files: str) -> Path:
    """``--data DIR`` (:func:`data_folder`) or, when absent, the embedded synthetic dataset
    (generated once)."""
    from jdsearch.data import synth

    if data is not None:
        return data_folder(data, files)
    return synth.ensure_dataset(DEFAULT_DATA, images=DEFAULT_SYNTH_IMAGES, seed=DEFAULT_SYNTH_SEED)


def open_split(
    data_dir: Path, split: str, *, ann: str | None = None, images: str | None = None
) -> Any:
    """The :class:`~jdsearch.data.coco.CocoDataset` of ``DATA_DIR/SPLIT.json`` (or ``ann``) over
    the images in ``DATA_DIR/images`` (or ``images``: a split's own folder, COCO's
    ``val2017/``)."""
    from jdsearch.data.coco import CocoDataset

    return CocoDataset(
        Path(ann) if ann is not None else data_dir / f"{split}.json",
        Path(images) if images is not None else data_dir / "images",
    )
