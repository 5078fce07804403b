"""ImageNet backbones: a torchvision classification ``state_dict`` initialises a detector's body
(``load_backbone_weights``, ``jdsearch train --backbone-weights``, ``base.backbone_weights``):
every body tensor lands where it belongs, ``fc`` is reported, and a body that does not fit the
spec is refused in one line naming the tensor and both shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from torch import Tensor, nn

from jdsearch.cli import main
from jdsearch.core.errors import CheckpointError, SpecError
from jdsearch.models import build_detector
from jdsearch.models.torchvision_body import load_backbone_weights
from jdsearch.spec.arch import BASIC, BOTTLENECK, BackboneArch
from jdsearch.spec.detector import DetectorSpec, load_spec
from jdsearch.store.checkpoint import load_checkpoint

FAMILIES = {  # torchvision name: (block kind, depths, groups, width per group)
    "resnet18": (BASIC, (2, 2, 2, 2), 1, None),
    "resnet34": (BASIC, (3, 4, 6, 3), 1, None),
    "resnet50": (BOTTLENECK, (3, 4, 6, 3), 1, None),
    "resnet101": (BOTTLENECK, (3, 4, 23, 3), 1, None),
    "resnext50_32x4d": (BOTTLENECK, (3, 4, 6, 3), 32, 4),
}


def classification_state_dict(name: str, path: Path) -> dict[str, Tensor]:
    """A randomly initialised torchvision classifier with distinct BN statistics, saved."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = getattr(torchvision.models, name)(weights=None)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.2, 0.6)
                    m.bias.normal_(0, 0.2)
                    m.num_batches_tracked.fill_(7)
    sd = model.eval().state_dict()
    torch.save(sd, path)
    return sd


def expected_name(tv: str) -> str | None:
    """Where a torchvision tensor belongs in the jdsearch body, spelled out independently of
    the package's own map."""
    parts = tv.split(".")
    if parts[0] in ("conv1", "bn1"):
        return ".".join(["stem", parts[0][:-1] if parts[0] == "conv1" else "bn", *parts[1:]])
    if parts[0].startswith("layer"):
        stage, block = int(parts[0][5:]) - 1, parts[1]
        rest = parts[2:]
        if rest[0] == "downsample":
            rest = ["shortcut", "conv" if rest[1] == "0" else "bn", *rest[2:]]
        return ".".join(["stages", str(stage), block, *rest])
    return None


def torchvision_features(model: nn.Module, x: Tensor) -> list[Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        out.append(x)
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_body_tensor_lands_where_it_belongs(tmp_path: Path, name: str) -> None:
    kind, depths, groups, wpg = FAMILIES[name]
    arch = BackboneArch.resnet(depths, kind=kind, groups=groups, width_per_group=wpg)
    detector = build_detector(DetectorSpec(name=name, arch=arch), 3, seed=0)
    sd = classification_state_dict(name, tmp_path / "w.pth")
    report = load_backbone_weights(detector, tmp_path / "w.pth")
    body = detector.backbone.body.state_dict()
    assert report.unmapped == ("fc.bias", "fc.weight")
    assert report.loaded == len(body) == len(sd) - 2
    for tv, tensor in sd.items():
        if not tv.startswith("fc."):
            assert torch.equal(body[expected_name(tv)], tensor), tv
    assert "unmapped: fc.bias, fc.weight" in report.line()
    # and the body computes what torchvision's does
    tv_model = getattr(torchvision.models, name)(weights=None)
    tv_model.load_state_dict(sd)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = list(detector.backbone.body.eval()(x).values())
        theirs = torchvision_features(tv_model.eval(), x)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_a_body_that_does_not_fit_is_refused_in_one_line(tmp_path: Path) -> None:
    classification_state_dict("resnet18", tmp_path / "r18.pth")
    detector = build_detector(load_spec("r50-fpn"), 3, seed=0)
    with pytest.raises(CheckpointError) as e:
        load_backbone_weights(detector, tmp_path / "r18.pth")
    message = str(e.value)
    assert "\n" not in message
    assert (
        "layer1.0.conv1.weight (64, 64, 3, 3) does not fit stages.0.0.conv1.weight (64, 64, 1, 1)"
        " of spec r50-fpn" in message
    )
    torch.save({"model": {"epoch": 3}}, tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="not a state_dict"):
        load_backbone_weights(detector, tmp_path / "junk.pth")


def small_r18_spec(tmp_path: Path) -> Path:
    """r18-fpn with small inputs and few proposals: its body takes resnet18 weights."""
    spec = {
        "name": "r18-small",
        "backbone": {"kind": "basic", "depths": [2, 2, 2, 2]},
        "rpn": {"pre_nms_top_n_train": 100, "post_nms_top_n_train": 50},
        "roi_heads": {"batch_size_per_image": 32},
        "input": {"size": "96x64", "resolutions": ["96x64"]},
    }
    path = tmp_path / "r18-small.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def assert_body_from(ckpt_path: Path, sd: dict[str, Tensor]) -> None:
    """The body's convs are the file's (training at lr 1e-9 moves them by nothing visible)."""
    body = load_checkpoint(ckpt_path).detector.backbone.body.state_dict()
    for tv, tensor in sd.items():
        if tv.endswith("conv1.weight") or tv.endswith("conv2.weight"):
            assert torch.allclose(body[expected_name(tv)], tensor, atol=1e-6), tv


def test_train_takes_backbone_weights(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--images", "8", "--size", "64"]) == 0
    sd = classification_state_dict("resnet18", tmp_path / "r18.pth")
    out = tmp_path / "base.safetensors"
    train = ["train", str(small_r18_spec(tmp_path)), "--data", str(data), "--out", str(out)]
    train += ["--iters", "1", "--batch-size", "2", "--lr", "1e-9", "--warmup", "1"]
    train += ["--bn-sparsity", "0", "--no-eval", "--quiet"]
    capsys.readouterr()
    code = main([*train, "--backbone-weights", str(tmp_path / "r18.pth")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "120 body tensors set; unmapped: fc.bias, fc.weight" in captured.out
    assert_body_from(out, sd)
    assert load_checkpoint(out).extra["backbone_weights"] == str(tmp_path / "r18.pth")
    code = main([*train, "--backbone-weights", str(tmp_path / "r18.pth"), "--init", str(out)])
    assert code == 2 and "not with --init" in capsys.readouterr().err
    code = main(
        [*train[:1], "tiny-r18-fpn", *train[2:], "--backbone-weights", str(tmp_path / "r18.pth")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "conv1.weight (64, 3, 7, 7) does not fit stem.conv.weight (16, 3, 7, 7)" in err


def test_a_study_trains_its_base_from_backbone_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jdsearch.search.assets import _base_checkpoint as base_checkpoint
    from jdsearch.search.assets import ensure_data
    from jdsearch.search.check import check_study
    from jdsearch.spec.study import study_from_dict
    from tests.conftest import tiny_study_dict

    sd = classification_state_dict("resnet18", tmp_path / "r18.pth")
    raw = tiny_study_dict(tmp_path / "data", "bw")
    raw["data"]["synth"] = {"images": 8, "seed": 1, "size": 64}
    raw["base"] = {
        "detector": str(small_r18_spec(tmp_path)),
        "backbone_weights": str(tmp_path / "r18.pth"),
        "train": {"max_iters": 1, "batch_size": 2, "lr": 1e-9, "warmup_iters": 1},
    }
    raw["resolutions"] = ["96x64"]
    raw["search"]["bn_sparsity"] = 0.0
    spec = study_from_dict(raw, source="test")
    monkeypatch.chdir(tmp_path)
    train_set, _ = ensure_data(spec)
    path = base_checkpoint(spec, train_set, progress=False)
    assert_body_from(path, sd)
    assert load_checkpoint(path).extra["backbone_weights"] == str(tmp_path / "r18.pth")
    assert base_checkpoint(spec, train_set, progress=False) == path  # cached: reused
    lines = "\n".join(check_study(spec, steps=0).lines)  # search --check maps them too
    assert (
        f"backbone weights {tmp_path / 'r18.pth'}: " in lines
        and "unmapped: fc.bias, fc.weight" in lines
    )
    del raw["base"]["backbone_weights"]  # the cached base is not from random weights
    other = study_from_dict(raw, source="test")
    for step in (lambda: base_checkpoint(other, train_set, False), lambda: check_study(other)):
        with pytest.raises(SpecError, match=r"started from .*r18\.pth: delete it to train a new"):
            step()
