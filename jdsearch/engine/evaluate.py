"""COCO box mAP of a detector at one or several input resolutions.

With dynamic-resolution training (paper 3.1.2) one trained student is evaluated at every
resolution of its set, and the search scores each ``(student, resolution)`` pair. Inference runs in
eval mode under ``torch.no_grad``; the detector's resize sizes and train/eval mode are restored
afterwards. Metrics come from ``pycocotools`` (its console output is swallowed).

Size-bucket APs (``APs``/``APm``/``APl``) for which the ground truth has no object are reported
as ``NaN`` — not pycocotools' ``-1``, which would silently drag down any average it enters.
Overall ``AP``/``AP50``/``AP75`` are ``0.0`` when the detector finds nothing (and ``NaN`` only if
the dataset itself has no annotated object).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from jdsearch.core.errors import DataError
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import CocoDataset, make_loader, using_resolution

__all__ = [
    "CocoMetrics",
    "Detections",
    "coco_metrics",
    "evaluate",
    "match_categories",
    "predict",
]

logger = logging.getLogger(__name__)

# Indices into COCOeval.stats for the box metrics we keep.
_STATS = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5}


@dataclass(frozen=True)
class CocoMetrics:
    """COCO box metrics in ``[0, 1]`` (``NaN``: no ground-truth object of that size) + speed."""

    AP: float
    AP50: float
    AP75: float
    APs: float
    APm: float
    APl: float
    seconds: float = 0.0  # inference time over the dataset at this size (reading the images aside)
    images_per_s: float = 0.0
    detections: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Every field, as a plain dict."""
        return asdict(self)


@dataclass(frozen=True)
class Detections:
    """One image's detections in original-image pixels: boxes ``xyxy`` ``[N, 4]``, scores, labels."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor


def _run(
    detector: nn.Module, images: Sequence[Tensor], device: torch.device
) -> list[dict[str, Tensor]]:
    outputs = detector([im.to(device, non_blocking=True) for im in images])
    return [{k: v.detach().cpu() for k, v in out.items()} for out in outputs]


@contextlib.contextmanager
def _inference(detector: nn.Module, size: Resolution | None) -> Any:
    was_training = detector.training
    detector.eval()
    try:
        with (
            torch.no_grad(),
            using_resolution(detector, size) if size else contextlib.nullcontext(),
        ):
            yield
    finally:
        detector.train(was_training)


def predict(
    detector: nn.Module,
    images: Sequence[Tensor],
    size: Resolution | None = None,
    *,
    device: str | torch.device | None = None,
) -> list[Detections]:
    """Detections for ``images`` (float CHW in ``[0, 1]``) at ``size`` (default: current size)."""
    dev = torch.device(device) if device is not None else next(detector.parameters()).device
    detector.to(dev)
    with _inference(detector, size):
        outputs = _run(detector, images, dev)
    return [Detections(o["boxes"], o["scores"], o["labels"]) for o in outputs]


def coco_metrics(
    coco_gt: Any, results: list[dict[str, Any]], image_ids: Sequence[int]
) -> CocoMetrics:
    """Run ``COCOeval`` (bbox) on ``results`` (COCO result dicts, ``xywh``) over ``image_ids``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not coco_gt.getAnnIds(imgIds=list(image_ids)):
        nan = float("nan")
        return CocoMetrics(nan, nan, nan, nan, nan, nan, detections=len(results))
    with contextlib.redirect_stdout(io.StringIO()):
        # Build the detection COCO by hand: ``loadRes`` crashes on an empty list.
        dt = COCO()
        anns = []
        for i, r in enumerate(results, start=1):
            _, _, w, h = r["bbox"]
            anns.append({**r, "id": i, "area": w * h, "iscrowd": 0})
        dt.dataset = {
            "images": [dict(im) for im in coco_gt.dataset["images"]],
            "categories": [dict(c) for c in coco_gt.dataset["categories"]],
            "annotations": anns,
        }
        dt.createIndex()
        ev = COCOeval(coco_gt, dt, iouType="bbox")
        ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: float(ev.stats[i]) for k, i in _STATS.items()}
    clean = {k: (v if v >= 0 else math.nan) for k, v in stats.items()}
    return CocoMetrics(**clean, detections=len(results))


def match_categories(
    dataset: CocoDataset,
    num_classes: int,
    names: Sequence[str] | None = None,
    ids: Sequence[int] | None = None,
    *,
    source: str = "the detector",
) -> tuple[int, ...]:
    """The dataset's category id of each label ``1..K`` of a detector with ``num_classes``
    (background included) whose classes are ``names`` with COCO ids ``ids`` (as its checkpoint
    records them; either may be ``None``).

    Classes are matched by id (and their names must agree) when ids are recorded, else by name;
    with neither, by position (nothing can be checked). The dataset must have exactly the
    detector's categories: a missing, extra or renamed one would make the AP silently wrong.

    Raises:
        DataError: one line naming the annotation file, ``source`` and the first category that
            differs.
    """
    k = num_classes - 1
    have = dict(zip(dataset.category_ids, dataset.class_names, strict=True))
    where = f"{dataset.ann_file}: categories do not match {source}"
    if len(have) != k:
        raise DataError(f"{where}: {len(have)} categories here, {k} classes there")
    if ids is not None:
        for i, cid in enumerate(ids):
            theirs = names[i] if names is not None else None
            if cid not in have:
                raise DataError(
                    f"{where}: its class {i + 1} {theirs!r} has category id {cid}, not here"
                )
            if theirs is not None and have[cid] != theirs:
                raise DataError(
                    f"{where}: category id {cid} is {have[cid]!r} here, {theirs!r} there"
                )
        return tuple(int(i) for i in ids)
    if names is None:
        logger.warning("%s records no class names: classes matched by position", source)
        return tuple(dataset.category_ids)
    by_name = {name: cid for cid, name in have.items()}
    for i, name in enumerate(names):
        if name not in by_name:
            raise DataError(f"{where}: its class {i + 1} {name!r} is not a category here")
    if len(by_name) != len(have):
        raise DataError(f"{where}: category names repeat here, so they cannot be matched by name")
    return tuple(by_name[name] for name in names)


def _results(
    category_ids: Sequence[int], image_id: int, out: dict[str, Tensor]
) -> list[dict[str, Any]]:
    boxes = out["boxes"].numpy().astype(np.float64)
    scores = out["scores"].numpy().astype(np.float64)
    labels = out["labels"].numpy()
    rows = []
    for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels, strict=True):
        rows.append(
            {
                "image_id": int(image_id),
                "category_id": int(category_ids[int(label) - 1]),
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "score": float(score),
            }
        )
    return rows


def evaluate(
    detector: nn.Module,
    dataset: CocoDataset,
    sizes: Sequence[Resolution],
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    category_ids: Sequence[int] | None = None,
) -> dict[str, CocoMetrics]:
    """COCO box metrics of ``detector`` on ``dataset`` at each of ``sizes`` (key: ``str(size)``).

    The detector is moved to ``device`` and stays there; its sizes and mode are restored.
    Labels ``1..K`` are mapped to ``category_ids`` (see :func:`match_categories`; default: the
    dataset's ids in label order, for a detector trained on this dataset's categories); boxes go
    ``xyxy → xywh``.
    """
    ids = tuple(dataset.category_ids if category_ids is None else category_ids)
    predictor = getattr(getattr(detector, "roi_heads", None), "box_predictor", None)
    classes = getattr(getattr(predictor, "cls_score", None), "out_features", None)
    if classes is not None and classes - 1 != len(ids):
        raise DataError(
            f"{getattr(dataset, 'ann_file', 'dataset')}: {len(ids)} categories to evaluate, but the "
            f"detector has {classes - 1} classes"
        )
    dev = torch.device(device)
    detector.to(dev)
    loader = make_loader(
        dataset,
        batch_size,
        shuffle=False,
        seed=0,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
    )
    coco_gt = dataset.coco_gt()
    image_ids = dataset.image_ids
    resolutions = list(dict.fromkeys(Resolution.parse(size) for size in sizes))
    results, seconds = _detect_at_sizes(detector, loader, resolutions, ids, dev)
    metrics: dict[str, CocoMetrics] = {}
    for size in resolutions:
        m = coco_metrics(coco_gt, results[size], image_ids)
        m = CocoMetrics(
            **{
                **m.to_dict(),
                "seconds": seconds[size],
                "images_per_s": len(dataset) / seconds[size] if seconds[size] > 0 else 0.0,
            }
        )
        logger.info(
            "eval %s at %s: AP %.4f AP50 %.4f (%d detections, %.1f img/s)",
            getattr(dataset, "ann_file", "dataset"),
            size,
            m.AP,
            m.AP50,
            len(results[size]),
            m.images_per_s,
        )
        metrics[str(size)] = m
    return metrics


def _detect_at_sizes(
    detector: nn.Module,
    loader: Any,
    sizes: Sequence[Resolution],
    ids: Sequence[int],
    device: torch.device,
) -> tuple[dict[Resolution, list[dict[str, Any]]], dict[Resolution, float]]:
    """COCO results at each size, and the seconds each took, in one pass over the images (each
    read and decoded once), every size on each batch."""
    results: dict[Resolution, list[dict[str, Any]]] = {size: [] for size in sizes}
    seconds = dict.fromkeys(sizes, 0.0)
    for images, targets in loader:
        images = [im.to(device, non_blocking=True) for im in images]  # once for every size
        for size in sizes:
            start = time.perf_counter()
            with _inference(detector, size):
                outputs = _run(detector, images, device)
            for target, out in zip(targets, outputs, strict=True):
                results[size].extend(_results(ids, target["image_id"], out))
            seconds[size] += time.perf_counter() - start
    return results, seconds
