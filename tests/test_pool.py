"""Elastic teacher pool: configs, spaces, specs, extraction, re-ordering, BN recalibration,
persistence and a tiny end-to-end IPS run."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from jdsearch.core.errors import CheckpointError, SpecError
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import CocoDataset, make_loader, using_resolution
from jdsearch.data.synth import generate
from jdsearch.engine.evaluate import evaluate
from jdsearch.methods.pool import (
    ElasticPool,
    load_pool,
    pool_from_bytes,
    pool_to_bytes,
    recalibrate_bn,
    save_pool,
    train_and_save_pool,
    train_pool,
)
from jdsearch.methods.pool.elastic import ElasticBatchNorm2d, make_elastic, reorder_channels
from jdsearch.models.detector import build_detector
from jdsearch.spec.detector import load_spec
from jdsearch.spec.pool import POOL_TRAIN, PhaseSpec, PoolSpec
from jdsearch.spec.pool_space import SubnetConfig, SubnetSpace
from jdsearch.store.checkpoint import load_checkpoint, save_checkpoint

NUM_CLASSES = 4
RES = (Resolution(64, 48), Resolution(80, 64))

# A small space on tiny-r50-fpn: inner widths 8/12, 16/24, 32/48, 64/96; FPN 16/24.
SMALL_SPACE = {"depths": [[1, 2], [1, 2], "1-3", [1, 2]], "widths": [1.0, 1.5], "fpn": [16, 24]}
SMALL_POOL = {
    "detector": "tiny-r50-fpn",
    "base_widths": [8, 16, 32, 64],
    "space": SMALL_SPACE,
    "phases": [
        {"epochs": 1, "lr": 0.01},
        {"epochs": 1, "lr": 0.005, "depths": [2, 2, "2-3", 2], "widths": [1.5], "fpn": [24]},
        {"epochs": 1, "lr": 0.005},
    ],
    "train": {
        "batch_size": 2,
        "warmup_iters": 1,
        "resolutions": ["64x48", "80x64"],
    },
    "recalibration_batches": 2,
}


@pytest.fixture(scope="module")
def spec() -> PoolSpec:
    return PoolSpec.from_dict(SMALL_POOL)


def _randomise_bn(net: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN parameters and statistics (fresh init has γ = 1 everywhere)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


@pytest.fixture(scope="module")
def pool(spec: PoolSpec) -> ElasticPool:
    torch.manual_seed(0)
    p = ElasticPool(spec, NUM_CLASSES)
    _randomise_bn(p.supernet)
    p.supernet.eval()
    return p


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> CocoDataset:
    info = generate(tmp_path_factory.mktemp("synth"), images=8, seed=3, size=64)
    return CocoDataset(info.train_json, info.image_dir)


def _images() -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)]


def _run(det: nn.Module) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    images = _images()
    with torch.no_grad():
        feats = det.backbone(det.transform(images)[0].tensors)
        return dict(feats), det(images)


# ---------------------------------------------------------------------- configs
def test_config_string_round_trip() -> None:
    cfg = SubnetConfig((3, 4, 12, 3), (1.25, 1.5, 1.5, 1.25), 320)
    assert str(cfg) == "d3-4-12-3_w1.25-1.5-1.5-1.25_f320"
    assert SubnetConfig.parse(str(cfg)) == cfg
    assert SubnetConfig.parse("d2-2-2-2_w1-1-1-1_f256") == SubnetConfig(
        (2, 2, 2, 2), (1.0,) * 4, 256
    )


@settings(max_examples=60, deadline=None)
@given(
    st.tuples(*[st.integers(1, 40)] * 4),
    st.tuples(*[st.integers(10, 800).map(lambda x: x / 100)] * 4),
    st.integers(1, 2048),
)
def test_config_round_trip_property(
    depths: tuple[int, ...], widths: tuple[float, ...], fpn: int
) -> None:
    cfg = SubnetConfig(depths, widths, fpn)
    assert SubnetConfig.parse(str(cfg)) == cfg


@pytest.mark.parametrize(
    "text",
    ["", "d3-4-23-3_w1.5-1.5-1.5_f384", "d3-4-23-3_w1.5-1.5-1.5-1.5", "x", "d0-4-23-3_w1-1-1-1_f8"],
)
def test_config_parse_rejects(text: str) -> None:
    with pytest.raises(SpecError):
        SubnetConfig.parse(text)


# ---------------------------------------------------------------------- spaces
def test_space_size_small_by_hand(spec: PoolSpec) -> None:
    space = spec.space
    # depths 2·2·3·2 = 24, widths 2⁴ = 16, FPN 2  →  768; × 2 resolutions → 1536.
    assert space.size() == 24 * 16 * 2 == 768
    assert space.size(resolutions=2) == 1536
    assert sum(1 for _ in space) == 768
    assert len(set(space)) == 768


def test_paper_space_size() -> None:
    paper = PoolSpec.paper()
    # (2·3·22·2 depths) · 3⁴ widths · 3 FPN = 264 · 81 · 3 = 64 152; × 4 resolutions = 256 608.
    assert paper.space.size() == 64_152
    assert paper.space.size(resolutions=4) == 256_608
    assert str(paper.largest) == "d3-4-23-3_w1.5-1.5-1.5-1.5_f384"
    assert str(paper.space.smallest()) == "d2-2-2-2_w1.0-1.0-1.0-1.0_f256"
    assert paper.phases[1].space.size() == 12 * 16 * 2
    assert [(p.epochs, p.lr) for p in paper.phases] == [(48, 0.12), (24, 0.04), (36, 0.04)]


def test_space_sample_extremes_contains(spec: PoolSpec) -> None:
    space = spec.space
    rng = np.random.default_rng(0)
    seen = {space.sample(rng) for _ in range(400)}
    assert all(space.contains(c) for c in seen)
    assert len(seen) > 100  # uniform draws cover the space
    assert space.largest() == SubnetConfig((2, 2, 3, 2), (1.5,) * 4, 24)
    assert space.smallest() == SubnetConfig((1, 1, 1, 1), (1.0,) * 4, 16)
    assert not space.contains(SubnetConfig((2, 2, 4, 2), (1.5,) * 4, 24))
    assert not space.contains(SubnetConfig((2, 2, 3, 2), (1.25,) * 4, 24))
    assert not space.contains(SubnetConfig((2, 2, 3, 2), (1.5,) * 4, 32))


def test_mutations_stay_in_space(spec: PoolSpec) -> None:
    space = spec.space
    rng = np.random.default_rng(1)
    for _ in range(50):
        cfg = space.sample(rng)
        moves = space.neighbours(cfg)
        assert moves
        for move, new in moves.items():
            assert move in space.move_names()
            assert space.contains(new) and new != cfg
            diff = (
                sum(a != b for a, b in zip(cfg.depths, new.depths, strict=True))
                + sum(a != b for a, b in zip(cfg.widths, new.widths, strict=True))
                + (cfg.fpn != new.fpn)
            )
            assert diff == 1  # one stage's depth or width, or the FPN
        move, new = space.mutate(cfg, rng)
        assert moves[move] == new
    top = space.largest()
    assert space.apply_move(top, "teacher.depth3+") is None
    assert space.apply_move(top, "teacher.depth3-") == SubnetConfig((2, 2, 2, 2), (1.5,) * 4, 24)
    assert space.apply_move(top, "teacher.fpn-") == SubnetConfig((2, 2, 3, 2), (1.5,) * 4, 16)
    with pytest.raises(SpecError, match="unknown"):
        space.apply_move(top, "teacher.depth5+")
    single = spec.phases[0].space
    with pytest.raises(SpecError, match="single member"):
        single.mutate(single.largest(), rng)


# ---------------------------------------------------------------------- specs
def test_spec_round_trip(spec: PoolSpec) -> None:
    for s in (spec, PoolSpec.paper(), PoolSpec.tiny()):
        assert PoolSpec.from_dict(s.to_dict()) == s
    assert spec.phases[1].space.describe() == "d[2, 2, 2|3, 2] w[1.5 ×4] f[24]"
    assert spec.phases[2].space == spec.space
    assert spec.train.resolutions == RES
    # jdsearch 0.1 kept reorder and recalibration_batches under train; pool files still hold that
    legacy = copy.deepcopy(SMALL_POOL)
    legacy["train"]["recalibration_batches"] = legacy.pop("recalibration_batches")
    legacy["train"]["reorder"] = False
    old = PoolSpec.from_dict(legacy)
    assert old == dataclasses.replace(spec, reorder=False)


def _with(**changes: object) -> dict[str, object]:
    d = copy.deepcopy(SMALL_POOL)
    d.update(changes)
    return d


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_with(colour="red"), r"pool\.colour: unknown key"),
        (_with(space={**SMALL_SPACE, "depth": [1, 1, 1, 1]}), r"pool\.space\.depth: unknown key"),
        (_with(space={**SMALL_SPACE, "depths": [1, 2, 3]}), r"pool\.space\.depths: expected 4"),
        (_with(space={**SMALL_SPACE, "depths": [1, 2, "3-1", 1]}), r"depths\[2\].*empty"),
        (_with(space={**SMALL_SPACE, "widths": [1.0, -1.5]}), r"pool\.space\.widths.*positive"),
        (_with(space={**SMALL_SPACE, "widths": [1.0, 1.05]}), r"must be distinct"),
        (_with(space={**SMALL_SPACE, "fpn": [0]}), r"pool\.space\.fpn"),
        (
            _with(phases=[{"epochs": 1, "lr": 0.1, "fpn": [16]}]),
            r"phases\[0\]\.fpn.*super-net alone",
        ),
        (
            _with(phases=[{"epochs": 1, "lr": 0.1, "warmup": 3}]),
            r"phases\[0\]\.warmup: unknown key",
        ),
        (_with(phases=[{"epochs": 0, "lr": 0.1}]), r"phases\[0\]\.epochs: must be positive"),
        (_with(phases=[{"epochs": 1, "lr": 0.1}]), r"last phase.*whole space"),
        (
            _with(
                phases=[
                    {"epochs": 1, "lr": 0.1},
                    {"epochs": 1, "lr": 0.1},
                    {"epochs": 1, "lr": 0.1, "fpn": [24]},
                ]
            ),
            r"phases\[2\].*drops sub-networks",
        ),
        (_with(train={"batch_sz": 2}), r"pool\.train\.batch_sz: unknown key"),
        (_with(train={"schedule": "linear"}), r"pool\.train\.schedule"),
        (_with(kd={"feat": 1.0}), r"pool\.kd.*unknown key"),
        (_with(base_widths=[8, 16, 32]), r"pool\.base_widths"),
    ],
)
def test_spec_errors_name_the_field(data: dict[str, object], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        PoolSpec.from_dict(data)


def test_stage1_projection_mismatch_is_rejected() -> None:
    # Stem 16 = 4 × 4: a 1.0× stage 1 would lose the projection shortcut the super-net has.
    bad = _with(base_widths=[4, 16, 32, 64])
    with pytest.raises(SpecError, match="projection"):
        ElasticPool(PoolSpec.from_dict(bad), NUM_CLASSES)


# ---------------------------------------------------------------------- extraction
def test_supernet_is_the_largest_detector(pool: ElasticPool, spec: PoolSpec) -> None:
    plain = build_detector(pool.spec_of(spec.largest), NUM_CLASSES)
    assert plain.state_dict().keys() == pool.supernet.state_dict().keys()
    assert pool.supernet.arch == pool.arch_of(spec.largest)
    assert pool.arch.stage_out_channels == (48, 96, 192, 384) and pool.arch.fpn == 24


@pytest.mark.parametrize("which", ["smallest", "largest", "random0", "random1", "random2"])
def test_extract_equals_active_subnet(pool: ElasticPool, which: str) -> None:
    space = pool.space
    if which == "smallest":
        cfg = space.smallest()
    elif which == "largest":
        cfg = space.largest()
    else:
        cfg = space.sample(np.random.default_rng(int(which[-1])))
    sub = pool.extract(cfg)
    assert sub.arch == pool.arch_of(cfg)
    assert sub.arch.depths == cfg.depths and sub.arch.fpn == cfg.fpn
    assert not sub.training
    with pool.using(cfg):
        feats_super, out_super = _run(pool.supernet)
    feats_sub, out_sub = _run(sub)
    for key in feats_super:
        assert feats_super[key].shape[1] == cfg.fpn
        torch.testing.assert_close(feats_sub[key], feats_super[key], rtol=1e-6, atol=1e-6)
    for a, b in zip(out_super, out_sub, strict=True):
        assert len(a["boxes"]) > 0
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)
    assert pool.active == space.largest()  # restored by using()


def test_extract_rejects_config_outside_space(pool: ElasticPool) -> None:
    with pytest.raises(SpecError, match="not in the space"):
        pool.extract(SubnetConfig((2, 2, 3, 2), (1.25,) * 4, 24))


def test_subnet_training_updates_shared_weights(spec: PoolSpec, data: CocoDataset) -> None:
    torch.manual_seed(0)
    p = ElasticPool(spec, data.num_classes)
    cfg = SubnetConfig((1, 2, 2, 1), (1.0, 1.5, 1.0, 1.5), 16)
    p.activate(cfg)
    net = p.supernet.train()
    images, targets = next(iter(make_loader(data, 2, shuffle=False, seed=0)))
    losses = net(images, targets)
    sum(losses.values()).backward()
    body = net.backbone.body
    conv1 = body.stages[0][0].conv1  # 16 → 12 in the super-net, 8 active
    assert conv1.weight.grad is not None
    assert conv1.weight.grad[:8].abs().sum() > 0 and conv1.weight.grad[8:].abs().sum() == 0
    assert body.stages[0][1].conv1.weight.grad is None  # stage 1 runs one block only
    fc6 = net.roi_heads.box_head.fc6  # reads 16 × 7 × 7 of 24 × 7 × 7 columns
    assert (
        fc6.weight.grad[:, : 16 * 49].abs().sum() > 0
        and fc6.weight.grad[:, 16 * 49 :].abs().sum() == 0
    )


def test_elastic_bn_updates_only_the_active_statistics() -> None:
    bn = ElasticBatchNorm2d.from_module(nn.BatchNorm2d(6)).train()
    bn(torch.randn(4, 4, 3, 3) * 3 + 2)
    assert (bn.running_mean[:4] != 0).all() and (bn.running_mean[4:] == 0).all()
    assert (bn.running_var[4:] == 1).all() and int(bn.num_batches_tracked) == 1


# ---------------------------------------------------------------------- re-ordering
def test_reorder_preserves_function_and_sorts(spec: PoolSpec) -> None:
    torch.manual_seed(2)
    p = ElasticPool(spec, NUM_CLASSES)
    _randomise_bn(p.supernet, seed=5)
    net = p.supernet.eval()
    _, before = _run(net)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    perms = reorder_channels(net)
    _, after = _run(net)
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, state[k])]
    assert len(changed) > 50
    assert any((perm != torch.arange(len(perm))).any() for perm in perms.values())
    assert {"stage1.block1.c1", "stage4.out", "fpn.lateral", "fpn.out", "rpn.conv"} <= set(perms)
    for a, b in zip(before, after, strict=True):
        assert len(a["boxes"]) > 0
        for key in ("boxes", "scores"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)
        assert torch.equal(a["labels"], b["labels"])
    gamma = net.backbone.body.stages[1][0].bn1.weight.detach().abs()
    assert torch.all(gamma[:-1] >= gamma[1:])  # most important first
    stream = sum(b.bn3.weight.detach().abs() for b in net.backbone.body.stages[2])
    stream = stream + net.backbone.body.stages[2][0].shortcut.bn.weight.detach().abs()
    assert torch.all(stream[:-1] >= stream[1:])


@pytest.mark.parametrize("preset", ["tiny-r50-fpn", "tiny-r18-fpn"])
def test_reorder_works_on_plain_detectors(preset: str) -> None:
    # tiny-r18-fpn's first block adds the stem's output: its stage keeps the stem's order.
    torch.manual_seed(0)
    det = build_detector(load_spec(preset), NUM_CLASSES)
    _randomise_bn(det, seed=1)
    det.eval()
    _, before = _run(det)
    perms = reorder_channels(det)
    _, after = _run(det)
    assert ("stage1.out" in perms) == (det.backbone.body.stages[0][0].shortcut is not None)
    assert len(after[0]["scores"]) > 0
    torch.testing.assert_close(after[0]["scores"], before[0]["scores"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after[0]["boxes"], before[0]["boxes"], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- BN recalibration
def test_recalibrate_bn_uses_data_statistics(pool: ElasticPool, data: CocoDataset) -> None:
    det = pool.extract(pool.space.smallest())
    det.train()  # the mode must come back
    params = {k: v.clone() for k, v in det.named_parameters()}
    _, out_before = _run(det.eval())
    det.train()
    stem_bn = det.backbone.body.stem.bn
    momentum = stem_bn.momentum
    batch = next(iter(make_loader(data, 2, shuffle=False, seed=0)))
    used = recalibrate_bn(det, [batch], batches=1, resolutions=["64x48"])
    assert used == 1 and det.training and stem_bn.momentum == momentum
    for k, v in det.named_parameters():
        assert torch.equal(v, params[k]), k
    # The stem BN's statistics are exactly the batch's (cumulative average of one batch).
    det.eval()
    with torch.no_grad(), using_resolution(det, Resolution(64, 48)):
        x = det.backbone.body.stem.conv(det.transform(batch[0])[0].tensors)
    torch.testing.assert_close(stem_bn.running_mean, x.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        stem_bn.running_var, x.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5
    )
    # Two batches: the average of the two batch means.
    loader = make_loader(data, 2, shuffle=False, seed=0)
    batches = [b for _, b in zip(range(2), loader, strict=False)]
    recalibrate_bn(det, batches, batches=2, resolutions=["64x48"])
    means = []
    for b in batches:
        with torch.no_grad(), using_resolution(det, Resolution(64, 48)):
            means.append(
                det.backbone.body.stem.conv(det.transform(b[0])[0].tensors).mean((0, 2, 3))
            )
    torch.testing.assert_close(
        stem_bn.running_mean, (means[0] + means[1]) / 2, rtol=1e-4, atol=1e-5
    )
    # And the detector now computes something else (its statistics were the super-net's).
    _, out_after = _run(det)
    assert not torch.allclose(out_after[0]["scores"][:5], out_before[0]["scores"][:5])


def test_recalibrate_bn_from_dataset_cycles(pool: ElasticPool, data: CocoDataset) -> None:
    det = pool.extract(pool.space.largest())
    n = recalibrate_bn(det, data, batches=7, batch_size=2, resolutions=RES)  # 6 images: cycles
    assert n == 7
    assert int(det.backbone.body.stem.bn.num_batches_tracked) == 7
    with pytest.raises(SpecError):
        recalibrate_bn(det, data, batches=0)


# ---------------------------------------------------------------------- persistence
def test_save_load_round_trip(pool: ElasticPool, tmp_path: Path) -> None:
    path = save_pool(tmp_path / "pool.safetensors", pool)
    loaded = load_pool(path)
    assert loaded.spec == pool.spec and loaded.name == pool.name
    assert loaded.num_classes == NUM_CLASSES and loaded.record == pool.record
    cfg = SubnetConfig((2, 1, 3, 1), (1.0, 1.5, 1.5, 1.0), 16)
    _, a = _run(pool.extract(cfg))
    _, b = _run(loaded.extract(cfg))
    torch.testing.assert_close(b[0]["scores"], a[0]["scores"], rtol=0, atol=0)
    assert torch.equal(b[0]["boxes"], a[0]["boxes"])
    again = pool_from_bytes(pool_to_bytes(pool))
    for (k, v), (k2, v2) in zip(
        pool.supernet.state_dict().items(), again.supernet.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    # A pool file is a super-net checkpoint too.
    assert load_checkpoint(path).spec.arch == pool.arch


def test_corrupt_or_foreign_files_raise(pool: ElasticPool, tmp_path: Path) -> None:
    data = bytearray(pool_to_bytes(pool))
    data[-100] ^= 0xFF  # a weight byte
    with pytest.raises(CheckpointError, match="sha256"):
        pool_from_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        pool_from_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="no such"):
        load_pool(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_checkpoint(plain, build_detector(load_spec("tiny-r50-fpn"), NUM_CLASSES))
    with pytest.raises(CheckpointError, match="not a teacher pool"):
        load_pool(plain)


# ---------------------------------------------------------------------- IPS end to end
def test_ips_end_to_end(spec: PoolSpec, data: CocoDataset, tmp_path: Path) -> None:
    path = tmp_path / "pool.safetensors"
    torch.manual_seed(0)
    steps: list[tuple[int, int]] = []
    pool = ElasticPool(spec, data.num_classes, class_names=data.class_names)
    initial = {k: v.clone() for k, v in pool.supernet.state_dict().items()}
    records = train_pool(
        pool, data, max_iters=3, callback=lambda i, info: steps.append((i, info.iteration))
    )
    assert [r.name for r in records] == ["supernet", "shrink1", "shrink2"]
    assert steps == [(i, k) for i in range(3) for k in (1, 2, 3)]
    assert records[0].subnets_sampled == 1 and not records[0].reordered
    assert records[2].subnets_sampled >= 2 and records[2].reordered
    assert "loss_kd_feat" not in records[0].final_losses
    assert all(
        math.isfinite(records[2].final_losses[k])
        for k in ("loss_kd_feat", "loss_kd_cls", "loss_kd_loc")
    )
    assert pool.record == records and pool.active == pool.largest
    changed = [k for k, v in pool.supernet.state_dict().items() if not torch.equal(v, initial[k])]
    assert any(k.endswith("conv1.weight") for k in changed)
    # Further phases: nothing left to do.
    assert train_pool(pool, data) == ()
    # Extract a teacher, recalibrate, evaluate.
    teacher = pool.teacher(pool.space.smallest(), data, batches=2)
    metrics = evaluate(teacher, data, [RES[0]])
    assert math.isfinite(metrics[str(RES[0])].AP)
    # The CLI entry point: trains, saves after each phase, resumes a finished file without work.
    trained = train_and_save_pool(spec, data, path, progress=False, max_iters=1)
    assert len(trained.record) == 3 and path.exists()
    loaded = load_pool(path)
    assert loaded.record == trained.record and loaded.class_names == tuple(data.class_names)
    resumed = train_and_save_pool(spec, data, path, progress=False, max_iters=1)
    assert resumed.record == loaded.record
    other = PoolSpec(
        SubnetSpace(((2,), (2,), (3,), (2,)), ((1.5,),) * 4, (24,)),
        (
            PhaseSpec(
                "supernet", 1, 0.01, SubnetSpace(((2,), (2,), (3,), (2,)), ((1.5,),) * 4, (24,))
            ),
        ),
        "tiny-r50-fpn",
        base_widths=(8, 16, 32, 64),
        train=dataclasses.replace(POOL_TRAIN, batch_size=2),
    )
    with pytest.raises(SpecError, match="another super-net"):
        train_and_save_pool(other, data, path, progress=False, max_iters=1)


def test_make_elastic_is_idempotent_and_neutral() -> None:
    torch.manual_seed(0)
    det = build_detector(load_spec("tiny-r50-fpn"), NUM_CLASSES)
    _randomise_bn(det, seed=3)
    det.eval()
    feats, out = _run(det)
    make_elastic(det)
    make_elastic(det)
    feats2, out2 = _run(det)
    for k in feats:
        assert torch.equal(feats[k], feats2[k])
    assert torch.equal(out[0]["scores"], out2[0]["scores"])


def test_a_fresh_pool_starts_from_weights_set_by_its_seed(spec: PoolSpec) -> None:
    torch.manual_seed(1)
    a = ElasticPool(spec, NUM_CLASSES)
    torch.manual_seed(2)  # the global stream does not matter, the pool's train.seed does
    b = ElasticPool(spec, NUM_CLASSES)
    sa, sb = a.supernet.state_dict(), b.supernet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------ phase states and the spec
class _Killed(Exception):
    """Stands for the process dying right after a phase state is saved."""


def _two_phases(**phase0: object) -> PoolSpec:
    """SMALL_POOL less its middle phase; ``phase0`` changes the super-net phase."""
    doc = copy.deepcopy(SMALL_POOL)
    phases = doc["phases"]
    assert isinstance(phases, list)
    doc["phases"] = [{**phases[0], **phase0}, phases[2]]
    return PoolSpec.from_dict(doc)


def _killed_in_phase_0(spec: PoolSpec, data: CocoDataset, path: Path, monkeypatch) -> Path:
    """Train ``spec``'s pool at ``path`` until its first phase state is saved (iteration 1),
    then stop as a kill would; the phase state file."""
    from jdsearch.methods.pool import store
    from jdsearch.methods.pool.training import PhaseStates

    class KillAfterSave(PhaseStates):
        def save(self, *args: object) -> None:
            super().save(*args)  # type: ignore[arg-type]
            raise _Killed

    with monkeypatch.context() as m:
        m.setattr(store, "PhaseStates", KillAfterSave)
        m.setattr(store, "PHASE_CHECKPOINT_EVERY", 1)
        with pytest.raises(_Killed):
            train_and_save_pool(spec, data, path, progress=False, max_iters=2)
    state = path.with_name(path.name + ".phase-state")
    assert state.is_file() and not path.exists()
    return state


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(lambda: _two_phases(lr=0.02), id="another lr"),
        pytest.param(lambda: PoolSpec.from_dict(SMALL_POOL), id="other phases"),
    ],
)
def test_a_phase_state_is_resumed_only_under_the_spec_that_saved_it(
    data: CocoDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, other
) -> None:
    """A pool training killed inside phase 0 leaves its phase state. Run again with the same
    spec, it continues at the saved iteration; with another spec (the lr, the phases), the state
    is discarded with one warning that names the file and why, and phase 0 starts over."""
    spec = _two_phases()
    path = tmp_path / "pool.safetensors"
    resuming = "IPS phase 0: resuming at iteration 1"

    state = _killed_in_phase_0(spec, data, path, monkeypatch)
    with caplog.at_level("INFO", logger="jdsearch.methods.pool"):
        train_and_save_pool(spec, data, path, progress=False, max_iters=2)
    assert resuming in caplog.messages and "discarded" not in caplog.text
    assert path.is_file() and not state.exists()

    path.unlink()
    state = _killed_in_phase_0(spec, data, path, monkeypatch)
    caplog.clear()
    with caplog.at_level("INFO", logger="jdsearch.methods.pool"):
        pool = train_and_save_pool(other(), data, path, progress=False, max_iters=2)
    assert resuming not in caplog.messages
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert line.startswith(f"{state}: saved under key ")
    assert "(its spec, start or data changed): discarded, phase 0 starts over" in line
    assert "\n" not in line
    assert len(pool.record) == len(other().phases) and not state.exists()


def test_phase_states_keep_their_key(tmp_path: Path, caplog) -> None:
    """A state saved under one key is read back under it, and under another key (or from a
    jdsearch that saved none) is discarded and removed."""
    from jdsearch.methods.pool.training import PhaseStates
    from jdsearch.store.trainstate import TrainState

    path = tmp_path / "pool.safetensors.phase-state"
    state = TrainState(3, {"w": torch.ones(2)}, {})
    PhaseStates(path, 1, key="aaaa").save(0, state, {})
    assert PhaseStates(path, 1, key="bbbb", readonly=True).load(0) is None  # a rank > 0 reads
    assert path.is_file()  # ... and removes nothing
    loaded = PhaseStates(path, 1, key="aaaa").load(0)
    assert loaded is not None and loaded.iteration == 3
    assert PhaseStates(path, 1, key="bbbb").load(0) is None and not path.exists()
    PhaseStates(path, 1).save(0, state, {})  # no key: as an earlier jdsearch saved it
    caplog.clear()
    assert PhaseStates(path, 1, key="aaaa").load(0) is None and not path.exists()
    assert caplog.messages == [
        f"{path}: saved without a key, not this pool's aaaa (its spec, start or data changed): "
        "discarded, phase 0 starts over"
    ]
