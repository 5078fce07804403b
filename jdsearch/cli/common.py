"""What several commands share: the argument types (finite numbers, sizes), the summary line of a
detector, the image files of arguments, and the options, storage and held-out split of the
commands that read a finished study."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jdsearch.core.config import FieldError
from jdsearch.core.errors import JDSearchError, SpecError
from jdsearch.core.limits import MAX_INPUT_SIDE
from jdsearch.core.resolution import Resolution


# ---------------------------------------------------------------------- argument types
# Each refuses a bad value through argparse, whose one line names the flag as the user typed it:
# ``jdsearch predict: error: argument --score-thresh: must be a finite number, got 'nan'``.
def finite_float(text: str) -> float:
    """The ``type`` of every float option: a finite number (``nan`` and ``inf`` are refused:
    they pass every comparison a bound is checked with, or none)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """The ``type`` of an integer option from ``low`` (to ``high``) that no config dataclass
    checks (a count of repeats, of images, of seeds): refused by argparse, naming the flag,
    before the command runs. ``int_range(1)("0")`` raises ``must be an integer ≥ 1, got '0'``."""
    bounds = f"≥ {low}" if high is None else f"from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text) if len(text) <= 40 else None  # no int() of 5000 digits
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {text[:40]!r}")
        return value

    parse.__name__ = "int"  # argparse's own name for a value it cannot convert
    return parse


def positive_float(text: str) -> float:
    """The ``type`` of a bound that must be a finite number above 0 (``--max-flops``)."""
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """The ``type`` of a score threshold: a number from 0 to 1 (a detection's score lies there;
    2 keeps no detection, silently)."""
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


def nonempty(text: str) -> str:
    """The conversion of every option and argument without a ``type`` of its own (a path, a
    name, a URL, a device): ``''`` is refused, where it would read as the current folder
    (``--out ''``) or as no value at all (``--init ''`` starting from nothing). :class:`Parser`
    registers it."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty, got ''")
    return text


class Parser(argparse.ArgumentParser):
    """jdsearch's argument parser: a value of an option or argument that has no ``type`` of its
    own goes through :func:`nonempty`. Its sub-command parsers are of this class too (argparse
    makes them of their parent's), and an argument group shares its parser's conversions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("type", None, nonempty)  # argparse's conversion of a type-less value

    def add_subparsers(self, **kwargs: Any) -> Any:
        """As argparse's; the sub-command's parser, not this one, converts what follows it."""
        action = super().add_subparsers(**kwargs)
        action.type = str  # (argparse hands the sub-command all the rest as this action's values)
        return action


def resolution(text: str) -> Resolution:
    """The ``type`` of a ``LONGxSHORT`` option: a :class:`Resolution`, each side at most
    :data:`~jdsearch.core.limits.MAX_INPUT_SIDE`."""
    try:
        return Resolution.parse(text)
    except SpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def height_width(text: str) -> tuple[int, int]:
    """The ``type`` of a ``HEIGHTxWIDTH`` option: ``(height, width)`` in that order, each side
    positive and at most :data:`~jdsearch.core.limits.MAX_INPUT_SIDE`."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    # no int() of 5000 digits: a side of more than 9 is too large anyway
    sides = [int(g) if len(g) <= 9 else MAX_INPUT_SIDE + 1 for g in m.groups()] if m else [0]
    if min(sides) < 1:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: expected HEIGHTxWIDTH, e.g. 800x1333")
    if max(sides) > MAX_INPUT_SIDE:
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r}: a side is more than the {MAX_INPUT_SIDE} pixels an input size may have"
        )
    return sides[0], sides[1]


# ---------------------------------------------------------------------- a field's flag
#: The flag that fills each field of the config dataclasses the commands build from their flags.
#: A dataclass names the field it refuses (``TrainConfig.epochs: must be a positive number, got
#: 0.0``); the command line reports it at the flag instead (``--epochs: ...``), in one place:
#: :func:`flag_message`, which ``main`` calls on every :class:`FieldError`.
FIELD_FLAGS: dict[str, str] = {
    "TrainConfig.epochs": "--epochs",
    "TrainConfig.max_iters": "--iters",
    "TrainConfig.batch_size": "--batch-size",
    "TrainConfig.lr": "--lr",
    "TrainConfig.warmup_iters": "--warmup",
    "TrainConfig.grad_clip": "--grad-clip",
    "TrainConfig.num_workers": "--workers",
    "TrainConfig.seed": "--seed",
    "TrainConfig.device": "--device",
    "MorphConfig.channel_fraction": "--fraction",
    "DetectorSpec.num_classes": "--num-classes",
}


def flag_message(e: FieldError, args: argparse.Namespace) -> str:
    """``FLAG: WHY`` when the command that ran (``args``) has the flag that fills the field ``e``
    refuses (:data:`FIELD_FLAGS`); else ``e``'s own message, which names the field."""
    flag = FIELD_FLAGS.get(f"{e.owner}.{e.name}")
    if flag is None or not hasattr(args, flag.removeprefix("--").replace("-", "_")):
        return str(e)
    return f"{flag}: {e.why}"


# ---------------------------------------------------------------------- shared helpers


def describe(detector: Any, size: tuple[int, int]) -> str:
    """The ``arch:`` and ``params:`` lines of a detector, FLOPs counted at ``size`` (H, W)."""
    from jdsearch.models.flops import count_flops

    report = count_flops(detector, size=size)
    return (
        f"arch: {detector.arch.encode()}\n"
        f"params: {report.params / 1e6:.3f} M   FLOPs at {size[1]}x{size[0]}: {report.total / 1e9:.3f} G"
        f" (backbone {report.backbone / 1e9:.3f} G)"
    )


def image_files(items: Sequence[str]) -> list[Path]:
    """The image files among ``items`` and in the folders among them (in name order);
    :class:`JDSearchError` for a missing path, one that is not a regular file (``/dev/zero``, a
    FIFO, which would block the reader), or when there are none."""
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in exts))
        elif p.exists():
            files.append(p)
        else:
            raise JDSearchError(f"{p}: no such image file or folder")
    for f in files:
        if not f.is_file():
            raise JDSearchError(f"{f}: not a regular file, expected an image file")
    if not files:
        raise JDSearchError(f"no image files in {' '.join(items)}")
    return files


def check_output(flag: str, path: str) -> Path:
    """``path`` of an output file, refused before any work when it names a folder."""
    out = Path(path)
    if out.is_dir():
        raise JDSearchError(f"{flag} {path}: is a folder, expected a file to write")
    return out


def write_output(flag: str, path: str, text: str) -> Path:
    """Write ``text`` to the output file ``path`` (its folder made); a failure is one line naming
    ``flag`` and the path, not a traceback."""
    out = check_output(flag, path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    except OSError as e:
        raise JDSearchError(f"{flag} {path}: cannot write ({e.strerror or e})") from None
    return out


def study_options(p: argparse.ArgumentParser, trial_help: str) -> None:
    """--storage / --study / --trial of the commands that read a finished study."""
    p.add_argument("--storage", help="the study's storage URL (default sqlite:///runs/NAME.db)")
    p.add_argument("--study", help="study name (optional when the storage holds one study)")
    p.add_argument(
        "--trial", type=int_range(0), default=None, help=f"{trial_help} (default: the best)"
    )


def storage_url(args: argparse.Namespace) -> str:
    """``--storage`` or, with only ``--study``, the default ``sqlite:///runs/NAME.db``."""
    if args.storage:
        return str(args.storage)
    if args.study:
        return f"sqlite:///runs/{args.study}.db"
    raise JDSearchError("give --storage URL (and --study NAME when it holds several studies)")


def heldout(handle: Any) -> Any:
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
