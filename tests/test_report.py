"""The search report: figure data on hand-made trials (known answers), then the real small study."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import optuna
import plotly.graph_objects as go
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from jdsearch.core.errors import JDSearchError
from jdsearch.report import html as report_html
from jdsearch.report.figures import (
    FIGURE_KEYS,
    build_figures,
    fig_action_gain,
    fig_h_per_iteration,
    fig_lineage,
    fig_pareto,
    fig_stage_flops,
    fig_teacher_capacity,
    graph_object_id,
    upgraded_trial,
)
from jdsearch.report.html import write_report
from jdsearch.report.trials import (
    FAMILIES,
    action_family,
    action_gains,
    action_steps,
    best_trial,
    lineage_path,
    pareto_front,
    phase_windows,
    running_best,
    teacher_param_counter,
    trial_ap,
    trial_gflops,
)
from jdsearch.search.objective import move_vocabulary

optuna.logging.set_verbosity(optuna.logging.WARNING)
MOVES = CategoricalDistribution(move_vocabulary())
RES = ("64x64", "96x96")


def mk(
    number: int,
    move: str,
    parent: int | None,
    value: float | None = None,
    *,
    state: TrialState = TrialState.COMPLETE,
    ap: float | None = None,
    gflops: float | None = None,
    **attrs: Any,
) -> FrozenTrial:
    """A trial as the objective records it; ``value`` is H at the second resolution (the best)."""
    user: dict[str, Any] = {"parent": parent}
    if state == TrialState.COMPLETE:
        assert value is not None
        ap = value if ap is None else ap
        user.update(
            {
                "h": {RES[0]: value / 2, RES[1]: value},
                "ap": {RES[0]: ap / 2, RES[1]: ap},
                "metrics": {RES[0]: {"AP": ap / 2}, RES[1]: {"AP": ap}},
                "best_resolution": RES[1],
                "flops": int(1e9 * (1.0 if gflops is None else gflops)),
                "teacher": "d2-2-3-2_w1.5-1.5-1.5-1.5_f32",
                "teacher_params": 1000,
                "student": "[(16, 16)-(16, 16)], [(32, 32)], [(64, 64)], [(128, 128)]",
                "stage_flops": [10, 20, 30, 40, 50],
            }
        )
    user.update(attrs)
    t = optuna.trial.create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        params={"move": move},
        distributions={"move": MOVES},
        user_attrs=user,
    )
    t.number = number
    return t


def tree() -> list[FrozenTrial]:
    """A search with a failed trial, a child of that failed trial and a child of a missing trial."""
    return [
        mk(0, "base", None, 0.30, teacher_params=900),
        mk(1, "channel_prune", 0, 0.35, teacher_params=900),  # +0.05
        mk(2, "layer_prune", 0, state=TrialState.FAIL),
        mk(3, "teacher.depth1+", 1, 0.33, teacher_params=1200),  # -0.02
        mk(4, "add_layer:2", 2, 0.40, teacher_params=700),  # parent failed: no increment
        mk(5, "channel_prune", 1, 0.38, teacher_params=600),  # +0.03
        mk(6, "rearrange:2->3", 99, 0.36, teacher_params=800),  # parent missing
        mk(7, "layer_prune", 5, 0.41, teacher_params=500),  # +0.03
        mk(8, "channel_prune", 5, state=TrialState.FAIL),
    ]


def trace(fig: go.Figure, name: str) -> Any:
    found = [t for t in fig.data if t.name == name]
    assert len(found) == 1, [t.name for t in fig.data]
    return found[0]


# ---------------------------------------------------------------------- pure logic
def test_action_family() -> None:
    assert action_family("add_layer:3") == "add_layer"
    assert action_family("rearrange:2->3") == "rearrange"
    assert action_family("channel_prune") == "channel_prune"
    assert action_family("teacher.width2+") == "teacher"
    assert action_family("teacher.fpn-") == "teacher"
    assert action_family("base") is None
    assert action_family(None) is None


def test_phase_windows_split_completed_trials_by_number() -> None:
    trials = [mk(n, "channel_prune", 0, 0.1) for n in range(11) if n != 4]
    trials.insert(4, mk(4, "channel_prune", 0, state=TrialState.FAIL))
    windows = phase_windows(trials, 4)
    assert [w.numbers for w in windows] == [(0, 1, 2), (3, 5, 6), (7, 8), (9, 10)]
    assert windows[1].label == "phase 2 (trials 3–6)"
    assert [w.numbers for w in phase_windows(trials[:2], 4)] == [
        (0,),
        (1,),
    ]  # fewer trials than phases
    assert phase_windows([mk(0, "base", None, state=TrialState.FAIL)], 4) == []
    for bad in (0, -1, True, 2.0):
        with pytest.raises(JDSearchError, match="phases"):
            phase_windows(trials, bad)  # type: ignore[arg-type]


def test_action_steps_increments_and_missing_parents() -> None:
    steps = {s.trial: s for s in action_steps(tree())}
    assert sorted(steps) == [1, 3, 4, 5, 6, 7]  # completed, not the root
    assert steps[1].gain == pytest.approx(0.05) and steps[1].family == "channel_prune"
    assert steps[3].gain == pytest.approx(-0.02) and steps[3].family == "teacher"
    assert steps[4].gain is None  # parent 2 failed
    assert steps[6].gain is None and steps[6].parent == 99  # parent missing
    assert steps[7].gain == pytest.approx(0.03)


def test_action_gains_per_phase_and_family() -> None:
    gains = action_gains(tree(), phases=2)
    assert [p.numbers for p in gains.phases] == [(0, 1, 3, 4), (5, 6, 7)]
    assert gains.families == ("channel_prune", "layer_prune", "add_layer", "rearrange", "teacher")
    c = gains.cell(0, "channel_prune")
    assert (c.increment, c.beneficial, c.scored, c.failed) == (pytest.approx(0.05), 1, 1, 0)
    c = gains.cell(0, "teacher")  # a harmful action brings no increment, only a net loss
    assert (c.increment, c.net, c.beneficial, c.scored) == (0.0, pytest.approx(-0.02), 0, 1)
    assert gains.cell(0, "add_layer").unscored == 1 and gains.cell(0, "add_layer").scored == 0
    assert gains.cell(0, "layer_prune").failed == 1  # trial 2 falls in phase 1's number range
    assert (gains.share(0, "channel_prune"), gains.share(0, "teacher")) == (1.0, 0.0)
    c = gains.cell(1, "channel_prune")
    assert (c.increment, c.beneficial, c.failed) == (pytest.approx(0.03), 1, 1)
    assert gains.cell(1, "rearrange").unscored == 1
    assert gains.cell(1, "layer_prune").increment == pytest.approx(0.03)
    # Phase 2 has two beneficial actions, one channel pruning and one layer pruning.
    assert gains.beneficial_in(1) == 2
    assert (
        gains.share(1, "channel_prune"),
        gains.share(1, "layer_prune"),
        gains.share(1, "rearrange"),
    ) == (0.5, 0.5, 0.0)
    assert gains.increment("channel_prune") == pytest.approx(0.08)


def generations() -> list[FrozenTrial]:
    """Nine completed trials and a failed one; two phases: trials 0–4 and 5–9."""
    return [
        mk(0, "base", None, 0.30),
        mk(1, "channel_prune", 0, 0.40),  # +0.10
        mk(2, "channel_prune", 1, 0.45),  # +0.05
        mk(3, "layer_prune", 2, 0.44),  # -0.01
        mk(4, "teacher.width1+", 2, 0.47),  # +0.02
        mk(5, "add_layer:3", 4, 0.46),  # -0.01
        mk(6, "layer_prune", 4, 0.45),  # -0.02
        mk(7, "rearrange:2->3", 4, 0.50),  # +0.03
        mk(8, "add_layer:2", 7, 0.52),  # +0.02
        mk(9, "channel_prune", 8, state=TrialState.FAIL),
    ]


def test_fig_action_gain_known_answers() -> None:
    gains = action_gains(generations(), phases=2)
    assert [p.numbers for p in gains.phases] == [(0, 1, 2, 3, 4), (5, 6, 7, 8)]
    expected_increment = {  # (phase, family): summed positive increments
        (0, "channel_prune"): 0.15,
        (0, "teacher"): 0.02,
        (1, "rearrange"): 0.03,
        (1, "add_layer"): 0.02,
    }
    expected_share = {
        (0, "channel_prune"): 2 / 3,
        (0, "teacher"): 1 / 3,
        (1, "rearrange"): 0.5,
        (1, "add_layer"): 0.5,
    }
    assert (
        gains.cell(1, "add_layer").net == pytest.approx(0.01)
        and gains.cell(1, "add_layer").scored == 2
    )
    assert gains.cell(1, "channel_prune").failed == 1

    fig = fig_action_gain(generations(), phases=2)
    assert fig.layout.barmode == "stack"
    labels = [p.label for p in gains.phases]
    tops = {t.name: t for t in fig.data if t.xaxis == "x"}
    bottoms = {t.name: t for t in fig.data if t.xaxis == "x2"}
    assert set(tops) == set(bottoms) == set(FAMILIES)
    for fam in FAMILIES:
        assert list(tops[fam].x) == labels and list(bottoms[fam].x) == labels
        assert list(tops[fam].y) == pytest.approx(
            [expected_increment.get((i, fam), 0.0) for i in range(2)]
        )
        assert list(bottoms[fam].y) == pytest.approx(
            [100 * expected_share.get((i, fam), 0.0) for i in range(2)]
        )
        assert bottoms[fam].yaxis == "y2" and bottoms[fam].showlegend is False
    for i in range(2):  # the bottom panel stacks to 100 % in every phase
        assert sum(bottoms[f].y[i] for f in FAMILIES) == pytest.approx(100)
    assert "whole search 0.1500" in tops["channel_prune"].hovertemplate
    assert (
        tops["layer_prune"].text[0].startswith("0 beneficial of 1 scored actions (net ΔH -0.0100)")
    )
    assert not [a for a in fig.layout.annotations if a.text == "no beneficial action"]


def test_fig_action_gain_phase_without_beneficial_action() -> None:
    trials = [
        mk(0, "base", None, 0.30),
        mk(1, "channel_prune", 0, 0.20),  # -0.10
        mk(2, "layer_prune", 0, 0.25),  # -0.05
        mk(3, "add_layer:1", 0, 0.35),  # +0.05
    ]
    gains = action_gains(trials, phases=3)
    assert [p.numbers for p in gains.phases] == [(0, 1), (2,), (3,)]
    assert [gains.beneficial_in(i) for i in range(3)] == [0, 0, 1]
    assert gains.share(0, "channel_prune") is None and gains.share(2, "add_layer") == 1.0
    fig = fig_action_gain(trials, phases=3)
    bottoms = {t.name: t for t in fig.data if t.xaxis == "x2"}
    for fam in FAMILIES:  # no bar at all in the phases without a beneficial action
        assert list(bottoms[fam].y)[:2] == [None, None]
    assert list(bottoms["add_layer"].y) == [None, None, 100.0]
    notes = [a for a in fig.layout.annotations if a.text == "no beneficial action"]
    assert [n.x for n in notes] == [p.label for p in gains.phases[:2]]
    assert all((n.xref, n.yref) == ("x2", "y2") for n in notes)
    assert "none of its 1 scored actions improved" in notes[0].hovertext


def plotted_flops(t: FrozenTrial) -> float:
    """Fig. 9's x, written out independently: FLOPs at the best resolution, else at the base one."""
    a = t.user_attrs
    return a["flops_at"][a["best_resolution"]] if a.get("flops_at") else a["flops"]


def brute_force_front(trials: list[FrozenTrial]) -> set[int]:
    pts = [
        (t.number, trial_ap(t), plotted_flops(t))
        for t in trials
        if t.state == TrialState.COMPLETE and math.isfinite(trial_ap(t))
    ]
    return {
        n
        for n, a, f in pts
        if not any(a2 >= a and f2 <= f and (a2 > a or f2 < f) for _, a2, f2 in pts)
    }


def test_pareto_front_known_answer() -> None:
    trials = [
        mk(0, "base", None, 0.1, ap=0.30, gflops=1.0),
        mk(1, "channel_prune", 0, 0.1, ap=0.35, gflops=1.5),
        mk(2, "channel_prune", 0, 0.1, ap=0.33, gflops=1.6),  # dominated by 1
        mk(3, "channel_prune", 0, 0.1, ap=0.35, gflops=1.5),  # equal to 1: both stay
        mk(4, "channel_prune", 0, 0.1, ap=0.40, gflops=3.0),
        mk(5, "channel_prune", 0, 0.1, ap=0.20, gflops=0.9),  # the cheapest
        mk(6, "channel_prune", 0, 0.1, ap=0.29, gflops=1.0),  # same FLOPs as 0, lower AP
        mk(7, "channel_prune", 0, state=TrialState.FAIL, ap=0.9, flops=1),  # failed: ignored
        mk(8, "channel_prune", 0, 0.1, ap=0.45, gflops=2.0, metrics={}),
        mk(9, "channel_prune", 0, 0.1, ap=0.39, gflops=3.0),  # same FLOPs as 4, lower AP
    ]
    trials[8].user_attrs["ap"] = {}  # no AP recorded at all: takes no part
    front = pareto_front(trials)
    assert [t.number for t in front] == [5, 0, 1, 3, 4]
    assert {t.number for t in front} == brute_force_front(trials)

    fig = fig_pareto(trials)
    line = trace(fig, "Pareto front")
    assert list(line.customdata) == [5, 0, 1, 3, 4] and line.line.shape == "hv"
    assert list(line.x) == sorted(line.x)
    assert len(trace(fig, "trials").x) == 8  # completed with AP and FLOPs
    assert list(trace(fig, "base (trial 0)").customdata) == [0]
    assert list(trace(fig, "upgraded (trial 0, best H)").customdata) == [
        0
    ]  # all H tie: the earliest
    assert (
        fig.layout.xaxis.title.text
        == "GFLOPs (multiply-adds at the base resolution: these trials record no flops_at)"
    )


def at(gflops_best: float) -> dict[str, int]:
    """A ``flops_at`` attribute: multiply-adds per evaluated resolution (the best one is RES[1])."""
    return {RES[0]: int(1e9 * gflops_best / 2), RES[1]: int(1e9 * gflops_best)}


def test_trial_gflops_at_the_best_resolution_with_fallback() -> None:
    assert trial_gflops(mk(0, "base", None, 0.1, gflops=1.0, flops_at=at(2.5))) == (
        pytest.approx(2.5),
        RES[1],
    )
    assert trial_gflops(mk(0, "base", None, 0.1, gflops=1.0)) == (pytest.approx(1.0), None)
    only_other = mk(
        0, "base", None, 0.1, gflops=1.0, flops_at={RES[0]: 7}
    )  # best resolution missing
    assert trial_gflops(only_other) == (pytest.approx(1.0), None)
    bare = mk(0, "base", None, 0.1)
    del bare.user_attrs["flops"]
    assert math.isnan(trial_gflops(bare)[0])


def test_pareto_pairs_ap_with_flops_at_the_same_resolution() -> None:
    trials = [
        mk(0, "base", None, 0.50, ap=0.30, gflops=1.0, flops_at=at(4.0)),
        # Cheap at the base resolution but costly at its best one: dominated by trial 2 there.
        mk(1, "channel_prune", 0, 0.40, ap=0.40, gflops=1.0, flops_at=at(3.0)),
        mk(2, "channel_prune", 0, 0.30, ap=0.40, gflops=2.0, flops_at=at(2.0)),
        mk(3, "channel_prune", 0, 0.20, ap=0.45, gflops=2.5),  # an older trial: no flops_at
    ]
    assert [t.number for t in pareto_front(trials)] == [2, 3]
    assert {t.number for t in pareto_front(trials)} == brute_force_front(trials)
    fig = fig_pareto(trials)
    points = trace(fig, "trials")
    assert list(points.customdata) == [0, 1, 2, 3]
    assert list(points.x) == pytest.approx([4.0, 3.0, 2.0, 2.5])
    assert list(points.y) == pytest.approx([30, 40, 40, 45])
    assert list(points.marker.symbol) == ["circle", "circle", "circle", "circle-open"]
    assert "GFLOPs 3.000 at 96x96 (1.000 at the base resolution)" in points.text[1]
    assert "GFLOPs 2.500 at the base resolution (no flops_at recorded)" in points.text[3]
    front = trace(fig, "Pareto front")
    assert list(front.customdata) == [2, 3] and list(front.x) == pytest.approx([2.0, 2.5])
    assert "open circles: at the base resolution" in fig.layout.xaxis.title.text
    assert list(trace(fig, "upgraded (trial 0, best H)").x) == pytest.approx([4.0])

    del trials[3]
    assert (
        fig_pareto(trials).layout.xaxis.title.text
        == "GFLOPs (multiply-adds at the trial's best resolution)"
    )


def test_figures_mark_the_chosen_trial() -> None:
    trials = tree()
    assert list(trace(fig_pareto(trials), "upgraded (trial 7, best H)").customdata) == [7]
    assert list(trace(fig_pareto(trials, best=3), "upgraded (trial 3)").customdata) == [3]
    assert fig_stage_flops(trials, best=3).data[1].name == "upgraded student (trial 3)"
    assert fig_stage_flops(trials).data[1].name == "upgraded student (trial 7, best H)"
    assert "upgraded (trial 3)" in fig_lineage(trials, best=3).layout.title.text
    for fn in (fig_pareto, fig_stage_flops, fig_lineage):
        with pytest.raises(JDSearchError, match="trial 2 is not a completed trial"):
            fn(trials, best=2)  # failed
        with pytest.raises(JDSearchError, match="trial 42 is not a completed trial"):
            fn(trials, best=42)
        with pytest.raises(JDSearchError, match="trial must be a trial number"):
            fn(trials, best="3")


def test_pareto_front_matches_brute_force_on_random_trials() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 25))
        # Coarse grids make ties in AP and in FLOPs common.
        trials = [
            mk(
                i,
                "channel_prune",
                0,
                0.1,
                ap=float(rng.integers(0, 6)) / 10,
                gflops=float(rng.integers(1, 6)),
            )
            for i in range(n)
        ]
        for t in trials:  # about half record flops_at, unrelated to their base-resolution flops
            if rng.random() < 0.5:
                t.user_attrs["flops_at"] = {RES[0]: 1, RES[1]: int(1e9 * rng.integers(1, 6))}
        front = pareto_front(trials)
        assert {t.number for t in front} == brute_force_front(trials)
        flops = [plotted_flops(t) for t in front]
        assert flops == sorted(flops)


def test_lineage_path_follows_parents() -> None:
    trials = tree()
    assert [t.number for t in lineage_path(trials, 7)] == [0, 1, 5, 7]
    assert [t.number for t in lineage_path(trials, 4)] == [0, 2, 4]  # through the failed trial
    assert [t.number for t in lineage_path(trials, 6)] == [6]  # parent 99 is missing
    loop = [mk(0, "channel_prune", 1, 0.1), mk(1, "channel_prune", 0, 0.2)]
    assert [t.number for t in lineage_path(loop, 1)] == [0, 1]
    with pytest.raises(JDSearchError, match="no trial 42"):
        lineage_path(trials, 42)


def test_fig_h_per_iteration() -> None:
    trials = tree()
    fig = fig_h_per_iteration(trials)
    done = [0, 1, 3, 4, 5, 6, 7]
    for i, res in enumerate(RES):
        series = trace(fig, f"H at {res}")
        assert list(series.x) == done
        assert list(series.y) == pytest.approx(
            [t.user_attrs["h"][res] for t in trials if t.number in done]
        )
        assert i == 0 or series.y[0] > 0
    best = trace(fig, "best H so far")
    assert list(best.y) == pytest.approx([0.30, 0.35, 0.35, 0.40, 0.40, 0.40, 0.41])
    assert list(best.customdata) == [0, 1, 1, 4, 4, 4, 7]
    assert "2 failed" in fig.layout.title.text
    assert [t.number for t in running_best(trials)] == [0, 1, 1, 4, 4, 4, 7]


def test_best_is_the_earlier_trial_on_a_tie() -> None:
    trials = [
        mk(0, "base", None, 0.3),
        mk(1, "channel_prune", 0, 0.3),
        mk(2, "layer_prune", 0, 0.2),
    ]
    assert [t.number for t in running_best(trials)] == [0, 0, 0]
    assert best_trial(trials).number == 0
    assert list(trace(fig_lineage(trials), "path to trial 0").customdata) == [0]


def test_fig_lineage_nodes_edges_and_path() -> None:
    fig = fig_lineage(tree())
    nodes = [t for t in fig.data if t.mode == "markers"]
    assert sorted(itertools.chain.from_iterable(t.customdata for t in nodes)) == [
        0,
        1,
        3,
        4,
        5,
        6,
        7,
    ]
    assert {t.name for t in nodes} == {
        "base",
        "channel_prune",
        "teacher",
        "add_layer",
        "rearrange",
        "layer_prune",
    }
    edges = trace(fig, "parent → child")
    pairs = {(edges.x[i], edges.x[i + 1]) for i in range(0, len(edges.x), 3)}
    assert pairs == {(0, 1), (1, 3), (1, 5), (5, 7)}  # no edge from a failed or missing parent
    assert list(trace(fig, "path to trial 7").customdata) == [0, 1, 5, 7]
    fig3 = fig_lineage(tree(), best=3)
    assert list(trace(fig3, "path to trial 3").customdata) == [0, 1, 3]
    hover = trace(fig, "rearrange").text[0]
    assert "rearrange:2->3 from 99" in hover and "teacher d2-2-3-2" in hover and "AP 36.0" in hover
    with pytest.raises(JDSearchError, match="trial 2 is not a completed trial"):
        fig_lineage(tree(), best=2)


def test_fig_teacher_capacity_running_best_and_fallback_count() -> None:
    trials = tree()
    del trials[5].user_attrs["teacher_params"]  # an older study: count it from the config
    calls: list[str] = []

    def count(cfg: str) -> int:
        calls.append(cfg)
        return 600

    fig = fig_teacher_capacity(trials, count=count)
    assert calls == ["d2-2-3-2_w1.5-1.5-1.5-1.5_f32"]
    best = trace(fig, "best student's teacher")
    # best so far: 0, 1, 1, 4, 4, 4, 7 -> their teachers' params in M
    assert list(best.y) == pytest.approx([9e-4, 9e-4, 9e-4, 7e-4, 7e-4, 7e-4, 5e-4])
    hist = trace(fig, "all teachers")
    assert sorted(hist.x) == pytest.approx(
        sorted(v / 1e6 for v in (900, 900, 1200, 700, 600, 800, 500))
    )
    assert hist.xaxis == "x2"  # the right panel
    with pytest.raises(JDSearchError, match="trial 5 has no teacher_params"):
        fig_teacher_capacity(trials)


def test_fig_stage_flops() -> None:
    trials = tree()
    trials[7].user_attrs["stage_flops"] = [10, 10, 45, 30, 0]
    trials[0].user_attrs["stage_flops"] = [10, 20, 30, 40, 0]
    fig = fig_stage_flops(trials)
    base, best = fig.data
    assert list(base.x) == ["stem", "stage 1", "stage 2", "stage 3", "stage 4"]
    assert list(base.y) == pytest.approx([1e-8, 2e-8, 3e-8, 4e-8, 0])
    assert list(best.text) == ["+0.0%", "-50.0%", "+50.0%", "-25.0%", "n/a"]
    assert "trial 7" in best.name
    with pytest.raises(JDSearchError, match="no completed base trial"):
        fig_stage_flops(trials[1:])
    del trials[7].user_attrs["stage_flops"]
    with pytest.raises(JDSearchError, match="trial 7 records no stage_flops"):
        fig_stage_flops(trials)


@pytest.mark.parametrize(
    "fn", [fig_h_per_iteration, fig_pareto, fig_teacher_capacity, fig_action_gain, fig_lineage]
)
def test_figures_need_a_completed_trial(fn: Any) -> None:
    with pytest.raises(JDSearchError, match="no completed trial"):
        fn([mk(0, "base", None, state=TrialState.FAIL)])


def test_png_export_is_optional(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figs = {"a": go.Figure(), "b": go.Figure(layout={"height": 640})}
    find_spec = importlib.util.find_spec
    # No kaleido: nothing is tried, and the line says how to get it.
    with monkeypatch.context() as m:
        m.setattr(
            importlib.util, "find_spec", lambda n, *a: None if n == "kaleido" else find_spec(n, *a)
        )
        written, skipped = report_html._write_pngs(figs, tmp_path)
    assert written == {} and skipped == (
        'no image exporter: kaleido is not installed (pip install -e ".[png]")'
    )
    kaleido_errors = pytest.importorskip("kaleido.errors")  # in the dev extra, so run in CI

    def render(writes: list[str], then: Any) -> Any:
        def fake(figures: Any, paths: dict[str, Path]) -> list[str]:
            assert list(figures) == list(paths) == ["a", "b"]  # one call renders every figure
            for key in writes:
                paths[key].write_bytes(b"\x89PNG")
            if isinstance(then, BaseException):
                raise then
            return then

        return fake

    failed = "image export failed for"
    cases = [  # what the renderer writes, then returns or raises; what _write_pngs says
        (["a", "b"], [], None),
        (["a"], RuntimeError("browser closed\nmore"), f"{failed} b: RuntimeError: browser closed"),
        ([], ["JavascriptError: bad figure"], f"{failed} a, b: JavascriptError: bad figure"),
        ([], kaleido_errors.ChromeNotFoundError("x"), report_html._NO_BROWSER),
    ]
    for writes, then, expect_skipped in cases:
        monkeypatch.setattr(report_html, "_render_pngs", render(writes, then))
        for key in figs:  # PNGs of an earlier report must not pass for new ones
            (tmp_path / f"{key}.png").write_bytes(b"stale")
        written, skipped = report_html._write_pngs(figs, tmp_path)
        assert written == {k: tmp_path / f"{k}.png" for k in writes}
        assert skipped == expect_skipped
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"{k}.png" for k in writes]
        for p in tmp_path.iterdir():
            p.unlink()


# ---------------------------------------------------------------------- the real small study
@pytest.fixture
def study_copy(small_study: Any, tmp_path: Path) -> Any:
    """The small study's database copied, so attaching figures never touches the shared one."""
    from jdsearch.search.queries import open_study

    db = tmp_path / "copy.db"
    shutil.copyfile(small_study.url.removeprefix("sqlite:///"), db)
    return open_study(f"sqlite:///{db}", small_study.name)


def test_figures_of_a_real_study(study_copy: Any) -> None:
    from jdsearch.search.queries import lineage

    handle = study_copy
    trials = handle.study.get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    figs = build_figures(handle)
    assert tuple(figs) == FIGURE_KEYS
    assert all(isinstance(f, go.Figure) and f.data for f in figs.values())

    resolutions = [str(r) for r in handle.spec.resolutions]
    for res in resolutions:  # fig 8: one point per completed trial per resolution
        series = trace(figs["h_per_iteration"], f"H at {res}")
        assert list(series.x) == [t.number for t in done]
        assert list(series.y) == pytest.approx([t.user_attrs["h"][res] for t in done])

    front = trace(figs["pareto"], "Pareto front")
    assert set(front.customdata) == brute_force_front(trials) and len(front.customdata) >= 1
    points = trace(figs["pareto"], "trials")
    assert list(points.customdata) == [t.number for t in done]
    assert list(points.x) == pytest.approx(
        [plotted_flops(t) / 1e9 for t in done]
    )  # flops_at or not

    best = handle.trial()
    path = trace(figs["lineage"], f"path to trial {best.number}")
    assert list(path.customdata) == [t.number for t in lineage(handle.study, best.number)]
    nodes = [t for t in figs["lineage"].data if t.mode == "markers"]
    assert sum(len(t.x) for t in nodes) == len(done)

    base_bars, best_bars = figs["stage_flops"].data
    assert list(base_bars.y) == pytest.approx(
        [v / 1e9 for v in handle.base_trial().user_attrs["stage_flops"]]
    )
    assert list(best_bars.y) == pytest.approx([v / 1e9 for v in best.user_attrs["stage_flops"]])
    hist = trace(figs["teacher_capacity"], "all teachers")
    assert sorted(hist.x) == pytest.approx(
        sorted(t.user_attrs["teacher_params"] / 1e6 for t in done)
    )
    top = [t for t in figs["action_gain"].data if t.xaxis == "x"]
    assert {t.name for t in top} == set(FAMILIES)
    bottom = [t for t in figs["action_gain"].data if t.xaxis == "x2"]
    for i in range(len(bottom[0].y)):  # each phase stacks to 100 % or has no bar at all
        ys = [t.y[i] for t in bottom]
        assert all(y is None for y in ys) or sum(ys) == pytest.approx(100)


def chosen_trial(handle: Any) -> int:
    """A completed trial of the small study other than the best (and the base, when possible)."""
    best, base = handle.trial().number, handle.base_trial().number
    done = [
        t.number
        for t in handle.study.get_trials()
        if t.state == TrialState.COMPLETE and t.number != best
    ]
    assert done, "the small study needs a completed trial besides the best"
    return next((n for n in done if n != base), done[0])


def test_build_figures_follow_the_chosen_trial(study_copy: Any) -> None:
    from jdsearch.search.queries import lineage

    handle = study_copy
    n = chosen_trial(handle)
    chosen = handle.trial(n)
    assert upgraded_trial(handle).number == handle.trial().number
    assert upgraded_trial(handle, n).number == n
    figs = build_figures(handle, trial=n)
    bars = figs["stage_flops"].data[1]
    assert bars.name == f"upgraded student (trial {n})"
    assert list(bars.y) == pytest.approx([v / 1e9 for v in chosen.user_attrs["stage_flops"]])
    path = trace(figs["lineage"], f"path to trial {n}")
    assert list(path.customdata) == [t.number for t in lineage(handle.study, n)]
    star = trace(figs["pareto"], f"upgraded (trial {n})")
    assert list(star.customdata) == [n] and list(star.x) == pytest.approx(
        [plotted_flops(chosen) / 1e9]
    )


def test_write_report_for_a_chosen_trial(study_copy: Any, tmp_path: Path) -> None:
    from jdsearch.report.compare import compare_study

    handle = study_copy
    n, best = chosen_trial(handle), handle.trial()
    files = write_report(
        handle,
        tmp_path / "out",
        trial=n,
        comparison=compare_study(handle, n, fps=False),
        png=False,
        attach=False,
    )
    page = files.html.read_text(encoding="utf-8")
    assert (
        f"Upgraded detector: trial {n} (chosen for this report; the best H is trial {best.number},"
        in page
    )
    assert f"upgraded student (trial {n})" in page  # the fig-7 and lineage paragraphs name it
    res = handle.trial(n).user_attrs["best_resolution"]
    flops_at = handle.trial(n).user_attrs.get("flops_at")
    assert (f"GFLOPs at {res} (" if flops_at else "GFLOPs at the base resolution.") in page
    for key, fig in build_figures(handle, trial=n).items():
        assert (
            json.loads(files.figures[key].read_text())["data"] == json.loads(fig.to_json())["data"]
        )
    stage = json.loads(files.figures["stage_flops"].read_text())
    assert stage["data"][1]["name"] == f"upgraded student (trial {n})"

    default = write_report(handle, tmp_path / "default", png=False, attach=False).html.read_text(
        encoding="utf-8"
    )
    assert f"Upgraded detector: trial {best.number} (the best H)," in default


def test_write_report_rejects_a_bad_trial(study_copy: Any, tmp_path: Path) -> None:
    from jdsearch.report.compare import compare_study

    handle = study_copy
    handle.study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.FAIL,
            params={"move": "channel_prune"},
            distributions={"move": MOVES},
            user_attrs={"parent": 0},
        )
    )
    n_failed = handle.study.get_trials()[-1].number
    assert handle.study.get_trials()[-1].state == TrialState.FAIL
    cases = [
        ({"trial": 999}, "has no trial 999"),
        ({"trial": n_failed}, f"trial {n_failed} is FAIL"),
        ({"trial": True}, "trial must be a trial number"),
        (
            {"trial": chosen_trial(handle), "comparison": compare_study(handle, fps=False)},
            "comparison's upgraded detector is trial",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(JDSearchError, match=message) as info:
            write_report(handle, tmp_path / "o", png=False, attach=False, **kwargs)
        assert "\n" not in str(info.value)
        if "comparison" not in kwargs:
            with pytest.raises(JDSearchError, match=message):
                build_figures(handle, trial=kwargs["trial"])
    assert not (tmp_path / "o").exists()


def test_teacher_param_counter_matches_the_recorded_counts(study_copy: Any) -> None:
    count = teacher_param_counter(study_copy)
    recorded = {
        t.user_attrs["teacher"]: t.user_attrs["teacher_params"]
        for t in study_copy.study.get_trials()
        if t.state == TrialState.COMPLETE
    }
    assert len(recorded) >= 1
    for cfg, n in recorded.items():
        assert count(cfg) == n


class StrictHTML(HTMLParser):
    """Collects ids, table cells and scripts; fails on a mismatched or unclosed tag."""

    VOID: ClassVar[set[str]] = {"meta", "br", "link", "img", "input", "hr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.ids: list[str] = []
        self.cells: list[str] = []
        self.scripts: list[str] = []
        self.external: list[str] = []  # src/href of anything the page would fetch
        self.doctype = ""
        self._cell: list[str] | None = None

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.ids += [v for k, v in attrs if k == "id" and v]
        self.external += [
            v for k, v in attrs if k in ("src", "href") and v and not v.startswith("#")
        ]
        if tag in ("td", "th"):
            self._cell = []
        if tag == "script":
            self.scripts.append("")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self.stack and self.stack[-1] == "script":
            self.scripts[-1] += data


def dashboard_plots(handle: Any) -> tuple[dict[str, str], int]:
    from optuna_dashboard._custom_plot_data import SYSTEM_ATTR_PLOT_DATA, get_plotly_graph_objects

    attrs = handle.study._storage.get_study_system_attrs(handle.study._study_id)
    n_keys = sum(k.startswith(SYSTEM_ATTR_PLOT_DATA) for k in attrs)
    return get_plotly_graph_objects(attrs), n_keys


def test_write_report_html_json_and_dashboard(study_copy: Any, tmp_path: Path) -> None:
    from plotly.offline import get_plotlyjs

    from jdsearch.report.compare import compare_study

    handle = study_copy
    comparison = compare_study(handle, fps=False)
    # PNGs: tests/test_browser.py (kaleido needs a browser; here it would only cost time).
    files = write_report(handle, tmp_path / "out", comparison=comparison, png=False, attach=False)
    assert dashboard_plots(handle) == ({}, 0)  # attach=False leaves the study alone

    text = files.html.read_text(encoding="utf-8")
    parser = StrictHTML()
    parser.feed(text)
    parser.close()
    assert parser.doctype.lower() == "doctype html" and parser.stack == []
    assert {f"fig-{k}" for k in FIGURE_KEYS} <= set(parser.ids)
    assert {f"sec-{k}" for k in FIGURE_KEYS} <= set(parser.ids)
    js = get_plotlyjs()
    assert sum(js in s for s in parser.scripts) == 1 and text.count(js[:300]) == 1  # embedded once
    assert parser.external == []  # works offline: nothing loaded from elsewhere
    header, rows = comparison.table()
    table = parser.cells[: len(header) * (1 + len(rows))]
    assert table == header + [c for r in rows for c in r]
    for key in FIGURE_KEYS:  # every figure is plotted into its div
        assert sum("Plotly.newPlot(" in s and f'"fig-{key}"' in s for s in parser.scripts) == 1

    assert set(files.figures) == set(FIGURE_KEYS)
    figs = build_figures(handle)
    for key, path in files.figures.items():
        assert path == tmp_path / "out" / "figures" / f"{key}.json"
        assert json.loads(path.read_text())["data"] == json.loads(figs[key].to_json())["data"]

    # attach: visible to optuna-dashboard under stable ids; a second report overwrites.
    files = write_report(handle, tmp_path / "out", png=False, attach=True)
    assert files.png_skipped == "PNG export not requested"
    assert files.attached == tuple(graph_object_id(k) for k in FIGURE_KEYS)
    plots, n_keys = dashboard_plots(handle)
    assert set(plots) == {graph_object_id(k) for k in FIGURE_KEYS}
    for key in FIGURE_KEYS:
        assert (
            json.loads(plots[graph_object_id(key)])["data"]
            == json.loads(figs[key].to_json())["data"]
        )
    write_report(handle, tmp_path / "out2", png=False, attach=True)
    again, n_again = dashboard_plots(handle)
    assert again == plots and n_again == n_keys


def test_write_report_rejects_bad_input(study_copy: Any, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(JDSearchError, match="is not a directory"):
        write_report(study_copy, tmp_path / "file", attach=False, png=False)
    with pytest.raises(JDSearchError, match="comparison must be"):
        write_report(study_copy, tmp_path / "o", comparison="table", attach=False, png=False)  # type: ignore[arg-type]
    with pytest.raises(JDSearchError, match="phases"):
        write_report(study_copy, tmp_path / "o", phases=0, attach=False, png=False)
    assert not (tmp_path / "o").exists()


def test_cli_report_prints_the_table_and_writes_the_report(
    small_study: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jdsearch.cli import main

    db = tmp_path / "cli.db"
    shutil.copyfile(small_study.url.removeprefix("sqlite:///"), db)
    out = tmp_path / "rep"
    rc = main(
        ["report", "--storage", f"sqlite:///{db}", "--out", str(out), "--repeats", "2", "--no-png"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("detector"))
    assert header.split() == [
        "detector",
        "trial",
        "input",
        "size",
        "GFLOPs",
        "FPS",
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
    ]
    base = next(line for line in text.splitlines() if line.startswith("base "))
    assert base.split()[1] == "0" and float(base.split()[4]) > 0  # trial 0, measured FPS
    assert "change" in text and (out / "report.html").is_file()
    assert "PNGs: none written (PNG export not requested)" in text.splitlines()
    page = (out / "report.html").read_text()
    assert "Base vs upgraded detector" in page and all(f'id="fig-{k}"' in page for k in FIGURE_KEYS)
    from jdsearch.search.queries import open_study

    plots, _ = dashboard_plots(open_study(f"sqlite:///{db}"))
    assert {graph_object_id(k) for k in FIGURE_KEYS} <= set(plots)
