"""``jdsearch init``: a commented study spec for a user's COCO dataset and base detector.

:func:`init_study` reads the dataset (the records are validated as the data layer validates
them), picks the study's settings by the rules below and writes a YAML file that loads with
:func:`jdsearch.spec.study.load_study`; each choice is explained in a comment of the file. The rules
(also in ``docs/your-data.md``), each a function that ``tests/test_init.py`` pins:

* :func:`resolution_ladder`: four sizes like the paper's 512x512 … 1333x800, whose short sides are
  0.64, 0.75, 0.9 and 1 of the largest; the largest is the dataset's native size
  (:func:`native_size`: the median long side by the median short side of its images), the others
  keep the dataset's aspect ratio, rounded to multiples of 8.
* R_base (``base.resolution``): the size the base is deployed at; a checkpoint's own input size,
  else (a base the study trains on this data) the native size.
* :func:`budgets`: scaled to the number of training images N.
* :func:`matched_pool`: the teacher pool of the base's block family and widths.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
import statistics
import textwrap
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jdsearch.core.errors import DataError, SpecError
from jdsearch.core.limits import MAX_INPUT_SIDE
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import CocoDataset, check_same_categories
from jdsearch.spec.arch import BASIC, BOTTLENECK, NUM_STAGES, BackboneArch
from jdsearch.spec.detector import DetectorSpec, load_spec, spec_from_dict
from jdsearch.spec.pool import POOL_TRAIN, PhaseSpec, PoolSpec
from jdsearch.spec.pool_space import SubnetSpace, singleton
from jdsearch.spec.study import StudySpec, study_from_dict
from jdsearch.store.checkpoint import read_checkpoint_metadata

__all__ = [
    "BaseChoice",
    "Budgets",
    "DataFiles",
    "DatasetFacts",
    "InitResult",
    "StudyPlan",
    "budgets",
    "choose_base",
    "data_files",
    "init_study",
    "matched_pool",
    "native_size",
    "pool_multipliers",
    "read_dataset",
    "resolution_ladder",
    "study_text",
    "warmup_iters",
]

#: Short side of each rung over the largest one: the paper's 512, 600, 720, 800 (A.1.3) over 800.
LADDER_FRACTIONS = (0.64, 0.75, 0.9, 1.0)
LADDER_STEP = 8  # rung sides are multiples of this (the largest rung is the native size itself)
MIN_NATIVE_SIDE = 32
#: The paper trains its base detectors 12 epochs (the 1x schedule on COCO's 118k images). A
#: smaller set gets as many epochs as it takes to see IMAGES_SEEN images, at most MAX_BASE_EPOCHS.
PAPER_BASE_EPOCHS = 12
IMAGES_SEEN = 20_000
MAX_BASE_EPOCHS = 100
#: Pool phases as multiples of the base's epochs: the paper's 48/24/36 for 12 (table 8).
IPS_SHARES = (4, 2, 3)
#: n_trials by training images: up to 1 000 images, up to 10 000, more.
TRIAL_TIERS = ((1_000, 100), (10_000, 50), (math.inf, 20))
BATCH = 4
WARMUP_SHARE = 0.05  # warm-up: 5 % of a training's iterations, at most MAX_WARMUP
MAX_WARMUP = 500
#: The deepest standard ResNet of each block family: the pool's super-net depths (the paper's
#: pool is R101-deep for every base; R34 is the deepest basic-block ResNet).
DEEP_DEPTHS = {BASIC: (3, 4, 6, 3), BOTTLENECK: (3, 4, 23, 3)}
MIN_POOL_DEPTH = 2  # the paper's space starts at 2 blocks per stage
POOL_WIDTHS = (1.0, 1.25, 1.5)  # width multipliers of the base widths (paper A.1.3)
MIN_BASE_WIDTH = 8  # so that the three multipliers give three distinct widths
HELDOUT_MIN_VAL = 20  # below this many val images, all of them score the trials
MAX_SELECTION = 500
DEFAULT_BASE = "r50-fpn"


# ---------------------------------------------------------------------- the rules
def native_size(sizes: Iterable[tuple[int, int]]) -> Resolution:
    """The dataset's native size ``LONGxSHORT``: median long side by median short side of the
    images' ``(width, height)`` (portrait and landscape alike), scaled down (aspect kept) to
    :data:`~jdsearch.core.limits.MAX_INPUT_SIDE` when larger."""
    pairs = [(max(w, h), min(w, h)) for w, h in sizes]
    if not pairs:
        raise DataError("the dataset has no images")
    long = round(statistics.median(p[0] for p in pairs))
    short = round(statistics.median(p[1] for p in pairs))
    if long > MAX_INPUT_SIDE:
        long, short = MAX_INPUT_SIDE, max(1, math.floor(short * MAX_INPUT_SIDE / long))
    return Resolution(max(long, short), short)


def _step(x: float) -> int:
    return max(LADDER_STEP, LADDER_STEP * math.floor(x / LADDER_STEP + 0.5))


def resolution_ladder(native: Resolution) -> tuple[Resolution, ...]:
    """The dynamic-resolution set: :data:`LADDER_FRACTIONS` of ``native`` with its aspect ratio,
    sides rounded to multiples of :data:`LADDER_STEP`, the largest ``native`` itself; rungs that
    round to the same size appear once. Raises :class:`SpecError` for a native short side below
    :data:`MIN_NATIVE_SIDE`."""
    if native.short < MIN_NATIVE_SIDE:
        raise SpecError(
            f"native image size {native}: a short side under {MIN_NATIVE_SIDE} px is too small "
            "for a Faster R-CNN FPN (its coarsest level has stride 64)"
        )
    rungs: list[Resolution] = []
    for f in LADDER_FRACTIONS[:-1]:
        rung = Resolution(_step(native.long * f), _step(native.short * f))
        if rung not in rungs and rung.pixels < native.pixels:
            rungs.append(rung)
    return (*rungs, native)


@dataclass(frozen=True)
class Budgets:
    """Training budgets of a study, in epochs over the training images, and its trials."""

    base_epochs: int
    pool_epochs: tuple[int, ...]  # one per IPS phase
    fast_eval_epochs: float
    n_trials: int


def budgets(train_images: int) -> Budgets:
    """The budgets for ``train_images`` training images N: the base trains
    ``clamp(ceil(IMAGES_SEEN / N), 12, 100)`` epochs E; the pool's phases ``4E, 2E, 3E``; a trial's
    fast evaluation ``E / 4``; ``n_trials`` by :data:`TRIAL_TIERS` (more trials where each is
    cheap). At COCO's size these are the paper's 12, 48/24/36 and 3 epochs."""
    if train_images < 1:
        raise DataError("the training split has no images")
    e = min(MAX_BASE_EPOCHS, max(PAPER_BASE_EPOCHS, math.ceil(IMAGES_SEEN / train_images)))
    n_trials = next(n for limit, n in TRIAL_TIERS if train_images <= limit)
    return Budgets(e, tuple(s * e for s in IPS_SHARES), e / 4, n_trials)


def warmup_iters(epochs: float, train_images: int) -> int:
    """:data:`WARMUP_SHARE` of a training's iterations at batch :data:`BATCH`, in
    ``[1, MAX_WARMUP]``."""
    iters = math.ceil(epochs * train_images / BATCH)
    return max(1, min(MAX_WARMUP, round(iters * WARMUP_SHARE)))


def _upper_half(choices: tuple[int, ...]) -> tuple[int, ...]:
    return choices[(len(choices) - 1) // 2 :]


def _shrink1(space: SubnetSpace) -> SubnetSpace:
    """The first shrinking phase's space, as the paper's table 8: the stage with the most depth
    choices keeps its upper half, the others their deepest; the two widest multipliers and FPNs."""
    longest = max(range(NUM_STAGES), key=lambda s: (len(space.depths[s]), s))
    depths = tuple(
        _upper_half(ds) if s == longest else ds[-1:] for s, ds in enumerate(space.depths)
    )
    return SubnetSpace(depths, tuple(ws[-2:] for ws in space.widths), space.fpn[-2:])


def pool_multipliers(base: BackboneArch, widths: Sequence[int]) -> tuple[tuple[float, ...], ...]:
    """:data:`POOL_WIDTHS` per stage, but 1.0 alone for an unstrided first stage whose output
    width is the stem's: that block of the base has no projection shortcut, which a wider
    super-net's would have, so only at the base's own width is the base one of the pool's
    sub-networks (r18's 64 = its stem), and the pool can start from it (``pool.init``)."""
    expansion = 4 if base.kind == BOTTLENECK else 1
    out = []
    for s, w in enumerate(widths):
        same = s == 0 and base.strides[0] == 1 and expansion * w == base.stem
        out.append((1.0,) if same else POOL_WIDTHS)
    return tuple(out)


def matched_pool(
    base: BackboneArch,
    template: str,
    resolutions: Sequence[Resolution],
    plan: Budgets,
    train_images: int,
) -> PoolSpec:
    """The teacher pool for ``base``: the same block kind; base widths ``W`` the base's stage
    widths (output / 4 for bottlenecks); depths from ``min(2, d)`` to the family's deepest
    standard ResNet (:data:`DEEP_DEPTHS`) per stage; multipliers 1, 1.25, 1.5
    (:func:`pool_multipliers`); FPN 1, 1.25 and
    1.5 times the base's; the three IPS phases of :func:`budgets`, trained at ``resolutions``.
    For an R50-FPN base this is the paper's pool (``PoolSpec.paper().space``)."""
    kind = base.kind
    expansion = 4 if kind == BOTTLENECK else 1
    widths = tuple(max(MIN_BASE_WIDTH, s.out_channels // expansion) for s in base.stages)
    depths = tuple(
        tuple(range(min(MIN_POOL_DEPTH, d), max(deep, d) + 1))
        for d, deep in zip(base.depths, DEEP_DEPTHS[kind], strict=True)
    )
    fpn = tuple(sorted({math.floor(base.fpn * m + 0.5) for m in POOL_WIDTHS}))
    space = SubnetSpace(depths, pool_multipliers(base, widths), fpn)
    e = plan.pool_epochs
    phases = (
        PhaseSpec("supernet", e[0], 0.02, singleton(space.largest())),
        PhaseSpec("shrink1", e[1], 0.01, _shrink1(space)),
        PhaseSpec("shrink2", e[2], 0.01, space),
    )
    train = dataclasses.replace(
        POOL_TRAIN,
        batch_size=BATCH,
        warmup_iters=warmup_iters(e[0], train_images),
        grad_clip=10.0,
        resolutions=tuple(resolutions),
    )
    return PoolSpec(space, phases, template, kind, widths, train)


# ---------------------------------------------------------------------- the inputs
@dataclass(frozen=True)
class DatasetFacts:
    """What the study's settings are derived from, read from the two annotation files."""

    train_images: int
    val_images: int
    #: ``(category id, name, boxes in the training split)`` in label order.
    categories: tuple[tuple[int, str, int], ...]
    native: Resolution
    smallest: tuple[int, int]  # (width, height) of the smallest and the largest image
    largest: tuple[int, int]
    box_side: float  # median sqrt(w·h) of the training boxes, native pixels (0: no boxes)


def read_dataset(files: DataFiles) -> DatasetFacts:
    """Read and validate both splits, each over its image folder (records and file existence, as
    the data layer does).

    Raises:
        DataError: an invalid file or record, or splits whose categories (ids or names) differ.
    """
    train, val = files.train, files.val
    train_set, val_set = CocoDataset(train, files.train_images), CocoDataset(val, files.val_images)
    cats = list(zip(train_set.category_ids, train_set.class_names, strict=True))
    other = list(zip(val_set.category_ids, val_set.class_names, strict=True))
    check_same_categories(train, cats, val, other)
    sizes = [
        (r.width, r.height)
        for ds in (train_set, val_set)
        for r in (ds.image_record(i) for i in range(len(ds)))
    ]
    anns = train_set.coco_dict()["annotations"]
    counts = Counter(a["category_id"] for a in anns)
    sides = [math.sqrt(a["bbox"][2] * a["bbox"][3]) for a in anns]
    return DatasetFacts(
        train_images=len(train_set),
        val_images=len(val_set),
        categories=tuple((cid, name, counts[cid]) for cid, name in cats),
        native=native_size(sizes),
        smallest=min(sizes, key=lambda s: (s[0] * s[1], s)),
        largest=max(sizes, key=lambda s: (s[0] * s[1], s)),
        box_side=float(statistics.median(sides)) if sides else 0.0,
    )


@dataclass(frozen=True)
class BaseChoice:
    """The base detector: a preset or detector YAML the study trains, or a trained checkpoint."""

    given: str  # what the user passed
    spec: DetectorSpec
    checkpoint: Path | None = None
    num_classes: int | None = None  # the checkpoint's, background included
    deployed: Resolution | None = None  # the checkpoint's input size


def choose_base(base: str) -> BaseChoice:
    """``base`` as a checkpoint (``.safetensors``: only its metadata is read) or a detector preset
    or YAML. Raises :class:`SpecError`/:class:`CheckpointError` naming it when it is neither."""
    if base.endswith((".pt", ".pth")):
        raise SpecError(
            f"{base}: a torch file; convert a torchvision Faster R-CNN first with "
            f"`jdsearch import {base} --out base.safetensors`, then pass that checkpoint"
        )
    if base.endswith(".safetensors"):
        meta = read_checkpoint_metadata(base)
        spec = spec_from_dict(meta["spec"], source=f"{base}: spec")
        return BaseChoice(base, spec, Path(base), int(meta["num_classes"]), spec.input.size)
    return BaseChoice(base, load_spec(base))


# ---------------------------------------------------------------------- the spec text
def _flow(value: Any) -> str:
    """``value`` as one line of YAML flow style (strings plain where YAML reads them back as is,
    else JSON-quoted, which YAML reads too)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    text = str(value)
    plain = re.fullmatch(r"[A-Za-z0-9_./][A-Za-z0-9_./+-]*", text) is not None
    return text if plain and yaml.safe_load(text) == text else json.dumps(text)


def _line(key: str, value: Any, comment: str = "", indent: int = 2) -> str:
    """``key: value`` in flow style, its comment after it, or above it when the line would pass
    100 characters."""
    text = f"{' ' * indent}{key}: {_flow(value)}"
    if not comment:
        return text
    line = f"{text.ljust(max(30, len(text) + 1))}# {comment}"
    return line if len(line) <= 100 else f"{' ' * indent}# {comment}\n{text}"


def _train(epochs: float, lr: float, warmup: int) -> dict[str, Any]:
    return {
        "epochs": epochs,
        "lr": lr,
        "batch_size": BATCH,
        "warmup_iters": warmup,
        "grad_clip": 10.0,
    }


def _selection(val_images: int) -> int | None:
    """``data.max_val_images``: half the val images (at most 500) score the trials and the rest
    are held out; all of them when there are fewer than :data:`HELDOUT_MIN_VAL`."""
    if val_images < HELDOUT_MIN_VAL:
        return None
    return min(MAX_SELECTION, math.ceil(val_images / 2))


@dataclass(frozen=True)
class StudyPlan:
    """Everything the spec text is written from."""

    name: str
    out: Path
    files: DataFiles
    facts: DatasetFacts
    base: BaseChoice
    base_detector: str  # what ``base.detector`` and ``pool.detector`` name
    resolutions: tuple[Resolution, ...]
    r_base: Resolution
    budgets: Budgets
    pool: PoolSpec
    device: str
    command: str


def _comment(text: str, indent: int = 0) -> list[str]:
    """``text`` as YAML comment lines of at most 100 characters."""
    pad = " " * indent + "# "
    return textwrap.wrap(text, width=100 - len(pad), initial_indent=pad, subsequent_indent=pad)


def _header(p: StudyPlan) -> list[str]:
    f = p.facts
    cats = ", ".join(f"{name} (id {cid}, {n} boxes)" for cid, name, n in f.categories[:12])
    more = f" and {len(f.categories) - 12} more" if len(f.categories) > 12 else ""
    empty = [name for _, name, n in f.categories if n == 0]
    anchors = p.base.spec.rpn.anchor_sizes
    lines = [
        f"# Study spec written by `{p.command}`.",
        "# Paths are relative to the folder jdsearch runs in. Check the spec (data, base, pool;",
        "# prints the plan and a time estimate), then run it:",
        f"#   jdsearch search {p.out} --check",
        f"#   jdsearch search {p.out}",
        "#",
        *_comment(
            f"Dataset: {f.train_images} train / {f.val_images} val images of "
            f"{f.smallest[0]}x{f.smallest[1]} to {f.largest[0]}x{f.largest[1]} px (native size, "
            f"the median long by the median short side: {f.native}); {len(f.categories)} "
            f"categories: {cats}{more}. Boxes: median side {f.box_side:.0f} px; the base's "
            f"anchors: {anchors[0]}-{anchors[-1]} px."
        ),
    ]
    if empty:
        lines += _comment(
            f"No training boxes for {', '.join(empty)}: the detector keeps the class but cannot "
            "learn it; add boxes or drop the category from both files."
        )
    return lines


def _data_lines(p: StudyPlan) -> list[str]:
    n = _selection(p.facts.val_images)
    held = (
        f"first {n} val images score the trials, the other {p.facts.val_images - n} are held out"
        if n is not None
        else f"all val images score the trials (under {HELDOUT_MIN_VAL}: none held out)"
    )
    fields = p.files.spec_fields()
    standard = "holds images/, train.json, val.json" if len(fields) == 1 else "the dataset's folder"
    why = {
        "dir": standard,
        "train": "the training split's annotation file",
        "train_images": "the folder its file_name paths start in",
        "val": "the validation split's annotation file",
        "val_images": "the folder its file_name paths start in",
    }
    return [
        "data:",
        *[_line(key, value, why[key]) for key, value in fields.items()],
        _line("max_val_images", n, held),
        "  # test: test.json            # a held-out split of your own (its images: test_images,",
        "  #                            # default dir/images)",
    ]


def _base_lines(p: StudyPlan) -> list[str]:
    b, plan = p.base, p.budgets
    lines = ["base:"]
    if b.checkpoint is not None:
        lines.append(_line("detector", p.base_detector, "the checkpoint's architecture and heads"))
        lines.append(_line("checkpoint", str(b.checkpoint), "the trained base: not retrained"))
        why = "R_base of H: the checkpoint's input size, where it is deployed"
    else:
        lines.append(
            _line("detector", p.base_detector, f"trained here: runs/{p.name}/base.safetensors")
        )
        lines.append("  # checkpoint: base.safetensors  # a base you trained already")
        why = "R_base of H: trained on this data, deployed at its native size"
    lines.append(_line("resolution", str(p.r_base), why))
    lines.append(
        "  # backbone_weights: resnet50-imagenet.pth  # ImageNet body for a base trained here"
    )
    warm = warmup_iters(plan.base_epochs, p.facts.train_images)
    lines.append(_line("train", _train(plan.base_epochs, 0.02, warm), "E epochs", 2))
    return lines


def _pool_lines(p: StudyPlan) -> list[str]:
    d = p.pool.to_dict()
    kind, widths = d["kind"], d["base_widths"]
    why = (
        f"Teacher pool matched to the base: {kind} blocks as in the base (the pool's sub-networks "
        "are also the students of the `pool` strategy), base widths W = the base's stage widths "
        f"{widths}, FPN 1-1.5x the base's, depths from 2 to the family's deepest ResNet (R101 for "
        "bottlenecks, R34 for basic blocks) at 1-1.5x width: for an R50-FPN base this is the "
        "paper's pool (A.1.3, table 8). Its phases train 4E, 2E and 3E epochs (the paper's "
        "48/24/36 for E = 12), at the study's resolutions."
    )
    return [
        *_comment(why),
        "pool:",
        _line("detector", d["detector"], "stem, strides and heads of the super-net: the base's"),
        _line("kind", kind),
        _line("base_widths", widths),
        "  space:",
        _line("depths", d["space"]["depths"], indent=4),
        _line("widths", d["space"]["widths"], indent=4),
        _line("fpn", d["space"]["fpn"], indent=4),
        "  phases:                     # integrated progressive shrinking",
        *[f"    - {_flow(phase)}" for phase in d["phases"]],
        _line("train", _pool_train(d["train"])),
    ]


def _pool_train(train: dict[str, Any]) -> dict[str, Any]:
    keys = ("batch_size", "warmup_iters", "grad_clip", "resolutions")
    return {k: train[k] for k in keys}


def _budget_comment(p: StudyPlan) -> list[str]:
    b, n = p.budgets, p.facts.train_images
    return _comment(
        f"Budgets for N = {n} training images: the base trains E = clamp(ceil({IMAGES_SEEN} / N), "
        f"{PAPER_BASE_EPOCHS}, {MAX_BASE_EPOCHS}) = {b.base_epochs} epochs (the paper's 12 at "
        "COCO's size; a small set needs more passes), the pool 9E over its phases, a trial's "
        "fast evaluation E/4 (the paper's 3), n_trials 100 up to 1 000 images, 50 up to 10 000, "
        "20 above (a trial on a small set is cheap). Warm-up: 5 % of each training's iterations. "
        "`--check` estimates the time of it all."
    )


def _score_lines(p: StudyPlan) -> list[str]:
    b, n = p.budgets, p.facts.train_images
    fast = _train(b.fast_eval_epochs, 0.01, warmup_iters(b.fast_eval_epochs, n))
    return [
        *_comment(
            "Dynamic resolution: the paper's four sizes (short sides 0.64, 0.75, 0.9 and 1 of "
            "the largest) with the largest at the dataset's native size, in its aspect ratio."
        ),
        _line("resolutions", [str(r) for r in p.resolutions], indent=0),
        _line("score", {"alpha": 0.4, "beta": 0.8}, "H = AP·[(C/C_base)·(R/R_base)^β]^-α", 0),
        *_comment(
            "KD: the paper's weights. A pool trained briefly is a weak teacher that can pull the "
            "students down; studies/quickstart.yaml uses 0.1 at CPU scale. mode: dynamic "
            "(default), fixed or off. when: stronger (default: distil only if the pool's largest "
            "sub-network beats the base on the selection split) or always."
        ),
        _line("kd", {"feat_weight": 1.0, "cls_weight": 1.0, "loc_weight": 1.0}, indent=0),
        _line("fast_eval", fast, "E/4 epochs per trial", 0),
    ]


def _search_lines(p: StudyPlan) -> list[str]:
    search = {"top_k": 5, "freeze_student": 5, "n_trials": p.budgets.n_trials, "seed": 0}
    return [
        f"search:                       # stored in sqlite:///runs/{p.name}.db (search.storage)",
        *[_line(k, v) for k, v in search.items()],
        _line("device", p.device, "cuda for real training (amp: true: mixed precision)", 0),
    ]


def study_text(p: StudyPlan) -> str:
    """The commented YAML of ``p``."""
    parts = [
        _header(p),
        [f"name: {_flow(p.name)}"],
        _data_lines(p),
        _budget_comment(p),
        _base_lines(p),
        _pool_lines(p),
        _score_lines(p),
        _search_lines(p),
    ]
    return "\n".join(line for part in parts for line in part) + "\n"


# ---------------------------------------------------------------------- init
@dataclass(frozen=True)
class InitResult:
    """What :func:`init_study` wrote, the study it describes and a summary to print."""

    path: Path
    spec: StudySpec
    written: tuple[Path, ...]  # the spec first, then what it needs (the base detector's YAML)
    lines: tuple[str, ...]


@dataclass(frozen=True)
class DataFiles:
    """The dataset's two annotation files and the image folder of each split; ``dir`` is the
    dataset's folder (``--data``, the spec's ``data.dir``), ``None`` when not given. The spec
    names ``dir`` and every file that is not where ``dir``'s layout (``images/``,
    ``train.json``, ``val.json``) has it: no file is linked or copied."""

    train: Path
    val: Path
    train_images: Path
    val_images: Path
    dir: Path | None = None

    def spec_fields(self) -> dict[str, str]:
        """The spec's ``data`` fields: ``dir`` (when given), then each file not at its default
        in ``dir``, in ``--train``, ``--train-images``, ``--val``, ``--val-images`` order."""
        fields = {} if self.dir is None else {"dir": str(self.dir)}
        for key, default in (
            ("train", "train.json"),
            ("train_images", "images"),
            ("val", "val.json"),
            ("val_images", "images"),
        ):
            path: Path = getattr(self, key)
            if self.dir is None or path.resolve() != (self.dir / default).resolve():
                fields[key] = str(path)
        return fields


def data_files(
    data: str | Path | None,
    train: str | Path | None = None,
    val: str | Path | None = None,
    images: str | Path | None = None,
    *,
    train_images: str | Path | None = None,
    val_images: str | Path | None = None,
    command: str = "init",
) -> DataFiles:
    """The dataset's files: ``DATA/train.json``, ``DATA/val.json`` and ``DATA/images`` for both
    splits unless given (``images``: both splits' folder, unless ``train_images`` and
    ``val_images`` name each its own). ``command`` (``init``, ``train``) starts the messages.

    Raises:
        SpecError: no ``data`` and not every file given, or ``images`` beside both split folders.
    """
    folders = (train_images, val_images)
    if data is None and (None in (train, val) or (images is None and None in folders)):
        raise SpecError(
            f"{command}: give --data DIR, or --train, --val and --images "
            "(or --train-images and --val-images)"
        )
    if images is not None and None not in folders:
        raise SpecError(f"{command}: --images is unused: --train-images and --val-images name both")
    d = Path(data) if data is not None else None

    def pick(given: str | Path | None, default: str) -> Path:
        if given is not None:
            return Path(given)
        assert d is not None  # checked above: without --data every file is given
        return d / default

    return DataFiles(
        train=pick(train, "train.json"),
        val=pick(val, "val.json"),
        train_images=pick(train_images if train_images is not None else images, "images"),
        val_images=pick(val_images if val_images is not None else images, "images"),
        dir=d,
    )


def _refuse(path: Path, force: bool) -> None:
    if (path.exists() or path.is_symlink()) and not force:
        raise SpecError(f"{path}: already exists; pass --force to overwrite it")


def _check_classes(base: BaseChoice, facts: DatasetFacts, train: Path) -> None:
    k = len(facts.categories)
    if base.num_classes is not None and base.num_classes != k + 1:
        raise SpecError(
            f"{base.given}: the checkpoint has {base.num_classes - 1} classes but {train} has {k} "
            "categories; give a base trained on these categories, or a preset to train one"
        )


def _plan(
    name: str,
    out: Path,
    files: DataFiles,
    base: BaseChoice,
    base_detector: str,
    device: str,
) -> StudyPlan:
    facts = read_dataset(files)
    _check_classes(base, facts, files.train)
    try:
        ladder = resolution_ladder(facts.native)
    except SpecError as e:  # name the data set whose images are too small
        shown = files.dir if files.dir is not None else files.train_images
        raise SpecError(f"{shown} ({files.train.name}, {files.val.name}): {e}") from None
    plan = budgets(facts.train_images)
    pool = matched_pool(base.spec.arch, base_detector, ladder, plan, facts.train_images)
    flags = {"dir": "--data", "train_images": "--train-images", "val_images": "--val-images"}
    data_args = [
        arg
        for key, value in files.spec_fields().items()
        for arg in (flags.get(key, f"--{key}"), value)
    ]
    command = shlex.join(["jdsearch", "init", *data_args, "--base", base.given, "--out", str(out)])
    r_base = base.deployed or ladder[-1]
    return StudyPlan(
        name, out, files, facts, base, base_detector, ladder, r_base, plan, pool, device, command
    )


def _base_yaml(base: BaseChoice) -> str:
    spec = base.spec.to_dict()
    spec.pop("num_classes", None)
    return (
        f"# The detector of {base.checkpoint} (architecture, heads, input), written by jdsearch"
        " init:\n# the base's architecture and the template of its teacher pool.\n"
        + yaml.safe_dump(spec, sort_keys=False)
    )


def init_study(
    out: str | Path,
    data: str | Path | DataFiles,
    *,
    base: str = DEFAULT_BASE,
    name: str | None = None,
    device: str | None = None,
    force: bool = False,
) -> InitResult:
    """Write a commented study spec for a COCO dataset and a base detector (the module's rules).

    Args:
        out: the study spec to write (refused when it exists, unless ``force``).
        data: a folder with ``images/``, ``train.json`` and ``val.json``, or other files as
            :func:`data_files` gives them (the spec names each).
        base: a checkpoint (``.safetensors``) or a detector preset or YAML the study trains.
        name: the study's name; default the stem of ``out``.
        device: default ``cpu``, so that one data set gives one spec on every machine (a worker
            runs on another device with ``jdsearch search --device``).
        force: overwrite ``out`` and what it needs.

    Returns:
        What was written; the spec is read back with :func:`study_from_dict` before writing.

    Raises:
        SpecError: ``out`` exists, an invalid name, base or dataset shape, one line naming it.
        DataError: an invalid annotation file or record, or splits with other categories.
        CheckpointError: an unreadable base checkpoint.
    """
    out = Path(out)
    name = name if name is not None else out.stem
    files = data if isinstance(data, DataFiles) else data_files(data)
    choice = choose_base(base)
    side = out.with_name(f"{out.stem}-base-detector.yaml") if choice.checkpoint else None
    for path in (out, side):
        if path is not None:
            _refuse(path, force)
    plan = _plan(name, out, files, choice, str(side or base), device or "cpu")
    text = study_text(plan)
    spec = study_from_dict(yaml.safe_load(text), source=str(out))
    written = _write(out, text, side, choice)
    return InitResult(out, spec, written, tuple(_summary(plan, spec)))


def _write(out: Path, text: str, side: Path | None, base: BaseChoice) -> tuple[Path, ...]:
    written = [out]
    if side is not None:
        side.parent.mkdir(parents=True, exist_ok=True)
        side.write_text(_base_yaml(base))
        written.append(side)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return tuple(written)


def _summary(p: StudyPlan, spec: StudySpec) -> list[str]:
    f, b, d = p.facts, p.budgets, spec.data
    return [
        f"wrote {p.out}: study {spec.name}",
        f"  data        {f.train_images} train / {f.val_images} val images, "
        f"{len(f.categories)} categories, native size {f.native}",
        f"              {d.annotations('train')} over {d.images('train')}/, "
        f"{d.annotations('val')} over {d.images('val')}/",
        f"  resolutions {', '.join(str(r) for r in spec.resolutions)}; R_base {p.r_base}",
        f"  base        {p.base.given}"
        + (" (checkpoint)" if p.base.checkpoint else f", trained {b.base_epochs} epochs"),
        f"  pool        {spec.pool.kind}, W {list(spec.pool.base_widths)}, "
        f"{spec.pool.space.describe()}, phases {'/'.join(str(e) for e in b.pool_epochs)} epochs",
        f"  search      {b.n_trials} trials of {b.fast_eval_epochs:g} epochs on {spec.device}",
        f"next: jdsearch search {p.out} --check",
    ]
