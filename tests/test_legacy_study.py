"""A study written by jdsearch 0.1 still reads, and the current code reproduces its H."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import optuna
import pytest

from jdsearch.search.queries import open_study
from jdsearch.search.summary import summary

LEGACY = Path(__file__).parent / "data" / "study_v0_1.sqlite"


@pytest.fixture
def legacy_url(tmp_path: Path) -> str:
    copy = tmp_path / "legacy.sqlite"
    shutil.copyfile(LEGACY, copy)  # opening may touch the file; the fixture stays pristine
    return f"sqlite:///{copy}"


def _trials(url: str, name: str = "small") -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=url)
    return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)


def test_a_study_of_the_previous_format_opens_and_summarises(legacy_url: str) -> None:
    handle = open_study(legacy_url)
    assert handle.spec.name == "small"
    assert handle.trial().number == 5 and handle.base_trial().number == 0
    assert handle.categories() == [
        (1, "disc"),
        (2, "ring"),
        (3, "square"),
        (4, "triangle"),
        (5, "cross"),
        (6, "bar"),
    ]
    text = summary(handle.study)
    assert "best (trial 5)" in text
    assert "base (#0) -> teacher.depth4- (#1) -> channel_prune (#4) -> layer_prune (#5)" in text


def test_a_study_of_the_previous_format_draws_every_figure(legacy_url: str) -> None:
    from jdsearch.report.figures import FIGURE_KEYS, build_figures

    figures = build_figures(open_study(legacy_url))
    assert tuple(figures) == FIGURE_KEYS
    h_series = [tr for tr in figures["h_per_iteration"].data if tr.name == "H at 64x64"]
    assert len(h_series) == 1 and len(h_series[0].x) == 6


def test_the_same_search_gives_the_same_lineage_and_h_as_the_previous_code(small_study) -> None:
    old, new = _trials(f"sqlite:///{LEGACY}"), _trials(small_study.url)
    assert [t.state for t in new] == [t.state for t in old]
    for o, n in zip(old, new, strict=True):
        assert n.params == o.params, n.number
        assert n.user_attrs["parent"] == o.user_attrs["parent"], n.number
        for key in ("student", "teacher", "flops", "flops_at", "params", "stage_flops"):
            assert n.user_attrs[key] == o.user_attrs[key], (n.number, key)
        assert math.isclose(n.value, o.value, rel_tol=1e-6, abs_tol=1e-12), (n.number, n.value)
        assert n.user_attrs["h"] == pytest.approx(o.user_attrs["h"], rel=1e-6, abs=1e-12)
