"""The study's two validation splits: the *selection* split every trial is scored on, and a
*held-out* split the search never sees, on which the chosen detector is judged.

The selection split is the first ``data.max_val_images`` images of ``val.json`` (``data.val``; all
of them when unset). The held-out split is the ``data.test`` annotation file when the study names
one, else the rest of ``val.json``; with neither there is none. The two never share an image: an
image is the file ``file_name`` names in its split's image folder.
"""

from __future__ import annotations

from pathlib import Path

from jdsearch.core.errors import DataError
from jdsearch.data.coco import CocoDataset
from jdsearch.spec.study import StudySpec

__all__ = ["heldout_split", "missing_files", "selection_split"]


def missing_files(spec: StudySpec) -> str | None:
    """What of the train and val annotation files is missing (``data.dir``'s ``train.json`` and
    ``val.json``, or the files ``data.train`` and ``data.val`` name), as the start of a message;
    ``None`` when both are there."""
    data = spec.data
    if all(data.annotations(split).is_file() for split in ("train", "val")):
        return None
    if data.train is None and data.val is None:
        return f"data.dir {data.dir} has no train.json/val.json"
    for split in ("train", "val"):
        if not data.annotations(split).is_file():
            given = getattr(data, split)
            if given is None:
                return f"data.dir {data.dir} has no {split}.json"
            return f"data.{split} {given}: no such file"
    return None


def selection_split(spec: StudySpec) -> CocoDataset:
    """The images every trial is scored on (H, the trial's recorded AP).

    Raises:
        DataError: ``val.json`` or its images are missing or invalid.
    """
    data = spec.data
    return CocoDataset(data.annotations("val"), data.images("val"), max_images=data.max_val_images)


def heldout_split(spec: StudySpec, selection: CocoDataset | None = None) -> CocoDataset | None:
    """The images the search never saw, or ``None`` when the study has none.

    Args:
        spec: the study.
        selection: its selection split, if already loaded.

    Returns:
        ``data.test`` if set, else the ``val.json`` images beyond ``data.max_val_images``.

    Raises:
        DataError: an unreadable or invalid file, or a held-out image that is also in the
            selection split (named with its file).
    """
    data = spec.data
    selection = selection or selection_split(spec)
    if data.test is not None:
        heldout = CocoDataset(data.test, data.images("test"))
        folder = data.images("test")
    else:
        n = data.max_val_images
        full = CocoDataset(data.annotations("val"), data.images("val"))
        if n is None or len(full) <= n:
            return None
        heldout, folder = full.subset(range(n, len(full))), data.images("val")
    val = data.images("val")
    chosen = {_image(val, selection.image_record(i).file_name) for i in range(len(selection))}
    for i in range(len(heldout)):
        record = heldout.image_record(i)
        if _image(folder, record.file_name) in chosen:
            raise DataError(
                f"{heldout.ann_file}: image id {record.id} ({record.file_name}) is also in the "
                f"selection split ({selection.ann_file}); a held-out image must be unseen"
            )
    return heldout


def _image(folder: Path, file_name: str) -> Path:
    """The image file ``file_name`` names in ``folder``: two splits' folders may differ."""
    return (folder / file_name).resolve()
