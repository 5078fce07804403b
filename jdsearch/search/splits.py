"""The study's two validation splits: the *selection* split every trial is scored on, and a
*held-out* split the search never sees, on which the chosen detector is judged.

The selection split is the first ``data.max_val_images`` images of ``val.json`` (all of them when
unset). The held-out split is the ``data.test`` annotation file when the study names one, else the
rest of ``val.json``; with neither there is none. The two never share an image.
"""

from __future__ import annotations

from jdsearch.core.errors import DataError
from jdsearch.data.coco import CocoDataset
from jdsearch.spec.study import StudySpec

__all__ = ["heldout_split", "selection_split"]


def selection_split(spec: StudySpec) -> CocoDataset:
    """The images every trial is scored on (H, the trial's recorded AP).

    Raises:
        DataError: ``val.json`` or its images are missing or invalid.
    """
    d = spec.data.dir
    return CocoDataset(d / "val.json", d / "images", max_images=spec.data.max_val_images)


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
    d = spec.data.dir
    selection = selection or selection_split(spec)
    if spec.data.test is not None:
        heldout = CocoDataset(spec.data.test, d / "images")
    else:
        n = spec.data.max_val_images
        full = CocoDataset(d / "val.json", d / "images")
        if n is None or len(full) <= n:
            return None
        heldout = full.subset(range(n, len(full)))
    chosen = {selection.image_record(i).file_name for i in range(len(selection))}
    for i in range(len(heldout)):
        record = heldout.image_record(i)
        if record.file_name in chosen:
            raise DataError(
                f"{heldout.ann_file}: image id {record.id} ({record.file_name}) is also in the "
                f"selection split ({selection.ann_file}); a held-out image must be unseen"
            )
    return heldout
