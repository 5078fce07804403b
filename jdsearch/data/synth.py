"""Deterministic synthetic detection data: coloured shapes on cluttered backgrounds, COCO format.

This is the embedded default dataset: small enough to train a tiny Faster R-CNN on a CPU in
minutes, hard enough that architecture, resolution and distillation choices show in the mAP.

Each image has a smooth two-colour gradient, low-frequency blotches, a stripe texture, thin
distractor lines, arcs and specks (none of which are objects), then 0..``max_objects`` shapes of
six classes by default (:data:`CLASS_NAMES`). Shapes vary in size (small, medium, and at most one
large per image; ``object_size`` sets the range), aspect ratio and colour; colour is drawn
independently of the class, so only the shape identifies it. With more than six classes a class
is a shape in one colour (``red disc``, :func:`jdsearch.spec.synth.class_names`): its hue is
drawn near that colour's, its saturation and brightness freely. Shapes may overlap and leave the
image partly, but every shape keeps at least 65 % of its pixels visible. Boxes are computed from
the visible pixels, so they are tight and inside the image; ``area`` is the box area. Finally
Gaussian pixel noise is added everywhere.

Everything is drawn from ``numpy.random.default_rng`` seeded by ``(seed, image number)`` and
rendered with NumPy and PIL, and nothing time-dependent is written, so the same arguments give
byte-identical files (given the same NumPy, Pillow and zlib builds), whatever the number of
worker processes that draw them (``tests/test_synth.py`` pins the hashes).

Speed: the images are drawn and saved in worker processes (one per available CPU by default),
each image from its own random stream; the background is drawn channels first. A profile before
this put about 45 % of the time in zlib's PNG encoding (which has to stay as it is for the bytes
to stay) and a third in the background. The quickstart's 1,200 images of 128 px, seed 0, before
and after, each pair measured back to back on the 2-core development machine, whose cores other
jobs share: 10.5 s and 4.5 s, 2.3x, while they left about one core free (load average 1.7; CPU
time 10.5 s and 8.5 s; in one process, ``workers=1``, 8.9 s), and 17.5 s and 14.4 s, 1.2x, while
they kept both cores busy (load average about 4; CPU time 11.3 s and 10.1 s).
"""

from __future__ import annotations

import colorsys
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from jdsearch.core.errors import SpecError
from jdsearch.spec.synth import (
    COLOURS,
    MAX_IMAGES,
    MAX_SIDE,
    MIN_SIDE,
    OBJECT_SIZE,
    SHAPES,
    class_names,
    classes_problem,
    object_size_problem,
)

__all__ = [
    "CLASS_NAMES",
    "MAX_SIDE",
    "MIN_SIDE",
    "SynthInfo",
    "available_cpus",
    "ensure_dataset",
    "generate",
]

logger = logging.getLogger(__name__)

#: Object classes of the default set, in category-id order (category id = index + 1).
CLASS_NAMES: tuple[str, ...] = SHAPES

_MIN_VISIBLE = 0.65  # fraction of a shape's pixels that must stay visible (overlap, truncation)
_MIN_CONTRAST = 90.0  # RGB distance between a shape and what lies under it
_PLACE_TRIES = 12
_CHUNK = 32  # most images a worker process draws per task
#: A shape's nominal side per size group, as fractions of the image's shorter side, for the
#: default ``object_size`` (:data:`~jdsearch.spec.synth.OBJECT_SIZE`, 0.07 to 0.88).
_SIZE_GROUPS = {"small": (0.07, 0.2), "medium": (0.2, 0.45), "large": (0.6, 0.88)}
#: The hue (degrees) of each colour of a class, and how far a shape's hue strays from it.
_HUES = {"red": 0, "green": 120, "blue": 240, "yellow": 60, "cyan": 180, "magenta": 300}
_HUE_JITTER = 12.0


@dataclass(frozen=True)
class SynthInfo:
    """Where :func:`generate` wrote the dataset and what is in it."""

    out_dir: Path
    image_dir: Path
    train_json: Path
    val_json: Path
    images: int
    train_images: int
    val_images: int
    train_annotations: int
    val_annotations: int
    empty_images: int
    class_names: tuple[str, ...]
    seed: int


@dataclass(frozen=True)
class _Recipe:
    """What every image of a set is drawn with (a worker process gets a copy)."""

    seed: int
    sides: tuple[int, int]  # the smallest and largest image side
    max_objects: int
    classes: int
    spans: dict[str, tuple[float, float]]  # a shape's nominal side per size group (_spans)

    def hue(self, cls: int) -> float | None:
        """The hue (degrees) of class ``cls``; ``None`` when its colour is free (six classes or
        fewer)."""
        if self.classes <= len(SHAPES):
            return None
        return _HUES[COLOURS[cls // len(SHAPES)]]


def _spans(object_size: tuple[float, float]) -> dict[str, tuple[float, float]]:
    """Each size group's range of nominal sides for shapes of ``object_size``: the default table
    mapped linearly onto that range. The default range keeps the table's own numbers (mapped,
    some would differ in the last bit), so its sets are the ones drawn before the option was."""
    if tuple(object_size) == OBJECT_SIZE:
        return dict(_SIZE_GROUPS)
    (a, b), (lo, hi) = OBJECT_SIZE, object_size

    def at(x: float) -> float:
        return lo + (x - a) * (hi - lo) / (b - a)

    return {group: (at(x0), at(x1)) for group, (x0, x1) in _SIZE_GROUPS.items()}


@dataclass(frozen=True)
class _Shape:
    """A placed shape: its class index and its visible box (COCO ``x, y, w, h``, integers)."""

    cls: int
    box: tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------
# Background
# --------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int, amp: float) -> np.ndarray:
    """Bilinearly interpolated random grid: soft colour blotches of about ``cell`` pixels, float
    ``[3, h, w]`` (channels first)."""
    grid = rng.normal(0.0, amp, size=(h // cell + 2, w // cell + 2, 3)).transpose(2, 0, 1)
    ys = (np.arange(h) + 0.5) / cell
    xs = (np.arange(w) + 0.5) / cell
    y0 = ys.astype(np.int64)
    x0 = xs.astype(np.int64)
    fy = (ys - y0)[:, None]
    fx = xs - x0
    # Along x on the grid's rows first, then along y: each pixel is the same sum of the same
    # products as interpolating every pixel row, for a tenth of the work (and np.take and
    # in-place products make fewer and faster copies than indexing and new arrays).
    rows = np.take(grid, x0, axis=2) * (1 - fx) + np.take(grid, x0 + 1, axis=2) * fx
    top = np.take(rows, y0, axis=1)
    top *= 1 - fy
    bottom = np.take(rows, y0 + 1, axis=1)
    bottom *= fy
    top += bottom
    return top


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Gradient + blotches + stripes, float ``[h, w, 3]`` in roughly 0..255.

    Drawn channels first (``[3, h, w]``): NumPy broadcasts a row of pixels many times faster
    than the three channels of one pixel, and every pixel gets the same values either way.
    """
    c0 = rng.uniform(0, 255, size=3)[:, None, None]
    c1 = rng.uniform(0, 255, size=3)[:, None, None]
    angle = rng.uniform(0, 2 * np.pi)
    yy = np.arange(h, dtype=np.float64)[:, None]  # broadcast to [h, w] by the sums below
    xx = np.arange(w, dtype=np.float64)[None, :]
    t = xx * np.cos(angle) + yy * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-9)
    canvas = c0 + (c1 - c0) * t
    canvas += _smooth_noise(rng, h, w, cell=int(rng.integers(8, 24)), amp=float(rng.uniform(5, 20)))
    # Stripe texture over a random rectangle (sometimes the whole image).
    period = rng.uniform(3, 12)
    s_angle = rng.uniform(0, np.pi)
    stripes = np.sin(2 * np.pi * (xx * np.cos(s_angle) + yy * np.sin(s_angle)) / period)
    y_a, y_b = sorted(int(v) for v in rng.integers(0, h + 1, size=2))
    x_a, x_b = sorted(int(v) for v in rng.integers(0, w + 1, size=2))
    region = np.zeros((h, w), dtype=bool)
    region[y_a:y_b, x_a:x_b] = True
    if rng.random() < 0.3:
        region[:] = True
    canvas += rng.uniform(4, 18) * stripes * region
    return np.ascontiguousarray(canvas.transpose(1, 2, 0))


def _distractors(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """Thin lines, arcs and specks drawn over the background; none of them is an object."""
    h, w = canvas.shape[:2]
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)

    def colour() -> tuple[int, int, int]:
        r, g, b = (int(c) for c in rng.integers(0, 256, size=3))
        return r, g, b

    for _ in range(int(rng.integers(0, 5))):
        x0, x1 = (float(v) for v in rng.uniform(-0.2 * w, 1.2 * w, size=2))
        y0, y1 = (float(v) for v in rng.uniform(-0.2 * h, 1.2 * h, size=2))
        draw.line([(x0, y0), (x1, y1)], fill=colour(), width=1)
    for _ in range(int(rng.integers(0, 3))):
        cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        r = float(rng.uniform(6, max(8.0, 0.4 * min(h, w))))
        start = float(rng.uniform(0, 360))
        span = float(rng.uniform(40, 200))
        draw.arc([cx - r, cy - r, cx + r, cy + r], start, start + span, fill=colour(), width=1)
    for _ in range(int(rng.integers(0, 10))):
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        s = int(rng.integers(1, 3))
        draw.rectangle([cx, cy, cx + s - 1, cy + s - 1], fill=colour())
    return np.array(img, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def _shape_mask(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    """Boolean ``[h, w]`` mask of class ``cls`` filling its window edge to edge."""
    v = ((np.arange(h) + 0.5) / h * 2 - 1)[:, None]
    u = ((np.arange(w) + 0.5) / w * 2 - 1)[None, :]
    name = CLASS_NAMES[cls]
    if name == "disc":
        return (u * u + v * v) <= 1.0
    if name == "ring":
        r2 = u * u + v * v
        inner = float(rng.uniform(0.45, 0.65))
        return (r2 <= 1.0) & (r2 >= inner * inner)
    if name in ("square", "bar"):
        return np.ones((h, w), dtype=bool)
    if name == "triangle":
        orient = int(rng.integers(0, 4))  # apex up, down, left, right
        along, across, n_along, n_across = (v, u, h, w) if orient < 2 else (u, v, w, h)
        if orient % 2 == 1:
            along = -along
        # A pixel is in if any part of it is (half a pixel is 1/n in these units), so the
        # one-pixel apex is drawn and the mask reaches all four edges of its window.
        return np.abs(across) - 1.0 / n_across <= (along + 1.0 / n_along + 1.0) / 2.0 + 1e-9
    if name == "cross":
        t = float(rng.uniform(0.22, 0.36))
        return (np.abs(u) <= t) | (np.abs(v) <= t)
    raise AssertionError(f"unknown class {cls}")


def _shape_size(
    rng: np.random.Generator, shape: int, span: tuple[float, float], img_h: int, img_w: int
) -> tuple[int, int]:
    """Window ``(h, w)`` for a shape of :data:`SHAPES` index ``shape`` whose nominal side is
    drawn in ``span`` (fractions of the image's shorter side)."""
    side = min(img_h, img_w)
    lo, hi = span
    s = float(rng.uniform(lo, hi)) * side
    name = SHAPES[shape]
    if name == "bar":
        ratio = float(rng.uniform(2.8, 5.0))
        long_side, short_side = s * np.sqrt(ratio) * 1.2, s / np.sqrt(ratio) * 1.2
        if rng.random() < 0.5:
            h, w = short_side, long_side
        else:
            h, w = long_side, short_side
        min_short = 3
    else:
        aspect = float(rng.uniform(0.78, 1.28))  # w / h
        h, w = s / np.sqrt(aspect), s * np.sqrt(aspect)
        min_short = 10 if name in ("ring", "cross") else 8
    # Shrink (keeping the aspect ratio) to fit 95 % of the image, then enforce minimum sides.
    fit = min(1.0, 0.95 * img_h / h, 0.95 * img_w / w)
    h = round(float(max(h * fit, min_short)))
    w = round(float(max(w * fit, min_short)))
    return h, w


def _colour(rng: np.random.Generator, hue: float | None) -> np.ndarray:
    """A random RGB colour, float: any, or of ``hue`` (degrees, give or take
    :data:`_HUE_JITTER`) with a saturation and a brightness that keep it that colour."""
    if hue is None:
        return rng.integers(0, 256, size=3).astype(np.float64)
    h = (hue + float(rng.uniform(-_HUE_JITTER, _HUE_JITTER))) % 360.0 / 360.0
    s, v = float(rng.uniform(0.65, 1.0)), float(rng.uniform(0.6, 1.0))
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def _contrasting_colour(
    rng: np.random.Generator, under: np.ndarray, hue: float | None = None
) -> np.ndarray:
    """A random colour (of ``hue``, if given) far (in RGB) from the mean of the pixels it will
    cover."""
    mean = under.mean(axis=0)
    best, best_dist = None, -1.0
    for _ in range(24):
        c = _colour(rng, hue)
        dist = float(np.linalg.norm(c - mean))
        if dist >= _MIN_CONTRAST:
            return c
        if dist > best_dist:
            best, best_dist = c, dist
    assert best is not None
    return best


def _render(
    rng: np.random.Generator, h: int, w: int, n_objects: int, recipe: _Recipe
) -> tuple[np.ndarray, list[_Shape]]:
    """One image (``uint8 [h, w, 3]``) and its shapes."""
    canvas = _Canvas(_distractors(rng, _background(rng, h, w)), recipe)
    for _, cls, sh, sw in _plan_shapes(rng, h, w, n_objects, recipe):
        canvas.place(rng, cls, sh, sw)
    shapes = canvas.shapes()
    pixels = canvas.pixels
    pixels += rng.normal(0.0, float(rng.uniform(2, 10)), size=pixels.shape)
    np.rint(pixels, out=pixels)
    return np.clip(pixels, 0, 255, out=pixels).astype(np.uint8), shapes


def _plan_shapes(
    rng: np.random.Generator, h: int, w: int, n_objects: int, recipe: _Recipe
) -> list[tuple[int, int, int, int]]:
    """``(area, class, height, width)`` of the shapes to place, biggest first (small shapes then
    sit on top); at most one large shape per image."""
    groups = rng.choice(["small", "medium", "large"], size=n_objects, p=[0.45, 0.4, 0.15])
    large = np.flatnonzero(groups == "large")
    groups[large[1:]] = "medium"
    specs = []
    for group in groups:
        cls = int(rng.integers(0, recipe.classes))
        sh, sw = _shape_size(rng, cls % len(SHAPES), recipe.spans[str(group)], h, w)
        specs.append((sh * sw, cls, sh, sw))
    specs.sort(key=lambda s: -s[0])
    return specs


class _Canvas:
    """An image being drawn, and which placed shape shows at each pixel."""

    def __init__(self, pixels: np.ndarray, recipe: _Recipe) -> None:
        self.pixels = pixels
        self.recipe = recipe
        h, w = pixels.shape[:2]
        self.owner = np.full((h, w), -1, dtype=np.int32)
        self.visible: list[int] = []  # visible pixels per placed shape
        self.full: list[int] = []  # pixels of the untruncated, unoccluded shape
        self.windows: list[tuple[int, int, int, int]] = []  # clipped y_a, y_b, x_a, x_b
        self.classes: list[int] = []

    def place(self, rng: np.random.Generator, cls: int, sh: int, sw: int) -> bool:
        """Try up to ``_PLACE_TRIES`` positions where the shape and every shape it covers stay
        visible enough; draw it at the first. Whether it was placed."""
        h, w = self.owner.shape
        mask = _shape_mask(rng, cls % len(SHAPES), sh, sw)
        area = int(mask.sum())
        for _ in range(_PLACE_TRIES):
            y0 = int(rng.integers(-sh // 4, h - (3 * sh) // 4 + 1))
            x0 = int(rng.integers(-sw // 4, w - (3 * sw) // 4 + 1))
            y_a, y_b = max(y0, 0), min(y0 + sh, h)
            x_a, x_b = max(x0, 0), min(x0 + sw, w)
            if y_b <= y_a or x_b <= x_a:
                continue
            sub = mask[y_a - y0 : y_b - y0, x_a - x0 : x_b - x0]
            if sub.sum() < _MIN_VISIBLE * area or not self._cover(y_a, y_b, x_a, x_b, sub):
                continue
            self._draw(rng, (y_a, y_b, x_a, x_b), sub, cls, area)
            return True
        return False

    def _cover(self, y_a: int, y_b: int, x_a: int, x_b: int, sub: np.ndarray) -> bool:
        """Whether the shapes under ``sub`` stay visible enough; if so, count what they lose."""
        covered = self.owner[y_a:y_b, x_a:x_b][sub]
        covered = covered[covered >= 0]
        if not covered.size:
            return True
        lost = np.bincount(covered, minlength=len(self.visible))
        hit = np.flatnonzero(lost)
        if any(self.visible[j] - int(lost[j]) < _MIN_VISIBLE * self.full[j] for j in hit):
            return False
        for j in hit:
            self.visible[j] -= int(lost[j])
        return True

    def _draw(
        self,
        rng: np.random.Generator,
        window: tuple[int, int, int, int],
        sub: np.ndarray,
        cls: int,
        area: int,
    ) -> None:
        y_a, y_b, x_a, x_b = window
        idx = len(self.visible)
        region = self.pixels[y_a:y_b, x_a:x_b]
        colour = _contrasting_colour(rng, region[sub], self.recipe.hue(cls))
        shade = 1.0 + float(rng.uniform(-0.12, 0.12)) * np.linspace(-1, 1, x_b - x_a)
        shaded = (colour[None, None, :] * shade[None, :, None]).repeat(y_b - y_a, axis=0)
        region[sub] = shaded[sub]
        self.owner[y_a:y_b, x_a:x_b][sub] = idx
        self.visible.append(int(sub.sum()))
        self.full.append(area)
        self.windows.append(window)
        self.classes.append(cls)

    def shapes(self) -> list[_Shape]:
        """Each placed shape with the box of its visible pixels (COCO ``xywh``)."""
        out = []
        for idx, (y_a, y_b, x_a, x_b) in enumerate(self.windows):
            ys, xs = np.nonzero(self.owner[y_a:y_b, x_a:x_b] == idx)
            assert ys.size > 0
            box = (
                x_a + int(xs.min()),
                y_a + int(ys.min()),
                int(xs.max() - xs.min()) + 1,
                int(ys.max() - ys.min()) + 1,
            )
            out.append(_Shape(self.classes[idx], box))
        return out


# --------------------------------------------------------------------------------------------
# Dataset generation
# --------------------------------------------------------------------------------------------


def _check_args(
    images: int, seed: int, size: int | tuple[int, int], val_fraction: float, max_objects: int
) -> tuple[int, int]:
    def is_int(x: Any) -> bool:
        return isinstance(x, int | np.integer) and not isinstance(x, bool)

    if not is_int(images) or not 2 <= images <= MAX_IMAGES:
        raise SpecError(f"synth: images must be an integer from 2 to {MAX_IMAGES}, got {images!r}")
    if not is_int(seed) or seed < 0:
        raise SpecError(f"synth: seed must be a non-negative integer, got {seed!r}")
    if is_int(size):
        lo = hi = int(size)  # type: ignore[arg-type]
    elif isinstance(size, tuple | list) and len(size) == 2 and all(is_int(s) for s in size):
        lo, hi = int(size[0]), int(size[1])
    else:
        raise SpecError(f"synth: size must be an integer or a (min, max) pair, got {size!r}")
    if not MIN_SIDE <= lo <= hi <= MAX_SIDE:
        raise SpecError(f"synth: size {size!r} must satisfy {MIN_SIDE} <= min <= max <= {MAX_SIDE}")
    if not isinstance(val_fraction, int | float) or not 0.0 < float(val_fraction) < 1.0:
        raise SpecError(f"synth: val_fraction must be in (0, 1), got {val_fraction!r}")
    if not is_int(max_objects) or max_objects < 1:
        raise SpecError(f"synth: max_objects must be an integer >= 1, got {max_objects!r}")
    return lo, hi


def _check_workers(workers: int | None) -> int:
    """The number of worker processes: ``workers``, or :func:`available_cpus` for ``None``."""
    workers = available_cpus() if workers is None else workers
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise SpecError(f"synth: workers must be an integer >= 1, got {workers!r}")
    return workers


def _image_dir(out: Path) -> Path:
    """``out/images``, made if missing; refused when ``out`` is a file."""
    if out.exists() and not out.is_dir():
        raise SpecError(f"synth: output path {out} exists and is not a folder")
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    return image_dir


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _coco_doc(
    split: str,
    seed: int,
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    names: tuple[str, ...],
) -> str:
    doc = {
        "info": {
            "description": f"jdsearch synthetic shapes, {split} split",
            "version": "1",
            "seed": seed,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(names)
        ],
    }
    return json.dumps(doc, indent=1) + "\n"


def _plan_splits(
    n: int, seed: int, val_fraction: float, empty_fraction: float
) -> tuple[set[int], set[int]]:
    """The ids of the validation images and of the images without objects."""
    plan = np.random.default_rng([seed, 0])
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    val_ids = {int(i) + 1 for i in plan.choice(n, size=n_val, replace=False)}
    n_empty = max(round(n * empty_fraction), 1) if empty_fraction > 0 else 0
    empty_ids = {int(i) + 1 for i in plan.choice(n, size=n_empty, replace=False)}
    return val_ids, empty_ids


def _annotations(image_id: int, shapes: list[_Shape], first_id: int) -> list[dict[str, Any]]:
    out = []
    for ann_id, shape in enumerate(shapes, start=first_id):
        x, y, bw, bh = shape.box
        out.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": shape.cls + 1,
                "bbox": [x, y, bw, bh],
                "area": bw * bh,
                "iscrowd": 0,
            }
        )
    return out


@dataclass(frozen=True)
class _Chunk:
    """Images ``ids`` of a set to draw and save in ``image_dir`` (by this process or a worker):
    what each holds is drawn from its own random stream, seeded by ``(seed, 1, image id)``, so
    that neither the order nor the process that draws it changes a byte."""

    image_dir: Path
    ids: tuple[int, ...]
    empty_ids: frozenset[int]
    recipe: _Recipe


#: What :func:`_write_chunk` returns for each image: its id, width, height and shapes.
_Drawn = tuple[int, int, int, list[_Shape]]


def _write_chunk(chunk: _Chunk) -> list[_Drawn]:
    """Render and save the images of ``chunk``; what each holds, in the chunk's order."""
    recipe = chunk.recipe
    lo, hi = recipe.sides
    out = []
    for image_id in chunk.ids:
        rng = np.random.default_rng([recipe.seed, 1, image_id])
        h, w = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        empty = image_id in chunk.empty_ids
        n_objects = 0 if empty else int(rng.integers(1, recipe.max_objects + 1))
        pixels, shapes = _render(rng, h, w, n_objects, recipe)
        path = chunk.image_dir / f"{image_id:06d}.png"
        Image.fromarray(pixels, "RGB").save(path, format="PNG", compress_level=6)
        out.append((image_id, w, h, shapes))
    return out


def available_cpus() -> int:
    """The CPUs this process may run on: :func:`generate`'s default number of workers."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def _draw_all(chunks: list[_Chunk], workers: int) -> list[_Drawn]:
    """:func:`_write_chunk` over ``chunks``, in up to ``workers`` processes; in chunk order."""
    if workers <= 1 or len(chunks) <= 1:
        return [drawn for chunk in chunks for drawn in _write_chunk(chunk)]
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
        return [drawn for done in pool.map(_write_chunk, chunks) for drawn in done]


def _write_images(
    image_dir: Path,
    n: int,
    recipe: _Recipe,
    plan: tuple[set[int], set[int]],
    workers: int,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]], int]:
    """Render and save images ``1..n`` (``plan``: the ids of the validation images and of the
    empty ones); their COCO records and annotations per split, and the number of images without
    objects."""
    val_ids, empty_ids = plan
    size = max(1, min(_CHUNK, -(-n // (4 * workers))))  # a few chunks a worker: even loads
    chunks = [
        _Chunk(image_dir, ids, frozenset(empty_ids.intersection(ids)), recipe)
        for ids in (tuple(range(a, min(a + size, n + 1))) for a in range(1, n + 1, size))
    ]
    split_images: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    split_anns: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    empty = 0
    for image_id, w, h, shapes in _draw_all(chunks, workers):
        file_name = f"{image_id:06d}.png"
        split = "val" if image_id in val_ids else "train"
        empty += not shapes
        split_images[split].append(
            {"id": image_id, "file_name": file_name, "width": w, "height": h}
        )
        first_id = len(split_anns["train"]) + len(split_anns["val"]) + 1
        split_anns[split] += _annotations(image_id, shapes, first_id)
    return split_images, split_anns, empty


def _recipe(
    seed: int, sides: tuple[int, int], max_objects: int, classes: Any, object_size: Any
) -> _Recipe:
    """The recipe of every image, once ``classes`` and ``object_size`` are checked."""
    why = classes_problem(classes)
    if why is not None:
        raise SpecError(f"synth: classes {why}, got {classes!r}")
    why = object_size_problem(object_size)
    if why is not None:
        raise SpecError(f"synth: object_size {why}, got {object_size!r}")
    span = (float(object_size[0]), float(object_size[1]))
    return _Recipe(seed, sides, max_objects, classes, _spans(span))


def generate(  # noqa: PLR0913 - keyword-only: one per option of `data synth` and `data.synth`
    out_dir: str | Path,
    *,
    images: int,
    seed: int,
    size: int | tuple[int, int] = 128,
    classes: int = len(SHAPES),
    object_size: tuple[float, float] = OBJECT_SIZE,
    val_fraction: float = 0.25,
    max_objects: int = 6,
    empty_fraction: float = 0.05,
    workers: int | None = None,
) -> SynthInfo:
    """Write ``images`` synthetic images and a COCO train/val split under ``out_dir``.

    Layout: ``out_dir/images/000001.png ...`` shared by ``out_dir/train.json`` and
    ``out_dir/val.json`` (image and annotation ids are unique across both).

    ``size`` is the image side in pixels: an ``int`` for square images, or ``(min, max)`` to
    draw height and width independently in that range (varied aspect ratios). ``classes``
    (1 to 36): up to six, shapes of any colour; more, shapes in given colours
    (:func:`~jdsearch.spec.synth.class_names`). ``object_size``: the range of a shape's
    nominal side s, as fractions of the image's shorter side: its window has the area of an
    s × s square (a bar's, of a 1.2s × 1.2s one), its sides raised to 8 px (10 for rings and
    crosses) and shrunk to fit the image; the default, 0.07 to 0.88, is split into small,
    medium and large shapes, and another range is split alike.

    About ``val_fraction`` of the images go to validation (at least one image in each split),
    and about ``empty_fraction`` of them (at least one) contain no objects, only clutter. Other
    images hold 1..``max_objects`` shapes (fewer when they do not fit).

    ``workers`` processes (default: :func:`available_cpus`; 1: this one) draw and save the
    images, each from its own random stream: the files are the same for any number of them.

    Files are overwritten; PNGs left in ``images/`` by an earlier, larger run are not removed
    (the JSON files never refer to them).
    """
    lo, hi = _check_args(images, seed, size, val_fraction, max_objects)
    recipe = _recipe(int(seed), (lo, hi), max_objects, classes, object_size)
    if not 0.0 <= float(empty_fraction) < 1.0:
        raise SpecError(f"synth: empty_fraction must be in [0, 1), got {empty_fraction!r}")
    workers = _check_workers(workers)
    n, out = int(images), Path(out_dir)
    image_dir = _image_dir(out)
    started = time.perf_counter()
    plan = _plan_splits(n, recipe.seed, float(val_fraction), float(empty_fraction))
    info = _write_set(out, _write_images(image_dir, n, recipe, plan, workers), recipe)
    objects = info.train_annotations + info.val_annotations
    seconds = time.perf_counter() - started
    logger.info("synth: wrote %d images, %d objects to %s in %.1fs", n, objects, out, seconds)
    return info


def _write_set(
    out: Path,
    drawn: tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]], int],
    recipe: _Recipe,
) -> SynthInfo:
    """Write ``train.json`` and ``val.json`` of the images ``drawn`` (:func:`_write_images`);
    what the set holds."""
    split_images, split_anns, empty = drawn
    names = class_names(recipe.classes)
    train_json, val_json = out / "train.json", out / "val.json"
    for split, path in (("train", train_json), ("val", val_json)):
        doc = _coco_doc(split, recipe.seed, split_images[split], split_anns[split], names)
        _write_text(path, doc)
    return SynthInfo(
        out_dir=out,
        image_dir=out / "images",
        train_json=train_json,
        val_json=val_json,
        images=len(split_images["train"]) + len(split_images["val"]),
        train_images=len(split_images["train"]),
        val_images=len(split_images["val"]),
        train_annotations=len(split_anns["train"]),
        val_annotations=len(split_anns["val"]),
        empty_images=empty,
        class_names=names,
        seed=recipe.seed,
    )


def ensure_dataset(out_dir: str | Path, *, images: int, seed: int) -> Path:
    """``out_dir``, after writing a dataset there with :func:`generate` (``images`` images from
    ``seed``, the default size) unless its ``train.json`` and ``val.json`` are there already;
    says so on stdout when it generates. The command line's embedded dataset is made so."""
    out = Path(out_dir)
    if not (out / "train.json").is_file() or not (out / "val.json").is_file():
        print(f"generating the embedded synthetic dataset in {out} ...", flush=True)
        info = generate(out, images=images, seed=seed)
        print(
            f"  {info.train_images} train / {info.val_images} val images, classes: {', '.join(info.class_names)}"
        )
    return out
