"""The local recovery after a move (jdsearch.methods.morph.recovery): it trains only what the
move changed, towards the parent's FPN outputs, and leaves everything else as it was."""

from __future__ import annotations

import copy

import pytest
import torch

from jdsearch.core.errors import SpecError
from jdsearch.data.coco import CocoDataset, make_loader
from jdsearch.data.synth import generate
from jdsearch.methods.morph.actions import evolve
from jdsearch.methods.morph.recovery import changed_stages, local_recovery
from jdsearch.models.detector import build_detector
from jdsearch.spec.arch import BackboneArch
from jdsearch.spec.detector import load_spec

R18 = BackboneArch.resnet([2, 2, 2, 2], kind="basic", widths=(8, 16, 16, 32), stem=8, fpn=16)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> CocoDataset:
    info = generate(tmp_path_factory.mktemp("shapes"), images=12, seed=0, size=64)
    return CocoDataset(info.train_json, info.image_dir)


def _parent(classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    detector = build_detector(load_spec("tiny-r18-fpn").with_arch(R18), classes)
    gen = torch.Generator().manual_seed(0)
    for m in detector.modules():  # BN statistics and scales as a trained detector has them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
    return detector.eval()


def _distance(child: torch.nn.Module, parent: torch.nn.Module, data: CocoDataset) -> float:
    """FPN outputs' squared error against the parent's, relative, on the same fixed images."""
    images, _ = next(iter(make_loader(data, 8, shuffle=False, seed=0)))
    with torch.no_grad():
        batch = child.transform(images)[0].tensors
        pairs = zip(child.backbone(batch).values(), parent.backbone(batch).values(), strict=True)
        return sum(float((c - p).pow(2).mean() / p.pow(2).mean()) for c, p in pairs)


def test_a_rearranged_child_moves_towards_its_parent_and_only_where_it_changed(
    shapes: CocoDataset,
) -> None:
    parent = _parent(shapes.num_classes)
    child = evolve(parent, "rearrange:3->4")
    assert changed_stages(parent, child) == (2, 3)
    assert changed_stages(parent, copy.deepcopy(parent)) == ()
    child.eval()
    parent_before = copy.deepcopy(parent.state_dict())
    before = copy.deepcopy(child.state_dict())
    flags = {n: p.requires_grad for n, p in child.named_parameters()}
    far = _distance(child, parent, shapes)
    rng = torch.get_rng_state()
    report = local_recovery(child, parent, shapes, iters=30, lr=0.01, batch_size=4, seed=0)
    assert torch.equal(torch.get_rng_state(), rng)  # the process's random state is untouched
    assert report.iters == 30 and report.trained == (
        "backbone.body.stages.2",
        "backbone.body.stages.3",
        "backbone.fpn",
    )
    assert _distance(child, parent, shapes) < 0.7 * far  # measured on images it may not have used
    after = child.state_dict()
    trained = [k for k in after if not torch.equal(after[k], before[k])]
    assert trained and all(k.startswith(report.trained) for k in trained)
    assert any(k.startswith("backbone.body.stages.3") for k in trained)
    assert any(k.startswith("backbone.fpn") for k in trained)
    assert not child.training and flags == {n: p.requires_grad for n, p in child.named_parameters()}
    assert all(p.grad is None for p in child.parameters())
    assert all(torch.equal(v, parent.state_dict()[k]) for k, v in parent_before.items())
    # the same seed, the same recovery
    again = evolve(parent, "rearrange:3->4").eval()
    local_recovery(again, parent, shapes, iters=30, lr=0.01, batch_size=4, seed=0)
    assert all(torch.equal(v, after[k]) for k, v in again.state_dict().items())


def test_a_channel_pruned_child_trains_every_stage_and_bad_settings_are_refused(
    shapes: CocoDataset,
) -> None:
    parent = _parent(shapes.num_classes)
    child = evolve(parent, "channel_prune").eval()
    stages = changed_stages(parent, child)
    assert stages and set(stages) <= {0, 1, 2, 3}
    report = local_recovery(child, parent, shapes, iters=2, batch_size=4)
    assert report.trained[-1] == "backbone.fpn" and len(report.trained) == len(stages) + 1
    for iters, lr in ((0, 0.01), (5, 0.0), (5, float("nan")), (5, float("inf"))):
        with pytest.raises(SpecError, match=r"local_recovery: (iters|lr) must be"):
            local_recovery(child, parent, shapes, iters=iters, lr=lr)
