"""Taylor channel importance (``search.channel_importance: taylor``): the scores, the plan that
ranks by them, and a search trial's ``channel_prune`` that uses them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from jdsearch.core.errors import SpecError
from jdsearch.data.coco import CocoDataset
from jdsearch.methods.morph.actions import MorphConfig, channel_costs, evolve
from jdsearch.methods.morph.importance import taylor_scores
from jdsearch.methods.morph.pruning import plan_channel_prune, prunable_bn_names
from jdsearch.models.detector import build_detector
from jdsearch.models.flops import count_flops
from jdsearch.search.objective import Objective
from jdsearch.search.record import TrialRecord
from jdsearch.search.run import run_search
from jdsearch.search.session import prepare
from jdsearch.spec.arch import BackboneArch
from jdsearch.spec.detector import load_spec
from jdsearch.spec.study import study_from_dict

R18 = BackboneArch.resnet([2, 2, 2, 2], kind="basic", widths=(8, 16, 16, 32), stem=8, fpn=16)


def _detector(classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(load_spec("tiny-r18-fpn").with_arch(R18), classes)


def test_scores_leave_the_detector_as_it_was_and_repeat(shapes: CocoDataset) -> None:
    det = _detector(shapes.num_classes)
    det.eval()
    before = {k: v.clone() for k, v in det.state_dict().items()}
    scores = taylor_scores(det, shapes, batches=2, batch_size=2, resolutions=["64x64"], seed=3)
    after = det.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert not det.training and all(p.grad is None for p in det.parameters())
    body = det.backbone.body
    for name in prunable_bn_names(body.arch):
        assert len(scores[name]) == body.get_submodule(name).num_features
        assert all(v >= 0 for v in scores[name]) and any(v > 0 for v in scores[name])
    again = taylor_scores(det, shapes, batches=2, batch_size=2, resolutions=["64x64"], seed=3)
    assert again == scores
    other = taylor_scores(det, shapes, batches=2, batch_size=2, resolutions=["64x64"], seed=4)
    assert other != scores


def test_a_channel_whose_bn_outputs_nothing_scores_zero(shapes: CocoDataset) -> None:
    """Zero γ and β: the channel's BN output is 0 whatever comes in, so removing it changes
    nothing, and to first order the loss does not change either."""
    det = _detector(shapes.num_classes)
    bn = det.backbone.body.get_submodule("stages.2.0.bn1")
    with torch.no_grad():
        bn.weight[5] = 0.0
        bn.bias[5] = 0.0
    scores = taylor_scores(det, shapes, batches=2, batch_size=2, resolutions=["64x64"])
    assert scores["stages.2.0.bn1"][5] == 0.0
    body = det.backbone.body
    plan = plan_channel_prune(body, 1 / sum(_space_sizes(body)), scores=scores)
    assert plan.removed == {"stages.2.0.bn1": (5,)}  # the first channel a prune removes


def test_the_plan_ranks_by_the_scores_and_sums_a_stream_over_its_writers() -> None:
    det = _detector(3)
    body = det.backbone.body
    scores = {
        n: tuple(1.0 + i for i in range(m.num_features))
        for n, m in body.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    }
    # Channel 3 of the stage-2 stream is weak in the projection's BN but strong in the blocks
    # that also write to the stream: summed, it is not the weakest.
    stream = ("stages.1.0.shortcut.bn", "stages.1.0.bn2", "stages.1.1.bn2")
    scores[stream[0]] = tuple(0.0 if c == 3 else 50.0 for c in range(16))
    scores[stream[1]] = tuple(100.0 if c == 3 else 50.0 for c in range(16))
    scores["stages.2.1.bn1"] = tuple(0.01 if c in (0, 7) else 50.0 for c in range(16))
    plan = plan_channel_prune(body, 2 / sum(_space_sizes(body)), scores=scores)
    assert plan.removed == {"stages.2.1.bn1": (0, 7)}
    by_gamma = plan_channel_prune(body, 2 / sum(_space_sizes(body)))
    assert by_gamma.removed != plan.removed  # |γ| of a fresh BN are all 1: ties, not these
    with pytest.raises(KeyError, match="no score for BN"):
        plan_channel_prune(body, 0.1, scores={"stages.2.1.bn1": scores["stages.2.1.bn1"]})
    child = evolve(
        det, "channel_prune", config=MorphConfig(channel_fraction=0.05, channel_scores=scores)
    )
    assert child.arch.stages[2].blocks[1].channels[0] < 16


def _space_sizes(body: torch.nn.Module) -> list[int]:
    from jdsearch.methods.morph.pruning import _units

    _, spaces, _ = _units(body, 1)
    return [size for size, _ in spaces.values()]


def test_the_study_field_is_validated(search_assets, tmp_path: Path) -> None:
    data = search_assets.study("bad", f"sqlite:///{tmp_path / 's.db'}", channel_importance="l2")
    with pytest.raises(SpecError, match=r"search.channel_importance.*bn_scale, taylor.*'l2'"):
        study_from_dict(data, source="test")


@pytest.mark.slow
def test_a_trials_channel_prune_ranks_its_parent_by_taylor(
    search_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child a search trial prunes is the one the parent's Taylor scores plan, on the
    training set with the trial's seed, and a study left at bn_scale plans by |γ|."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    data = search_assets.study("taylor", url, n_trials=1, channel_importance="taylor")
    data["kd"]["mode"] = "off"
    spec = study_from_dict(data, source="test")
    search_assets.install_pool(tmp_path, "taylor")
    monkeypatch.chdir(tmp_path)
    study = run_search(spec, progress=False)
    _, ctx = prepare(spec, progress=False)
    root = TrialRecord.from_trial(study.get_trials()[0])
    parent = ctx.download(str(root.checkpoint), "root").detector
    objective = Objective(ctx)
    pair = objective.load_pair(study, 1, "channel_prune", 0, seed=11)
    scores = taylor_scores(
        parent,
        ctx.train_set,
        batch_size=spec.fast_eval.batch_size,
        resolutions=spec.resolutions,
        seed=11,
    )
    config = MorphConfig(channel_fraction=spec.search.channel_fraction, channel_scores=scores)
    assert pair.student.arch == evolve(parent, "channel_prune", config=config).arch
    search = dataclasses.replace(spec.search, channel_importance="bn_scale")
    plain = dataclasses.replace(ctx, spec=dataclasses.replace(spec, search=search))
    by_gamma = Objective(plain).load_pair(study, 1, "channel_prune", 0, seed=11)
    assert by_gamma.student.arch == evolve(parent, "channel_prune", config=ctx.morph_config).arch
    assert by_gamma.student.arch != pair.student.arch


def test_channel_costs_are_what_removing_one_unit_saves() -> None:
    """Each space's cost is the FLOPs difference to the child without one of its units, and the
    costs add up: removing one unit of two spaces saves their sum (no space shares a conv with
    another in both its input and output)."""
    det = _detector(3)
    size = (64, 64)
    costs = channel_costs(det, size)
    assert set(costs) == set(_spaces(det.backbone.body))
    whole = count_flops(det, size).total
    one = {"stages.2.1.bn1": tuple(1.0 if c else 0.0 for c in range(16))}
    scores = _uniform_scores(det, one)
    child = evolve(det, "channel_prune", config=_one_unit(det, scores))
    assert child.arch.stages[2].blocks[1].channels[0] == 15
    assert whole - count_flops(child, size).total == costs["stages.2.1.bn1"]
    # a stream channel reaches more convs than an inner one of the same stage
    assert costs["stages.2.0.shortcut.bn"] > costs["stages.2.1.bn1"] > 0


def test_costs_turn_the_ranking_towards_cheap_accuracy() -> None:
    """Of two weak channels, the weaker goes first by score alone, and the one whose space saves
    far more FLOPs per unit of score goes first by score per FLOP."""
    det = _detector(3)
    costs = channel_costs(det, (64, 64))
    cheap, dear = "stages.3.1.bn1", "stages.1.1.bn1"
    assert costs[dear] > 2 * costs[cheap]
    scores = _uniform_scores(det, {cheap: (0.4,) + (9.0,) * 31, dear: (0.5,) + (9.0,) * 15})
    body = det.backbone.body
    fraction = 1 / sum(_space_sizes(body))
    assert plan_channel_prune(body, fraction, scores=scores).removed == {cheap: (0,)}
    by_cost = plan_channel_prune(body, fraction, scores=scores, costs=costs)
    assert by_cost.removed == {dear: (0,)}
    with pytest.raises(KeyError, match="no cost for channel space"):
        plan_channel_prune(body, fraction, scores=scores, costs={cheap: 1.0})


def _spaces(body: torch.nn.Module) -> list[str]:
    from jdsearch.methods.morph.pruning import _units

    return list(_units(body, 1)[1])


def _uniform_scores(det: torch.nn.Module, override: dict[str, tuple[float, ...]]) -> dict:
    body = det.backbone.body
    scores = {
        n: (10.0,) * m.num_features
        for n, m in body.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    }
    return {**scores, **override}


def _one_unit(det: torch.nn.Module, scores: dict) -> MorphConfig:
    fraction = 1 / sum(_space_sizes(det.backbone.body))
    return MorphConfig(channel_fraction=fraction, channel_scores=scores)
