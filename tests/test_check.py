"""``jdsearch search SPEC --check``: data, base and pool checked and the plan printed, nothing
trained; a bad input is one line naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from jdsearch.cli import main
from jdsearch.core.errors import DataError, JDSearchError, SpecError
from jdsearch.search.check import check_study
from jdsearch.spec.study import study_from_dict


def _spec(search_assets, tmp_path: Path, **changes):
    data = search_assets.study("checked", f"sqlite:///{tmp_path / 'checked.db'}")
    data["data"]["max_val_images"] = 4
    for key, value in changes.items():
        section, name = key.split("__")
        data[section][name] = value
    return data


@pytest.mark.slow
def test_check_reports_the_plan_and_trains_nothing(
    search_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    spec_file = tmp_path / "checked.yaml"
    spec_file.write_text(yaml.safe_dump(_spec(search_assets, tmp_path)))
    assert main(["--threads", "1", "search", str(spec_file), "--check"]) == 0
    out = capsys.readouterr().out
    for fact in (
        "the spec is valid",
        "train.json: 24 images",
        "splits: selection 4 images, held-out 4",
        "loads and fits the dataset's classes",
        "sub-networks of tiny-r50-fpn fit the super-net, which starts from random weights",
        "plan: 3 trials (hill_climb, KD dynamic), each 0.25 epochs = 6 training images",
        "estimate (training only, 4 steps timed here)",
        "ok: nothing was trained",
    ):
        assert fact in out, fact
    assert not (tmp_path / "checked.db").exists() and not (tmp_path / "runs").exists()
    report = check_study(study_from_dict(_spec(search_assets, tmp_path), source="t"), steps=2)
    assert report.estimate_s["base"] == 0.0  # given as a checkpoint: not trained
    assert report.estimate_s["pool"] > 0 and report.estimate_s["trials"] > 0


def test_check_names_a_bad_annotation_record(search_assets, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(search_assets.data_dir, data)
    val = json.loads((data / "val.json").read_text())
    val["annotations"][0]["bbox"] = [0, 0, -5, 3]
    (data / "val.json").write_text(json.dumps(val))
    spec = study_from_dict(_spec(search_assets, tmp_path, data__dir=str(data)), source="t.yaml")
    with pytest.raises(DataError, match=r"val\.json.*annotation.*bbox"):
        check_study(spec, steps=0)


def test_check_compares_the_splits_categories_one_line_each(
    search_assets, tmp_path: Path, capsys
) -> None:
    """A category renamed, one in the val split only and one in train only: each is one line of
    the refusal, naming the file, the id and the name (as ``jdsearch init`` does)."""
    data = tmp_path / "data"
    shutil.copytree(search_assets.data_dir, data)
    val = json.loads((data / "val.json").read_text())
    first, last = val["categories"][0], val["categories"][-1]
    first["name"] = "renamed"
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] != last["id"]]
    last["id"] = 99  # in val only; its old id is in train only
    (data / "val.json").write_text(json.dumps(val))
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(_spec(search_assets, tmp_path, data__dir=str(data))))
    assert main(["search", str(spec_file), "--check"]) == 2
    err = capsys.readouterr().err.splitlines()
    train, val_file = data / "train.json", data / "val.json"
    assert err[0] == (
        f"jdsearch: error: {val_file}: its categories differ from {train}'s in 3 way(s), one "
        "line each below; both splits need the same ids and names"
    )
    name = last["name"]
    old = next(c["id"] for c in json.loads(train.read_text())["categories"] if c["name"] == name)
    assert err[1:] == [
        f"  {val_file}: category id {first['id']} is named 'renamed', in {train} "
        f"{json.loads(train.read_text())['categories'][0]['name']!r}",
        f"  {val_file}: category {name!r} (id 99) is not in {train} (there its id is {old})",
        f"  {train}: category {name!r} (id {old}) is not in {val_file} (there its id is 99)",
    ]


def test_check_refuses_a_missing_or_misfit_base(search_assets, tmp_path: Path) -> None:
    missing = _spec(search_assets, tmp_path)
    missing["base"]["checkpoint"] = str(tmp_path / "nope.safetensors")
    with pytest.raises(SpecError, match=r"base\.checkpoint .*nope\.safetensors does not exist"):
        check_study(study_from_dict(missing, source="t.yaml"), steps=0)
    other = tmp_path / "other"  # the same images with one class fewer
    shutil.copytree(search_assets.data_dir, other)
    for split in ("train.json", "val.json"):
        coco = json.loads((other / split).read_text())
        coco["categories"] = coco["categories"][:-1]
        kept = {c["id"] for c in coco["categories"]}
        coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] in kept]
        (other / split).write_text(json.dumps(coco))
    misfit = _spec(search_assets, tmp_path, data__dir=str(other))
    with pytest.raises(JDSearchError, match="the base detector has 6 classes, the dataset 5"):
        check_study(study_from_dict(misfit, source="t.yaml"), steps=0)
