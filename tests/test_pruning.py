"""Pruning criteria: residual chains, prunable BNs, the BN sparsity term, channel/layer ranking."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jdsearch.core.errors import SpecError
from jdsearch.methods.morph.actions import evolve
from jdsearch.methods.morph.pruning import (
    BNSparsity,
    bn_l1,
    chains,
    layer_importance,
    least_important_block,
    plan_channel_prune,
    prunable_bn_names,
    removable_blocks,
)
from jdsearch.models.detector import build_detector
from jdsearch.models.resnet import ResNet
from jdsearch.spec.arch import BackboneArch
from jdsearch.spec.detector import load_spec

R18 = BackboneArch.resnet([2, 2, 2, 2], kind="basic", widths=(8, 16, 16, 32), stem=8, fpn=16)
R50 = BackboneArch.resnet([2, 2, 2, 2], kind="bottleneck", widths=(4, 8, 8, 16), stem=8, fpn=16)


def test_chains_follow_projections() -> None:
    r18 = chains(R18)  # stem 8 == stage-1 width: stage 1 hangs off the stem
    assert [c.head for c in r18] == [None, (1, 0), (2, 0), (3, 0)]
    assert r18[0].members == ((0, 0), (0, 1)) and not r18[0].prunable
    assert [c.width for c in r18] == [8, 16, 16, 32]
    assert [c.head for c in chains(R50)] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    # after rearrange:4->3, stage 3 ends with stage 4's old first block: two chains in stage 3,
    # and stage 4's next block heads a new chain
    det = evolve(build_detector(load_spec("tiny-r18-fpn").with_arch(R18), 3), "rearrange:4->3")
    moved = chains(det.arch)
    assert [c.head for c in moved] == [None, (1, 0), (2, 0), (2, 2), (3, 0)]
    assert moved[3].members == ((2, 2),) and moved[4].members == ((3, 0),)


def test_prunable_bns_exclude_the_stem_chain() -> None:
    names = set(prunable_bn_names(R18))
    assert "stem.bn" not in names
    assert not {"stages.0.0.bn2", "stages.0.1.bn2"} & names  # stem-headed chain: never pruned
    assert {"stages.0.0.bn1", "stages.0.1.bn1"} <= names  # inner widths are prunable
    assert {"stages.1.0.shortcut.bn", "stages.1.0.bn2", "stages.1.1.bn2", "stages.1.0.bn1"} <= names
    r50 = set(prunable_bn_names(R50))
    assert {"stages.0.0.bn1", "stages.0.0.bn2", "stages.0.0.bn3", "stages.0.0.shortcut.bn"} <= r50
    assert len(r50) == 8 * 3 + 4  # three BNs per block + one projection per stage


def test_bn_l1_and_sparsity_term() -> None:
    det = build_detector(load_spec("tiny-r18-fpn").with_arch(R18), 3)
    body = det.backbone.body
    with torch.no_grad():
        for m in det.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.0, 1.0)
    expected = sum(
        float(body.get_submodule(n).weight.detach().abs().sum()) for n in prunable_bn_names(R18)
    )
    assert float(bn_l1(det).detach()) == pytest.approx(expected, rel=1e-6)
    assert float(bn_l1(body).detach()) == pytest.approx(expected, rel=1e-6)
    every_bn = sum(
        float(m.weight.detach().abs().sum())
        for m in body.modules()
        if isinstance(m, nn.BatchNorm2d)
    )
    assert every_bn > expected
    term = BNSparsity(lam=1e-3)
    out = term(det)
    assert set(out) == {"loss_bn_sparsity"}
    assert float(out["loss_bn_sparsity"].detach()) == pytest.approx(1e-3 * expected, rel=1e-6)
    out["loss_bn_sparsity"].backward()
    g = body.stages[1][0].shortcut.bn
    torch.testing.assert_close(g.weight.grad, 1e-3 * g.weight.detach().sign())
    assert body.stem.bn.weight.grad is None and body.stages[0][0].bn2.weight.grad is None
    assert BNSparsity().lam == 1e-5
    with pytest.raises(SpecError, match="lam"):
        BNSparsity(lam=-1.0)


def test_bn_l1_falls_back_to_every_bn_of_a_foreign_model() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )
    with torch.no_grad():
        model[1].weight.fill_(-0.5)
    assert float(bn_l1(model).detach()) == pytest.approx(4 * 0.5 + 4 * 1.0)


@pytest.mark.slow
def test_sparsity_term_shrinks_gammas_in_the_real_trainer(tmp_path) -> None:
    from jdsearch.core.resolution import Resolution
    from jdsearch.data.coco import CocoDataset
    from jdsearch.data.synth import generate
    from jdsearch.engine.train import train
    from jdsearch.spec.settings import TrainConfig

    info = generate(tmp_path, images=6, seed=0, size=64)
    data = CocoDataset(info.train_json, info.image_dir)
    cfg = TrainConfig(
        max_iters=3,
        batch_size=2,
        lr=0.01,
        warmup_iters=0,
        weight_decay=0.0,
        resolutions=(Resolution(64, 64),),
    )
    totals = []
    for terms in ([], [BNSparsity(lam=1.0)]):
        torch.manual_seed(0)
        det = build_detector(load_spec("tiny-r18-fpn").with_arch(R18), data.num_classes)
        result = train(det, data, cfg, loss_terms=terms)
        assert ("loss_bn_sparsity" in result.final_losses) == bool(terms)
        totals.append(float(bn_l1(det).detach()))
    assert totals[1] < totals[0] - 0.01


def _body(arch: BackboneArch) -> ResNet:
    torch.manual_seed(0)
    return ResNet(arch)


def test_ties_shrink_every_space_in_proportion() -> None:
    body = _body(R50)  # fresh BNs: every γ is 1
    plan = plan_channel_prune(body, fraction=0.25)
    widths = {k: len(v) + len(plan.keep[k]) for k, v in plan.removed.items()}
    assert len(plan.removed) >= 20  # spread over the chains and the inner BNs, not one space
    for k, idx in plan.removed.items():
        assert len(idx) <= widths[k] // 2


def test_plan_respects_min_channels() -> None:
    body = _body(R50)
    with torch.no_grad():
        body.stages[1][0].shortcut.bn.weight.fill_(1e-3)  # the whole 32-wide stage-2 chain
    plan = plan_channel_prune(body, fraction=0.5, min_channels=3)
    assert len(plan.keep["stages.1.0.shortcut.bn"]) == 3
    assert all(len(k) >= 3 or k == () for k in plan.keep.values())
    assert plan.removed_channels == sum(len(v) for v in plan.removed.values())


def test_layer_candidates_and_normalised_importance() -> None:
    arch = BackboneArch.resnet(
        [3, 2, 2, 2], kind="bottleneck", widths=(4, 8, 8, 16), stem=8, fpn=16
    )
    assert removable_blocks(arch) == [(0, 1), (0, 2), (1, 1), (2, 1), (3, 1)]
    body = _body(arch)
    with torch.no_grad():  # block 3 of stage 1 = block 2 with doubled parameters
        body.stages[0][2].load_state_dict(body.stages[0][1].state_dict())
        for p in body.stages[0][2].parameters():
            p.mul_(2.0)
    # the importance is the mean |θ| of the block...
    blk = body.stages[0][1]
    mean = sum(float(p.detach().abs().sum()) for p in blk.parameters()) / sum(
        p.numel() for p in blk.parameters()
    )
    assert layer_importance(body, (0, 1)) == pytest.approx(mean)
    assert layer_importance(body, (0, 2)) == pytest.approx(
        2 * layer_importance(body, (0, 1)), rel=1e-5
    )
    # ...so the least important block is the one with the smallest mean |θ|
    with torch.no_grad():
        for p in body.stages[2][1].parameters():
            p.mul_(0.1)
    slot = least_important_block(body)
    assert slot is not None and (slot.stage, slot.index) == (2, 1)
    assert (
        least_important_block(_body(BackboneArch.resnet([1, 1, 1, 1], widths=(4, 4, 4, 4), stem=8)))
        is None
    )
