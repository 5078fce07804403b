"""Decoded images are kept for a small set: an epoch after the first, and every evaluation size,
read no file and decode nothing; the pixels are the same as a fresh decode's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jdsearch.core.resolution import Resolution
from jdsearch.data import coco as data_module
from jdsearch.data.coco import CocoDataset
from jdsearch.data.synth import generate
from jdsearch.engine.evaluate import evaluate
from jdsearch.models.detector import build_detector
from jdsearch.spec.detector import load_spec


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    info = generate(tmp_path_factory.mktemp("synth"), images=12, seed=2, size=(40, 56))
    return info.val_json, info.image_dir


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    opened: list[Path] = []
    real = data_module.open_image

    def counted(path, where=""):  # type: ignore[no-untyped-def]
        opened.append(Path(path))
        return real(path, where)

    monkeypatch.setattr(data_module, "open_image", counted)
    return opened


def test_a_small_set_decodes_each_image_once(
    synth: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = CocoDataset(*synth)
    opened = _counting(monkeypatch)
    cached = CocoDataset(*synth)
    first = [cached[i][0] for i in range(len(cached))]
    second = [cached[i][0] for i in range(len(cached))]
    assert len(opened) == len(cached) > 0  # the second pass opened nothing
    monkeypatch.undo()
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        assert torch.equal(a, b) and torch.equal(a, fresh[i][0])
        assert a.data_ptr() != b.data_ptr()  # each read gets its own tensor


def test_over_the_budget_nothing_is_kept(
    synth: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JDSEARCH_IMAGE_CACHE_MB", "0")
    dataset = CocoDataset(*synth)
    opened = _counting(monkeypatch)
    for _ in range(2):
        for i in range(len(dataset)):
            dataset[i]
    assert len(opened) == 2 * len(dataset)


def test_evaluation_at_several_sizes_reads_each_image_once(
    synth: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even with no cache: one pass over the images, every size on each batch."""
    monkeypatch.setenv("JDSEARCH_IMAGE_CACHE_MB", "0")
    dataset = CocoDataset(*synth)
    torch.manual_seed(0)
    detector = build_detector(load_spec("tiny-r18-fpn"), dataset.num_classes)
    opened = _counting(monkeypatch)
    sizes = [Resolution(48, 48), Resolution(64, 64), Resolution(80, 80)]
    metrics = evaluate(detector, dataset, sizes, batch_size=4)
    assert list(metrics) == ["48x48", "64x64", "80x80"]
    assert len(opened) == len(dataset)
