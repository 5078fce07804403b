"""A user's dataset end to end, through the three commands of the README's "Your own data":
``jdsearch data check``, ``jdsearch init``, ``jdsearch search --check``, then a 2-trial search.

The set is laid out the way users' sets are: images in subfolders that ``file_name`` names, mixed
sizes and orientations, a grayscale image, an image without objects, non-contiguous category and
image ids and a category without a single box. A second set is laid out as COCO 2017 ships: each
split its own annotation file and image folder, read where they lie (no link anywhere).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from jdsearch.cli import main
from jdsearch.data.synth import generate
from jdsearch.search.queries import open_study
from jdsearch.search.record import TrialRecord
from jdsearch.spec.study import load_study

# (width, height) cycle: landscape, portrait and square, 64-128 px.
SIZES = [(128, 96), (96, 72), (80, 112), (112, 112), (120, 80), (72, 96)]
CATEGORIES = [
    {"id": 12, "name": "unused", "supercategory": "none"},  # listed first, never annotated
    {"id": 3, "name": "block"},
    {"id": 7, "name": "disc"},
]


def _image(rng: np.random.Generator, size: tuple[int, int], n_objects: int, gray: bool):
    """A noisy background with ``n_objects`` blocks (id 3) and discs (id 7); the image and
    its ``(category id, [x, y, w, h])`` boxes."""
    w, h = size
    pixels = rng.integers(60, 120, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    boxes = []
    for k in range(n_objects):
        bw, bh = (int(v) for v in rng.integers(14, 34, 2))
        x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        colour = tuple(int(c) for c in rng.integers(170, 255, 3))
        category = 3 if k % 2 == 0 else 7
        shape = draw.rectangle if category == 3 else draw.ellipse
        shape([x, y, x + bw - 1, y + bh - 1], fill=colour)
        boxes.append((category, [x, y, bw, bh]))
    return (img.convert("L") if gray else img), boxes


def write_user_set(root: Path, train: int = 24, val: int = 8) -> Path:
    """A COCO set in ``root``: ``images/<camera>/<day>/*.{png,jpg}``, ``train.json``, ``val.json``.
    Image 5 is grayscale (8-bit JPEG), image 7 has no objects."""
    rng = np.random.default_rng(7)
    splits: dict[str, dict] = {s: {"images": [], "annotations": []} for s in ("train", "val")}
    ann_id = 501
    for i in range(train + val):
        split = "train" if i < train else "val"
        size = SIZES[i % len(SIZES)]
        img, boxes = _image(rng, size, 0 if i == 7 else 1 + i % 3, gray=i == 5)
        ext = "jpg" if i % 2 else "png"
        file_name = f"cam_{'ab'[i % 2]}/day{i % 3}/frame_{i:03d}.{ext}"
        path = root / "images" / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=95) if ext == "jpg" else img.save(path)
        image_id = 1000 + 3 * i
        splits[split]["images"].append(
            {"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]}
        )
        for category, box in boxes:
            splits[split]["annotations"].append(
                {"id": ann_id, "image_id": image_id, "category_id": category, "bbox": box,
                 "area": box[2] * box[3], "iscrowd": 0}
            )  # fmt: skip
            ann_id += 2
    for split, data in splits.items():
        data["categories"] = CATEGORIES
        (root / f"{split}.json").write_text(json.dumps(data))
    return root


def _shrink(spec_file: Path) -> dict:
    """Cut the generated budgets to seconds on a CPU (the rest of the spec is kept); returns the
    spec as generated."""
    generated = yaml.safe_load(spec_file.read_text())
    spec = yaml.safe_load(spec_file.read_text())
    spec["base"]["train"].update(epochs=1, warmup_iters=1)
    for phase in spec["pool"]["phases"]:
        phase["epochs"] = 0.25
    spec["pool"]["recalibration_batches"] = 2
    spec["pool"]["train"]["warmup_iters"] = 1
    spec["fast_eval"].update(epochs=0.25, warmup_iters=1)
    spec["search"].update(n_trials=2, freeze_student=1)
    spec_file.write_text(yaml.safe_dump(spec))
    return generated


@pytest.mark.slow
def test_a_users_dataset_runs_from_init_to_a_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    data = write_user_set(tmp_path / "shapes")
    assert Image.open(data / "images/cam_b/day2/frame_005.jpg").mode == "L"
    assert main(["data", "check", "--ann", str(data / "train.json"), "--images", str(data / "images")]) == 0  # fmt: skip
    assert "unused: 0" in capsys.readouterr().out

    spec_file = tmp_path / "studies" / "shapes.yaml"
    init = ["--threads", "1", "init", "--data", str(data), "--base", "tiny-r18-fpn"]
    assert main([*init, "--out", str(spec_file), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {spec_file}: study shapes" in out and "3 categories" in out
    text = spec_file.read_text()
    assert "No training boxes for unused" in text  # the empty category is pointed out
    study = load_study(spec_file)
    # Native size: the median long side by the median short side of the 32 images.
    assert str(study.resolutions[-1]) == "112x80" and len(study.resolutions) == 4
    assert study.base.resolution == study.resolutions[-1]
    assert study.pool.kind == "basic" and study.pool.base_widths == (16, 32, 64, 128)
    assert study.pool.train.resolutions == study.resolutions
    assert study.data.dir == data and study.search.n_trials == 100

    # A second init does not overwrite the spec, unless --force.
    assert main([*init, "--out", str(spec_file)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert spec_file.read_text() == text

    generated = _shrink(spec_file)
    assert generated["base"]["train"]["epochs"] == 100
    assert main(["--threads", "1", "search", str(spec_file), "--check"]) == 0
    out = capsys.readouterr().out
    assert "train.json: 24 images" in out and "ok: nothing was trained" in out

    assert main(["--threads", "1", "search", str(spec_file), "--quiet"]) == 0
    handle = open_study("sqlite:///runs/shapes.db", "shapes")
    # Labels 1..3 are the sorted category ids, the empty one included.
    assert handle.categories() == [(3, "block"), (7, "disc"), (12, "unused")]
    # R_base of H is the spec's base.resolution (the native size), not the preset's input size.
    assert handle.study.user_attrs["base_resolution"] == "112x80"  # tiny-r18-fpn: 208x128
    trials = handle.study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:  # scored (AP on the val images, every size of the ladder)
        ap = TrialRecord.from_trial(t).ap
        assert math.isfinite(t.value) and set(ap) == {str(r) for r in study.resolutions}
        assert all(math.isfinite(v) for v in ap.values())
    assert (tmp_path / "runs/shapes/base.safetensors").is_file()


def write_coco2017_set(root: Path, scratch: Path) -> Path:
    """A tiny synthetic set (64-px squares, 12 train and 4 val images) moved into COCO 2017's
    layout under ``root``: ``annotations/instances_{train,val}2017.json``, ``train2017/``,
    ``val2017/``; ``scratch`` is where it is drawn first (removed)."""
    generate(scratch, images=16, seed=3, size=64, classes=2, workers=1)
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        doc = json.loads((scratch / f"{split}.json").read_text())
        folder = root / f"{split}2017"
        folder.mkdir()
        for image in doc["images"]:
            shutil.move(scratch / "images" / image["file_name"], folder / image["file_name"])
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
    shutil.rmtree(scratch)
    return root


@pytest.mark.slow
def test_coco_2017_as_it_ships_runs_from_init_to_a_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    coco = write_coco2017_set(Path("coco"), Path("scratch"))
    ann = {s: coco / "annotations" / f"instances_{s}2017.json" for s in ("train", "val")}
    for split in ("train", "val"):
        check = ["data", "check", "--ann", str(ann[split]), "--images", str(coco / f"{split}2017")]
        assert main(check) == 0
        assert capsys.readouterr().out.rstrip().endswith("ok")
    spec_file = Path("studies/coco.yaml")
    init = ["--threads", "1", "init", "--train", str(ann["train"]), "--val", str(ann["val"])]
    init += ["--train-images", "coco/train2017", "--val-images", "coco/val2017"]
    assert main([*init, "--base", "tiny-r18-fpn", "--out", str(spec_file)]) == 0
    assert "coco/annotations/instances_val2017.json over coco/val2017/" in capsys.readouterr().out
    data = yaml.safe_load(spec_file.read_text())["data"]
    assert data == {
        "train": "coco/annotations/instances_train2017.json",
        "train_images": "coco/train2017",
        "val": "coco/annotations/instances_val2017.json",
        "val_images": "coco/val2017",
        "max_val_images": None,
    }
    study = load_study(spec_file)
    assert study.data.images("val") == Path("coco/val2017")

    _shrink(spec_file)
    assert main(["--threads", "1", "search", str(spec_file), "--check"]) == 0
    out = capsys.readouterr().out
    assert "instances_train2017.json: 12 images" in out and "instances_val2017.json: 4" in out
    assert main(["--threads", "1", "search", str(spec_file), "--quiet"]) == 0
    handle = open_study("sqlite:///runs/coco.db", "coco")
    assert [t.state.name for t in handle.study.trials] == ["COMPLETE", "COMPLETE"]
    assert all(math.isfinite(t.value) for t in handle.study.trials)  # scored on val2017/
    assert handle.spec.data.images("train") == Path("coco/train2017")  # the stored spec
    assert not [p for p in tmp_path.rglob("*") if p.is_symlink()]
    assert not Path("runs/coco/data").exists()  # nothing linked or copied into data.dir
    assert sorted(p.name for p in coco.iterdir()) == ["annotations", "train2017", "val2017"]
