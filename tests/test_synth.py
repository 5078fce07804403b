"""Tests for the synthetic shapes generator (jdsearch.data.synth)."""

from __future__ import annotations

import colorsys
import json
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from jdsearch.core.errors import SpecError
from jdsearch.data.coco import CocoDataset, validate
from jdsearch.data.synth import CLASS_NAMES, SynthInfo, _shape_mask, _spans, generate
from jdsearch.spec.synth import OBJECT_SIZE, class_names
from jdsearch.testing import tree_digest


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def synth100(tmp_path_factory: pytest.TempPathFactory) -> SynthInfo:
    return generate(tmp_path_factory.mktemp("synth100"), images=100, seed=7)


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", images=12, seed=11, size=(48, 80))
    b = generate(tmp_path / "b", images=12, seed=11, size=(48, 80))
    files_a, files_b = _all_files(a.out_dir), _all_files(b.out_dir)
    assert set(files_a) == {"train.json", "val.json"} | {
        f"images/{i:06d}.png" for i in range(1, 13)
    }
    assert files_a == files_b


def test_different_seed_gives_different_data(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", images=6, seed=1, size=64)
    b = generate(tmp_path / "b", images=6, seed=2, size=64)
    assert a.train_json.read_bytes() != b.train_json.read_bytes()
    assert (a.image_dir / "000001.png").read_bytes() != (b.image_dir / "000001.png").read_bytes()


def test_info_matches_files(synth100: SynthInfo) -> None:
    train, val = _load(synth100.train_json), _load(synth100.val_json)
    assert synth100.images == 100
    assert synth100.train_images == len(train["images"]) == 75
    assert synth100.val_images == len(val["images"]) == 25
    assert synth100.train_annotations == len(train["annotations"])
    assert synth100.val_annotations == len(val["annotations"])
    assert synth100.class_names == CLASS_NAMES
    assert [c["name"] for c in train["categories"]] == list(CLASS_NAMES)
    assert train["categories"] == val["categories"]
    assert len(CLASS_NAMES) >= 5


def test_splits_are_disjoint_and_ids_unique(synth100: SynthInfo) -> None:
    train, val = _load(synth100.train_json), _load(synth100.val_json)
    train_ids = {im["id"] for im in train["images"]}
    val_ids = {im["id"] for im in val["images"]}
    assert not train_ids & val_ids
    assert train_ids | val_ids == set(range(1, 101))
    ann_ids = [a["id"] for a in train["annotations"] + val["annotations"]]
    assert len(ann_ids) == len(set(ann_ids))
    assert {a["image_id"] for a in train["annotations"]} <= train_ids
    assert {a["image_id"] for a in val["annotations"]} <= val_ids


def test_boxes_are_positive_and_inside_their_image(synth100: SynthInfo) -> None:
    for path in (synth100.train_json, synth100.val_json):
        doc = _load(path)
        sizes = {im["id"]: (im["width"], im["height"]) for im in doc["images"]}
        for ann in doc["annotations"]:
            x, y, w, h = ann["bbox"]
            width, height = sizes[ann["image_id"]]
            assert all(isinstance(c, int) for c in ann["bbox"])
            assert w > 0 and h > 0, ann
            assert x >= 0 and y >= 0 and x + w <= width and y + h <= height, ann
            assert ann["area"] == w * h
            assert ann["iscrowd"] == 0


def test_every_class_and_some_empty_images_in_100(synth100: SynthInfo) -> None:
    docs = [_load(synth100.train_json), _load(synth100.val_json)]
    anns = [a for d in docs for a in d["annotations"]]
    counts = np.bincount([a["category_id"] for a in anns], minlength=len(CLASS_NAMES) + 1)
    assert counts[0] == 0
    assert (counts[1:] >= 10).all(), counts
    images_with_objects = {a["image_id"] for a in anns}
    empty = 100 - len(images_with_objects)
    assert empty == synth100.empty_images
    assert 1 <= empty <= 15
    per_image = np.bincount([a["image_id"] for a in anns], minlength=101)[1:]
    assert len(set(per_image.tolist())) >= 4, "number of objects per image should vary"


def test_object_sizes_overlaps_and_aspect_ratios_vary(synth100: SynthInfo) -> None:
    doc = _load(synth100.train_json)
    areas = np.array([a["area"] for a in doc["annotations"]])
    assert (areas < 32**2).sum() >= 20  # COCO "small"
    assert ((areas >= 32**2) & (areas < 96**2)).sum() >= 20  # COCO "medium"
    assert (areas >= 64**2).sum() >= 3
    ratios = np.array([a["bbox"][2] / a["bbox"][3] for a in doc["annotations"]])
    assert ratios.min() < 0.4 and ratios.max() > 2.5  # bars, both orientations
    by_image: dict[int, list[list[int]]] = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
    overlapping = 0
    for boxes in by_image.values():
        for (x1, y1, w1, h1), (x2, y2, w2, h2) in combinations(boxes, 2):
            if min(x1 + w1, x2 + w2) > max(x1, x2) and min(y1 + h1, y2 + h2) > max(y1, y2):
                overlapping += 1
    assert overlapping >= 5


def test_colour_does_not_determine_class(synth100: SynthInfo) -> None:
    doc = _load(synth100.train_json)
    mean_colour: dict[int, list[np.ndarray]] = {}
    for im in doc["images"][:40]:
        pixels = np.asarray(Image.open(synth100.image_dir / im["file_name"]), dtype=np.float64)
        for a in doc["annotations"]:
            if a["image_id"] == im["id"]:
                x, y, w, h = a["bbox"]
                centre = pixels[y + h // 2, x + w // 2]
                mean_colour.setdefault(a["category_id"], []).append(centre)
    for colours in mean_colour.values():
        spread = np.std(np.stack(colours), axis=0)
        assert (spread > 30).all(), spread  # each class appears in many colours


@pytest.mark.parametrize("cls", range(len(CLASS_NAMES)))
def test_shape_masks_touch_all_four_window_edges(cls: int) -> None:
    # Unoccluded shapes therefore get a box equal to their window: tight boxes.
    rng = np.random.default_rng(0)
    for h, w in [(8, 8), (10, 23), (31, 12), (60, 60)]:
        mask = _shape_mask(rng, cls, h, w)
        assert mask.shape == (h, w)
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()


def test_shapes_are_distinct() -> None:
    rng = np.random.default_rng(0)
    masks = [_shape_mask(rng, cls, 40, 40) for cls in range(len(CLASS_NAMES))]
    fills = [float(m.mean()) for m in masks]
    assert fills[CLASS_NAMES.index("square")] == 1.0
    assert fills[CLASS_NAMES.index("ring")] < fills[CLASS_NAMES.index("disc")] < 0.85
    assert 0.4 < fills[CLASS_NAMES.index("triangle")] < 0.6
    ring = masks[CLASS_NAMES.index("ring")]
    assert not ring[20, 20], "a ring has a hole"


def test_size_range_varies_image_shapes(tmp_path: Path) -> None:
    info = generate(tmp_path, images=16, seed=3, size=(96, 160))
    doc = _load(info.train_json)
    shapes = set()
    for im in doc["images"]:
        with Image.open(info.image_dir / im["file_name"]) as img:
            assert img.size == (im["width"], im["height"])
            assert img.mode == "RGB"
        assert 96 <= im["width"] <= 160 and 96 <= im["height"] <= 160
        shapes.add((im["width"], im["height"]))
    assert len(shapes) >= 5


def test_generated_set_loads_through_coco_dataset(tmp_path: Path) -> None:
    info = generate(tmp_path, images=8, seed=0, size=64)
    summary = validate(info.train_json, info.image_dir)
    assert summary.images == info.train_images
    assert summary.annotations == info.train_annotations
    assert summary.categories == len(CLASS_NAMES)
    ds = CocoDataset(info.train_json, info.image_dir)
    assert len(ds) == info.train_images
    assert ds.class_names == list(CLASS_NAMES)
    assert ds.num_classes == len(CLASS_NAMES) + 1
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert target["boxes"].shape[1] == 4
    assert target["labels"].dtype == torch.int64
    assert all(1 <= label <= len(CLASS_NAMES) for label in target["labels"].tolist())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"images": 1, "seed": 0},
        {"images": 4, "seed": -1},
        {"images": 4, "seed": 0, "size": 16},
        {"images": 4, "seed": 0, "size": (128, 64)},
        {"images": 4, "seed": 0, "size": (64, 96, 128)},
        {"images": 4, "seed": 0, "val_fraction": 0.0},
        {"images": 4, "seed": 0, "val_fraction": 1.0},
        {"images": 4, "seed": 0, "max_objects": 0},
        {"images": 4, "seed": 0, "workers": 0},
        {"images": 4, "seed": 0, "workers": 1.5},
    ],
)
def test_bad_arguments_raise_spec_error(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(SpecError, match="synth"):
        generate(tmp_path, **kwargs)
    assert not (tmp_path / "train.json").exists()


# Hashes of the generator's output before it was sped up (train.json, val.json and every PNG):
# any change of the generator must leave its files byte-identical for the same arguments (a
# cached study's data, base and pool are keyed on them). They depend on the NumPy, Pillow and
# zlib builds, as the bytes do.
PINNED = [
    (0, 128, "dadb9c1a10435bf4c8e978d20a9682d7a21fcc4af8d23cc624d0c41e9315cf59"),
    (3, 96, "b095762ff7814c6be983a42db9d471667b9c3f884c61fc1d5f9c148e6857b61e"),
    (7, (48, 80), "bad6e9a3899f3afadb8649565dbd3be4eedfeb02cf88540beb652e9d3fa79630"),
]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(("seed", "size", "digest"), PINNED)
def test_output_is_pinned(tmp_path: Path, seed: int, size: Any, digest: str, workers: int) -> None:
    # With 2 workers the 24 images are drawn in 8 chunks by 2 processes, in no fixed order.
    generate(tmp_path, images=24, seed=seed, size=size, workers=workers)
    assert len(list((tmp_path / "images").iterdir())) == 24
    assert tree_digest(tmp_path) == digest


@pytest.fixture(scope="module")
def shapes20(tmp_path_factory: pytest.TempPathFactory) -> SynthInfo:
    return generate(
        tmp_path_factory.mktemp("shapes20"),
        images=60,
        seed=5,
        size=96,
        classes=20,
        object_size=(0.05, 0.3),
    )


def test_classes_option_sets_the_categories(shapes20: SynthInfo) -> None:
    train, val = _load(shapes20.train_json), _load(shapes20.val_json)
    names = [c["name"] for c in train["categories"]]
    assert names == list(class_names(20)) == list(shapes20.class_names)
    assert len(names) == len(set(names)) == 20
    assert names[:2] == ["red disc", "red ring"] and names[-1] == "yellow ring"
    assert train["categories"] == val["categories"]
    used = {a["category_id"] for d in (train, val) for a in d["annotations"]}
    assert used <= set(range(1, 21)) and len(used) >= 15, sorted(used)
    assert class_names(3) == ("disc", "ring", "square") and class_names(6) == CLASS_NAMES


def test_coloured_classes_have_their_colour(shapes20: SynthInfo) -> None:
    # A filled shape's centre pixel (a disc, a square: not a ring's hole) has its class's hue.
    hues = {"red": 0, "green": 120, "blue": 240, "yellow": 60}
    off: dict[str, list[float]] = {colour: [] for colour in hues}
    for path in (shapes20.train_json, shapes20.val_json):
        doc = _load(path)
        names = {c["id"]: c["name"] for c in doc["categories"]}
        files = {im["id"]: im["file_name"] for im in doc["images"]}
        for a in doc["annotations"]:
            colour, shape = names[a["category_id"]].split()
            if shape not in ("disc", "square"):
                continue
            x, y, w, h = a["bbox"]
            with Image.open(shapes20.image_dir / files[a["image_id"]]) as img:
                r, g, b = (c / 255 for c in img.getpixel((x + w // 2, y + h // 2)))
            hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
            off[colour].append(abs((hue - hues[colour] + 180) % 360 - 180))
    for colour, errors in off.items():
        assert len(errors) >= 3, colour
        assert np.median(errors) < 20, (colour, errors)  # drawn within 12 degrees, then noise


def test_object_size_option_bounds_the_boxes(shapes20: SynthInfo, synth100: SynthInfo) -> None:
    # A window has the area of an s x s square, s <= max * side (a bar's: 1.2 s); a visible box
    # fits in its window. Images are 96 px, as asked.
    bound = 1.2 * 0.3 * 96 + 1
    sides = []
    for path in (shapes20.train_json, shapes20.val_json):
        doc = _load(path)
        assert {(im["width"], im["height"]) for im in doc["images"]} == {(96, 96)}
        sides += [np.sqrt(a["area"]) for a in doc["annotations"]]
    default = [np.sqrt(a["area"]) for a in _load(synth100.train_json)["annotations"]]
    assert max(sides) <= bound < max(default)
    assert np.median(sides) < 0.5 * np.median(default)
    with Image.open(shapes20.image_dir / "000001.png") as img:
        assert img.size == (96, 96)


def test_default_object_size_keeps_the_size_groups_exactly() -> None:
    assert _spans(OBJECT_SIZE) == {
        "small": (0.07, 0.2),
        "medium": (0.2, 0.45),
        "large": (0.6, 0.88),
    }
    spans = _spans((0.05, 0.5))
    assert spans["small"][0] == pytest.approx(0.05) and spans["large"][1] == pytest.approx(0.5)
    assert spans["small"][1] == pytest.approx(spans["medium"][0])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"classes": 0}, "synth: classes must be an integer from 1 to 36"),
        ({"classes": 37}, "synth: classes must be"),
        ({"classes": 2.0}, "synth: classes must be"),
        ({"classes": True}, "synth: classes must be"),
        ({"object_size": (0.5, 0.2)}, "synth: object_size must be a min and a max"),
        ({"object_size": (0.0, 0.5)}, "synth: object_size must be"),
        ({"object_size": (0.1, 1.5)}, "synth: object_size must be"),
        ({"object_size": (0.1,)}, "synth: object_size must be"),
        ({"object_size": 0.3}, "synth: object_size must be"),
    ],
)
def test_bad_options_are_refused_in_one_line(
    tmp_path: Path, kwargs: dict[str, Any], needle: str
) -> None:
    with pytest.raises(SpecError) as info:
        generate(tmp_path, images=4, seed=0, **kwargs)
    message = str(info.value)
    assert message.startswith(needle) and "\n" not in message, message
    assert repr(next(iter(kwargs.values()))) in message
    assert not (tmp_path / "train.json").exists()
