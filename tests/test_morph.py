"""Student morphism: the four weight-inheriting actions, their feasibility and their reports."""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from jdsearch.core.resolution import Resolution
from jdsearch.methods.morph.actions import (
    Action,
    MorphConfig,
    MorphError,
    MorphReport,
    all_actions,
    describe,
    evolve,
    evolve_with_report,
    feasible_actions,
)
from jdsearch.models.detector import Detector, build_detector
from jdsearch.spec.arch import BackboneArch, Block, Stage
from jdsearch.spec.detector import load_spec

SIZE = 64
NUM_CLASSES = 4

# Tiny students: R18-style (stem as wide as stage 1, so stage 1 has no projection), R50-style
# bottlenecks, and a ResNeXt-style grouped variant with 4 channels per group.
R18 = BackboneArch.resnet([2, 2, 2, 2], kind="basic", widths=(8, 16, 16, 32), stem=8, fpn=16)
R50 = BackboneArch.resnet([2, 3, 3, 2], kind="bottleneck", widths=(4, 8, 8, 16), stem=8, fpn=16)
X = BackboneArch(
    (
        Stage((Block((16, 16, 32), 4), Block((16, 16, 32), 4)), 1),
        Stage((Block((16, 16, 48), 4), Block((16, 16, 48), 4)), 2),
        Stage((Block((24, 24, 64), 6), Block((24, 24, 64), 6)), 2),
        Stage((Block((32, 32, 64), 8),), 2),
    ),
    stem=8,
    fpn=16,
)


def tiny(arch: BackboneArch, seed: int = 0) -> Detector:
    """A detector with the tiny preset's heads, ``arch`` as backbone, 64-px inputs, eval mode."""
    preset = "tiny-r18-fpn" if arch.kind == "basic" else "tiny-r50-fpn"
    spec = load_spec(preset).with_arch(arch)
    res = Resolution(SIZE, SIZE)
    spec = dataclasses.replace(
        spec, input=dataclasses.replace(spec.input, size=res, resolutions=(res,))
    )
    torch.manual_seed(seed)
    return build_detector(spec, NUM_CLASSES).eval()


@torch.no_grad()
def randomize_bn(det: nn.Module, seed: int = 0) -> None:
    """Give every BN distinct γ/β/statistics (a fresh BN is the identity and hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    for m in det.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.1 * torch.randn(n, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def images(seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, SIZE, SIZE, generator=g), torch.rand(3, 48, SIZE, generator=g)]


@torch.no_grad()
def features(det: Detector, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, SIZE, SIZE, generator=g)
    return list(det.eval().backbone(x).values())


@torch.no_grad()
def detections(det: Detector) -> list[dict[str, Tensor]]:
    return det.eval()(images())


def assert_same_function(a: Detector, b: Detector, atol: float = 1e-4) -> None:
    for fa, fb in zip(features(a), features(b), strict=True):
        torch.testing.assert_close(fa, fb, atol=atol, rtol=1e-4)
    for da, db in zip(detections(a), detections(b), strict=True):
        assert da["boxes"].shape == db["boxes"].shape
        torch.testing.assert_close(da["boxes"], db["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(da["scores"], db["scores"], atol=1e-5, rtol=1e-4)
        assert torch.equal(da["labels"], db["labels"])


def state_copy(det: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in det.state_dict().items()}


def body_params_from_arch(arch: BackboneArch) -> int:
    """Backbone-body parameter count derived from the arch alone (independent of the builder)."""
    n = 3 * 49 * arch.stem + 2 * arch.stem
    for slot in arch.slots():
        ch, g, cin = slot.block.channels, slot.block.groups, slot.in_channels
        if len(ch) == 2:
            n += 9 * cin * ch[0] + 2 * ch[0] + 9 * ch[0] * ch[1] + 2 * ch[1]
        else:
            n += (
                cin * ch[0]
                + 2 * ch[0]
                + 9 * (ch[0] // g) * ch[1]
                + 2 * ch[1]
                + ch[1] * ch[2]
                + 2 * ch[2]
            )
        if slot.has_projection:
            n += cin * ch[-1] + 2 * ch[-1]
    return n


def producers(arch: BackboneArch, key: str) -> list[str]:
    """BNs producing the channels of space ``key`` (a chain: the head's projection BN and the last
    BN of every block up to the next projection)."""
    m = re.fullmatch(r"stages\.(\d+)\.(\d+)\.shortcut\.bn", key)
    if m is None:
        return [key]
    head = (int(m.group(1)), int(m.group(2)))
    names = [key]
    started = False
    for slot in arch.slots():
        here = (slot.stage, slot.index) == head
        if started and slot.has_projection:
            break
        started = started or here
        if started:
            last = "bn2" if len(slot.block.channels) == 2 else "bn3"
            names.append(f"stages.{slot.stage}.{slot.index}.{last}")
    return names


# ---------------------------------------------------------------------- vocabulary, feasibility
def test_action_strings_round_trip() -> None:
    assert all_actions()[:3] == ["channel_prune", "layer_prune", "add_layer:1"]
    assert "rearrange:3->4" in all_actions() and "rearrange:4->3" in all_actions()
    for text in all_actions():
        assert str(Action.parse(text)) == text
    assert Action.parse("rearrange:3->4") == Action("rearrange", src=3, dst=4)


@pytest.mark.parametrize(
    "text",
    [
        "prune",
        "add_layer",
        "add_layer:0",
        "add_layer:5",
        "add_layer:x",
        "rearrange:1->3",
        "rearrange:4->5",
        "rearrange:2-3",
        "channel_prune:0.2",
        "",
    ],
)
def test_unknown_actions_raise_morph_error(text: str) -> None:
    with pytest.raises(MorphError, match="action"):
        Action.parse(text)
    with pytest.raises(MorphError):
        evolve(tiny(R18), text)


def test_feasibility_never_empties_a_stage() -> None:
    shallow = BackboneArch.resnet(
        [1, 1, 1, 1], kind="basic", widths=(8, 16, 16, 32), stem=8, fpn=16
    )
    det = tiny(shallow)
    acts = feasible_actions(det)
    assert acts == ["channel_prune", "add_layer:1", "add_layer:2", "add_layer:3", "add_layer:4"]
    for bad in ("layer_prune", "rearrange:2->3", "rearrange:3->2"):
        with pytest.raises(MorphError, match="not feasible"):
            evolve(det, bad)
    capped = MorphConfig(max_stage_depth=2)
    assert "add_layer:1" not in feasible_actions(tiny(R18), config=capped)
    assert "add_layer:1" in feasible_actions(det, config=capped)
    with pytest.raises(MorphError, match="max_stage_depth"):
        evolve(tiny(R18), "add_layer:1", config=capped)


def test_every_action_leaves_the_parent_untouched() -> None:
    det = tiny(R50)
    randomize_bn(det)
    before, arch = state_copy(det), det.arch
    for action in feasible_actions(det):
        child = evolve(det, action)
        assert child is not det and child.arch != arch
    assert det.arch == arch
    after = det.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_child_keeps_mode_and_transform_sizes() -> None:
    det = tiny(R18).train()
    det.transform.min_size, det.transform.max_size = (40,), 56
    child = evolve(det, "add_layer:2")
    assert child.training
    assert child.transform.min_size == (40,) and child.transform.max_size == 56
    assert child.spec.num_classes == NUM_CLASSES and child.spec.rpn == det.spec.rpn


# ---------------------------------------------------------------------- channel pruning
@pytest.mark.parametrize("arch", [R18, R50, X], ids=["r18", "r50", "x"])
def test_channel_prune_is_exact_when_removed_channels_are_zero(arch: BackboneArch) -> None:
    det = tiny(arch)
    randomize_bn(det, seed=1)
    _, report = evolve_with_report(det, "channel_prune", config=MorphConfig(channel_fraction=0.25))
    assert report.removed_channels
    body = det.backbone.body
    with torch.no_grad():
        for key, idx in report.removed_channels.items():
            for name in producers(arch, key):
                bn = body.get_submodule(name)
                bn.weight[list(idx)] = 0.0
                bn.bias[list(idx)] = 0.0
    child, second = evolve_with_report(
        det, "channel_prune", config=MorphConfig(channel_fraction=0.25)
    )
    for key, idx in second.removed_channels.items():  # it removes (some of) the zeroed channels
        assert set(idx) <= set(report.removed_channels[key])
    assert child.arch.num_blocks() == arch.num_blocks()
    assert body_params_from_arch(child.arch) < body_params_from_arch(arch)
    assert_same_function(det, child)


def test_channel_prune_ranks_globally_and_prunes_a_stage_through_its_projection() -> None:
    det = tiny(R50)
    body = det.backbone.body
    with torch.no_grad():
        for m in body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(1.0, 2.0)
        body.stages[2][0].shortcut.bn.weight[:5] = 0.01  # 5 of stage 3's 32 output channels
    total = 16 + 32 + 32 + 64 + sum(sum(s.block.channels[:2]) for s in R50.slots())
    fraction = 5.4 / total  # rounds to exactly 5 channels
    child, report = evolve_with_report(
        det, "channel_prune", config=MorphConfig(channel_fraction=fraction)
    )
    assert dict(report.removed_channels) == {"stages.2.0.shortcut.bn": (0, 1, 2, 3, 4)}
    assert child.arch.stage_out_channels == (16, 32, 27, 64)
    assert [b.out_channels for b in child.arch.stages[2].blocks] == [27, 27, 27]
    assert child.arch.slot(3, 0).in_channels == 27
    assert child.backbone.fpn.inner_blocks[2][0].in_channels == 27
    # inherited by slicing: stage 4's first conv lost exactly input channels 0..4
    torch.testing.assert_close(
        child.backbone.body.stages[3][0].conv1.weight, body.stages[3][0].conv1.weight[:, 5:]
    )
    torch.testing.assert_close(
        child.backbone.fpn.inner_blocks[2][0].weight,
        det.backbone.fpn.inner_blocks[2][0].weight[:, 5:],
    )


def test_stage_without_projection_keeps_its_width() -> None:
    det = tiny(R18)  # stem 8 = stage-1 width 8: stage 1 has no projection
    body = det.backbone.body
    with torch.no_grad():
        for m in body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
        for blk in body.stages[0]:
            blk.bn2.weight.fill_(1e-4)  # tiny, but produces the unprunable stem chain
        body.stem.bn.weight.fill_(1e-4)
    child = evolve(det, "channel_prune", config=MorphConfig(channel_fraction=0.3))
    assert child.arch.stem == 8 and child.arch.stage_out_channels[0] == 8
    assert child.arch.stage_out_channels[1:] != R18.stage_out_channels[1:]


def test_channel_prune_removes_the_configured_fraction() -> None:
    det = tiny(R50)
    randomize_bn(det, seed=3)
    prunable = 16 + 32 + 32 + 64 + sum(sum(s.block.channels[:2]) for s in R50.slots())
    for fraction in (0.1, 0.3):
        _, report = evolve_with_report(
            det, "channel_prune", config=MorphConfig(channel_fraction=fraction)
        )
        assert sum(len(v) for v in report.removed_channels.values()) == round(fraction * prunable)
        assert report.new_params == 0 and report.params_after < report.params_before


def test_grouped_blocks_lose_whole_groups() -> None:
    det = tiny(X)
    body = det.backbone.body
    with torch.no_grad():
        for m in body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(1.0, 2.0)
        blk = body.stages[1][1]  # (16, 16, 48), 4 groups of 4
        blk.bn1.weight[8:12] = 0.01
        blk.bn2.weight[8:12] = 0.02
    child, report = evolve_with_report(
        det, "channel_prune", config=MorphConfig(channel_fraction=0.01)
    )
    assert dict(report.removed_channels) == {
        "stages.1.1.bn1": (8, 9, 10, 11),
        "stages.1.1.bn2": (8, 9, 10, 11),
    }
    new = child.arch.slot(1, 1).block
    assert new.channels == (12, 12, 48) and new.groups == 3
    kept = [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15]
    torch.testing.assert_close(
        child.backbone.body.stages[1][1].conv2.weight, blk.conv2.weight[kept]
    )
    # Repeated pruning keeps 4 channels per group everywhere (appendix B: 128 -> 112 = 28 x 4),
    # down to the minimum of two groups per grouped conv.
    cfg = MorphConfig(channel_fraction=0.3)
    while "channel_prune" in feasible_actions(child, config=cfg):
        child = evolve(child, "channel_prune", config=cfg)
        for slot in child.arch.slots():
            c1, c2, _ = slot.block.channels
            assert c1 == c2 == 4 * slot.block.groups and slot.block.groups >= 2
    assert all(s.block.groups == 2 for s in child.arch.slots())
    a = child.arch  # the encoding still round-trips with the ResNeXt group width
    assert (
        BackboneArch.parse(a.encode(), stem=a.stem, fpn=a.fpn, strides=a.strides, group_width=4)
        == a
    )


def test_channel_prune_stops_at_the_minimum_width() -> None:
    arch = BackboneArch.resnet([1, 1, 1, 1], kind="bottleneck", widths=(2, 2, 3, 3), stem=4, fpn=8)
    det = tiny(arch)
    randomize_bn(det)
    cfg = MorphConfig(channel_fraction=0.5, min_channels=2)
    for _ in range(20):
        if "channel_prune" not in feasible_actions(det, config=cfg):
            break
        det = evolve(det, "channel_prune", config=cfg)
    else:
        pytest.fail("channel pruning never became infeasible")
    assert all(min(s.block.channels) == 2 for s in det.arch.slots())
    with pytest.raises(MorphError, match="minimum"):
        evolve(det, "channel_prune", config=cfg)
    assert "channel_prune" in feasible_actions(det)  # the default minimum is 1 channel


# ---------------------------------------------------------------------- layer pruning
def test_layer_prune_removes_the_least_mean_magnitude_block() -> None:
    det = tiny(R50)
    body = det.backbone.body
    victim = body.stages[3][1]  # widest stage: 64-wide, most parameters
    with torch.no_grad():
        for p in victim.parameters():
            p.mul_(0.5)

    def l1(m: nn.Module) -> float:
        return sum(float(p.detach().abs().sum()) for p in m.parameters())

    assert l1(victim) > l1(body.stages[0][1])  # a raw (unnormalised) sum would pick stage 1
    child, report = evolve_with_report(det, "layer_prune")
    assert report.removed_blocks == ("stage 4 block 2",) and report.new_params == 0
    assert child.arch.depths == (2, 3, 3, 1)
    parent_sd, child_sd = det.state_dict(), child.state_dict()
    for k, v in child_sd.items():
        assert torch.equal(v, parent_sd[k]), k  # blocks before the victim keep their names


def test_layer_prune_renumbers_later_blocks() -> None:
    det = tiny(R50)
    with torch.no_grad():
        for p in det.backbone.body.stages[2][1].parameters():
            p.mul_(0.01)
    child, report = evolve_with_report(det, "layer_prune")
    assert report.removed_blocks == ("stage 3 block 2",)
    torch.testing.assert_close(
        child.backbone.body.stages[2][1].conv2.weight, det.backbone.body.stages[2][2].conv2.weight
    )


# ---------------------------------------------------------------------- add-layer
@pytest.mark.parametrize("arch", [R18, R50, X], ids=["r18", "r50", "x"])
def test_add_layer_is_an_identity(arch: BackboneArch) -> None:
    det = tiny(arch)
    randomize_bn(det, seed=2)
    for stage in range(1, 5):
        child, report = evolve_with_report(det, f"add_layer:{stage}")
        new = child.arch.stages[stage - 1].blocks[-1]
        assert new == arch.stages[stage - 1].blocks[-1]
        assert child.arch.depths[stage - 1] == arch.depths[stage - 1] + 1
        block = child.backbone.body.stages[stage - 1][-1]
        assert block.shortcut is None
        assert report.new_params == sum(p.numel() for p in block.parameters())
        assert report.inherited_params == report.params_before
        assert_same_function(det, child, atol=0)


# ---------------------------------------------------------------------- rearrange
def test_rearrange_moves_the_stride_and_inherits_every_conv() -> None:
    det = tiny(R18)  # stage widths 8, 16, 16, 32
    randomize_bn(det)
    child, report = evolve_with_report(det, "rearrange:3->4")
    assert child.arch.depths == (2, 2, 1, 3)
    assert child.arch.stages[3].blocks[0].channels == (16, 16)
    assert report.moved_blocks == ("stage 3 block 2 -> stage 4 block 1",)
    moved, src = child.backbone.body.stages[3][0], det.backbone.body.stages[2][1]
    assert moved.conv1.stride == (2, 2) and src.conv1.stride == (1, 1)
    torch.testing.assert_close(moved.conv1.weight, src.conv1.weight)
    torch.testing.assert_close(moved.bn2.running_var, src.bn2.running_var)
    # only the moved block's new strided 16 -> 16 projection is new; stage 3's width is unchanged
    assert report.new_params == 16 * 16 + 2 * 16
    assert report.new_tensors == tuple(
        sorted(k for k in child.state_dict() if k.startswith("backbone.body.stages.3.0.shortcut"))
    )
    # the new projection is the identity on the strided grid (eval mode)
    x = torch.rand(1, 16, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(moved.shortcut.eval()(x), x[:, :, ::2, ::2])


def test_rearrange_4_to_3_gives_stage_3_a_second_chain() -> None:
    det = tiny(R18)
    child, report = evolve_with_report(det, "rearrange:4->3")
    assert child.arch.depths == (2, 2, 3, 1)
    assert child.arch.stage_out_channels == (8, 16, 32, 32)
    # new: the 32 -> 32 strided projection of stage 4's next block, and stage 3's FPN lateral
    # whose input grew from 16 to 32 channels.
    fpn = R18.fpn
    assert report.new_params == (32 * 32 + 2 * 32) + (32 * fpn + fpn)
    assert child.backbone.fpn.inner_blocks[2][0].in_channels == 32
    assert child.backbone.body.stages[3][0].shortcut is not None
    # the moved block (now stride 1, still 16 -> 32) keeps its projection weights
    torch.testing.assert_close(
        child.backbone.body.stages[2][2].shortcut.conv.weight,
        det.backbone.body.stages[3][0].shortcut.conv.weight,
    )


def test_a_move_makes_the_same_child_whatever_ran_before_it() -> None:
    """The new FPN lateral of rearrange:4->3 starts from a seed of the parent's architecture
    and the move, not from the process's random state: a retried trial on another worker
    rebuilds the child its first attempt had."""
    det = tiny(R18)
    torch.manual_seed(1)
    first = evolve(det, "rearrange:4->3").state_dict()
    torch.manual_seed(2)
    torch.rand(7)
    second = evolve(det, "rearrange:4->3").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    state = torch.get_rng_state()
    evolve(det, "rearrange:4->3")
    assert torch.equal(torch.get_rng_state(), state)  # and it draws nothing from the process's


def test_rearrange_there_and_back_restores_the_parent_exactly() -> None:
    det = tiny(R50)
    randomize_bn(det)
    back = evolve(evolve(det, "rearrange:3->4"), "rearrange:4->3")
    assert back.arch == det.arch
    a, b = det.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_r101_student_pattern_stage3_blocks_at_the_start_of_stage4() -> None:
    """Appendix B's R101 student starts stage 4 with two blocks of stage 3's width."""
    det = tiny(R50)
    for _ in range(2):
        det = evolve(det, "rearrange:3->4")
    assert [b.out_channels for b in det.arch.stages[3].blocks] == [32, 32, 64, 64]
    assert det.arch.depths == (2, 3, 1, 4)
    assert_same_function(det, det)  # builds and runs


# ---------------------------------------------------------------------- arch stays true
def _flops_total(det: Detector) -> int | None:
    try:
        from jdsearch.models.flops import count_flops
    except ImportError:
        return None
    return count_flops(det, size=(SIZE, SIZE)).backbone


def _random_walk(
    arch: BackboneArch, steps: int, seed: int
) -> Iterator[tuple[str, Detector, Detector, MorphReport]]:
    rng = random.Random(seed)
    det = tiny(arch, seed)
    randomize_bn(det, seed)
    cfg = MorphConfig(max_stage_depth=5)
    for _ in range(steps):
        action = rng.choice(feasible_actions(det, config=cfg))
        child, report = evolve_with_report(det, action, config=cfg)
        yield action, det, child, report
        det = child


@pytest.mark.parametrize("arch", [R18, R50], ids=["r18", "r50"])
def test_random_action_sequences_keep_the_arch_true(arch: BackboneArch, tmp_path) -> None:
    seen: set[str] = set()
    last: Detector | None = None
    flops_parent: int | None = None
    for step, (action, parent, child, report) in enumerate(_random_walk(arch, steps=22, seed=7)):
        seen.add(action.split(":")[0])
        a = child.arch
        body = child.backbone.body
        # the model is the arch: per-block widths, shortcuts, strides, FPN inputs, parameter count
        for slot in a.slots():
            blk = body.stages[slot.stage][slot.index]
            assert blk.conv1.in_channels == slot.in_channels
            assert (blk.shortcut is not None) == slot.has_projection
            assert max(blk.conv1.stride + blk.conv2.stride) == slot.stride
        assert [b[0].in_channels for b in child.backbone.fpn.inner_blocks] == list(
            a.stage_out_channels
        )
        assert sum(p.numel() for p in body.parameters()) == body_params_from_arch(a)
        # the encoding round-trips and a rebuild from it reproduces the outputs
        parsed = BackboneArch.parse(a.encode(), stem=a.stem, fpn=a.fpn, strides=a.strides)
        assert parsed == a
        rebuilt = build_detector(child.spec.with_arch(parsed), NUM_CLASSES)
        rebuilt.load_state_dict(child.state_dict(), strict=True)
        out = features(child)
        assert all(torch.isfinite(f).all() for f in out)
        for fa, fb in zip(out, features(rebuilt), strict=True):
            assert torch.equal(fa, fb)
        # the report's bookkeeping
        n_child = sum(p.numel() for p in child.parameters())
        assert report.params_after == n_child == report.inherited_params + report.new_params
        assert (
            report.child_encoding == a.encode() and report.parent_encoding == parent.arch.encode()
        )
        # FLOPs move the way the action says
        flops_parent = _flops_total(parent) if flops_parent is None else flops_parent
        flops_child = _flops_total(child)
        if flops_child is not None:
            if action in ("channel_prune", "layer_prune"):
                assert flops_child < flops_parent
            elif action.startswith("add_layer"):
                assert flops_child > flops_parent
        flops_parent = flops_child
        if step % 8 == 0:
            with torch.no_grad():
                child(images())  # the whole detector runs
        last = child
    assert seen == {"channel_prune", "layer_prune", "add_layer", "rearrange"}
    assert last is not None
    from jdsearch.store.checkpoint import load_checkpoint, save_checkpoint

    path = save_checkpoint(tmp_path / "walk.safetensors", last)
    loaded = load_checkpoint(path).detector
    assert loaded.arch == last.arch
    assert _flops_total(loaded) == _flops_total(last)
    for fa, fb in zip(features(last), features(loaded), strict=True):
        assert torch.equal(fa, fb)


def test_describe() -> None:
    det = tiny(R50)
    d = describe(det)
    assert d["encoding"] == R50.encode() and d["depths"] == [2, 3, 3, 2]
    assert d["params"] == sum(p.numel() for p in det.parameters())
    assert d["backbone_body_params"] == body_params_from_arch(R50)
    assert d["feasible_actions"] == feasible_actions(det)
    if _flops_total(det) is not None:
        assert d["flops"] > d["backbone_flops"] > 0
