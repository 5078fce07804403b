"""The synthetic data set's spec: the study spec's ``data.synth`` section, what
:func:`jdsearch.data.synth.generate` is asked to write, and the limits of what it can draw
(image sides, classes, object sizes), checked here for the spec, the generator and the command
line alike. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jdsearch.core.config import check, is_int, is_number

__all__ = [
    "COLOURS",
    "MAX_CLASSES",
    "MAX_IMAGES",
    "MAX_SIDE",
    "MIN_SIDE",
    "OBJECT_SIZE",
    "SHAPES",
    "SynthSpec",
    "class_names",
    "classes_problem",
    "object_size_problem",
]

#: Smallest and largest image side, so that every size class of object fits.
MIN_SIDE = 32
MAX_SIDE = 4096
#: The most images a set may have: far beyond any use of a synthetic set (the quickstart's has
#: 640), far below the generator's per-image arrays filling memory.
MAX_IMAGES = 1_000_000
#: The shapes, in category-id order: the classes of a set of up to six classes, any colour each.
SHAPES: tuple[str, ...] = ("disc", "ring", "square", "triangle", "cross", "bar")
#: The colours of a set of more than six classes, where a class is a shape in one colour.
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "cyan", "magenta")
MAX_CLASSES = len(SHAPES) * len(COLOURS)
#: The default range of a shape's nominal side, as fractions of the image's shorter side.
OBJECT_SIZE = (0.07, 0.88)


def class_names(classes: int) -> tuple[str, ...]:
    """The names of ``classes`` classes, in category-id order: up to six, the first shapes of
    :data:`SHAPES` (any colour); more, each shape in each colour of :data:`COLOURS`, colour by
    colour (``red disc``, ``red ring``, … ``red bar``, ``green disc``, …)."""
    if classes <= len(SHAPES):
        return SHAPES[:classes]
    return tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)[:classes]


def classes_problem(classes: Any) -> str | None:
    """Why ``classes`` is not a number of classes the generator can draw; ``None`` if it is."""
    if not is_int(classes) or not 1 <= classes <= MAX_CLASSES:
        return f"must be an integer from 1 to {MAX_CLASSES} ({len(SHAPES)} shapes × colours)"
    return None


def object_size_problem(size: Any) -> str | None:
    """Why ``size`` is not a range of object sizes (``(min, max)``, fractions of the image's
    shorter side, ``0 < min < max ≤ 1``); ``None`` if it is."""
    ok = isinstance(size, tuple | list) and len(size) == 2 and all(is_number(v) for v in size)
    if not ok or not 0 < size[0] < size[1] <= 1:
        return "must be a min and a max, fractions of the image's shorter side, 0 < min < max ≤ 1"
    return None


@dataclass(frozen=True)
class SynthSpec:
    """A synthetic dataset to generate when ``data.dir`` has none (:func:`jdsearch.data.synth.generate`).

    ``size``: the images' side in pixels. ``classes``: how many classes (up to six: shapes of
    any colour; more: shapes in given colours, :func:`class_names`). ``object_size``: the range
    of a shape's nominal side, as fractions of the image's shorter side (:data:`OBJECT_SIZE`).
    """

    images: int = 640
    seed: int = 0
    size: int = 128
    classes: int = len(SHAPES)
    object_size: tuple[float, ...] = OBJECT_SIZE

    def __post_init__(self) -> None:
        check(self.images >= 2, self, "images", "must be ≥ 2 (an image in each split at least)")
        check(self.images <= MAX_IMAGES, self, "images", f"must be at most {MAX_IMAGES}")
        check(self.seed >= 0, self, "seed", "must not be negative")
        check(MIN_SIDE <= self.size <= MAX_SIDE, self, "size", f"must be {MIN_SIDE} to {MAX_SIDE}")
        why = classes_problem(self.classes)
        check(why is None, self, "classes", why or "")
        why = object_size_problem(self.object_size)
        check(why is None, self, "object_size", why or "")
        object.__setattr__(self, "object_size", tuple(float(v) for v in self.object_size))
