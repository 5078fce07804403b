"""COCO-format detection data: validated loading, batching, and dynamic input resolution.

``CocoDataset`` reads a COCO ``instances``-style JSON file with the standard :mod:`json` module and
validates every record before training starts, so that a malformed dataset fails in seconds with a
one-line :class:`~jdsearch.core.errors.DataError` naming the file and the record, not hours later inside
a training step. Only what box detection needs is kept (images, boxes, categories, crowd flags and
areas); segmentations are ignored.

Conventions (torchvision's):

* labels are contiguous, ``1..K`` in the order of sorted category id; ``0`` is background;
* target boxes are ``float32`` ``[N, 4]`` in absolute pixel ``x1, y1, x2, y2``;
* ``iscrowd`` annotations are kept in the targets by default with ``iscrowd == 1``. torchvision's
  Faster R-CNN ignores that field and would treat crowd boxes as ordinary objects, so
  :func:`jdsearch.engine.train.train` drops them from every batch (COCO practice); ``keep_crowd=False``
  drops them here already. Evaluation (:meth:`CocoDataset.coco_gt`) always includes them, because
  ``COCOeval`` handles crowd regions itself.
* boxes are validated as training sees them: clipped to the image and in ``float32``, so a box
  that is only positive in ``float64`` (``1e-9`` wide) is refused before training starts.

Dynamic resolution (Joint-DetNAS, sections 3.1.2 and A.1.3) samples one :class:`Resolution` per
training iteration. A resolution ``LONGxSHORT`` means what it means in mmdetection and torchvision:
resize keeping the aspect ratio so that the short side is at most ``SHORT`` and the long side at most
``LONG`` (one of the two bounds is met exactly).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from jdsearch.core.config import env_number
from jdsearch.core.errors import CheckpointError, DataError, SpecError
from jdsearch.core.files import read_bytes
from jdsearch.core.limits import MAX_ANNOTATION_BYTES, MAX_IMAGE_SIDE
from jdsearch.core.resolution import Resolution, parse_resolutions

__all__ = [
    "BBOX_TOLERANCE",
    "CocoDataset",
    "DataSummary",
    "ResolutionSampler",
    "category_differences",
    "check_same_categories",
    "collate",
    "cycled_batches",
    "load_image",
    "make_loader",
    "open_image",
    "read_categories",
    "set_resolution",
    "targets_to",
    "using_resolution",
    "validate",
]

logger = logging.getLogger(__name__)

#: How far (in pixels) a box may stick out of its image before it is rejected; covers float
#: rounding in converted datasets. Boxes inside the tolerance are clipped to the image.
BBOX_TOLERANCE = 1.0

#: The fewest ``float32`` steps (at the image's size) a clipped box side must span: fewer and it
#: may collapse to zero width once torchvision rescales or flips it, which stops training.
MIN_BOX_ULPS = 8

#: Integer fields (ids, sizes) must fit in a signed 64-bit integer, as NumPy and torch hold them.
_INT_LIMIT = 2**63 - 1

Target = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One validated entry of ``images``."""

    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class CategoryRecord:
    """One validated entry of ``categories``."""

    id: int
    name: str
    supercategory: str = ""


@dataclass(frozen=True, slots=True, eq=False)
class _ImageEntry:
    """An image and its annotations as compact arrays (COCO ``xywh`` boxes, as in the file)."""

    image: ImageRecord
    ann_ids: np.ndarray  # int64 [N]
    boxes_xywh: np.ndarray  # float64 [N, 4]
    category_ids: np.ndarray  # int64 [N]
    areas: np.ndarray  # float64 [N]
    iscrowd: np.ndarray  # int64 [N]


@dataclass(frozen=True)
class DataSummary:
    """What :func:`validate` found in a dataset (``jdsearch data check`` prints it)."""

    ann_file: Path
    image_dir: Path
    images: int
    annotations: int
    categories: int
    images_without_objects: int
    crowd_annotations: int
    #: ``(category name, number of annotations)`` in label order.
    per_category: tuple[tuple[str, int], ...] = field(default=())

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        out = [
            f"annotation file: {self.ann_file}",
            f"image folder:    {self.image_dir}",
            f"images:          {self.images} ({self.images_without_objects} without objects)",
            f"annotations:     {self.annotations} ({self.crowd_annotations} crowd"
            + (", left out of training)" if self.crowd_annotations else ")"),
            f"categories:      {self.categories}",
        ]
        out.extend(f"  {name}: {count}" for name, count in self.per_category)
        return out


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _short(value: Any, limit: int = 80) -> str:
    """A compact one-line rendering of a JSON value for error messages."""
    if isinstance(value, int) and value.bit_length() > 200:  # str() of a huge int is slow or fails
        return f"<integer of about {int(value.bit_length() * 0.30103)} digits>"
    try:
        text = json.dumps(value, allow_nan=True, separators=(", ", ": "))
    except (TypeError, ValueError):
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Validator:
    """Raises ``DataError`` messages of the form ``FILE: RECORD: PROBLEM``."""

    def __init__(self, ann_file: Path) -> None:
        self.name = str(ann_file)

    def fail(self, where: str, problem: str) -> NoReturn:
        prefix = f"{self.name}: {where}: " if where else f"{self.name}: "
        raise DataError(prefix + problem)

    def int_field(self, rec: Mapping[str, Any], key: str, where: str) -> int:
        if key not in rec:
            self.fail(where, f"missing field {key!r}")
        value = rec[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(where, f"{key} {_short(value)} is not an integer")
        if isinstance(value, float):
            if not math.isfinite(value):
                self.fail(where, f"{key} {_short(value)} is not finite")
            if not value.is_integer():
                self.fail(where, f"{key} {_short(value)} is not an integer")
        if abs(value) > _INT_LIMIT:
            self.fail(where, f"{key} {_short(value)} does not fit in 64 bits")
        return int(value)

    def number(self, value: Any, what: str, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(where, f"{what} {_short(value)} is not a number")
        number = _as_float(value)
        if not math.isfinite(number):
            self.fail(where, f"{what} {_short(value)} is not finite")
        return number


def _as_float(value: float) -> float:
    """``float(value)``; ``inf`` for an integer beyond float range."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _parse_json(v: _Validator, raw: bytes) -> Any:
    """The parsed bytes; any failure one line (an integer too long for Python is one too)."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        v.fail("", f"not UTF-8 text ({exc.reason} at byte {exc.start})")
    except json.JSONDecodeError as exc:
        v.fail("", f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}")
    except RecursionError:
        v.fail("", "invalid JSON: nested too deeply")
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        v.fail("", f"invalid JSON: {str(exc).split(';')[0]}")


def _read_json(path: Path) -> dict[str, Any]:
    v = _Validator(path)
    try:
        raw = read_bytes(path, MAX_ANNOTATION_BYTES)
    except FileNotFoundError:
        v.fail("", "annotation file not found")
    except IsADirectoryError:
        v.fail("", "is a directory, expected a COCO JSON file")
    except OSError as exc:
        v.fail("", f"cannot read annotation file ({exc.strerror or exc})")
    if not raw.strip():
        v.fail("", "annotation file is empty")
    data = _parse_json(v, raw)
    if not isinstance(data, dict):
        v.fail("", f"top level is a JSON {type(data).__name__}, expected an object")
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        v.fail("", "missing top-level key(s) " + ", ".join(repr(k) for k in missing))
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            v.fail("", f"top-level {key!r} is a {type(data[key]).__name__}, expected a list")
    return data


class _ImageFolder:
    """Existence checks against an image folder, listing each directory at most once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._listings: dict[Path, frozenset[str]] = {}

    def has(self, file_name: str) -> bool:
        path = self.root / file_name
        parent = path.parent
        if parent not in self._listings:
            try:
                with os.scandir(parent) as entries:
                    names = frozenset(e.name for e in entries if e.is_file())
            except OSError:
                names = frozenset()
            self._listings[parent] = names
        if path.name in self._listings[parent]:
            return True
        return path.is_file()  # symlinks and odd file systems: ask the OS directly


def _parse_categories(v: _Validator, items: list[Any]) -> tuple[CategoryRecord, ...]:
    categories: dict[int, CategoryRecord] = {}
    for pos, rec in enumerate(items):
        where = f"categories[{pos}]"
        if not isinstance(rec, dict):
            v.fail(where, f"is a {type(rec).__name__}, expected an object")
        cid = v.int_field(rec, "id", where)
        where = f"category id {cid}"
        if cid in categories:
            v.fail(where, "duplicate category id")
        name = rec.get("name")
        if not isinstance(name, str) or not name.strip():
            v.fail(where, f"name {_short(name)} is not a non-empty string")
        supercategory = rec.get("supercategory", "")
        categories[cid] = CategoryRecord(
            cid, name, supercategory if isinstance(supercategory, str) else ""
        )
    if not categories:
        v.fail("", "'categories' is empty; a detection dataset needs at least one category")
    return tuple(categories[cid] for cid in sorted(categories))


def read_categories(ann_file: str | Path) -> tuple[CategoryRecord, ...]:
    """The validated ``categories`` of a COCO annotation file, in label order (label k is the
    k-th smallest category id); its images and annotations are not read further.

    Raises:
        DataError: an unreadable or invalid file, or a bad category record (one line naming it).
    """
    path = Path(ann_file)
    return _parse_categories(_Validator(path), _read_json(path)["categories"])


def _parse_images(v: _Validator, items: list[Any], folder: _ImageFolder) -> list[ImageRecord]:
    images: list[ImageRecord] = []
    seen: set[int] = set()
    for pos, rec in enumerate(items):
        where = f"images[{pos}]"
        if not isinstance(rec, dict):
            v.fail(where, f"is a {type(rec).__name__}, expected an object")
        iid = v.int_field(rec, "id", where)
        where = f"image id {iid}"
        if iid in seen:
            v.fail(where, "duplicate image id")
        seen.add(iid)
        file_name = rec.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            v.fail(where, f"file_name {_short(file_name)} is not a non-empty string")
        width = v.int_field(rec, "width", where)
        height = v.int_field(rec, "height", where)
        if width <= 0 or height <= 0:
            v.fail(where, f"size {width}x{height} is not positive")
        if max(width, height) > MAX_IMAGE_SIDE:
            v.fail(where, f"size {width}x{height}: a side is more than {MAX_IMAGE_SIDE} pixels")
        if not folder.has(file_name):
            v.fail(where, f"image file {file_name!r} not found in {folder.root}")
        images.append(ImageRecord(iid, file_name, width, height))
    if not images:
        v.fail("", "'images' is empty")
    return images


_Annotation = tuple[int, tuple[float, float, float, float], int, float, int]


def _parse_annotations(
    v: _Validator,
    items: list[Any],
    images: Mapping[int, ImageRecord],
    category_ids: frozenset[int],
    image_dir: Path | None = None,
) -> dict[int, list[_Annotation]]:
    per_image: dict[int, list[_Annotation]] = {}
    seen: set[int] = set()
    for pos, rec in enumerate(items):
        where = f"annotations[{pos}]"
        if not isinstance(rec, dict):
            v.fail(where, f"is a {type(rec).__name__}, expected an object")
        aid = v.int_field(rec, "id", where)
        where = f"annotation id {aid}"
        if aid in seen:
            v.fail(where, "duplicate annotation id")
        seen.add(aid)
        iid = v.int_field(rec, "image_id", where)
        if iid not in images:
            v.fail(where, f"image_id {iid} is not in 'images'")
        where = f"annotation id {aid} (image {iid})"
        cid = v.int_field(rec, "category_id", where)
        if cid not in category_ids:
            v.fail(where, f"category_id {cid} is not in 'categories'")
        box = _parse_bbox(v, rec, where, images[iid], image_dir)
        iscrowd = 0
        if "iscrowd" in rec:
            crowd = rec["iscrowd"]
            if isinstance(crowd, bool) or crowd not in (0, 1):
                v.fail(where, f"iscrowd {_short(crowd)} is not 0 or 1")
            iscrowd = int(crowd)
        area = box[2] * box[3]
        if rec.get("area") is not None:
            area = v.number(rec["area"], "area", where)
            if area < 0:
                v.fail(where, f"area {_short(rec['area'])} is negative")
        per_image.setdefault(iid, []).append((aid, box, cid, area, iscrowd))
    return per_image


def _parse_bbox(
    v: _Validator,
    rec: Mapping[str, Any],
    where: str,
    img: ImageRecord,
    image_dir: Path | None = None,
) -> tuple[float, float, float, float]:
    """The annotation's ``[x, y, w, h]``: 4 finite numbers, positive size, inside the image
    (within :data:`BBOX_TOLERANCE`) and not empty once clipped to it. A box outside the image
    whose file (in ``image_dir``) is not the size its record says is reported as that mismatch:
    the record is wrong, not the box."""
    if "bbox" not in rec:
        v.fail(where, "missing field 'bbox'")
    bbox = rec["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4:
        v.fail(where, f"bbox {_short(bbox)} is not a list of 4 numbers")
    if any(isinstance(c, bool) or not isinstance(c, int | float) for c in bbox):
        v.fail(where, f"bbox {_short(bbox)} is not a list of 4 numbers")
    coords = [_as_float(c) for c in bbox]
    if not all(math.isfinite(c) for c in coords):
        v.fail(where, f"bbox {_short(bbox)} has a non-finite number")
    x, y, w, h = coords
    if w <= 0:
        v.fail(where, f"bbox {_short(bbox)} has non-positive width")
    if h <= 0:
        v.fail(where, f"bbox {_short(bbox)} has non-positive height")
    tol = BBOX_TOLERANCE
    if x < -tol or y < -tol or x + w > img.width + tol or y + h > img.height + tol:
        if image_dir is not None:
            _check_record_size(Path(v.name), img, image_dir)
        v.fail(where, f"bbox {_short(bbox)} lies outside the {img.width}x{img.height} image")
    if min(x + w, img.width) - max(x, 0.0) <= 0 or min(y + h, img.height) - max(y, 0.0) <= 0:
        v.fail(where, f"bbox {_short(bbox)} is empty once clipped to the image")
    _check_float32_box(v, bbox, where, img)
    return x, y, w, h


def _check_float32_box(v: _Validator, bbox: list[Any], where: str, img: ImageRecord) -> None:
    """Fail unless the box, clipped to the image and in ``float32`` as training holds it, spans at
    least :data:`MIN_BOX_ULPS` ``float32`` steps each way (torchvision stops on a flat box)."""
    x, y, w, h = (float(c) for c in bbox)
    step = float(np.spacing(np.float32(max(img.width, img.height))))
    for what, lo, hi, side in (("wide", x, x + w, img.width), ("high", y, y + h, img.height)):
        size = float(np.float32(min(hi, side)) - np.float32(max(lo, 0.0)))
        if size < MIN_BOX_ULPS * step:
            v.fail(
                where,
                f"bbox {_short(bbox)} is {size:.3g} px {what} once clipped and in float32 "
                f"(training's dtype); boxes need at least {MIN_BOX_ULPS * step:.2g} px",
            )


def _load_entries(
    ann_file: Path, image_dir: Path
) -> tuple[tuple[CategoryRecord, ...], tuple[_ImageEntry, ...]]:
    v = _Validator(ann_file)
    data = _read_json(ann_file)
    if not image_dir.is_dir():
        v.fail("", f"image folder {image_dir} does not exist or is not a folder")
    categories = _parse_categories(v, data["categories"])
    images = _parse_images(v, data["images"], _ImageFolder(image_dir))
    by_id = {img.id: img for img in images}
    per_image = _parse_annotations(
        v, data["annotations"], by_id, frozenset(c.id for c in categories), image_dir
    )
    entries = []
    for img in images:
        anns = per_image.get(img.id, [])
        entries.append(
            _ImageEntry(
                image=img,
                ann_ids=np.array([a[0] for a in anns], dtype=np.int64),
                boxes_xywh=np.array([a[1] for a in anns], dtype=np.float64).reshape(-1, 4),
                category_ids=np.array([a[2] for a in anns], dtype=np.int64),
                areas=np.array([a[3] for a in anns], dtype=np.float64),
                iscrowd=np.array([a[4] for a in anns], dtype=np.int64),
            )
        )
    return categories, tuple(entries)


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def _to_chw_float(img: Image.Image) -> np.ndarray:
    """Decode to ``float32 [3, H, W]`` RGB in ``[0, 1]`` (NumPy: far cheaper than small torch ops)."""
    rgb = _decode_rgb8(img)
    if rgb is None:
        # 16-bit grayscale: PIL's RGB conversion would saturate it, so scale by hand.
        gray = np.clip(np.asarray(img, dtype=np.float32) / np.float32(65535), 0.0, 1.0)
        return np.ascontiguousarray(np.broadcast_to(gray, (3, *gray.shape)))
    return _rgb8_to_chw_float(rgb)


def _decode_rgb8(img: Image.Image) -> np.ndarray | None:
    """The decoded ``uint8 [H, W, 3]`` RGB pixels; ``None`` for a 16-bit grayscale image."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I"):
        return None
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def _rgb8_to_chw_float(rgb: np.ndarray) -> np.ndarray:
    out = np.empty((3, rgb.shape[0], rgb.shape[1]), dtype=np.float32)
    np.divide(rgb.transpose(2, 0, 1), np.float32(255), out=out, dtype=np.float32)
    return out


def image_cache_bytes() -> int:
    """How many bytes of decoded images a dataset keeps in memory: ``JDSEARCH_IMAGE_CACHE_MB``
    (default 1024); a dataset whose images take more keeps none."""
    return int(env_number("JDSEARCH_IMAGE_CACHE_MB", 1024) * 2**20)


@contextlib.contextmanager
def open_image(path: str | Path, where: str = "") -> Iterator[Image.Image]:
    """``PIL.Image.open(path)`` for reading; every failure to open or decode it (inside the
    ``with`` block too), a missing file and an image too large to decode safely (PIL's
    decompression-bomb limit) is one :class:`DataError` line: ``WHERE`` (e.g. the annotation file
    and image id), then the file, then what is wrong."""
    p = Path(path)
    prefix = f"{where}: {p}" if where else str(p)
    try:
        with Image.open(p) as img:
            if max(img.size) > MAX_IMAGE_SIDE:  # from the header, before decoding
                w, h = img.size
                raise DataError(f"{prefix}: {w}x{h}: a side is more than {MAX_IMAGE_SIDE} pixels")
            yield img
    except FileNotFoundError:
        raise DataError(f"{prefix}: no such image file") from None
    except Image.DecompressionBombError as exc:
        what = str(exc).split(", could be")[0]
        raise DataError(f"{prefix}: image too large to decode safely ({what})") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{prefix}: cannot decode image ({exc})") from None


def _check_record_size(ann_file: Path, rec: ImageRecord, image_dir: Path) -> None:
    """Fail when the image file of ``rec`` is not the size the record says (its header only is
    read); an image that cannot be opened is left to be reported when it is read."""
    path = image_dir / rec.file_name
    try:
        with open_image(path) as img:
            size = img.size
    except DataError:
        return
    _check_size(ann_file, rec, path, size)


def _check_size(ann_file: Path, rec: ImageRecord, path: Path, size: tuple[int, int]) -> None:
    """Fail unless an opened image has the size its record says (checked before decoding)."""
    if size != (rec.width, rec.height):
        raise DataError(
            f"{ann_file}: image id {rec.id}: {path} is {size[0]}x{size[1]} "
            f"but the record says {rec.width}x{rec.height}"
        )


def load_image(path: str | Path) -> Tensor:
    """One image file as the detector's input: ``float32 [3, H, W]`` RGB in ``[0, 1]``; a
    :class:`DataError` line naming the file when it cannot be read (see :func:`open_image`)."""
    with open_image(path) as img:
        return torch.from_numpy(_to_chw_float(img))


class CocoDataset(Dataset[tuple[Tensor, Target]]):
    """A validated COCO detection dataset yielding ``(image, target)`` in torchvision's format.

    ``image`` is a ``float32`` ``[3, H, W]`` RGB tensor in ``[0, 1]`` (grayscale, 16-bit grayscale,
    palette and RGBA files are converted, alpha dropped; EXIF orientation is not applied, as in COCO). ``target`` holds ``boxes``
    (``float32 [N, 4]`` ``x1, y1, x2, y2`` pixels, clipped to the image), ``labels`` (``int64 [N]``,
    ``1..K``), ``image_id`` (a Python ``int``), ``iscrowd`` (``int64 [N]``) and ``area``
    (``float32 [N]``, the file's ``area`` or the box area when absent). Images without objects give
    ``boxes`` of shape ``[0, 4]``.

    All records are validated when the dataset is built; a decoded image whose size disagrees with
    its record raises :class:`DataError` when it is read.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        *,
        keep_crowd: bool = True,
        max_images: int | None = None,
    ) -> None:
        ann_path = Path(ann_file)
        image_path = Path(image_dir)
        categories, entries = _load_entries(ann_path, image_path)
        if max_images is not None:
            if max_images < 1:
                raise ValueError(f"max_images must be >= 1, got {max_images}")
            entries = entries[:max_images]
        self._setup(ann_path, image_path, categories, entries, keep_crowd)
        logger.info(
            "loaded %s: %d images, %d annotations, %d categories",
            ann_path,
            len(entries),
            sum(len(e.ann_ids) for e in entries),
            len(categories),
        )

    def _setup(
        self,
        ann_file: Path,
        image_dir: Path,
        categories: tuple[CategoryRecord, ...],
        entries: tuple[_ImageEntry, ...],
        keep_crowd: bool,
    ) -> None:
        self.ann_file = ann_file
        self.image_dir = image_dir
        self.keep_crowd = keep_crowd
        self._categories = categories
        self._entries = entries
        self._label_of = {c.id: i + 1 for i, c in enumerate(categories)}
        # A small set keeps its decoded pixels (uint8): each epoch and each evaluation size
        # after the first reads no file and decodes nothing.
        pixels = sum(3 * e.image.width * e.image.height for e in entries)
        self._decoded: dict[int, np.ndarray] | None = (
            {} if 0 < pixels <= image_cache_bytes() else None
        )

    # -- categories ------------------------------------------------------------------------

    @property
    def category_ids(self) -> list[int]:
        """COCO category ids in label order: ``category_ids[i]`` has label ``i + 1``."""
        return [c.id for c in self._categories]

    @property
    def class_names(self) -> list[str]:
        """Category names in label order (``class_names[i]`` has label ``i + 1``)."""
        return [c.name for c in self._categories]

    @property
    def num_classes(self) -> int:
        """Number of classes including background (``K + 1``), as torchvision expects."""
        return len(self._categories) + 1

    def label_to_category(self, label: int) -> int:
        """The COCO category id of a contiguous label ``1..K``."""
        if not 1 <= int(label) <= len(self._categories):
            raise ValueError(f"label {label} is outside 1..{len(self._categories)}")
        return self._categories[int(label) - 1].id

    def category_to_label(self, category_id: int) -> int:
        """The contiguous label ``1..K`` of a COCO category id."""
        try:
            return self._label_of[int(category_id)]
        except KeyError:
            raise ValueError(f"category id {category_id} is not in {self.ann_file}") from None

    # -- images ----------------------------------------------------------------------------

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids in dataset order."""
        return [e.image.id for e in self._entries]

    def image_record(self, index: int) -> ImageRecord:
        """The validated ``images`` record of item ``index``."""
        return self._entries[index].image

    def image_path(self, index: int) -> Path:
        """The file path of item ``index``'s image."""
        return self.image_dir / self._entries[index].image.file_name

    def __len__(self) -> int:
        return len(self._entries)

    def subset(self, indices: Iterable[int]) -> CocoDataset:
        """A dataset over the given items (same categories and labels; ``coco_gt`` follows)."""
        chosen = tuple(self._entries[i] for i in indices)
        if len({e.image.id for e in chosen}) != len(chosen):
            raise ValueError("subset indices repeat an image")
        out = CocoDataset.__new__(CocoDataset)
        out._setup(self.ann_file, self.image_dir, self._categories, chosen, self.keep_crowd)
        return out

    def _read_image(self, entry: _ImageEntry) -> Tensor:
        rec = entry.image
        cached = None if self._decoded is None else self._decoded.get(rec.id)
        if cached is not None:
            return torch.from_numpy(_rgb8_to_chw_float(cached))
        path = self.image_dir / rec.file_name
        with open_image(path, f"{self.ann_file}: image id {rec.id}") as img:
            _check_size(self.ann_file, rec, path, img.size)
            rgb = _decode_rgb8(img)
            array = _to_chw_float(img) if rgb is None else _rgb8_to_chw_float(rgb)
        if rgb is not None and self._decoded is not None and get_worker_info() is None:
            # Kept by the main process only: a loader worker's copy would go with the worker.
            self._decoded[rec.id] = rgb
        return torch.from_numpy(array)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        entry = self._entries[index]
        image = self._read_image(entry)
        keep = np.ones(len(entry.ann_ids), dtype=bool)
        if not self.keep_crowd:
            keep = entry.iscrowd == 0
        xywh = entry.boxes_xywh[keep]
        boxes = np.empty((len(xywh), 4), dtype=np.float64)
        boxes[:, 0] = np.clip(xywh[:, 0], 0.0, entry.image.width)
        boxes[:, 1] = np.clip(xywh[:, 1], 0.0, entry.image.height)
        boxes[:, 2] = np.clip(xywh[:, 0] + xywh[:, 2], 0.0, entry.image.width)
        boxes[:, 3] = np.clip(xywh[:, 1] + xywh[:, 3], 0.0, entry.image.height)
        labels = [self._label_of[int(c)] for c in entry.category_ids[keep]]
        target: Target = {
            "boxes": torch.from_numpy(boxes.astype(np.float32)),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": entry.image.id,
            "iscrowd": torch.from_numpy(entry.iscrowd[keep].copy()),
            "area": torch.from_numpy(entry.areas[keep].astype(np.float32)),
        }
        return image, target

    # -- evaluation ------------------------------------------------------------------------

    def coco_dict(self) -> dict[str, Any]:
        """The (validated, bbox-only) COCO dictionary of the images in this dataset."""
        images = []
        annotations = []
        for entry in self._entries:
            rec = entry.image
            images.append(
                {"id": rec.id, "file_name": rec.file_name, "width": rec.width, "height": rec.height}
            )
            for k in range(len(entry.ann_ids)):
                x, y, w, h = (float(c) for c in entry.boxes_xywh[k])
                annotations.append(
                    {
                        "id": int(entry.ann_ids[k]),
                        "image_id": rec.id,
                        "category_id": int(entry.category_ids[k]),
                        "bbox": [x, y, w, h],
                        "area": float(entry.areas[k]),
                        "iscrowd": int(entry.iscrowd[k]),
                    }
                )
        categories = [
            {"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in self._categories
        ]
        return {
            "info": {"description": f"jdsearch view of {self.ann_file.name}"},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }

    def coco_gt(self) -> Any:
        """A fresh ``pycocotools.coco.COCO`` ground truth for this dataset (no file re-read).

        Built from the validated records, so a :meth:`subset` evaluates on its own images only.
        pycocotools' progress prints are swallowed.
        """
        from pycocotools.coco import COCO

        gt = COCO()
        gt.dataset = self.coco_dict()
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        return gt


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def collate(batch: Sequence[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """Keep images and targets as lists: detection images differ in size."""
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets


def targets_to(targets: Sequence[Target], device: torch.device | str) -> list[Target]:
    """Move the tensors of each target to ``device`` (``image_id`` stays an ``int``)."""
    return [
        {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()}
        for t in targets
    ]


def _seed_worker(worker_id: int) -> None:
    """Seed Python and NumPy in a loader worker from the per-worker torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)  # third-party augmentations read NumPy's legacy global RNG


def cycled_batches(
    dataset: Dataset[Any], batch_size: int, count: int, *, seed: int
) -> Iterator[Any]:
    """``count`` shuffled batches of ``dataset`` (:func:`make_loader` with ``seed``); a data set
    of fewer batches is shuffled again, with ``seed + i`` where batch ``i`` ran out."""
    stream = iter(make_loader(dataset, batch_size, shuffle=True, seed=seed))
    for i in range(count):
        try:
            batch = next(stream)
        except StopIteration:
            stream = iter(make_loader(dataset, batch_size, shuffle=True, seed=seed + i))
            batch = next(stream)
        yield batch


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader[Any]:
    """A ``DataLoader`` with :func:`collate` whose order depends only on ``seed`` and the epoch.

    The shuffling generator is owned by the loader, so iterating it twice gives two different
    (but reproducible) epochs, and two loaders built with the same seed give the same sequence.
    ``pin_memory``: batches in page-locked memory, for fast copies to a GPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        persistent_workers=False,
    )


# --------------------------------------------------------------------------------------------
# Validation entry point
# --------------------------------------------------------------------------------------------


def validate(
    ann_file: str | Path, image_dir: str | Path, *, check_images: bool = True
) -> DataSummary:
    """Validate a COCO dataset and count what is in it (``jdsearch data check``).

    With ``check_images`` every image file's header is also read to confirm that it decodes and
    that its size matches its record (header only: fast, but a truncated file can still pass).
    """
    ann_path = Path(ann_file)
    image_path = Path(image_dir)
    categories, entries = _load_entries(ann_path, image_path)
    if check_images:
        for entry in entries:
            rec = entry.image
            path = image_path / rec.file_name
            with open_image(path, f"{ann_path}: image id {rec.id}") as img:
                _check_size(ann_path, rec, path, img.size)
    counts: Counter[int] = Counter()
    for entry in entries:
        counts.update(int(c) for c in entry.category_ids)
    return DataSummary(
        ann_file=ann_path,
        image_dir=image_path,
        images=len(entries),
        annotations=sum(len(e.ann_ids) for e in entries),
        categories=len(categories),
        images_without_objects=sum(1 for e in entries if len(e.ann_ids) == 0),
        crowd_annotations=int(sum(int(e.iscrowd.sum()) for e in entries)),
        per_category=tuple((c.name, counts[c.id]) for c in categories),
    )


# --------------------------------------------------------------------------------------------
# Resolutions
# --------------------------------------------------------------------------------------------


def _transform_of(model: torch.nn.Module) -> Any:
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    transform = getattr(model, "transform", None)
    if not isinstance(transform, GeneralizedRCNNTransform):
        raise TypeError(
            f"{type(model).__name__} has no GeneralizedRCNNTransform at .transform; "
            "set_resolution expects a torchvision GeneralizedRCNN"
        )
    return transform


def set_resolution(model: torch.nn.Module, res: Resolution) -> None:
    """Make a torchvision ``GeneralizedRCNN`` resize its inputs to ``res`` (train and eval)."""
    transform = _transform_of(model)
    transform.min_size = (res.short,)
    transform.max_size = res.long


def get_resolution(model: torch.nn.Module) -> Resolution:
    """The resolution a ``GeneralizedRCNN`` resizes to in eval mode."""
    transform = _transform_of(model)
    short = int(transform.min_size[-1])
    return Resolution(long=max(int(transform.max_size), short), short=short)


@contextlib.contextmanager
def using_resolution(model: torch.nn.Module, res: Resolution) -> Iterator[None]:
    """Temporarily set ``res`` on ``model``; the previous transform sizes come back on exit."""
    transform = _transform_of(model)
    saved = (transform.min_size, transform.max_size)
    set_resolution(model, res)
    try:
        yield
    finally:
        transform.min_size, transform.max_size = saved


class ResolutionSampler:
    """Uniform, seeded choice of one resolution per training iteration.

    Draw ``n`` depends only on ``(seed, n)``, so the state is just a counter: a resumed training
    that loads :meth:`state_dict` continues exactly the sequence it would have seen.
    """

    def __init__(self, resolutions: Sequence[Resolution | str], seed: int) -> None:
        self.resolutions = parse_resolutions(resolutions)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise SpecError(f"resolution sampler seed must be a non-negative integer, got {seed!r}")
        self.seed = seed
        self.step = 0

    def peek(self, step: int) -> Resolution:
        """The resolution of draw number ``step`` (0-based), without advancing."""
        rng = np.random.default_rng([self.seed, 0x5E5, step])
        return self.resolutions[int(rng.integers(len(self.resolutions)))]

    def next(self) -> Resolution:
        """The next resolution of the sequence (advances the draw counter)."""
        res = self.peek(self.step)
        self.step += 1
        return res

    def __next__(self) -> Resolution:
        return self.next()

    def __iter__(self) -> ResolutionSampler:
        return self

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly state: the resolutions, the seed and the number of draws made."""
        return {
            "resolutions": [str(r) for r in self.resolutions],
            "seed": self.seed,
            "step": self.step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`. Raises :class:`CheckpointError` when it is malformed,
        has a bad step, or lists other resolutions or another seed."""
        try:
            resolutions = [str(r) for r in state["resolutions"]]
            seed = state["seed"]
            step = state["step"]
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"resolution sampler state is malformed ({exc!r})") from None
        if resolutions != [str(r) for r in self.resolutions]:
            raise CheckpointError(
                f"resolution sampler state lists {resolutions}, but this run uses "
                f"{[str(r) for r in self.resolutions]}"
            )
        if seed != self.seed:
            raise CheckpointError(f"resolution sampler state has seed {seed}, this run {self.seed}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(f"resolution sampler state has a bad step {step!r}")
        self.step = step


def category_differences(
    train: str, train_cats: Sequence[tuple[int, str]], val: str, val_cats: Sequence[tuple[int, str]]
) -> list[str]:
    """How two splits' categories differ, one line each: an id named otherwise, an id in one
    split only, a name under two ids; ``[]`` when both hold the same ``(id, name)`` pairs.
    ``train``/``val`` name the files in the lines."""
    a, b = dict(train_cats), dict(val_cats)
    lines = [
        f"{val}: category id {cid} is named {b[cid]!r}, in {train} {a[cid]!r}"
        for cid in sorted(a.keys() & b.keys())
        if a[cid] != b[cid]
    ]
    for here, there, cats, other in ((val, train, b, a), (train, val, a, b)):
        for cid in sorted(cats.keys() - other.keys()):
            name = cats[cid]
            ids = [i for i, n in other.items() if n == name]
            where = f" (there its id is {ids[0]})" if ids else ""
            lines.append(f"{here}: category {name!r} (id {cid}) is not in {there}{where}")
    return lines


def check_same_categories(
    train: str | Path,
    cats: Sequence[tuple[int, str]],
    val: str | Path,
    other: Sequence[tuple[int, str]],
) -> None:
    """Refuse splits whose categories differ, one line for each difference.

    Raises:
        DataError: naming ``val``; its ``details``, one line for each id named otherwise or in
            one split only.
    """
    diffs = category_differences(str(train), cats, str(val), other)
    if diffs:
        raise DataError(
            f"{val}: its categories differ from {train}'s in {len(diffs)} way(s), one line each "
            "below; both splits need the same ids and names",
            details=diffs,
        )
