"""Honest selection: the split trials are scored on and the held-out split never share an image,
and the comparison and the export judge the chosen detector on the held-out one."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from optuna_dashboard import get_note

from jdsearch.core.errors import DataError
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import CocoDataset
from jdsearch.data.synth import generate
from jdsearch.engine.evaluate import evaluate
from jdsearch.report.compare import compare_study
from jdsearch.search.export import export_trial
from jdsearch.search.queries import open_study
from jdsearch.search.record import HELDOUT_PREFIX
from jdsearch.search.splits import heldout_split, selection_split
from jdsearch.spec.study import study_from_dict
from jdsearch.storage.optuna_internals import study_system_attrs, trial_of

from .conftest import tiny_study_dict


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("splits") / "data"
    generate(d, images=40, seed=2, size=64)  # 10 validation images
    return d


def _spec(data_dir: Path, **data: Any) -> Any:
    d = tiny_study_dict(data_dir, "splits")
    d["data"] = {"dir": str(data_dir), **data}
    return study_from_dict(d, source="test")


def _subset(doc: dict, images: list[dict]) -> str:
    ids = {im["id"] for im in images}
    anns = [a for a in doc["annotations"] if a["image_id"] in ids]
    return json.dumps({**doc, "images": images, "annotations": anns})


def _files(ds: CocoDataset) -> list[str]:
    return [ds.image_record(i).file_name for i in range(len(ds))]


def test_the_rest_of_val_is_held_out_and_never_selected(data_dir: Path) -> None:
    spec = _spec(data_dir, max_val_images=4)
    selection, heldout = selection_split(spec), heldout_split(spec)
    assert heldout is not None
    val = _files(CocoDataset(data_dir / "val.json", data_dir / "images"))
    assert len(val) == 10 and _files(selection) == val[:4] and _files(heldout) == val[4:]
    assert not set(_files(selection)) & set(_files(heldout))


def test_a_test_file_is_the_held_out_split_unless_it_shares_an_image(data_dir: Path) -> None:
    train = json.loads((data_dir / "train.json").read_text())
    test = data_dir / "test.json"
    test.write_text(_subset(train, train["images"][:5]))
    heldout = heldout_split(_spec(data_dir, max_val_images=4, test=str(test)))
    assert heldout is not None and _files(heldout) == [r["file_name"] for r in train["images"][:5]]
    val = json.loads((data_dir / "val.json").read_text())
    leaky = data_dir / "leaky.json"
    leaky.write_text(_subset(val, val["images"][3:6]))  # val image 4 is selected
    with pytest.raises(DataError, match=r"leaky.json: image id \d+ \(\d+\.png\) is also in"):
        heldout_split(_spec(data_dir, max_val_images=4, test=str(leaky)))


def test_splits_read_their_own_folders_and_only_the_same_file_is_the_same_image(
    data_dir: Path, tmp_path: Path
) -> None:
    """COCO 2017's layout: each split its annotation file and image folder. A test image of the
    same ``file_name`` as a selected one but in another folder is another image."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        doc = json.loads((data_dir / f"{split}.json").read_text())
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
        for image in doc["images"]:
            target = root / f"{split}2017" / image["file_name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data_dir / "images" / image["file_name"], target)
    val = json.loads((data_dir / "val.json").read_text())
    test = root / "annotations" / "test.json"
    test.write_text(_subset(val, val["images"][:3]))  # the selected files, in another folder
    shutil.copytree(root / "val2017", root / "test2017")
    files = {
        "train": str(root / "annotations/instances_train2017.json"),
        "val": str(root / "annotations/instances_val2017.json"),
        "train_images": str(root / "train2017"),
        "val_images": str(root / "val2017"),
    }
    spec = _spec(tmp_path / "nothing-here", max_val_images=4, **files)
    selection = selection_split(spec)
    assert selection.ann_file == root / "annotations/instances_val2017.json"
    assert _files(selection) == [r["file_name"] for r in val["images"][:4]]
    assert selection.image_dir == root / "val2017"
    heldout = heldout_split(spec, selection)
    assert heldout is not None and len(heldout) == 6 and heldout.image_dir == root / "val2017"
    with_folder = _spec(
        tmp_path / "x", max_val_images=4, test=str(test), test_images=str(root / "val2017"), **files
    )
    with pytest.raises(DataError, match=r"test.json: image id \d+ .* is also in the selection"):
        heldout_split(with_folder)
    mine = _spec(
        tmp_path / "x",
        max_val_images=4,
        test=str(test),
        test_images=str(root / "test2017"),
        **files,
    )
    held = heldout_split(mine)
    assert held is not None and held.image_dir == root / "test2017"
    assert _files(held) == [r["file_name"] for r in val["images"][:3]]


def test_without_a_test_file_or_a_val_cap_nothing_is_held_out(data_dir: Path) -> None:
    assert heldout_split(_spec(data_dir)) is None
    assert heldout_split(_spec(data_dir, max_val_images=50)) is None


def test_comparison_and_export_judge_on_the_held_out_split(
    small_study: Any, tmp_path: Path, data_dir: Path
) -> None:
    db = tmp_path / "copy.db"
    shutil.copyfile(small_study.url.removeprefix("sqlite:///"), db)
    handle = open_study(f"sqlite:///{db}", small_study.name)
    heldout = CocoDataset(data_dir / "val.json", data_dir / "images")
    c = compare_study(handle, fps=False, heldout=heldout)
    for row, trial in ((c.base, handle.base_trial()), (c.upgraded, handle.trial())):
        det = handle.checkpoint(trial).detector
        size = Resolution.parse(row.input_size)
        direct = evaluate(det, heldout, [size])[str(size)]
        assert row.heldout is not None
        for k, v in row.heldout.items():
            expected = float(getattr(direct, k))
            assert (math.isnan(v) and math.isnan(expected)) or v == pytest.approx(expected), k
    header, rows = c.table()
    assert header[-2:] == ["held-out AP", "held-out AP50"] and len(rows[0]) == len(header)
    assert "held-out AP: on 10 images of" in c.format()
    exported = export_trial(handle, tmp_path / "x", onnx=False, heldout=heldout)
    held = exported.info["source"]["heldout"]
    assert held["images"] == 10 and held["file"].endswith("val.json")
    up = c.upgraded.heldout
    assert held["metrics"]["AP"] == pytest.approx(round(up["AP"], 5), abs=1e-5)
    # The study keeps it, and the trial's dashboard note shows it.
    best = handle.trial()
    recorded = study_system_attrs(handle.study)[f"{HELDOUT_PREFIX}{best.number}"]
    assert recorded == {**held, "resolution": str(exported.input_size)}
    note = get_note(trial_of(handle.study, best))
    ap = held["metrics"]["AP"]
    assert f"**Held-out AP**: {'–' if ap is None else f'{100 * ap:.1f}'} (AP50 " in note
    assert "on 10 images of `" in note and note.rstrip().splitlines()[-1].startswith("**Lineage**")
