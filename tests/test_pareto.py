"""Pareto search, the fast parts: the non-dominated sort, the crowding distance and the
hypervolume against brute force on random points; the sampler's parent choice in a Pareto study
on fake trials; the score's cost (latency cached per architecture, resolution and device) on tiny
detectors; the spec's new fields."""

from __future__ import annotations

import math
from collections import Counter

import optuna
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.distributions import CategoricalDistribution
from optuna.trial import create_trial

from jdsearch.core.errors import SpecError
from jdsearch.methods.morph.actions import MorphConfig, evolve
from jdsearch.models import build_detector
from jdsearch.search import cost as cost_module
from jdsearch.search.cost import CostMeter, arch_key, weighted_cost
from jdsearch.search.pareto import (
    crowding_distance,
    dominates,
    first_front,
    hypervolume_2d,
    non_dominated_sort,
)
from jdsearch.search.record import (
    BASE_MOVE,
    MOVE_PARAM,
    PARENT_ATTR,
    TrialRecord,
    h_of,
    is_complete,
)
from jdsearch.search.sampler import HillClimbingSampler
from jdsearch.search.strategies import ParetoScore, front_k
from jdsearch.spec.detector import load_spec
from jdsearch.spec.study import study_from_dict

from .conftest import REPO

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Small integer grids: ties and duplicates are common, which is where sorts go wrong.
coords = st.integers(min_value=0, max_value=6)
points2 = st.lists(st.tuples(coords, coords), min_size=0, max_size=14)
points3 = st.lists(st.tuples(coords, coords, coords), min_size=1, max_size=12)


# ---------------------------------------------------------------------- brute force
def brute_fronts(points: list[tuple[int, ...]]) -> list[list[int]]:
    """Peel: each front is what no remaining point dominates."""
    left, fronts = set(range(len(points))), []
    while left:
        front = sorted(
            i for i in left if not any(dominates(points[j], points[i]) for j in left if j != i)
        )
        fronts.append(front)
        left -= set(front)
    return fronts


def brute_crowding(points: list[tuple[int, ...]]) -> list[float]:
    """The definition, point by point: per objective, inf at the extremes, else the gap between
    the nearest strictly smaller and strictly larger values over the range."""
    out = []
    for p in points:
        d = 0.0
        for m in range(len(p)):
            values = [q[m] for q in points]
            low, high = min(values), max(values)
            if low == high:
                continue
            if p[m] in (low, high):
                d = math.inf
                continue
            below = max(v for v in values if v < p[m])
            above = min(v for v in values if v > p[m])
            d += (above - below) / (high - low)
        out.append(d)
    return out


def brute_hypervolume(points: list[tuple[int, int]], ref: tuple[int, int]) -> float:
    """Count the unit cells inside the reference box that some point dominates."""
    return float(
        sum(
            any(px <= x and py <= y for px, py in points)
            for x in range(-1, ref[0])
            for y in range(-1, ref[1])
        )
    )


@settings(max_examples=300, deadline=None)
@given(points3)
def test_non_dominated_sort_matches_brute_force(points: list[tuple[int, int, int]]) -> None:
    fronts = non_dominated_sort(points)
    assert fronts == brute_fronts(points)
    assert sorted(i for f in fronts for i in f) == list(range(len(points)))
    assert first_front(points) == fronts[0]


@settings(max_examples=300, deadline=None)
@given(points2)
def test_crowding_distance_matches_its_definition(points: list[tuple[int, int]]) -> None:
    front = [points[i] for i in first_front(points)]
    assert crowding_distance(front) == pytest.approx(brute_crowding(front))
    assert crowding_distance(points) == pytest.approx(brute_crowding(points))


@settings(max_examples=300, deadline=None)
@given(points2, st.tuples(coords, coords))
def test_hypervolume_matches_a_cell_count(
    points: list[tuple[int, int]], ref: tuple[int, int]
) -> None:
    assert hypervolume_2d(points, ref) == pytest.approx(brute_hypervolume(points, ref))


def test_known_answers() -> None:
    pts = [(0.0, 3.0), (1.0, 1.0), (3.0, 0.0), (2.0, 2.0), (1.0, 1.0)]
    assert non_dominated_sort(pts) == [[0, 1, 2, 4], [3]]
    assert crowding_distance([(0.0, 3.0), (1.0, 1.0), (3.0, 0.0)]) == [math.inf, 2.0, math.inf]
    # x in [1, 2): y from 2 to 4; x in [2, 4): y from 1 to 4
    assert hypervolume_2d([(1, 2), (2, 1)], (4, 4)) == 1 * 2 + 2 * 3
    assert hypervolume_2d([(5, 5)], (4, 4)) == 0.0
    with pytest.raises(ValueError):
        hypervolume_2d([(1, 2, 3)], (4, 4))


# ---------------------------------------------------------------------- the sampler
STUDENT_MOVES = ["channel_prune", "layer_prune"]
TEACHER_MOVES = ["teacher.fpn-", "teacher.depth1-"]
VOCAB = [BASE_MOVE, *STUDENT_MOVES, *TEACHER_MOVES]
DIST = {MOVE_PARAM: CategoricalDistribution(VOCAB)}


def pareto_study(**kw: object) -> tuple[optuna.Study, HillClimbingSampler]:
    sampler = HillClimbingSampler(
        VOCAB,
        lambda parent: (STUDENT_MOVES, TEACHER_MOVES),
        seed=0,
        root_wait=(0.01, 60.0),
        **kw,  # type: ignore[arg-type]
    )
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    return study, sampler


def add(study: optuna.Study, move: str, parent: int | None, ap: float, cost: float) -> None:
    study.add_trial(
        create_trial(
            values=[ap, cost],
            params={MOVE_PARAM: move},
            distributions=DIST,
            user_attrs={PARENT_ATTR: parent, "h_value": ap * cost**-0.4},
        )
    )


def test_front_k_keeps_the_non_dominated_and_breaks_ties_by_crowding() -> None:
    study, _ = pareto_study()
    # (AP, cost): 1..5 are the front (AP up with cost); 6 and 7 are dominated.
    for ap, cost in [(0.10, 1.0), (0.20, 0.5), (0.30, 0.6), (0.31, 0.7), (0.40, 1.2)]:
        add(study, "channel_prune", None, ap, cost)
    add(study, "layer_prune", 0, 0.25, 0.9)
    add(study, "layer_prune", 0, 0.05, 2.0)
    trials = study.get_trials()
    front = front_k(trials, 10)
    assert {t.number for t in front} == {1, 2, 3, 4}  # trial 0 (0.10, 1.0) is dominated by 1
    # extremes first (infinite crowding), then the most isolated interior point: trial 3 spans
    # (0.4 - 0.3) / 0.2 + (1.2 - 0.6) / 0.7 = 1.357, trial 2 (0.31 - 0.2) / 0.2 + 0.2 / 0.7 = 0.836
    front_points = [(-0.2, 0.5), (-0.3, 0.6), (-0.31, 0.7), (-0.4, 1.2)]
    assert crowding_distance(front_points)[1:3] == pytest.approx([0.836, 1.357], abs=1e-3)
    assert [t.number for t in front] == [1, 4, 3, 2]
    assert [t.number for t in front_k(trials, 3)] == [1, 4, 3]


def test_pareto_parents_come_from_the_front_only_and_isolated_ones_more_often() -> None:
    study, sampler = pareto_study(top_k=3, freeze_student=0)
    add(study, BASE_MOVE, None, 0.10, 1.0)  # dominated once 1 exists
    add(study, "channel_prune", 0, 0.20, 0.5)
    add(study, "channel_prune", 0, 0.30, 0.6)
    add(study, "channel_prune", 0, 0.31, 0.7)  # crowded: beyond top_k
    add(study, "channel_prune", 0, 0.40, 1.2)
    add(study, "layer_prune", 0, 0.25, 0.9)  # dominated by 2
    trials = study.get_trials()
    parents = Counter(
        sampler.choose(trials, n, score=ParetoScore()).parent for n in range(100, 1300)
    )
    assert set(parents) == {1, 4, 3}  # the three most isolated of the front
    assert parents[1] > parents[4] > parents[3]  # rank weights 3 : 2 : 1
    assert 520 < parents[1] < 680 and 140 < parents[3] < 260
    # the same trials in an H study rank by H (the recorded h_value): another top-3
    by_h = {t.number for t in sorted(trials, key=lambda t: -h_of(t))[:3]}  # type: ignore[operator]
    h_parents = {sampler.choose(trials, n).parent for n in range(100, 400)}
    assert h_parents == by_h != set(parents)


def test_a_pareto_study_keeps_the_freeze_and_untried_moves_first() -> None:
    study, _ = pareto_study(top_k=1, freeze_student=2, p_student=1.0)
    add(study, BASE_MOVE, None, 0.5, 1.0)
    seen = []
    for _ in range(4):
        trial = study.ask()
        seen.append(trial.suggest_categorical(MOVE_PARAM, VOCAB))
        assert trial.user_attrs[PARENT_ATTR] == 0
        study.tell(trial, [0.4, 1.5])  # dominated: the root stays the only parent
    assert set(seen[:2]) == set(TEACHER_MOVES)  # frozen: teacher moves only, untried first
    assert set(seen[2:]) == set(STUDENT_MOVES)  # p_student 1 once thawed, untried first


# ---------------------------------------------------------------------- the record
def test_a_pareto_trial_reads_its_h_from_the_attribute() -> None:
    t = create_trial(
        values=[0.3, 0.8],
        params={MOVE_PARAM: BASE_MOVE},
        distributions=DIST,
        user_attrs={
            "h_value": 0.33,
            "ap": {"64x64": 0.3},
            "cost": {"64x64": 0.8},
            "best_resolution": "64x64",
        },
    )
    assert h_of(t) == 0.33 and is_complete(t)
    r = TrialRecord.from_trial(t)
    assert r.value == r.h_value == 0.33 and r.point() == (0.3, 0.8)
    bare = create_trial(values=[0.3, 0.8], params={MOVE_PARAM: BASE_MOVE}, distributions=DIST)
    assert h_of(bare) is None and not is_complete(bare)
    single = create_trial(value=0.7, params={MOVE_PARAM: BASE_MOVE}, distributions=DIST)
    assert h_of(single) == 0.7 and TrialRecord.from_trial(single).point() is None


# ---------------------------------------------------------------------- the cost
def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_detector(load_spec("tiny-r18-fpn"), 4).eval()


def test_latency_cost_is_timed_once_per_architecture_resolution_and_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, ...]] = []
    real = cost_module.measure_latencies

    def counting(pairs, **kw):
        calls.append(tuple(str(r) for _, r in pairs))
        return real(pairs, **kw)

    monkeypatch.setattr(cost_module, "measure_latencies", counting)
    base = tiny(0)
    meter = CostMeter("latency", lambda: base, 1, warmup=0, repeats=2)
    student = evolve(tiny(1), "layer_prune", config=MorphConfig())
    same_arch = evolve(tiny(2), "layer_prune", config=MorphConfig())  # other weights
    assert arch_key(student) == arch_key(same_arch) != arch_key(base)

    ratios, records = meter.ratios(student, ["64x64", "96x96"], flops=0, params=0)
    assert calls == [("64x64", "64x64"), ("96x96", "96x96")]  # base and student, same size
    for res in ("64x64", "96x96"):
        rec = records[res]
        assert rec["ratio"] == ratios[res] == pytest.approx(rec["ms"] / rec["base_ms"])
        assert rec["device"].startswith("cpu ") and "thread" in rec["device"]
    again, _ = meter.ratios(same_arch, ["96x96", "64x64"], flops=0, params=0)
    assert again == ratios and len(calls) == 2 and meter.timed == 2  # the cache answered
    # the base's own architecture costs 1 and is never timed
    own, rec = meter.ratios(tiny(3), ["64x64"], flops=0, params=0)
    assert own == {"64x64": 1.0} and rec["64x64"]["ms"] is None and len(calls) == 2

    # a new worker learns the measurements from the study's completed trials (same device)
    fresh = CostMeter("latency", lambda: base, 1, warmup=0, repeats=2)
    recorded = create_trial(
        value=0.5,
        user_attrs={"latency": {"64x64": {**records["64x64"], "ratio": 0.123}}},
        system_attrs={"jdsearch:arch_key": arch_key(student)},
    )
    learnt, _ = fresh.ratios(student, ["64x64"], flops=0, params=0, known=[recorded])
    assert learnt == {"64x64": 0.123} and len(calls) == 2 and fresh.timed == 0
    other = {**records["64x64"], "device": "cuda:0 Some GPU", "ratio": 9.0}
    recorded.user_attrs["latency"] = {"64x64": other}  # another device's: timed here
    fresh2 = CostMeter("latency", lambda: base, 1, warmup=0, repeats=2)
    fresh2.ratios(student, ["64x64"], flops=0, params=0, known=[recorded])
    assert fresh2.timed == 1 and len(calls) == 3


def test_flops_and_params_costs_are_ratios_to_the_base() -> None:
    base = tiny(0)
    n_base = sum(p.numel() for p in base.parameters())
    student = evolve(tiny(1), "channel_prune", config=MorphConfig())
    n = sum(p.numel() for p in student.parameters())
    flops = CostMeter("flops", lambda: pytest.fail("flops needs no base detector"), 200)
    assert flops.ratios(student, ["64x64"], flops=150, params=n) == ({"64x64": 0.75}, {})
    params = CostMeter("params", lambda: base, 200)
    ratios, _ = params.ratios(student, ["64x64", "96x96"], flops=150, params=n)
    assert ratios == {"64x64": n / n_base, "96x96": n / n_base} and n < n_base
    from jdsearch.core.resolution import Resolution

    r, r0 = Resolution.parse("96x96"), Resolution.parse("64x64")
    assert weighted_cost(0.5, r, r0, 0.8) == pytest.approx(0.5 * (96 * 96 / 64 / 64) ** 0.8)


# ---------------------------------------------------------------------- the spec
def spec_with(**score: object) -> dict:
    data = yaml.safe_load((REPO / "studies" / "quickstart.yaml").read_text())
    data["score"] = {**data.get("score", {}), **score}
    return data


@pytest.mark.parametrize(
    ("score", "strategy", "message"),
    [
        ({"mode": "paretto"}, None, "s.yaml: score.mode: must be one of h, pareto, got 'paretto'"),
        ({"cost": "fps"}, None, "s.yaml: score.cost: must be one of flops, params, latency, got 'fps'"),
        ({"latency_repeats": 0}, None, "s.yaml: score.latency_repeats: must be ≥ 1, got 0"),
        ({"mode": "pareto"}, "greedy", "s.yaml: search.strategy: follows the single best pair"),
    ],
)  # fmt: skip
def test_bad_score_settings_are_one_line_naming_file_field_and_value(
    score: dict, strategy: str | None, message: str
) -> None:
    data = spec_with(**score)
    if strategy:
        data["search"]["strategy"] = strategy
    with pytest.raises(SpecError) as e:
        study_from_dict(data, source="s.yaml")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_score_defaults_are_the_paper_s() -> None:
    spec = study_from_dict(spec_with(), source="s.yaml")
    assert (spec.score.mode, spec.score.cost) == ("h", "flops")
    pareto = study_from_dict(spec_with(mode="pareto", cost="latency"), source="s.yaml")
    assert (pareto.score.mode, pareto.score.cost) == ("pareto", "latency")
    assert study_from_dict(pareto.to_dict(), source="stored").score == pareto.score
