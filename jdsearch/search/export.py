"""Exporting a trial of a study: its student checkpoint as a self-contained export folder."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from jdsearch.core.errors import JDSearchError
from jdsearch.core.files import read_text
from jdsearch.core.limits import MAX_ANNOTATION_BYTES
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import CocoDataset, load_image
from jdsearch.engine.evaluate import evaluate
from jdsearch.search.notes import save_trial_note, trial_note
from jdsearch.search.queries import lineage
from jdsearch.search.record import (
    BASE_FLOPS_ATTR,
    BASE_RESOLUTION_ATTR,
    HELDOUT_PREFIX,
    TrialRecord,
)
from jdsearch.storage.optuna_internals import set_study_system_attr
from jdsearch.storage.rdb import public_url
from jdsearch.store.export import Exported, Origin, export_detector, foreground_names

log = logging.getLogger(__name__)


def _categories(handle: Any, class_names: Sequence[str]) -> tuple[tuple[int, ...] | None, str]:
    """COCO category ids of labels ``1..K``: recorded in the study, else from its annotations."""
    recorded = handle.categories()
    if recorded is not None and [n for _, n in recorded] == list(class_names):
        return tuple(i for i, _ in recorded), "study"
    ann = handle.spec.data.annotations("train")
    try:
        cats = json.loads(read_text(ann, MAX_ANNOTATION_BYTES)).get("categories", [])
        by_name = {str(c["name"]): int(c["id"]) for c in cats}
        return tuple(by_name[n] for n in class_names), str(ann)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning(
            "no category ids recorded in the study and %s is not readable here: labels 1..K are written as ids",
            ann,
        )
        return None, ""


def _check_images(handle: Any, count: int = 3) -> list[Tensor]:
    """A few validation images of the study's dataset, when they are here."""
    ann, folder = handle.spec.data.annotations("val"), handle.spec.data.images("val")
    try:
        records = json.loads(read_text(ann, MAX_ANNOTATION_BYTES)).get("images", [])[:count]
        return [load_image(folder / r["file_name"]) for r in records]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, JDSearchError):
        log.warning(
            "the study's validation images (%s) are not readable here: the ONNX check uses noise images",
            ann,
        )
        return []


def export_trial(
    handle: Any,
    out_dir: str | Path,
    *,
    trial: int | None = None,
    input_size: Resolution | str | None = None,
    check_images: Sequence[Tensor] | None = None,
    onnx: bool = True,
    heldout: CocoDataset | None = None,
) -> Exported:
    """Export trial ``trial`` (default: the best) of an opened study at the resolution where it
    scored best (or ``input_size``).

    Args:
        handle: the study, opened with :func:`jdsearch.search.open_study`.
        out_dir: the export folder (created; an earlier export there is replaced).
        trial: a completed trial's number; default the best (highest H).
        input_size: ``LONGxSHORT`` input size; default the trial's best resolution.
        check_images: images for the ONNX check; default the study's validation images.
        onnx: write and check ``model.onnx``.
        heldout: the study's held-out split (:func:`~jdsearch.search.splits.heldout_split`);
            the detector's metrics on it are written to ``detector.json``.

    Returns:
        The export, loaded back.

    Raises:
        JDSearchError: no such completed trial, or its checkpoint is missing.
        ExportError: the folder cannot be written, or ONNX and PyTorch disagree.
    """
    t = handle.trial(trial)
    ckpt = handle.checkpoint(t)
    size = Resolution.parse(input_size or TrialRecord.from_trial(t).best_resolution)
    names = foreground_names(ckpt.class_names, ckpt.num_classes)
    source = _source(handle, t, size)
    if heldout is not None:
        source["heldout"] = _judge(handle, t, ckpt.detector, heldout, size)
    if check_images:
        images, image_source = list(check_images), "given"
    else:
        images = _check_images(handle) if onnx else []
        image_source = f"study validation set ({handle.spec.data.annotations('val')})"
    ids, ids_source = _categories(handle, names)
    return export_detector(
        ckpt.detector,
        out_dir,
        class_names=names,
        category_ids=ids,
        input_size=size,
        check_images=images or None,
        onnx=onnx,
        origin=Origin(source, image_source, ids_source),
    )


def _judge(handle: Any, t: Any, detector: Any, heldout: CocoDataset, size: Resolution) -> dict:
    """The detector's AP, AP50 and AP75 on the held-out split at ``size``, recorded in the study
    (:func:`record_heldout`)."""
    m = evaluate(detector, heldout, [size])[str(size)]
    values = {k: float(getattr(m, k)) for k in ("AP", "AP50", "AP75")}
    metrics = {k: None if math.isnan(v) else round(v, 5) for k, v in values.items()}
    judged = {"file": str(heldout.ann_file), "images": len(heldout), "metrics": metrics}
    record_heldout(handle, t, {**judged, "resolution": str(size)})
    return judged


def record_heldout(handle: Any, t: Any, heldout: dict[str, Any]) -> None:
    """Keep what a trial measured on the held-out split in its study (a study system attr: a
    finished trial takes no more attributes of its own) and show it in the trial's dashboard
    note; a study this user may not write is left as it is (logged)."""
    try:
        set_study_system_attr(handle.study, f"{HELDOUT_PREFIX}{t.number}", heldout)
    except Exception as e:  # a read-only database: the export itself has the figures
        log.warning("trial %d: its held-out AP was not recorded in the study (%s)", t.number, e)
        return
    trials = handle.study.get_trials(deepcopy=False)
    note = trial_note(trials, t, metric=handle.spec.score.metric, heldout=heldout)
    save_trial_note(handle.study, t, note)


def _source(handle: Any, t: Any, size: Resolution) -> dict[str, Any]:
    """Where an exported trial came from: study, storage, scores, teacher and lineage."""
    r = TrialRecord.from_trial(t)
    path = [TrialRecord.from_trial(p) for p in lineage(handle.study, t.number)]
    metrics = r.metrics.get(str(size))
    return {
        "study": handle.study.study_name,
        "storage": public_url(handle.url),
        "trial": t.number,
        "H": r.value,
        "metrics": None if metrics is None else dict(metrics),
        # score.cost's (C/C_base)·(R/R_base)^β at this size, and the latency measured there
        "cost": {"kind": handle.spec.score.cost, "value": r.cost.get(str(size))},
        "latency": r.latency.get(str(size)),
        "teacher": r.teacher or None,
        "lineage": [{"trial": p.number, "move": p.move, "H": p.value} for p in path],
        "base_resolution": handle.study.user_attrs.get(BASE_RESOLUTION_ATTR),
        "base_flops": handle.study.user_attrs.get(BASE_FLOPS_ATTR),
    }
