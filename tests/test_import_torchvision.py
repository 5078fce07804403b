"""``jdsearch import``: torchvision Faster R-CNN files (state dicts and pickled models of every
supported ResNet family) become checkpoints whose detections are the source's; unsupported
layouts and a conversion that does not hold are refused in one line, and nothing is written."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from torchvision.models.detection import (
    FasterRCNN,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from jdsearch.cli import main
from jdsearch.core.errors import CheckpointError
from jdsearch.core.resolution import Resolution
from jdsearch.models import torchvision_body
from jdsearch.models.torchvision_import import (
    TOLERANCE,
    check_images,
    compare_detections,
    compare_settings,
    import_torchvision,
)
from jdsearch.store.checkpoint import load_checkpoint

# Small inputs and few proposals keep a 60M-parameter detector in float64 at seconds per image.
SMALL: dict[str, Any] = {
    "min_size": 96,
    "max_size": 128,
    "rpn_pre_nms_top_n_test": 150,
    "rpn_post_nms_top_n_test": 60,
    "box_detections_per_img": 40,
    "box_score_thresh": 0.0,  # random weights score low: keep detections to compare
}
SIZE = Resolution(128, 96)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (torchvision's init makes every BN an
    identity, so a swapped BN would go unnoticed) and box predictors with spread-out outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d):
                n = m.weight.numel()
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                m.weight.copy_(0.2 + 0.4 * torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
        predictor = model.roi_heads.box_predictor
        predictor.cls_score.weight.copy_(
            0.05 * torch.randn(predictor.cls_score.weight.shape, generator=g)
        )
        predictor.bbox_pred.weight.copy_(
            0.01 * torch.randn(predictor.bbox_pred.weight.shape, generator=g)
        )
    return model.eval()


def torchvision_detector(family: str, norm_layer: Any = FrozenBatchNorm2d, **kw: Any) -> nn.Module:
    """``fasterrcnn_resnet50_fpn`` (plain BN) for ``"fasterrcnn_resnet50_fpn"``, else a
    ``FasterRCNN`` over ``resnet_fpn_backbone(family)`` (``FrozenBatchNorm2d`` by default)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if family == "fasterrcnn_resnet50_fpn":
            model = fasterrcnn_resnet50_fpn(
                weights=None, weights_backbone=None, num_classes=4, **SMALL, **kw
            )
        else:
            backbone = resnet_fpn_backbone(
                backbone_name=family, weights=None, trainable_layers=3, norm_layer=norm_layer
            )
            model = FasterRCNN(backbone, **{"num_classes": 3, **SMALL, **kw})
    return randomise(model)


def spec_yaml(path: Path, family_backbone: dict[str, Any]) -> Path:
    """A detector spec with ``SMALL``'s settings, for state dicts (which carry none)."""
    spec = {
        "name": "imported-small",
        "backbone": family_backbone,
        "rpn": {"pre_nms_top_n_test": 150, "post_nms_top_n_test": 60},
        "roi_heads": {"detections_per_img": 40, "score_thresh": 0.0},
        "input": {"size": "128x96", "resolutions": ["128x96"]},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


R18 = {"kind": "basic", "depths": [2, 2, 2, 2]}
X50 = {"kind": "bottleneck", "depths": [3, 4, 6, 3], "groups": 32, "width_per_group": 4}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_same_detections(source: nn.Module, detector: nn.Module) -> None:
    """In float64, as the import checks: the same detections within TOLERANCE (rounding cannot
    flip one there). In float32, as the models are saved, bit-identical when the source has plain
    BN (the same kernels run); a FrozenBatchNorm2d source computes x·scale + shift instead, and
    with these random weights float32 rounding moves boxes by up to ~0.03 px, so it is compared
    in float64 only."""
    check = compare_detections(source, detector, check_images(SIZE, 1, seed=7), size=SIZE)
    assert check.detections == 40 and check.max_box_diff <= TOLERANCE
    if any(isinstance(m, FrozenBatchNorm2d) for m in source.modules()):
        return
    images = check_images(SIZE, 2, seed=8)
    with torch.no_grad():
        for a, b in zip(source(images), detector(images), strict=True):
            assert len(a["boxes"]) == 40
            assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


@pytest.mark.parametrize(
    ("family", "saved", "arch", "name"),
    [
        ("resnet18", "state_dict", R18, "imported-small"),
        ("resnet34", "model", None, "r34-fpn"),
        ("fasterrcnn_resnet50_fpn", "model", None, "r50-fpn"),
        ("resnet101", "model", None, "r101-fpn"),
        ("resnext50_32x4d", "state_dict", X50, "imported-small"),
    ],
)
def test_each_family_imports_with_the_sources_detections(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    family: str,
    saved: str,
    arch: Any,
    name: str,
) -> None:
    source = torchvision_detector(family)
    src = tmp_path / "frcnn.pth"
    torch.save(source if saved == "model" else source.state_dict(), src)
    argv = ["import", str(src), "--out", str(tmp_path / "ckpt.safetensors"), "--check-images", "1"]
    if arch is not None:
        argv += ["--arch", str(spec_yaml(tmp_path / "spec.yaml", arch))]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert f"({saved}): {name}" in out and "agree" in out
    ckpt = load_checkpoint(tmp_path / "ckpt.safetensors")
    spec = ckpt.spec
    assert ckpt.num_classes == source.roi_heads.box_predictor.cls_score.out_features
    assert ckpt.extra["import"]["kind"] == saved
    # the transform and the anchors carried over (a state dict: from the spec given)
    assert spec.input.size == SIZE and spec.roi.detections_per_img == 40
    assert spec.rpn.post_nms_top_n_test == 60 and spec.rpn.anchor_sizes == (32, 64, 128, 256, 512)
    # FrozenBatchNorm2d became trainable BN
    body = ckpt.detector.backbone.body
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in ckpt.detector.modules())
    assert all(p.requires_grad for p in body.parameters())
    assert_same_detections(source, ckpt.detector)


def test_a_pickled_model_carries_its_transform_and_anchors(tmp_path: Path) -> None:
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
    source = torchvision_detector(
        "resnet18",
        rpn_anchor_generator=anchors,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
        box_score_thresh=0.01,
        rpn_nms_thresh=0.6,
    )
    torch.save(source, tmp_path / "m.pth")
    result = import_torchvision(tmp_path / "m.pth", images=1)
    spec = result.spec
    assert spec.rpn.anchor_sizes == (16, 32, 64, 128, 256) and spec.rpn.nms_thresh == 0.6
    assert spec.input.image_mean == (0.5,) * 3 and spec.input.image_std == (0.25,) * 3
    assert spec.roi.score_thresh == 0.01 and spec.input.size == SIZE
    assert_same_detections(source, result.detector)
    # the settings check names what differs
    result.detector.transform.max_size = 200
    with pytest.raises(
        CheckpointError, match=r"transform max_size 128\.0 of the source became 200"
    ):
        compare_settings(source, result.detector, source="m.pth")


def test_a_corrupted_mapping_makes_the_import_refuse(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Swapping two same-shaped BNs of one block fits every shape; only the check sees it.
    (A plain-BN source: the state dict holds BN counters, and the reference keeps plain BN.)"""
    torch.save(torchvision_detector("resnet18", nn.BatchNorm2d).state_dict(), tmp_path / "sd.pth")
    spec = spec_yaml(tmp_path / "spec.yaml", R18)
    right = torchvision_body.jdsearch_body_name

    def swapped(name: str) -> str | None:
        if name.startswith("layer3.1.bn"):
            name = (
                name.replace(".bn1.", ".bnX.").replace(".bn2.", ".bn1.").replace(".bnX.", ".bn2.")
            )
        return right(name)

    monkeypatch.setattr(torchvision_body, "jdsearch_body_name", swapped)
    out = tmp_path / "never.safetensors"
    code, _, err = run(
        capsys, "import", str(tmp_path / "sd.pth"), "--out", str(out), "--arch", str(spec)
    )
    assert code == 2 and err.count("\n") == 1
    assert "disagrees with the source" in err and "nothing written" in err
    assert not out.exists()
    monkeypatch.setattr(torchvision_body, "jdsearch_body_name", right)
    code, _, err = run(
        capsys, "import", str(tmp_path / "sd.pth"), "--out", str(out), "--arch", str(spec)
    )
    assert code == 0 and out.is_file(), err


class CustomHead(nn.Module):
    """A class no allow-list knows: a pickled model holding it must not be unpickled."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)


def _edited_r18(tmp_path: Path, edit: str) -> Path:
    model = torchvision_detector("resnet18")
    sd = dict(model.state_dict())
    if edit == "v2":
        sd = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict()
    elif edit == "v2-model":
        torch.save(
            fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None), tmp_path / "x.pth"
        )
        return tmp_path / "x.pth"
    elif edit == "mask":
        sd["roi_heads.mask_head.mask_fcn1.0.weight"] = torch.zeros(256, 256, 3, 3)
    elif edit == "p6p7":
        model.backbone.fpn.extra_blocks = LastLevelP6P7(256, 256)
        sd = model.state_dict()
    elif edit == "three-levels":
        backbone = resnet_fpn_backbone(
            backbone_name="resnet18", weights=None, returned_layers=[2, 3, 4]
        )
        sd = FasterRCNN(backbone, num_classes=3).state_dict()
    elif edit == "not-resnet":
        sd = {k.replace("backbone.body.conv1.", "backbone.body.stem.0."): v for k, v in sd.items()}
    elif edit == "custom-class":
        model.roi_heads.extra = CustomHead()
        torch.save(model, tmp_path / "x.pth")
        return tmp_path / "x.pth"
    elif edit == "bn-eps":  # a setting a state dict does not hold, but a pickled model does
        norm = functools.partial(FrozenBatchNorm2d, eps=0.0)
        backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=norm)
        torch.save(FasterRCNN(backbone, num_classes=3, **SMALL), tmp_path / "x.pth")
        return tmp_path / "x.pth"
    elif edit == "garbage":
        (tmp_path / "x.pth").write_bytes(b"hello\n")
        return tmp_path / "x.pth"
    elif edit == "not-a-state-dict":
        sd = {"epoch": 3}  # type: ignore[dict-item]
    torch.save(sd, tmp_path / "x.pth")
    return tmp_path / "x.pth"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("v2", "fasterrcnn_resnet50_fpn_v2 (conv+BN RPN head, 4-conv box head"),
        ("v2-model", "fasterrcnn_resnet50_fpn_v2 (conv+BN RPN head, 4-conv box head"),
        ("mask", "Mask/Keypoint R-CNN heads not supported"),
        ("p6p7", "learned extra levels (P6/P7) not supported"),
        ("three-levels", "an FPN over 3 stages is not supported"),
        ("not-resnet", "not a torchvision ResNet body"),
        ("custom-class", "names tests.test_import_torchvision.CustomHead"),
        ("not-a-state-dict", "not a state_dict"),
        ("garbage", "not a readable torch.save file"),
        ("bn-eps", "BN eps [0.0] of the source became [1e-05]; nothing written"),
    ],
)
def test_unsupported_files_are_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, edit: str, message: str
) -> None:
    src = _edited_r18(tmp_path, edit)
    out = tmp_path / "never.safetensors"
    code, _, err = run(capsys, "import", str(src), "--out", str(out))
    assert code == 2 and err.count("\n") == 1, err
    assert message in err and str(src) in err
    if edit in ("custom-class", "not-a-state-dict"):
        assert "save model.state_dict()" in err
    assert not out.exists()


def test_class_names_and_a_spec_that_does_not_fit(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    source = torchvision_detector("resnet18")
    torch.save(source, tmp_path / "m.pth")
    ann = tmp_path / "train.json"
    cats = [{"id": 7, "name": "dog"}, {"id": 2, "name": "cat"}]
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    out = tmp_path / "c.safetensors"
    code, _, err = run(
        capsys,
        "import",
        str(tmp_path / "m.pth"),
        "--out",
        str(out),
        "--ann",
        str(ann),
        "--check-images",
        "1",
    )
    assert code == 0, err
    assert load_checkpoint(out).class_names == ("cat", "dog")  # label order: sorted category id
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\nd\n")
    refused = ["import", str(tmp_path / "m.pth"), "--out", str(tmp_path / "n.safetensors")]
    code, _, err = run(capsys, *refused, "--classes", str(names))
    assert code == 2 and "4 class names for a detector with 2 classes" in err
    code, _, err = run(capsys, *refused, "--arch", "r50-fpn")
    assert code == 2 and err.count("\n") == 1
    assert (
        "layer1.0.conv1.weight (64, 64, 3, 3) does not fit stages.0.0.conv1.weight (64, 64, 1, 1)"
        in err
    )
    assert not (tmp_path / "n.safetensors").exists()


def test_outputs_indexed_by_category_id_keep_the_datasets_classes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Like torchvision's COCO models (91 outputs indexed by category id): the dataset's ids
    pick the rows, in id order, and each kept class's logits and box deltas are the source's."""
    source = torchvision_detector("resnet18", num_classes=11)
    torch.save(source.state_dict(), tmp_path / "sd.pth")
    ann = tmp_path / "train.json"
    cats = [{"id": 9, "name": "c9"}, {"id": 3, "name": "c3"}, {"id": 5, "name": "c5"}]
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    out = tmp_path / "k.safetensors"
    argv = ["import", str(tmp_path / "sd.pth"), "--out", str(out), "--ann", str(ann)]
    argv += ["--arch", str(spec_yaml(tmp_path / "r18.yaml", R18)), "--check-images", "1"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert "kept ids 3..9 as classes 1..3" in stdout
    ckpt = load_checkpoint(out)
    assert ckpt.class_names == ("c3", "c5", "c9") and ckpt.num_classes == 4
    assert ckpt.extra["import"]["kept_category_ids"] == [3, 5, 9]
    features = torch.randn(5, 1024)
    with torch.no_grad():
        logits, deltas = source.roi_heads.box_predictor(features)
        kept_logits, kept_deltas = ckpt.detector.roi_heads.box_predictor(features)
    rows = [0, 3, 5, 9]
    assert torch.allclose(kept_logits, logits[:, rows], atol=1e-6)
    assert torch.allclose(kept_deltas, deltas.view(5, 11, 4)[:, rows].flatten(1), atol=1e-6)
    cats.append({"id": 11, "name": "beyond"})  # not an output: the file's own classes stand
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    code, _, err = run(capsys, *argv)
    assert code == 2 and "4 class names for a detector with 10 classes" in err
