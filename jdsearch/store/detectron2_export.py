"""A jdsearch detector as detectron2 files: ``config.yaml``, ``model_final.pth`` (a state dict
under ``"model"``, detectron2's names) and ``jdsearch_backbone.py``, the module that registers
the backbone builder (:mod:`jdsearch.store.detectron2_backbone`, copied). Any student exports,
heterogeneous per-block widths included; its behaviour goes with it:

* input: detectron2's default, BGR pixels in 0–255; ``PIXEL_MEAN`` / ``PIXEL_STD`` are the
  detector's mean and std × 255 in BGR order and the first convolution takes BGR channels;
* classes: the background last, class-specific box deltas without the background's rows;
* ``arch.stride_in_1x1`` → ``RESNETS.STRIDE_IN_1X1``; ``roi_heads.aligned`` → ``ROIAlignV2``
  (else ``ROIAlign``); torchvision's rounded anchors at inferred strides →
  ``JDSearchAnchorGenerator`` (detectron2's own ``DefaultAnchorGenerator`` otherwise);
* BN → ``FrozenBN`` (same statistics; detectron2's default for a ResNet it fine-tunes).

When detectron2 is installed, the written files are loaded into detectron2's ``build_model`` and
both models run on check images; nothing is kept unless they agree as an import must
(:func:`~jdsearch.models.detectron2_import.compare_with_detectron2`).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from jdsearch.core.errors import ExportError, JDSearchError
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import get_resolution
from jdsearch.models import Detector
from jdsearch.models.detector import load_weights_exactly
from jdsearch.models.detectron2_files import detectron2_config, detectron2_name
from jdsearch.models.detectron2_import import compare_with_detectron2, quantised_images
from jdsearch.models.torchvision_body import BODY, torchvision_body_name
from jdsearch.models.torchvision_import import CHECK_SHORT, DetectionCheck, scaled_size
from jdsearch.store.onnx import cpu_copy

__all__ = [
    "CONFIG_FILE",
    "MODULE_FILE",
    "WEIGHTS_FILE",
    "Detectron2Export",
    "detectron2_config_dict",
    "detectron2_state",
    "export_detectron2",
    "load_in_detectron2",
]

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model_final.pth"
MODULE_FILE = "jdsearch_backbone.py"
_MODULE_SOURCE = Path(__file__).with_name("detectron2_backbone.py")
_CLS = "roi_heads.box_predictor.cls_score."
_BOX = "roi_heads.box_predictor.bbox_pred."
_STEM = "backbone.bottom_up.stem.conv1.weight"
_BGR = [2, 1, 0]


@dataclass(frozen=True)
class Detectron2Export:
    """What :func:`export_detectron2` wrote, and its check in detectron2 (``None``: detectron2
    is not installed here, and ``unchecked`` says so)."""

    path: Path
    files: tuple[str, ...]
    input_size: Resolution
    check: DetectionCheck | None
    unchecked: str = ""


def _refuse_unexportable(det: Detector, out: Path) -> None:
    spec = det.spec
    if tuple(spec.arch.strides) != (1, 2, 2, 2):
        raise ExportError(
            f"{out}: arch strides {list(spec.arch.strides)}: detectron2's FPN needs the stages at "
            "strides 4, 8, 16, 32 (stage strides 1, 2, 2, 2)"
        )
    if spec.input.size_divisible % 32:
        raise ExportError(
            f"{out}: input.size_divisible {spec.input.size_divisible}: detectron2's FPN pads to "
            "a multiple of 32"
        )


def detectron2_state(detector: Detector) -> dict[str, Tensor]:
    """The detector's tensors under detectron2's names, background last, the first convolution
    taking BGR channels; no ``num_batches_tracked`` (``FrozenBN`` has none)."""
    out: dict[str, Tensor] = {}
    for name, tensor in detector.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        tv = BODY + str(torchvision_body_name(name[len(BODY) :])) if name.startswith(BODY) else name
        d2 = detectron2_name(tv)
        assert d2 is not None, f"no detectron2 name for {name}"
        out[d2] = tensor.detach().clone()
    k1 = int(out[_CLS + "weight"].shape[0])
    order = torch.tensor([*range(1, k1), 0])
    for leaf in ("weight", "bias"):
        out[_CLS + leaf] = out[_CLS + leaf][order]
        out[_BOX + leaf] = out[_BOX + leaf][4:]
    out[_STEM] = out[_STEM][:, _BGR]
    return out


def _bgr255(values: Sequence[float]) -> list[float]:
    return [round(float(values[c]) * 255.0, 9) for c in _BGR]


def _roi_matcher(spec: Any) -> dict[str, Any]:
    fg, bg = spec.roi.fg_iou_thresh, spec.roi.bg_iou_thresh
    if fg == bg:
        return {"IOU_THRESHOLDS": [fg], "IOU_LABELS": [0, 1]}
    return {"IOU_THRESHOLDS": [bg, fg], "IOU_LABELS": [0, -1, 1]}  # between: ignored


def _heads(spec: Any, num_classes: int) -> dict[str, Any]:
    rpn, roi = spec.rpn, spec.roi
    torchvision_anchors = rpn.round_anchors or not rpn.fixed_anchor_strides
    return {
        "ANCHOR_GENERATOR": {
            "NAME": "JDSearchAnchorGenerator" if torchvision_anchors else "DefaultAnchorGenerator",
            "SIZES": [[int(s)] for s in rpn.anchor_sizes],
            "ASPECT_RATIOS": [[float(r) for r in rpn.aspect_ratios]],
            "OFFSET": 0.0,
        },
        "RPN": {
            "IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
            "PRE_NMS_TOPK_TRAIN": rpn.pre_nms_top_n_train,
            "PRE_NMS_TOPK_TEST": rpn.pre_nms_top_n_test,
            "POST_NMS_TOPK_TRAIN": rpn.post_nms_top_n_train,
            "POST_NMS_TOPK_TEST": rpn.post_nms_top_n_test,
            "NMS_THRESH": rpn.nms_thresh,
            "IOU_THRESHOLDS": [rpn.bg_iou_thresh, rpn.fg_iou_thresh],
            "BATCH_SIZE_PER_IMAGE": rpn.batch_size_per_image,
            "POSITIVE_FRACTION": rpn.positive_fraction,
        },
        "ROI_HEADS": {
            "NAME": "StandardROIHeads",
            "IN_FEATURES": ["p2", "p3", "p4", "p5"],
            "NUM_CLASSES": num_classes - 1,
            "BATCH_SIZE_PER_IMAGE": roi.batch_size_per_image,
            "POSITIVE_FRACTION": roi.positive_fraction,
            "SCORE_THRESH_TEST": roi.score_thresh,
            "NMS_THRESH_TEST": roi.nms_thresh,
            **_roi_matcher(spec),
        },
        "ROI_BOX_HEAD": {
            "NAME": "FastRCNNConvFCHead",
            "NUM_FC": 2,
            "FC_DIM": roi.representation_size,
            "POOLER_RESOLUTION": roi.pool_size,
            "POOLER_SAMPLING_RATIO": roi.sampling_ratio,
            "POOLER_TYPE": "ROIAlignV2" if roi.aligned else "ROIAlign",
        },
    }


def detectron2_config_dict(detector: Detector, size: Resolution) -> dict[str, Any]:
    """The detectron2 config of ``detector`` at input ``size`` (a plain mapping for YAML)."""
    spec = detector.spec
    stages = spec.arch.stages
    num_classes = int(detector.roi_heads.box_predictor.cls_score.out_features)
    model = {
        "META_ARCHITECTURE": "GeneralizedRCNN",
        "MASK_ON": False,
        "PIXEL_MEAN": _bgr255(spec.input.image_mean),
        "PIXEL_STD": _bgr255(spec.input.image_std),
        "BACKBONE": {"NAME": "build_jdsearch_resnet_fpn_backbone", "FREEZE_AT": 2},
        "RESNETS": {
            "STEM_OUT_CHANNELS": spec.arch.stem,
            "NORM": "FrozenBN",
            "STRIDE_IN_1X1": spec.arch.stride_in_1x1,
            "OUT_FEATURES": ["res2", "res3", "res4", "res5"],
        },
        "FPN": {"IN_FEATURES": ["res2", "res3", "res4", "res5"], "OUT_CHANNELS": spec.arch.fpn},
        **_heads(spec, num_classes),
        "JDSEARCH": {
            "STAGE_STRIDES": [s.stride for s in stages],
            "BLOCKS": [[list(b.channels) for b in s.blocks] for s in stages],
            "GROUPS": [[b.groups for b in s.blocks] for s in stages],
            "ROUND_ANCHORS": spec.rpn.round_anchors,
            "FIXED_ANCHOR_STRIDES": spec.rpn.fixed_anchor_strides,
            "SIZE_DIVISIBILITY": spec.input.size_divisible,
        },
    }
    return {
        "MODEL": model,
        "INPUT": {
            "FORMAT": "BGR",
            "MIN_SIZE_TEST": size.short,
            "MAX_SIZE_TEST": size.long,
            "MIN_SIZE_TRAIN": [size.short],
            "MAX_SIZE_TRAIN": size.long,
        },
        "TEST": {"DETECTIONS_PER_IMAGE": spec.roi.detections_per_img},
        "VERSION": 2,
    }


def _write(out: Path, det: Detector, size: Resolution, names: Sequence[str]) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        config = detectron2_config_dict(det, size)
        text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100)
        header = f"# jdsearch student {det.spec.name}: {det.arch.encode()}\n"
        header += f"# classes (detectron2 ids 0..K-1): {', '.join(names)}\n"
        (out / CONFIG_FILE).write_text(header + text)
        torch.save({"model": detectron2_state(det), "__author__": "jdsearch"}, out / WEIGHTS_FILE)
        shutil.copyfile(_MODULE_SOURCE, out / MODULE_FILE)
    except OSError as e:
        raise ExportError(f"{out}: cannot write the detectron2 files ({e.strerror or e})") from None


def load_in_detectron2(folder: str | Path) -> tuple[Any, Any]:
    """detectron2's model of an export folder (``build_model`` of its config, its weights
    loaded, every tensor in place) and the config; eval mode, on the CPU.

    Raises:
        CheckpointError: detectron2 is not installed, or the weights do not fit the model.
    """
    from detectron2.modeling import build_model

    from jdsearch.store.detectron2_backbone import add_jdsearch_config  # registers the builder

    folder = Path(folder)
    cfg = detectron2_config(folder / CONFIG_FILE, extend=add_jdsearch_config)
    model = build_model(cfg).eval()
    state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)["model"]
    load_weights_exactly(model, state, source=str(folder / WEIGHTS_FILE), what="detectron2's model")
    return model, cfg


def _check(
    folder: Path, det: Detector, size: Resolution, images: Sequence[Tensor] | None
) -> DetectionCheck:
    model, cfg = load_in_detectron2(folder)
    pictures = list(images) if images else quantised_images(scaled_size(size, CHECK_SHORT), 2)
    return compare_with_detectron2(
        model, det, pictures, input_format=cfg.INPUT.FORMAT, source=str(folder)
    )


def export_detectron2(
    detector: Detector,
    out_dir: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    input_size: Resolution | str | None = None,
    check_images: Sequence[Tensor] | None = None,
    check: bool = True,
) -> Detectron2Export:
    """Write ``detector`` as detectron2 files (see the module doc) and check them in detectron2.

    Args:
        detector: any jdsearch detector (copied to the CPU).
        out_dir: the folder (created; the three files there are replaced).
        class_names: the foreground names, written as a comment of the config.
        input_size: ``LONGxSHORT``, detectron2's ``INPUT.MIN/MAX_SIZE_TEST`` (default: the
            detector's current input size).
        check_images: RGB images in [0, 1] on whole 0–255 levels for the check (default: two
            smooth random images at the input size, scaled to a short side of at most 320).
        check: run the check when detectron2 is installed.

    Returns:
        The folder, its files, the input size and the check (``None`` when not run).

    Raises:
        ExportError: an architecture detectron2's FPN cannot hold, an unwritable folder, or a
            check that fails (the files are removed).
    """
    out = Path(out_dir)
    det = cpu_copy(detector).eval()
    _refuse_unexportable(det, out)
    size = Resolution.parse(input_size) if input_size is not None else get_resolution(det)
    k = int(det.roi_heads.box_predictor.cls_score.out_features) - 1
    names = list(class_names) if class_names is not None else [f"class{i}" for i in range(1, k + 1)]
    _write(out, det, size, names)
    files = (CONFIG_FILE, WEIGHTS_FILE, MODULE_FILE)
    if not check:
        return Detectron2Export(out, files, size, None, "not asked for")
    try:
        import detectron2  # noqa: F401 - the check needs it; without it the files are unchecked
    except ImportError:
        return Detectron2Export(out, files, size, None, "detectron2 is not installed here")
    try:
        result = _check(out, det, size, check_images)
    except JDSearchError as e:
        for name in files:
            (out / name).unlink(missing_ok=True)
        raise ExportError(f"{out}: detectron2 check failed, files removed: {e}") from None
    return Detectron2Export(out, files, size, result)
