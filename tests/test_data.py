"""Tests for COCO loading/validation, batching and dynamic resolution (jdsearch.data.coco)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from jdsearch.core.errors import CheckpointError, DataError, SpecError
from jdsearch.core.resolution import Resolution, parse_resolutions
from jdsearch.data.coco import (
    CocoDataset,
    ResolutionSampler,
    collate,
    get_resolution,
    make_loader,
    set_resolution,
    targets_to,
    using_resolution,
    validate,
)

ANN = "annotations.json"

# Three images: RGB 40x30 with two objects (one crowd), grayscale 20x10 without objects,
# RGBA 16x16 with one object. Category ids are unsorted and not contiguous on purpose.
BASE: dict[str, Any] = {
    "images": [
        {"id": 3, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 5, "file_name": "b.png", "width": 20, "height": 10},
        {"id": 9, "file_name": "sub/c.png", "width": 16, "height": 16},
    ],
    "annotations": [
        {"id": 17, "image_id": 3, "category_id": 12, "bbox": [10, 5, 8, 4], "area": 20.0},
        {"id": 18, "image_id": 3, "category_id": 7, "bbox": [0, 0, 40, 30], "iscrowd": 1},
        {"id": 19, "image_id": 9, "category_id": 3, "bbox": [2.5, 3.0, 4.0, 5.5], "iscrowd": 0},
    ],
    "categories": [
        {"id": 12, "name": "twelve"},
        {"id": 3, "name": "three"},
        {"id": 7, "name": "seven"},
    ],
}


def _write_images(image_dir: Path) -> None:
    (image_dir / "sub").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB").save(
        image_dir / "a.png"
    )
    Image.fromarray(np.full((10, 20), 255, dtype=np.uint8), "L").save(image_dir / "b.png")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(image_dir / "sub" / "c.png")


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    _write_images(path)
    return path


def _write(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / ANN
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return path


@pytest.fixture
def dataset(tmp_path: Path, image_dir: Path) -> CocoDataset:
    return CocoDataset(_write(tmp_path, BASE), image_dir)


# --------------------------------------------------------------------------------------------
# Validation errors: one per class of problem
# --------------------------------------------------------------------------------------------


def _mutated(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    change(doc)
    return doc


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


def _drop_top(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.pop(key)


def _append(key: str, record: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc[key].append(record)


BROKEN: list[tuple[str, Callable[[dict[str, Any]], None], list[str]]] = [
    ("no images key", _drop_top("images"), ["'images'"]),
    ("no annotations key", _drop_top("annotations"), ["'annotations'"]),
    ("no categories key", _drop_top("categories"), ["'categories'"]),
    ("images not a list", _set(("images",), {"id": 3}), ["'images'", "list"]),
    (
        "image file missing",
        _set(("images", 1, "file_name"), "missing.png"),
        ["image id 5", "missing.png"],
    ),
    (
        "duplicate image id",
        _append("images", {"id": 5, "file_name": "a.png", "width": 40, "height": 30}),
        ["image id 5", "duplicate"],
    ),
    ("image size", _set(("images", 0, "width"), 0), ["image id 3", "0x30"]),
    ("image id not int", _set(("images", 2, "id"), "9"), ["images[2]", '"9"']),
    (
        "duplicate category id",
        _append("categories", {"id": 7, "name": "again"}),
        ["category id 7", "duplicate"],
    ),
    (
        "unknown image id",
        _set(("annotations", 0, "image_id"), 4),
        ["annotation id 17", "image_id 4"],
    ),
    (
        "unknown category id",
        _set(("annotations", 2, "category_id"), 99),
        ["annotation id 19", "(image 9)", "category_id 99"],
    ),
    (
        "duplicate annotation id",
        _set(("annotations", 1, "id"), 17),
        ["annotation id 17", "duplicate"],
    ),
    (
        "bbox three numbers",
        _set(("annotations", 0, "bbox"), [1, 2, 3]),
        ["annotation id 17", "[1, 2, 3]", "4 numbers"],
    ),
    (
        "bbox with a string",
        _set(("annotations", 0, "bbox"), [1, 2, "3", 4]),
        ["annotation id 17", "4 numbers"],
    ),
    ("bbox missing", _set(("annotations", 0, "bbox"), None), ["annotation id 17", "bbox"]),
    (
        "non-positive width",
        _set(("annotations", 0, "bbox"), [10, 5, -2, 4]),
        ["annotation id 17 (image 3)", "[10, 5, -2, 4]", "non-positive width"],
    ),
    (
        "non-positive height",
        _set(("annotations", 2, "bbox"), [1, 1, 3, 0]),
        ["annotation id 19 (image 9)", "non-positive height"],
    ),
    (
        "bbox outside image",
        _set(("annotations", 0, "bbox"), [35, 5, 8, 4]),
        ["annotation id 17 (image 3)", "outside", "40x30"],
    ),
    (
        "bbox far above image",
        _set(("annotations", 0, "bbox"), [10, -3, 8, 4]),
        ["annotation id 17", "outside"],
    ),
    ("bad iscrowd", _set(("annotations", 0, "iscrowd"), 2), ["annotation id 17", "iscrowd"]),
    ("negative area", _set(("annotations", 0, "area"), -1), ["annotation id 17", "area"]),
    ("bad category name", _set(("categories", 0, "name"), ""), ["category id 12", "name"]),
    ("no categories", _set(("categories",), []), ["'categories' is empty"]),
]


def _assert_one_line_error(exc: pytest.ExceptionInfo[DataError], *needles: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    assert f"{ANN}: " in message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize(("change", "needles"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_record_raises_data_error(
    tmp_path: Path,
    image_dir: Path,
    change: Callable[[dict[str, Any]], None],
    needles: list[str],
) -> None:
    path = _write(tmp_path, _mutated(change))
    with pytest.raises(DataError) as exc:
        CocoDataset(path, image_dir)
    _assert_one_line_error(exc, *needles)
    with pytest.raises(DataError):
        validate(path, image_dir)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ('{"images": [', "invalid JSON at line 1"),
        ("[1, 2]", "expected an object"),
    ],
)
def test_unparsable_file_raises(tmp_path: Path, image_dir: Path, text: str, needle: str) -> None:
    with pytest.raises(DataError) as exc:
        CocoDataset(_write(tmp_path, text), image_dir)
    _assert_one_line_error(exc, needle)


def test_missing_file_raises(tmp_path: Path, image_dir: Path) -> None:
    with pytest.raises(DataError) as exc:
        CocoDataset(tmp_path / ANN, image_dir)
    _assert_one_line_error(exc, "not found")


def test_directory_instead_of_file_raises(tmp_path: Path, image_dir: Path) -> None:
    (tmp_path / ANN).mkdir()
    with pytest.raises(DataError) as exc:
        CocoDataset(tmp_path / ANN, image_dir)
    _assert_one_line_error(exc, "directory")


def test_missing_image_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        CocoDataset(_write(tmp_path, BASE), tmp_path / "nowhere")
    _assert_one_line_error(exc, "nowhere")


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_raise(tmp_path: Path, image_dir: Path, token: str) -> None:
    text = json.dumps(BASE).replace('"bbox": [2.5, 3.0, 4.0, 5.5]', f'"bbox": [2.5, {token}, 4, 5]')
    assert token in text
    with pytest.raises(DataError) as exc:
        CocoDataset(_write(tmp_path, text), image_dir)
    _assert_one_line_error(exc, "annotation id 19", "non-finite")


def test_non_finite_area_and_size_raise(tmp_path: Path, image_dir: Path) -> None:
    text = json.dumps(BASE).replace('"area": 20.0', '"area": NaN')
    with pytest.raises(DataError) as exc:
        CocoDataset(_write(tmp_path, text), image_dir)
    _assert_one_line_error(exc, "annotation id 17", "area NaN", "not finite")
    text = json.dumps(BASE).replace('"width": 20', '"width": Infinity')
    with pytest.raises(DataError) as exc:
        CocoDataset(_write(tmp_path, text), image_dir)
    _assert_one_line_error(exc, "image id 5", "width")


def test_box_within_tolerance_is_accepted_and_clipped(tmp_path: Path, image_dir: Path) -> None:
    doc = _mutated(_set(("annotations", 0, "bbox"), [-0.6, 25.0, 40.5, 5.8]))
    ds = CocoDataset(_write(tmp_path, doc), image_dir)
    _, target = ds[0]
    assert target["boxes"][0].tolist() == pytest.approx([0.0, 25.0, 39.9, 30.0])
    # coco_gt keeps the file's box: the evaluation compares against what the user wrote.
    gt = ds.coco_gt()
    assert gt.anns[17]["bbox"] == pytest.approx([-0.6, 25.0, 40.5, 5.8])


def test_image_size_mismatch_raises_when_read(tmp_path: Path, image_dir: Path) -> None:
    doc = _mutated(_set(("images", 0, "height"), 31))
    ds = CocoDataset(_write(tmp_path, doc), image_dir)
    with pytest.raises(DataError) as exc:
        ds[0]
    _assert_one_line_error(exc, "image id 3", "40x30", "40x31")
    with pytest.raises(DataError, match="image id 3"):
        validate(tmp_path / ANN, image_dir)
    assert validate(tmp_path / ANN, image_dir, check_images=False).images == 3


def test_undecodable_image_raises(tmp_path: Path, image_dir: Path) -> None:
    (image_dir / "b.png").write_bytes(b"not a png")
    ds = CocoDataset(_write(tmp_path, BASE), image_dir)
    with pytest.raises(DataError) as exc:
        ds[1]
    _assert_one_line_error(exc, "image id 5", "cannot decode")


# --------------------------------------------------------------------------------------------
# Dataset behaviour
# --------------------------------------------------------------------------------------------


def test_category_mapping_follows_sorted_ids(dataset: CocoDataset) -> None:
    assert dataset.category_ids == [3, 7, 12]
    assert dataset.class_names == ["three", "seven", "twelve"]
    assert dataset.num_classes == 4
    assert [dataset.label_to_category(label) for label in (1, 2, 3)] == [3, 7, 12]
    assert dataset.category_to_label(12) == 3
    for bad in (0, 4):
        with pytest.raises(ValueError):
            dataset.label_to_category(bad)
    with pytest.raises(ValueError):
        dataset.category_to_label(5)
    assert dataset.image_ids == [3, 5, 9]
    assert len(dataset) == 3


def test_item_shapes_dtypes_and_values(dataset: CocoDataset) -> None:
    image, target = dataset[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert image.is_contiguous()
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    expected = np.asarray(Image.open(dataset.image_path(0)), dtype=np.float32) / 255
    assert torch.allclose(image, torch.from_numpy(expected).permute(2, 0, 1))
    assert target["image_id"] == 3
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[10.0, 5.0, 18.0, 9.0], [0.0, 0.0, 40.0, 30.0]]
    assert target["labels"].dtype == torch.int64
    assert target["labels"].tolist() == [3, 2]  # category 12 -> label 3, category 7 -> 2
    assert target["iscrowd"].dtype == torch.int64
    assert target["iscrowd"].tolist() == [0, 1]
    assert target["area"].dtype == torch.float32
    assert target["area"].tolist() == [20.0, 1200.0]  # given area; box area when absent


def test_grayscale_empty_image_item(dataset: CocoDataset) -> None:
    image, target = dataset[1]
    assert image.shape == (3, 10, 20)
    assert torch.all(image == 1.0)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["iscrowd"].shape == (0,) and target["area"].shape == (0,)


def test_rgba_item_drops_alpha_and_converts_float_box(dataset: CocoDataset) -> None:
    image, target = dataset[2]
    assert image.shape == (3, 16, 16)
    assert torch.all(image[0] == 1.0) and torch.all(image[1:] == 0.0)
    assert target["boxes"].tolist() == [[2.5, 3.0, 6.5, 8.5]]
    assert target["labels"].tolist() == [1]


def test_sixteen_bit_grayscale_is_scaled_not_saturated(tmp_path: Path) -> None:
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    Image.fromarray(np.full((6, 5), 32768, dtype=np.uint16)).save(image_dir / "g.png")
    doc = {
        "images": [{"id": 1, "file_name": "g.png", "width": 5, "height": 6}],
        "annotations": [],
        "categories": [{"id": 1, "name": "thing"}],
    }
    image, target = CocoDataset(_write(tmp_path, doc), image_dir)[0]
    assert image.shape == (3, 6, 5) and image.dtype == torch.float32
    assert torch.allclose(image, torch.full_like(image, 32768 / 65535))
    assert target["boxes"].shape == (0, 4)


def test_keep_crowd_false_drops_crowd_boxes(tmp_path: Path, image_dir: Path) -> None:
    ds = CocoDataset(_write(tmp_path, BASE), image_dir, keep_crowd=False)
    _, target = ds[0]
    assert target["boxes"].tolist() == [[10.0, 5.0, 18.0, 9.0]]
    assert target["iscrowd"].tolist() == [0]
    assert len(ds.coco_gt().anns) == 3  # evaluation still sees the crowd region


def test_max_images_and_subset(tmp_path: Path, image_dir: Path, dataset: CocoDataset) -> None:
    first = CocoDataset(tmp_path / ANN, image_dir, max_images=2)
    assert first.image_ids == [3, 5]
    sub = dataset.subset([2, 0])
    assert sub.image_ids == [9, 3]
    assert sub.category_ids == dataset.category_ids
    assert sub[0][1]["labels"].tolist() == [1]
    gt = sub.coco_gt()
    assert sorted(gt.imgs) == [3, 9]
    assert sorted(gt.anns) == [17, 18, 19]
    with pytest.raises(ValueError):
        dataset.subset([0, 0])


def test_coco_gt_is_silent_and_scores_perfect_predictions(
    dataset: CocoDataset, capsys: pytest.CaptureFixture[str]
) -> None:
    from pycocotools.cocoeval import COCOeval

    gt = dataset.coco_gt()
    assert capsys.readouterr().out == ""
    assert sorted(gt.getImgIds()) == [3, 5, 9]
    assert sorted(gt.getCatIds()) == [3, 7, 12]
    detections = []
    for i in range(len(dataset)):
        _, target = dataset[i]
        for box, label, crowd in zip(
            target["boxes"].tolist(),
            target["labels"].tolist(),
            target["iscrowd"].tolist(),
            strict=True,
        ):
            if crowd:
                continue
            x1, y1, x2, y2 = box
            detections.append(
                {
                    "image_id": target["image_id"],
                    "category_id": dataset.label_to_category(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": 0.9,
                }
            )
    assert len(detections) == 2
    dt = gt.loadRes(detections)
    ev = COCOeval(gt, dt, iouType="bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    assert ev.stats[1] == pytest.approx(1.0)


def test_coco_gt_penalises_a_wrong_box(dataset: CocoDataset) -> None:
    from pycocotools.cocoeval import COCOeval

    gt = dataset.coco_gt()
    dt = gt.loadRes(
        [
            {"image_id": 3, "category_id": 12, "bbox": [20, 15, 8, 4], "score": 0.9},
            {"image_id": 9, "category_id": 3, "bbox": [2.5, 3.0, 4.0, 5.5], "score": 0.9},
        ]
    )
    ev = COCOeval(gt, dt, iouType="bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(0.5)


def test_validate_summary(tmp_path: Path, image_dir: Path) -> None:
    summary = validate(_write(tmp_path, BASE), image_dir)
    assert summary.images == 3
    assert summary.annotations == 3
    assert summary.categories == 3
    assert summary.images_without_objects == 1
    assert summary.crowd_annotations == 1
    assert summary.per_category == (("three", 1), ("seven", 1), ("twelve", 1))
    assert any("images:" in line and "3" in line for line in summary.lines())


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


class _Numbers(Dataset[tuple[torch.Tensor, dict[str, Any]]]):
    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return torch.zeros(3, 4 + i, 5), {"image_id": i, "boxes": torch.zeros(0, 4)}


def _order(loader: Any) -> list[int]:
    return [t["image_id"] for _, targets in loader for t in targets]


def test_collate_keeps_lists(dataset: CocoDataset) -> None:
    images, targets = collate([dataset[0], dataset[1]])
    assert isinstance(images, list) and isinstance(targets, list)
    assert [im.shape[1:] for im in images] == [(30, 40), (10, 20)]
    assert [t["image_id"] for t in targets] == [3, 5]


def test_loader_is_deterministic_under_seed() -> None:
    ds = _Numbers()
    a = make_loader(ds, 3, shuffle=True, seed=4)
    b = make_loader(ds, 3, shuffle=True, seed=4)
    c = make_loader(ds, 3, shuffle=True, seed=5)
    epoch_a1, epoch_a2 = _order(a), _order(a)
    assert epoch_a1 == _order(b)
    assert epoch_a2 == _order(b)
    assert epoch_a1 != epoch_a2  # a new permutation each epoch
    assert epoch_a1 != _order(c)
    assert sorted(epoch_a1) == list(range(20))
    assert _order(make_loader(ds, 3, shuffle=False, seed=4)) == list(range(20))
    dropped = make_loader(ds, 3, shuffle=False, seed=0, drop_last=True)
    assert len(_order(dropped)) == 18
    images, _ = next(iter(a))
    assert isinstance(images, list) and len(images) == 3


def test_targets_to_moves_tensors_only(dataset: CocoDataset) -> None:
    _, target = dataset[0]
    (moved,) = targets_to([target], "cpu")
    assert moved["image_id"] == 3
    assert torch.equal(moved["boxes"], target["boxes"])


# --------------------------------------------------------------------------------------------
# Resolutions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "long", "short"),
    [
        ("1333x800", 1333, 800),
        ("800x1333", 1333, 800),
        (" 512 X 512 ", 512, 512),
        ("1080×720", 1080, 720),
    ],
)
def test_resolution_parse(text: str, long: int, short: int) -> None:
    res = Resolution.parse(text)
    assert (res.long, res.short) == (long, short)
    assert str(res) == f"{long}x{short}"
    assert Resolution.parse(str(res)) == res
    assert res.pixels == long * short


@pytest.mark.parametrize(
    "text", ["", "1333", "1333x", "axb", "0x800", "1333x800x3", "-5x3", "1.5x2"]
)
def test_resolution_parse_rejects_bad_text(text: str) -> None:
    with pytest.raises(SpecError) as exc:
        Resolution.parse(text)
    assert repr(text) in str(exc.value)


def test_resolution_rejects_bad_fields() -> None:
    with pytest.raises(SpecError):
        Resolution(600, 800)
    with pytest.raises(SpecError):
        Resolution(0, 0)


def test_parse_resolutions() -> None:
    got = parse_resolutions(["512x512", "800x600", Resolution(1333, 800)])
    assert [str(r) for r in got] == ["512x512", "800x600", "1333x800"]
    with pytest.raises(SpecError, match="twice"):
        parse_resolutions(["800x600", "600x800"])
    with pytest.raises(SpecError, match="empty"):
        parse_resolutions([])


def test_resized_follows_keep_ratio_rule() -> None:
    res = Resolution(1333, 800)
    assert res.resized(480, 640) == (800, 1066)  # short side bound reached
    assert res.resized(100, 400) == (333, 1333)  # long side bound reached
    assert Resolution(512, 512).resized(600, 800) == (384, 512)


def test_sampler_is_reproducible_and_uniform() -> None:
    res = parse_resolutions(["512x512", "800x600", "1080x720", "1333x800"])
    a = ResolutionSampler(res, seed=3)
    b = ResolutionSampler(res, seed=3)
    seq_a = [a.next() for _ in range(400)]
    assert seq_a == [b.next() for _ in range(400)]
    counts = {r: seq_a.count(r) for r in res}
    assert all(60 <= c <= 140 for c in counts.values()), counts
    c = ResolutionSampler(res, seed=4)
    assert [c.next() for _ in range(400)] != seq_a
    assert ResolutionSampler(["800x600"], seed=0).next() == Resolution(800, 600)


def test_sampler_state_round_trip() -> None:
    res = parse_resolutions(["512x512", "800x600", "1333x800"])
    sampler = ResolutionSampler(res, seed=9)
    for _ in range(10):
        sampler.next()
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = [sampler.next() for _ in range(25)]
    resumed = ResolutionSampler(res, seed=9)
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(25)] == expected
    assert resumed.state_dict() == sampler.state_dict()
    with pytest.raises(CheckpointError):
        ResolutionSampler(res[:2], seed=9).load_state_dict(state)
    with pytest.raises(CheckpointError):
        ResolutionSampler(res, seed=8).load_state_dict(state)
    with pytest.raises(CheckpointError):
        ResolutionSampler(res, seed=9).load_state_dict({"seed": 9})
    with pytest.raises(SpecError):
        ResolutionSampler(res, seed=-1)


@pytest.fixture(scope="module")
def tiny_rcnn() -> torch.nn.Module:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3)
    return model.eval()


def test_set_resolution_changes_the_transform(tiny_rcnn: torch.nn.Module) -> None:
    images = [torch.rand(3, 120, 200), torch.rand(3, 200, 100)]
    for res, sizes in [
        (Resolution(160, 96), [(96, 160), (160, 80)]),
        (Resolution(100, 100), [(60, 100), (100, 50)]),
    ]:
        set_resolution(tiny_rcnn, res)
        assert tiny_rcnn.transform.min_size == (res.short,)
        assert tiny_rcnn.transform.max_size == res.long
        assert get_resolution(tiny_rcnn) == res
        image_list, _ = tiny_rcnn.transform(images)
        got = [tuple(s) for s in image_list.image_sizes]
        assert got == sizes
        assert got == [res.resized(*im.shape[-2:]) for im in images]
    # A real forward (one small image keeps it fast on a CPU) sees the resized image.
    set_resolution(tiny_rcnn, Resolution(96, 64))
    seen: list[list[tuple[int, int]]] = []
    hook = tiny_rcnn.rpn.register_forward_pre_hook(
        lambda _module, args: seen.append([tuple(s) for s in args[0].image_sizes])
    )
    try:
        with torch.no_grad():
            (det,) = tiny_rcnn([images[0]])
    finally:
        hook.remove()
    assert seen == [[(57, 96)]]  # scale min(64/120, 96/200) = 0.48
    assert det["boxes"].shape[1] == 4
    if len(det["boxes"]):  # boxes come back in the original image's coordinates
        assert float(det["boxes"][:, 2].max()) <= 200 + 1e-3
        assert float(det["boxes"][:, 3].max()) <= 120 + 1e-3


def test_using_resolution_restores(tiny_rcnn: torch.nn.Module) -> None:
    set_resolution(tiny_rcnn, Resolution(160, 96))
    with using_resolution(tiny_rcnn, Resolution(64, 64)):
        assert get_resolution(tiny_rcnn) == Resolution(64, 64)
        image_list, _ = tiny_rcnn.transform([torch.rand(3, 120, 200)])
        assert tuple(image_list.image_sizes[0]) == (38, 64)
    assert get_resolution(tiny_rcnn) == Resolution(160, 96)
    with pytest.raises(TypeError):
        set_resolution(torch.nn.Linear(2, 2), Resolution(64, 64))
