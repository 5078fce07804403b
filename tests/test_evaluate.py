"""COCO evaluation: label/box conversion, empty outputs, sizes applied and restored."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import CocoDataset, get_resolution
from jdsearch.data.synth import generate
from jdsearch.engine.evaluate import CocoMetrics, evaluate, predict
from jdsearch.models.detector import build_detector
from jdsearch.spec.detector import load_spec


@pytest.fixture(scope="module")
def val(tmp_path_factory: pytest.TempPathFactory) -> CocoDataset:
    """Synthetic images whose category ids are NOT 1..K (10, 20, ...), to test the mapping."""
    out = tmp_path_factory.mktemp("synth")
    info = generate(out, images=10, seed=3, size=(48, 72), val_fraction=0.5)
    doc = json.loads(info.val_json.read_text())
    for c in doc["categories"]:
        c["id"] *= 10
    for a in doc["annotations"]:
        a["category_id"] *= 10
    remapped = out / "val10.json"
    remapped.write_text(json.dumps(doc))
    ds = CocoDataset(remapped, info.image_dir)
    assert ds.category_ids[:2] == [10, 20]
    return ds


class Oracle(nn.Module):
    """Answers with a transform of the target of each image it is shown (found by its pixels);
    records the sizes."""

    def __init__(self, dataset: CocoDataset, mode: str = "exact") -> None:
        super().__init__()
        self.transform = GeneralizedRCNNTransform(99, 999, [0.0] * 3, [1.0] * 3)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.dataset, self.mode = dataset, mode
        self.index = {dataset[i][0].numpy().tobytes(): i for i in range(len(dataset))}
        self.seen_sizes: list[tuple[tuple[int, ...], int, bool]] = []

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        self.seen_sizes.append(
            (tuple(self.transform.min_size), self.transform.max_size, self.training)
        )
        assert not torch.is_grad_enabled()
        out = []
        for image in images:
            target = self.dataset[self.index[image.numpy().tobytes()]][1]
            n = len(target["boxes"])
            boxes, labels = target["boxes"].clone(), target["labels"].clone()
            if self.mode == "empty":
                boxes, labels, n = boxes[:0], labels[:0], 0
            elif self.mode == "shifted":  # every box off by half its width: IoU 1/3
                boxes[:, [0, 2]] += (boxes[:, 2] - boxes[:, 0]).unsqueeze(1) / 2
            elif self.mode == "wrong-class":
                labels = labels % (self.dataset.num_classes - 1) + 1
            out.append({"boxes": boxes, "scores": torch.ones(n), "labels": labels})
        return out


def test_perfect_detections_score_one_and_sizes_are_restored(val: CocoDataset) -> None:
    oracle = Oracle(val)
    oracle.train()
    sizes = [Resolution(80, 64), Resolution(128, 96)]
    metrics = evaluate(oracle, val, sizes, batch_size=3)
    assert list(metrics) == ["80x64", "128x96"]
    for m in metrics.values():
        assert isinstance(m, CocoMetrics)
        assert math.isclose(m.AP, 1.0) and math.isclose(m.AP50, 1.0) and math.isclose(m.AP75, 1.0)
        assert m.detections == sum(len(val[i][1]["boxes"]) for i in range(len(val)))
        assert m.seconds > 0 and m.images_per_s > 0
    # each size was applied during its pass, in eval mode; then everything came back
    assert {s for s in oracle.seen_sizes} == {((64,), 80, False), ((96,), 128, False)}
    assert oracle.training
    assert (oracle.transform.min_size, oracle.transform.max_size) == ((99,), 999)


def test_wrong_boxes_or_classes_score_low(val: CocoDataset) -> None:
    shifted = evaluate(Oracle(val, "shifted"), val, [Resolution(72, 72)])["72x72"]
    assert shifted.AP50 < 1e-9
    wrong = evaluate(Oracle(val, "wrong-class"), val, [Resolution(72, 72)])["72x72"]
    assert wrong.AP < 0.2


def test_no_detections_give_zero_not_a_crash(val: CocoDataset) -> None:
    m = evaluate(Oracle(val, "empty"), val, [Resolution(72, 72)])["72x72"]
    assert (m.AP, m.AP50, m.AP75, m.detections) == (0.0, 0.0, 0.0, 0)
    # buckets with objects are 0; a bucket without any ground-truth object is NaN, never -1
    for v in (m.APs, m.APm, m.APl):
        assert v == 0.0 or math.isnan(v)


def test_size_bucket_without_objects_is_nan(val: CocoDataset) -> None:
    m = evaluate(Oracle(val), val, [Resolution(72, 72)])["72x72"]
    areas = [float(a) for i in range(len(val)) for a in val[i][1]["area"]]
    assert not any(a > 96**2 for a in areas)  # images ≤ 72 px: no large objects
    assert math.isnan(m.APl)
    assert math.isclose(m.APs, 1.0) or math.isclose(m.APm, 1.0)


def test_real_detector_runs_at_each_size(val: CocoDataset, tmp_path: Path) -> None:
    torch.manual_seed(0)
    det = build_detector(load_spec("tiny-r18-fpn"), val.num_classes)
    before = get_resolution(det)
    det.train()
    metrics = evaluate(det, val, ["64x48", Resolution(96, 80)], batch_size=4)  # type: ignore[list-item]
    assert set(metrics) == {"64x48", "96x80"}
    for m in metrics.values():
        for v in (m.AP, m.AP50, m.AP75):
            assert 0.0 <= v <= 1.0
    assert get_resolution(det) == before and det.training
    dets = predict(det, [val[0][0], val[1][0]], Resolution(96, 80))
    assert len(dets) == 2 and det.training
    for d in dets:
        assert d.boxes.shape[1] == 4 and len(d.boxes) == len(d.scores) == len(d.labels)
        if len(d.labels):
            assert int(d.labels.min()) >= 1 and int(d.labels.max()) < val.num_classes
