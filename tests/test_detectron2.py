"""detectron2 interop: a detectron2 Faster R-CNN imports with detectron2's own detections (every
behaviour that differs from torchvision's is carried over, and each one is needed), any jdsearch
student exports to files detectron2 builds and runs with jdsearch's detections, and a search
starts from a detectron2 model and hands its winner back to detectron2.

detectron2 is built from ``shared/third_party/detectron2`` by ``.ci/run``: these tests skip
without it on a developer's machine and fail in CI.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from jdsearch.cli import main
from jdsearch.core.errors import CheckpointError, JDSearchError, SpecError
from jdsearch.core.resolution import Resolution
from jdsearch.methods.morph.actions import evolve
from jdsearch.models import build_detector, detectron2_import
from jdsearch.models.detectron2_files import read_detectron2_weights
from jdsearch.models.detectron2_import import (
    BOX_TOLERANCE,
    SCORE_TOLERANCE,
    import_detectron2,
    quantised_images,
)
from jdsearch.models.torchvision_import import match_detections
from jdsearch.spec.detector import load_spec
from jdsearch.store.checkpoint import load_checkpoint, save_checkpoint
from jdsearch.store.detectron2_export import CONFIG_FILE, MODULE_FILE, export_detectron2

from .conftest import REPO, unavailable

R50_CONFIG = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"


@pytest.fixture(scope="module")
def configs() -> Path:
    """detectron2's ``configs/`` (the shared source's, else the installed package's copy)."""
    try:
        import detectron2
        import detectron2.modeling
    except ImportError as e:
        unavailable(
            f"detectron2 is not installed ({e})",
            "CI builds detectron2 from shared/third_party/detectron2 (.ci/run)",
        )
    for folder in (
        REPO.parent / "shared/third_party/detectron2/configs",
        REPO / "shared/third_party/detectron2/configs",
        Path(detectron2.__file__).parent / "model_zoo/configs",
    ):
        if (folder / R50_CONFIG).is_file():
            return folder
    pytest.fail(f"no detectron2 configs/{R50_CONFIG} in the shared source or the package")


def tiny_config(
    path: Path,
    configs: Path,
    classes: int = 6,
    proposals: int = 100,
    resnets: dict[str, Any] | None = None,
    **input_: int,
) -> Path:
    """An R50-FPN-shaped detectron2 config (depths 3-4-6-3, the shared R50 config's settings)
    with tiny widths, anchors, proposal counts and input; ``proposals`` kept after NMS and
    ``proposals // 2`` detections."""
    size = {"MIN_SIZE_TEST": 96, "MAX_SIZE_TEST": 160, **input_}
    cfg = {
        "_BASE_": str(configs / R50_CONFIG),
        "MODEL": {
            "RESNETS": {
                "STEM_OUT_CHANNELS": 16,
                "RES2_OUT_CHANNELS": 32,
                "WIDTH_PER_GROUP": 8,
                **(resnets or {}),
            },
            "FPN": {"OUT_CHANNELS": 16},
            "ANCHOR_GENERATOR": {"SIZES": [[8], [16], [32], [64], [128]]},
            "RPN": {"PRE_NMS_TOPK_TEST": 300, "POST_NMS_TOPK_TEST": proposals},
            "ROI_HEADS": {"NUM_CLASSES": classes},
            "ROI_BOX_HEAD": {"FC_DIM": 64},
        },
        "INPUT": size,
        "TEST": {"DETECTIONS_PER_IMAGE": proposals // 2},
    }
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial (Frozen)BN statistics and affine parameters, and box predictors with
    spread-out outputs (detectron2's init makes every score ≈ 1/K, and ties flip under rounding)."""
    from detectron2.layers import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d):
            n = m.weight.numel()
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
            m.weight.copy_(0.2 + 0.4 * torch.rand(n, generator=g))
            m.bias.copy_(0.2 * torch.randn(n, generator=g))
    predictor = model.roi_heads.box_predictor
    for layer, scale in ((predictor.cls_score, 0.5), (predictor.bbox_pred, 0.05)):
        layer.weight.copy_(scale * torch.randn(layer.weight.shape, generator=g))
        layer.bias.copy_(0.5 * scale * torch.randn(layer.bias.shape, generator=g))
    return model.eval()


def detectron2_model(config: Path, seed: int = 0) -> nn.Module:
    from detectron2.modeling import build_model

    from jdsearch.models.detectron2_files import detectron2_config

    torch.manual_seed(seed)
    return randomise(build_model(detectron2_config(config)), seed)


def save_pkl(model: nn.Module, path: Path) -> Path:
    """The model-zoo layout: ``{"model": {name: numpy array}}``."""
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    with path.open("wb") as f:
        pickle.dump({"model": arrays, "__author__": "test"}, f)
    return path


# ---------------------------------------------------------------------- the spec's options
def test_detectron2_options_round_trip_and_leave_existing_specs_as_they_were() -> None:
    from jdsearch.spec.detector import spec_from_dict

    spec = load_spec("tiny-r50-fpn")
    plain = spec.to_dict()
    assert "aligned" not in plain["roi_heads"] and "round_anchors" not in plain["rpn"]
    assert "stride_in_1x1" not in plain["backbone"]["arch"]
    d2 = dataclasses.replace(
        spec.with_arch(dataclasses.replace(spec.arch, stride_in_1x1=True)),
        rpn=dataclasses.replace(spec.rpn, round_anchors=False, fixed_anchor_strides=True),
        roi=dataclasses.replace(spec.roi, aligned=True, sampling_ratio=0),
    )
    back = spec_from_dict(json.loads(json.dumps(d2.to_dict())))
    assert (back.arch, back.rpn, back.roi) == (d2.arch, d2.rpn, d2.roi)
    recipe = {"name": "x", "backbone": {"kind": "bottleneck", "depths": [1, 1, 1, 1]}}
    assert spec_from_dict(
        {**recipe, "backbone": {**recipe["backbone"], "stride_in_1x1": True}}
    ).arch.stride_in_1x1
    with pytest.raises(SpecError, match=r"roi_heads\.aligned"):
        spec_from_dict({**recipe, "roi_heads": {"aligned": 1}})


# ---------------------------------------------------------------------- reading safely
class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_a_pkl_with_a_reduce_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    bad = tmp_path / "model_final.pkl"
    good = tmp_path / "good.pkl"
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    with bad.open("wb") as f:
        pickle.dump({"model": {"w": weight, "x": Payload(marker)}}, f)
    with good.open("wb") as f:
        pickle.dump({"model": {"w": weight}, "__author__": "zoo"}, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"model_final\.pkl: refused: global builtins\.exec"):
        read_detectron2_weights(bad)
    assert not marker.exists()
    pickle.loads(bad.read_bytes())  # the payload is real: plain unpickling runs it
    assert marker.read_text() == "ran"
    assert torch.equal(read_detectron2_weights(good)["w"], torch.from_numpy(weight))


# ---------------------------------------------------------------------- import
def test_r50_fpn_of_the_shared_config_imports_with_detectrons_detections(
    configs: Path, tmp_path: Path
) -> None:
    model = detectron2_model(configs / R50_CONFIG)
    torch.save(model.state_dict(), tmp_path / "r50.pth")
    result = import_detectron2(configs / R50_CONFIG, tmp_path / "r50.pth", check_short=128)
    c = result.check
    print(
        f"\nR50-FPN ({R50_CONFIG}, random init): {c.detections} detections on {c.images} images "
        f"agree; largest box diff {c.max_box_diff:.3g} px, score diff {c.max_score_diff:.3g}"
    )
    assert c.detections == 200 and c.max_box_diff <= BOX_TOLERANCE
    spec = result.spec
    assert spec.arch.stride_in_1x1 and spec.arch.depths == (3, 4, 6, 3)
    assert spec.rpn.fixed_anchor_strides and not spec.rpn.round_anchors
    assert spec.roi.aligned and spec.roi.sampling_ratio == 0
    assert spec.input.image_mean == (0.485, 0.456, 0.406)  # detectron2's BGR mean / 255, as RGB
    assert spec.input.size == Resolution(1333, 800) and spec.num_classes == 81
    assert (spec.roi.score_thresh, spec.roi.detections_per_img) == (0.05, 100)
    assert (spec.rpn.pre_nms_top_n_test, spec.rpn.post_nms_top_n_test) == (1000, 1000)


def test_cli_imports_a_model_zoo_pkl(
    configs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(tmp_path / "tiny.yaml", configs)
    weights = save_pkl(detectron2_model(config), tmp_path / "model_final.pkl")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"c{i}" for i in range(6)))
    out = tmp_path / "base.safetensors"
    argv = ["import", "--from", "detectron2", str(config), str(weights), "--out", str(out)]
    assert main([*argv, "--classes", str(names)]) == 0
    printed = capsys.readouterr().out
    assert "check: " in printed and f"saved {out}" in printed
    print(printed.splitlines()[1])
    ckpt = load_checkpoint(out)
    assert ckpt.spec.arch.stride_in_1x1 and ckpt.spec.roi.aligned
    assert ckpt.class_names[-1] == "c5" and ckpt.extra["import"]["kind"] == "detectron2"
    assert main(["import", "--from", "detectron2", str(config), "--out", str(out)]) == 2
    assert "expected CONFIG.yaml WEIGHTS, got 1 paths" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("resnets", "depths", "kind"),
    [
        ({"DEPTH": 18, "RES2_OUT_CHANNELS": 64}, (2, 2, 2, 2), "basic"),
        ({"DEPTH": 101}, (3, 4, 23, 3), "bottleneck"),
    ],
    ids=["R18", "R101"],
)
def test_r18_and_r101_shapes_import(
    configs: Path, tmp_path: Path, resnets: dict[str, Any], depths: tuple[int, ...], kind: str
) -> None:
    config = tiny_config(tmp_path / "tiny.yaml", configs, resnets=resnets)
    torch.save(detectron2_model(config).state_dict(), tmp_path / "w.pth")
    result = import_detectron2(config, tmp_path / "w.pth", images=1)
    arch = result.spec.arch
    assert arch.depths == depths and arch.kind == kind and result.check.detections == 50
    assert arch.stride_in_1x1 == (kind == "bottleneck")


def _undo_bgr(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors["backbone.body.conv1.weight"] = tensors["backbone.body.conv1.weight"].flip(1)
    return tensors


VARIANTS = {  # each undoes one carried-over behaviour
    "stride on the 3x3 conv": lambda s: s.with_arch(
        dataclasses.replace(s.arch, stride_in_1x1=False)
    ),
    "RoIAlign unaligned": lambda s: dataclasses.replace(
        s, roi=dataclasses.replace(s.roi, aligned=False)
    ),
    "anchors rounded": lambda s: dataclasses.replace(
        s, rpn=dataclasses.replace(s.rpn, round_anchors=True)
    ),
    "anchor strides inferred": lambda s: dataclasses.replace(
        s, rpn=dataclasses.replace(s.rpn, fixed_anchor_strides=False)
    ),
    "mean in BGR order": lambda s: dataclasses.replace(
        s, input=dataclasses.replace(s.input, image_mean=s.input.image_mean[::-1])
    ),
}


@pytest.mark.parametrize("variant", [*VARIANTS, "channels in BGR order"])
def test_each_carried_over_behaviour_is_needed(
    configs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    """At 160x96 (P6 of a 96-pixel side is 2 cells: torchvision's stride 48, detectron2's 64),
    with every proposal kept (a random RPN ranks P6's few anchors low)."""
    config = tiny_config(tmp_path / "tiny.yaml", configs, proposals=2000)
    torch.save(detectron2_model(config).state_dict(), tmp_path / "w.pth")
    import_detectron2(config, tmp_path / "w.pth", images=1)  # as carried over: agrees
    if variant in VARIANTS:
        spec_of = detectron2_import.spec_from_detectron2
        undo = VARIANTS[variant]
        monkeypatch.setattr(
            detectron2_import, "spec_from_detectron2", lambda *a, **k: undo(spec_of(*a, **k))
        )
    else:
        state_of = detectron2_import.torchvision_state
        monkeypatch.setattr(
            detectron2_import, "torchvision_state", lambda *a: _undo_bgr(state_of(*a))
        )
    with pytest.raises(CheckpointError, match="disagrees with detectron2's on check image 0"):
        import_detectron2(config, tmp_path / "w.pth", images=1)


def test_configs_and_weights_that_do_not_fit_are_refused_in_one_line(
    configs: Path, tmp_path: Path
) -> None:
    config = tiny_config(tmp_path / "tiny.yaml", configs)
    weights = tmp_path / "w.pth"
    torch.save(detectron2_model(config).state_dict(), weights)
    cases = {
        "MODEL.MASK_ON": ({"MODEL": {"MASK_ON": True}}, "MODEL.MASK_ON True: a Mask R-CNN mask"),
        "NORM": ({"MODEL": {"RESNETS": {"NORM": "GN"}}}, "MODEL.RESNETS.NORM 'GN'"),
        "meta": (
            {"MODEL": {"META_ARCHITECTURE": "RetinaNet"}},
            "MODEL.META_ARCHITECTURE 'RetinaNet'",
        ),
        "unknown": ({"MODEL": {"RPN": {"NMS": 0.5}}}, "Non-existent config key: MODEL.RPN.NMS"),
        "classes": (
            {"MODEL": {"ROI_HEADS": {"NUM_CLASSES": 5}}},
            "MODEL.ROI_HEADS.NUM_CLASSES 5 does not fit the weights, which have 6",
        ),
    }
    for name, (override, message) in cases.items():
        bad = tmp_path / f"{name}.yaml"
        bad.write_text(json.dumps({"_BASE_": str(config), **override}))
        with pytest.raises(JDSearchError) as e:
            import_detectron2(bad, weights)
        assert str(bad) in str(e.value) and message in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
    (tmp_path / "lazy.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(SpecError, match=r"lazy\.py: a LazyConfig"):
        import_detectron2(tmp_path / "lazy.py", weights)


# ---------------------------------------------------------------------- export
RUN_IN_DETECTRON2 = """
import importlib.util, json, sys
import numpy as np, torch
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor

folder, images, out = sys.argv[1:4]
spec = importlib.util.spec_from_file_location("jdsearch_backbone", f"{folder}/jdsearch_backbone.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)  # registers the backbone builder
cfg = get_cfg()
module.add_jdsearch_config(cfg)
cfg.merge_from_file(f"{folder}/config.yaml")
cfg.MODEL.WEIGHTS = f"{folder}/model_final.pth"
cfg.MODEL.DEVICE = "cpu"
cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
predictor = DefaultPredictor(cfg)  # build_model + DetectionCheckpointer(cfg.MODEL.WEIGHTS)
missing = [k for k in predictor.model.state_dict() if k not in torch.load(cfg.MODEL.WEIGHTS)["model"]]
results = []
for bgr in np.load(images).values():
    inst = predictor(bgr)["instances"]
    results.append({"boxes": inst.pred_boxes.tensor.tolist(), "scores": inst.scores.tolist(),
                    "labels": (inst.pred_classes + 1).tolist()})
json.dump({"missing": missing, "results": results}, open(out, "w"))
"""


def detectron2_detections(folder: Path, images: list[torch.Tensor], tmp: Path) -> list[dict]:
    """detectron2's own inference (``DefaultPredictor``: BGR uint8, its resize, its weights
    loader) of an export folder, in a fresh process that imports the exported module."""
    bgr = {f"i{n}": (img.permute(1, 2, 0).flip(-1) * 255).round().to(torch.uint8).numpy()
           for n, img in enumerate(images)}  # fmt: skip
    np.savez(tmp / "images.npz", **bgr)
    script, out = tmp / "run.py", tmp / "out.json"
    script.write_text(RUN_IN_DETECTRON2)
    done = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp / "images.npz"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["missing"] == []
    return [{k: torch.tensor(v) for k, v in r.items()} for r in data["results"]]


def assert_same_in_detectron2(det: nn.Module, folder: Path, size: Resolution, tmp: Path) -> None:
    images = quantised_images(size, 2, seed=3)
    theirs = detectron2_detections(folder, images, tmp)
    jd = det.eval()
    jd.roi_heads.score_thresh = 0.0
    worst = [0.0, 0.0]
    for img, other in zip(images, theirs, strict=True):
        with torch.no_grad():
            (ours,) = jd([img])
        ok, box, score = match_detections(ours, other, BOX_TOLERANCE, SCORE_TOLERANCE)
        assert ok and len(ours["boxes"]) > 10, (len(ours["boxes"]), len(other["boxes"]), box)
        worst = [max(worst[0], box), max(worst[1], score)]
    print(f"\nexport {folder.name}: boxes within {worst[0]:.3g} px, scores within {worst[1]:.3g}")


@torch.no_grad()
def randomise_jdsearch(det: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in det.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + 1.5 * torch.rand(m.num_features, generator=g))
            m.weight.copy_(0.2 + 0.4 * torch.rand(m.num_features, generator=g))
    p = det.roi_heads.box_predictor
    p.cls_score.weight.copy_(0.5 * torch.randn(p.cls_score.weight.shape, generator=g))
    p.bbox_pred.weight.copy_(0.05 * torch.randn(p.bbox_pred.weight.shape, generator=g))
    return det.eval()


def test_a_morphed_student_exports_to_detectron2_with_the_same_detections(
    configs: Path, tmp_path: Path
) -> None:
    """torchvision-style (rounded anchors at inferred strides, unaligned RoIAlign, stride on
    the 3×3 conv), widths that differ block by block, at 160x96 (where P6's strides differ)."""
    det = randomise_jdsearch(build_detector(load_spec("tiny-r50-fpn"), 7, seed=0), 0)
    for action in ("channel_prune", "layer_prune", "add_layer:2"):
        det = randomise_jdsearch(evolve(det, action), 1)
    assert len({b.channels for b in det.arch.stages[2].blocks}) > 1
    size = Resolution(160, 96)
    done = export_detectron2(det, tmp_path / "student", input_size=size)
    assert done.check is not None and done.check.detections > 0
    text = (tmp_path / "student" / CONFIG_FILE).read_text()
    assert "NAME: JDSearchAnchorGenerator" in text and "POOLER_TYPE: ROIAlign}" in text
    assert (tmp_path / "student" / MODULE_FILE).is_file()
    det.transform.min_size, det.transform.max_size = (size.short,), size.long
    assert_same_in_detectron2(det, tmp_path / "student", size, tmp_path)


# ---------------------------------------------------------------------- a search from detectron2
@pytest.mark.slow
def test_a_search_starts_from_a_detectron2_model_and_its_winner_goes_back(
    configs: Path, search_assets: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from jdsearch.search.run import run_search
    from jdsearch.spec.study import study_from_dict

    cats = json.loads((search_assets.data_dir / "train.json").read_text())["categories"]
    names = [c["name"] for c in sorted(cats, key=lambda c: c["id"])]
    config = tiny_config(
        tmp_path / "d2.yaml", configs, len(names), MIN_SIZE_TEST=96, MAX_SIZE_TEST=96
    )
    torch.save(detectron2_model(config).state_dict(), tmp_path / "d2.pth")
    imported = import_detectron2(config, tmp_path / "d2.pth", images=1)
    base = save_checkpoint(tmp_path / "base.safetensors", imported.detector, class_names=names)
    url = f"sqlite:///{tmp_path / 's.db'}"
    data = search_assets.study("from-d2", url, n_trials=2)
    data["base"]["checkpoint"] = str(base)
    search_assets.install_pool(tmp_path, "from-d2")
    monkeypatch.chdir(tmp_path)
    study = run_search(study_from_dict(data, source="test"), progress=False)
    assert len([t for t in study.get_trials() if t.state.name == "COMPLETE"]) == 2
    out = tmp_path / "winner"
    assert main(["export", "--storage", url, "--format", "detectron2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "check       detectron2's build_model agrees" in printed, printed
    text = (out / CONFIG_FILE).read_text()
    assert "STRIDE_IN_1X1: true" in text and "POOLER_TYPE: ROIAlignV2" in text
    from jdsearch.search.queries import open_study

    handle = open_study(url, None)
    student = handle.checkpoint(handle.trial(None)).detector  # the winner
    assert student.spec.rpn == load_checkpoint(base).spec.rpn and student.spec.roi.aligned
    cfg = yaml.safe_load(text)["INPUT"]  # the winner's best resolution
    size = Resolution(cfg["MAX_SIZE_TEST"], cfg["MIN_SIZE_TEST"])
    student.transform.min_size, student.transform.max_size = (size.short,), size.long
    assert_same_in_detectron2(student, out, size, tmp_path)
