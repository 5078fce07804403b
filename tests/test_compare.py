"""The table-4 comparison: which trial, size, FLOPs and metrics each row holds; interleaved FPS."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from jdsearch.core.errors import JDSearchError
from jdsearch.core.resolution import Resolution
from jdsearch.engine.latency import check_device, measure_latencies
from jdsearch.models import build_detector
from jdsearch.models.flops import count_flops
from jdsearch.report.compare import METRIC_KEYS, compare_study
from jdsearch.search.queries import open_study
from jdsearch.spec.detector import load_spec


@pytest.fixture
def handle(small_study: Any, tmp_path: Path) -> Any:
    db = tmp_path / "copy.db"
    shutil.copyfile(small_study.url.removeprefix("sqlite:///"), db)
    return open_study(f"sqlite:///{db}", small_study.name)


def recorded(trial: Any, size: str) -> dict[str, float]:
    m = trial.user_attrs["metrics"][size]
    return {k: (math.nan if m[k] is None else m[k]) for k in METRIC_KEYS}


def test_rows_hold_the_base_trial_and_the_best_at_their_sizes(handle: Any) -> None:
    c = compare_study(handle, fps=False)
    base, best = handle.base_trial(), handle.trial()
    # The study's base resolution (208x128) was not evaluated: the base row falls back to the
    # base trial's best resolution.
    assert handle.study.user_attrs["base_resolution"] not in base.user_attrs["metrics"]
    assert (c.base.trial, c.base.input_size) == (base.number, base.user_attrs["best_resolution"])
    assert (c.upgraded.trial, c.upgraded.input_size) == (
        best.number,
        best.user_attrs["best_resolution"],
    )
    for row, trial in ((c.base, base), (c.upgraded, best)):
        det = handle.checkpoint(trial).detector
        assert row.flops == count_flops(det, size=Resolution.parse(row.input_size).hw).total
        assert row.arch == trial.user_attrs["student"] and row.h == trial.value
        got, want = row.metrics, recorded(trial, row.input_size)
        assert all(
            got[k] == want[k] or (math.isnan(got[k]) and math.isnan(want[k])) for k in METRIC_KEYS
        )
        assert row.latency is None and row.fps is None
    header, rows = c.table()
    change = rows[-1]
    assert (
        change[0] == "change"
        and change[3] == f"{c.upgraded.flops / c.base.flops:.2f}×"
        and change[4] == "-"
    )
    ap = header.index("AP")
    assert change[ap] == f"{100 * (c.upgraded.metrics['AP'] - c.base.metrics['AP']):+.1f}"
    text = c.format()
    assert (
        text.splitlines()[0].split()[:3] == ["detector", "trial", "input"]
        and "recorded by the search" in text
    )


def test_base_row_uses_the_base_resolution_when_it_was_evaluated(handle: Any) -> None:
    handle.study.set_user_attr("base_resolution", "96x96")
    c = compare_study(handle, fps=False)
    assert c.base.input_size == "96x96"
    assert c.base.metrics["AP"] == handle.base_trial().user_attrs["metrics"]["96x96"]["AP"]


def test_fps_is_measured_once_when_both_rows_are_one_trial(handle: Any) -> None:
    c = compare_study(handle, trial=0, repeats=3, warmup=1)
    assert c.base.latency is c.upgraded.latency and c.base.fps > 0
    assert c.table()[1][-1][4] == "1.00×"


def test_latencies_are_timed_interleaved() -> None:
    torch.manual_seed(0)
    a = build_detector(load_spec("tiny-r18-fpn"), 7)
    b = build_detector(load_spec("tiny-r18-fpn"), 7)
    order: list[str] = []
    a.register_forward_pre_hook(lambda m, x: order.append("a"))
    b.register_forward_pre_hook(lambda m, x: order.append("b"))
    seen: list[tuple[int, ...]] = []
    b.backbone.register_forward_pre_hook(lambda m, x: seen.append(tuple(x[0].shape)))
    lat_a, lat_b = measure_latencies([(a, "96x64"), (b, "128x96")], warmup=1, repeats=3)
    assert order == ["a", "b"] * 4
    assert all(s == (1, 3, 96, 128) for s in seen) and (lat_a.image, lat_b.image) == (
        "64x96",
        "96x128",
    )
    (portrait,) = measure_latencies([(b, "128x96")], warmup=0, repeats=1, image_hw=(128, 96))
    assert seen[-1] == (1, 3, 128, 96) and portrait.image == "128x96" and portrait.size == "128x96"


def test_device_and_amp_errors_are_one_line() -> None:
    with pytest.raises(JDSearchError, match="expected cpu, cuda or cuda:N"):
        check_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(JDSearchError, match="no CUDA device"):
            check_device("cuda")
    with pytest.raises(JDSearchError, match="needs a CUDA device"):
        measure_latencies([(build_detector(load_spec("tiny-r18-fpn"), 7), "96x64")], amp=True)
