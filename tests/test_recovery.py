"""The local recovery after a move (jdsearch.methods.morph.recovery): it trains only what the
move changed, towards the parent's FPN outputs, and leaves everything else as it was."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from jdsearch.core.errors import SpecError
from jdsearch.data.coco import CocoDataset, make_loader
from jdsearch.methods.morph.actions import evolve
from jdsearch.methods.morph.recovery import changed_stages, local_recovery
from jdsearch.models.detector import build_detector
from jdsearch.search.objective import Objective
from jdsearch.search.record import TrialRecord
from jdsearch.search.run import run_search
from jdsearch.search.session import prepare
from jdsearch.spec.arch import BackboneArch
from jdsearch.spec.detector import load_spec
from jdsearch.spec.study import SearchSpec, study_from_dict

R18 = BackboneArch.resnet([2, 2, 2, 2], kind="basic", widths=(8, 16, 16, 32), stem=8, fpn=16)


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


def test_the_study_fields_are_validated(search_assets, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    for field, value, message in (
        ("recovery_iters", -1, r"search.recovery_iters.*must not be negative.*-1"),
        ("recovery_moves", ["add_layer"], r"search.recovery_moves.*channel_prune, layer_prune"),
        ("recovery_moves", "rearrange", r"search.recovery_moves: expected a list, got .rearrange."),
        ("after_recovery", "skip", r"search.after_recovery.*train, score.*'skip'"),
    ):
        data = search_assets.study("bad", url, **{field: value})
        with pytest.raises(SpecError, match=message):
            study_from_dict(data, source="test")
    search = SearchSpec()  # off by default: a stored study resumes as it was made
    assert (search.recovery_iters, search.recovery_moves, search.after_recovery) == (
        0,
        ("rearrange",),
        "train",
    )


@pytest.mark.slow
def test_a_trials_rearrange_is_recovered_towards_its_parent(
    search_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``search.recovery_iters``, a trial's rearranged child is its parent's ``evolve``
    then :func:`local_recovery` with the trial's seed, and the trial records the steps; a move
    not named in ``recovery_moves`` and a study without recovery leave the child as evolved."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    data = search_assets.study(
        "recover",
        url,
        n_trials=1,
        recovery_iters=3,
        recovery_moves=["rearrange"],
        after_recovery="train",
    )
    data["kd"]["mode"] = "off"
    spec = study_from_dict(data, source="test")
    search_assets.install_pool(tmp_path, "recover")
    monkeypatch.chdir(tmp_path)
    study = run_search(spec, progress=False)
    _, ctx = prepare(spec, progress=False)
    root = TrialRecord.from_trial(study.get_trials()[0])
    parent = ctx.download(str(root.checkpoint), "root").detector
    pair = Objective(ctx).load_pair(study, 1, "rearrange:3->4", 0, seed=11)
    batch = spec.fast_eval.batch_size
    assert pair.morph["recovery_iters"] == 3 and pair.morph["recovery_images"] == 3 * batch
    expected = evolve(parent, "rearrange:3->4")
    plain = copy.deepcopy(expected.state_dict())
    local_recovery(
        expected,
        parent,
        ctx.train_set,
        iters=3,
        batch_size=batch,
        resolutions=spec.resolutions,
        seed=11,
    )
    got = pair.student.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    assert any(not torch.equal(got[k], v) for k, v in plain.items())  # it did train
    # after_recovery: score, the recovery is the trial's training: the child is scored as it is
    scored = dataclasses.replace(spec.search, after_recovery="score")
    objective = Objective(dataclasses.replace(ctx, spec=dataclasses.replace(spec, search=scored)))
    recovered = objective.load_pair(study, 1, "rearrange:3->4", 0, seed=11)
    assert objective.train_pair(recovered, seed=11).images == 0
    assert all(torch.equal(recovered.student.state_dict()[k], v) for k, v in got.items())
    assert Objective(ctx).train_pair(pair, seed=11).images > 0  # "train": the fast evaluation
    pruned = Objective(ctx).load_pair(study, 1, "layer_prune", 0, seed=11)
    assert "recovery_iters" not in pruned.morph  # not in recovery_moves
    off = dataclasses.replace(spec, search=dataclasses.replace(spec.search, recovery_iters=0))
    bare = Objective(dataclasses.replace(ctx, spec=off)).load_pair(study, 1, "rearrange:3->4", 0)
    assert "recovery_iters" not in bare.morph
    assert all(torch.equal(bare.student.state_dict()[k], v) for k, v in plain.items())
