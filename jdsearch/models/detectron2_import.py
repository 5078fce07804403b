"""Import a detectron2 Faster R-CNN (``GeneralizedRCNN`` over a ResNet-FPN) as a jdsearch
detector, and prove the conversion by running both.

The tensors are renamed to torchvision's Faster R-CNN names
(:func:`~jdsearch.models.detectron2_files.torchvision_name`) and then go the way a torchvision
file goes (:func:`~jdsearch.models.torchvision_import.architecture`,
:func:`~jdsearch.models.torchvision_import.convert`). What detectron2 does differently is
carried over, never approximated:

* input: detectron2 takes BGR (or RGB) pixels in 0–255 normalised by ``MODEL.PIXEL_MEAN`` /
  ``PIXEL_STD``; jdsearch takes RGB in [0, 1]. The channel order and the 255 go into the first
  convolution, the mean into the transform's mean (``PIXEL_MEAN / 255``), and the std into the
  first convolution too, so that the transform keeps the std of the spec (ImageNet's by
  default), as the teacher pool has it;
* ``RESNETS.STRIDE_IN_1X1`` → ``arch.stride_in_1x1``; ``ROIAlignV2`` → ``roi_heads.aligned``
  (and ``POOLER_SAMPLING_RATIO`` 0, adaptive); detectron2's unrounded anchors at fixed strides →
  ``rpn.round_anchors: false``, ``rpn.fixed_anchor_strides: true``;
* class-specific box regression with the background last → torchvision's order, background
  first (class-agnostic regression is repeated per class);
* ``FrozenBN`` → trainable BN (same statistics); test-time thresholds and top-k → the spec.

The check: both models' inference settings must be equal, and both run on a few images (float32,
one image a call, at a short side of at most :data:`CHECK_SHORT` pixels, the RoI score threshold
at 0): every box within :data:`BOX_TOLERANCE` pixels, every score within
:data:`SCORE_TOLERANCE`, the same labels, or nothing is written.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from jdsearch.core.config import shown
from jdsearch.core.errors import CheckpointError, SpecError
from jdsearch.core.resolution import Resolution
from jdsearch.models.detector import load_weights_exactly
from jdsearch.models.detectron2_files import (
    detectron2_config,
    read_config_dict,
    read_detectron2_weights,
    require_detectron2,
    torchvision_name,
)
from jdsearch.models.torch_internals import rpn_post_nms_top_n, rpn_pre_nms_top_n
from jdsearch.models.torchvision_body import check_weights_file
from jdsearch.models.torchvision_import import (
    CHECK_SHORT,
    DetectionCheck,
    Imported,
    agreement,
    architecture,
    check_images,
    check_size,
    convert,
    family_name,
)
from jdsearch.spec.arch import BOTTLENECK
from jdsearch.spec.detector import PAPER_RESOLUTIONS, DetectorSpec, InputSpec, RoISpec, RPNSpec

__all__ = [
    "BOX_TOLERANCE",
    "SCORE_TOLERANCE",
    "compare_with_detectron2",
    "detectron2_settings",
    "import_detectron2",
    "quantised_images",
    "run_detectron2",
    "spec_from_detectron2",
    "torchvision_state",
]

BOX_TOLERANCE = 0.5  # pixels: the largest box-coordinate difference of agreeing detections
SCORE_TOLERANCE = 1e-3
_RES = ["res2", "res3", "res4", "res5"]
_P5 = ["p2", "p3", "p4", "p5"]
_NOT_SUPPORTED = "is not carried over (jdsearch imports a Faster R-CNN over a ResNet-FPN)"
# (config key, the values jdsearch can build, what any other value means)
_SUPPORTED: tuple[tuple[str, tuple[Any, ...], str], ...] = (
    ("MODEL.META_ARCHITECTURE", ("GeneralizedRCNN",), "a meta-architecture"),
    ("MODEL.MASK_ON", (False,), "a Mask R-CNN mask head"),
    ("MODEL.KEYPOINT_ON", (False,), "a keypoint head"),
    ("MODEL.LOAD_PROPOSALS", (False,), "precomputed proposals"),
    ("MODEL.BACKBONE.NAME", ("build_resnet_fpn_backbone",), "a backbone"),
    ("MODEL.RESNETS.NORM", ("FrozenBN", "BN", "SyncBN"), "a ResNet normalisation"),
    ("MODEL.RESNETS.DEFORM_ON_PER_STAGE", ([False] * 4,), "a deformable convolution"),
    ("MODEL.RESNETS.RES5_DILATION", (1,), "a dilated res5"),
    ("MODEL.RESNETS.OUT_FEATURES", (_RES,), "a ResNet output"),
    ("MODEL.FPN.IN_FEATURES", (_RES,), "an FPN input"),
    ("MODEL.FPN.NORM", ("",), "a normalised FPN"),
    ("MODEL.FPN.FUSE_TYPE", ("sum",), "an FPN fusion"),
    ("MODEL.PROPOSAL_GENERATOR.NAME", ("RPN",), "a proposal generator"),
    ("MODEL.PROPOSAL_GENERATOR.MIN_SIZE", (0,), "a minimum proposal size"),
    ("MODEL.ANCHOR_GENERATOR.NAME", ("DefaultAnchorGenerator",), "an anchor generator"),
    ("MODEL.ANCHOR_GENERATOR.OFFSET", (0,), "an anchor offset"),
    ("MODEL.RPN.HEAD_NAME", ("StandardRPNHead",), "an RPN head"),
    ("MODEL.RPN.CONV_DIMS", ([-1],), "an RPN head with other convolutions"),
    ("MODEL.RPN.IN_FEATURES", ([*_P5, "p6"],), "an RPN over other levels"),
    ("MODEL.RPN.BBOX_REG_WEIGHTS", ([1, 1, 1, 1],), "RPN box-coder weights"),
    ("MODEL.RPN.IOU_LABELS", ([0, -1, 1],), "RPN matcher labels"),
    ("MODEL.ROI_HEADS.NAME", ("StandardROIHeads",), "RoI heads"),
    ("MODEL.ROI_HEADS.IN_FEATURES", (_P5,), "RoI pooling over other levels"),
    ("MODEL.ROI_HEADS.IOU_LABELS", ([0, 1],), "RoI matcher labels"),
    ("MODEL.ROI_BOX_HEAD.NAME", ("FastRCNNConvFCHead",), "a box head"),
    ("MODEL.ROI_BOX_HEAD.NUM_CONV", (0,), "a box head with convolutions"),
    ("MODEL.ROI_BOX_HEAD.NUM_FC", (2,), "a box head of other than two FC layers"),
    ("MODEL.ROI_BOX_HEAD.NORM", ("",), "a normalised box head"),
    ("MODEL.ROI_BOX_HEAD.POOLER_TYPE", ("ROIAlignV2", "ROIAlign"), "an RoI pooler"),
    ("MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", ([10, 10, 5, 5],), "box-coder weights"),
    ("INPUT.FORMAT", ("BGR", "RGB"), "an input format"),
)
# detectron2 buffers that are not weights (older files saved them)
_RUNTIME = ("pixel_mean", "pixel_std", "proposal_generator.anchor_generator.cell_anchors.")
_CLS = "roi_heads.box_predictor.cls_score."
_BOX = "roi_heads.box_predictor.bbox_pred."
_STEM = "backbone.body.conv1.weight"


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _plain(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _check_supported(cfg: Any, source: str) -> None:
    """One line naming the first config field whose value jdsearch cannot build."""
    for key, allowed, what in _SUPPORTED:
        value = _get(cfg, key)
        if _plain(value) not in [_plain(a) for a in allowed]:
            raise SpecError(f"{source}: {key} {shown(_plain(value))}: {what} {_NOT_SUPPORTED}")
    sizes, ratios = cfg.MODEL.ANCHOR_GENERATOR.SIZES, cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS
    if len(sizes) != 5 or any(len(s) != 1 or float(s[0]) != int(s[0]) for s in sizes):
        raise SpecError(
            f"{source}: MODEL.ANCHOR_GENERATOR.SIZES {shown(_plain(sizes))}: expected one whole "
            "size for each of the five levels p2-p6"
        )
    if len({tuple(_plain(r)) for r in ratios}) != 1:
        raise SpecError(
            f"{source}: MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS {shown(_plain(ratios))}: aspect "
            "ratios that differ between levels are not carried over"
        )
    for key, n in (("MODEL.RPN.IOU_THRESHOLDS", 2), ("MODEL.ROI_HEADS.IOU_THRESHOLDS", 1)):
        if len(_get(cfg, key)) != n:
            raise SpecError(f"{source}: {key} {shown(_plain(_get(cfg, key)))}: expected {n}")


# ---------------------------------------------------------------------- tensors
def _renamed(sd: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    out = {}
    for name, tensor in sd.items():
        if name.startswith(_RUNTIME):
            continue
        tv = torchvision_name(name)
        if tv is None:
            raise CheckpointError(
                f"{source}: tensor {name} {tuple(tensor.shape)} has no place in jdsearch's Faster "
                "R-CNN (a detectron2 GeneralizedRCNN over a ResNet-FPN was expected)"
            )
        out[tv] = tensor
    for key in (_STEM, _CLS + "weight", _BOX + "weight"):
        if key not in out:
            raise CheckpointError(
                f"{source}: no {key} tensor: not the weights of a detectron2 Faster R-CNN"
            )
    return out


def _background_first(sd: dict[str, Tensor], source: str) -> None:
    """detectron2's classes 0..K-1 and background K → torchvision's background 0 and classes
    1..K; class-specific box deltas get (unused) zero rows for the background, class-agnostic
    ones are repeated for every class."""
    k1 = int(sd[_CLS + "weight"].shape[0])
    order = torch.tensor([k1 - 1, *range(k1 - 1)])
    rows = int(sd[_BOX + "weight"].shape[0])
    if rows not in (4, 4 * (k1 - 1)):
        raise CheckpointError(
            f"{source}: {_BOX}weight has {rows} rows for {k1 - 1} classes (expected "
            f"{4 * (k1 - 1)}, or 4 for class-agnostic regression)"
        )
    for leaf in ("weight", "bias"):
        sd[_CLS + leaf] = sd[_CLS + leaf][order].clone()
        box = sd[_BOX + leaf]
        if rows == 4:
            sd[_BOX + leaf] = box.repeat(k1, *([1] * (box.dim() - 1)))
        else:
            sd[_BOX + leaf] = torch.cat([torch.zeros_like(box[:4]), box])


def _input_fold(cfg: Any, source: str) -> tuple[list[int], list[float]]:
    """The source channel of each RGB channel, and the mean (RGB, in [0, 1]) of the transform."""
    mean, d2_std = list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)
    if len(mean) != 3 or len(d2_std) != 3 or min(d2_std) <= 0:
        raise SpecError(
            f"{source}: MODEL.PIXEL_MEAN {shown(mean)} / PIXEL_STD {shown(d2_std)}: expected 3 "
            "values each, the std positive"
        )
    order = [2, 1, 0] if cfg.INPUT.FORMAT == "BGR" else [0, 1, 2]
    return order, [round(float(mean[c]) / 255.0, 12) for c in order]


def torchvision_state(
    sd: Mapping[str, Tensor], cfg: Any, std: Sequence[float], source: str
) -> dict[str, Tensor]:
    """A detectron2 state dict as a torchvision Faster R-CNN state dict whose transform takes RGB
    in [0, 1] with mean ``PIXEL_MEAN / 255`` and std ``std`` (RGB): background first, and the
    first convolution taking the input as detectron2's did.

    Raises:
        CheckpointError: a tensor with no place in a Faster R-CNN, or box deltas that fit no
            number of classes.
    """
    out = _renamed(sd, source)
    _background_first(out, source)
    order, _ = _input_fold(cfg, source)
    w = out[_STEM].double()
    d2_std = [float(cfg.MODEL.PIXEL_STD[c]) for c in order]
    scale = torch.tensor([255.0 * s / d for s, d in zip(std, d2_std, strict=True)])
    out[_STEM] = (w[:, order] * scale[None, :, None, None]).to(out[_STEM].dtype)
    return out


# ---------------------------------------------------------------------- the spec
def _rpn(cfg: Any) -> RPNSpec:
    r, a = cfg.MODEL.RPN, cfg.MODEL.ANCHOR_GENERATOR
    return RPNSpec(
        anchor_sizes=tuple(int(s[0]) for s in a.SIZES),
        aspect_ratios=tuple(float(v) for v in a.ASPECT_RATIOS[0]),
        pre_nms_top_n_train=int(r.PRE_NMS_TOPK_TRAIN),
        pre_nms_top_n_test=int(r.PRE_NMS_TOPK_TEST),
        post_nms_top_n_train=int(r.POST_NMS_TOPK_TRAIN),
        post_nms_top_n_test=int(r.POST_NMS_TOPK_TEST),
        nms_thresh=float(r.NMS_THRESH),
        fg_iou_thresh=float(r.IOU_THRESHOLDS[1]),
        bg_iou_thresh=float(r.IOU_THRESHOLDS[0]),
        batch_size_per_image=int(r.BATCH_SIZE_PER_IMAGE),
        positive_fraction=float(r.POSITIVE_FRACTION),
        round_anchors=False,
        fixed_anchor_strides=True,
    )


def _roi(cfg: Any, shapes: RoISpec) -> RoISpec:
    h, b = cfg.MODEL.ROI_HEADS, cfg.MODEL.ROI_BOX_HEAD
    return dataclasses.replace(
        shapes,
        sampling_ratio=int(b.POOLER_SAMPLING_RATIO),
        batch_size_per_image=int(h.BATCH_SIZE_PER_IMAGE),
        positive_fraction=float(h.POSITIVE_FRACTION),
        fg_iou_thresh=float(h.IOU_THRESHOLDS[0]),
        bg_iou_thresh=float(h.IOU_THRESHOLDS[0]),
        score_thresh=float(h.SCORE_THRESH_TEST),
        nms_thresh=float(h.NMS_THRESH_TEST),
        detections_per_img=int(cfg.TEST.DETECTIONS_PER_IMAGE),
        aligned=b.POOLER_TYPE == "ROIAlignV2",
    )


def _input(cfg: Any, base: DetectorSpec | None, mean: list[float], std: Sequence[float]) -> Any:
    size = Resolution(int(cfg.INPUT.MAX_SIZE_TEST), int(cfg.INPUT.MIN_SIZE_TEST))
    if base is not None:
        resolutions = base.input.resolutions
    else:
        resolutions = PAPER_RESOLUTIONS if size in PAPER_RESOLUTIONS else (size,)
    return InputSpec(
        size=size,
        resolutions=tuple(resolutions),
        image_mean=tuple(mean),
        image_std=tuple(float(s) for s in std),
        size_divisible=32,  # detectron2's FPN pads to its coarsest stride
    )


def _check_shapes(cfg: Any, num_classes: int, shapes: RoISpec, source: str) -> None:
    for key, value, expected in (
        ("MODEL.ROI_HEADS.NUM_CLASSES", int(cfg.MODEL.ROI_HEADS.NUM_CLASSES), num_classes - 1),
        ("MODEL.ROI_BOX_HEAD.FC_DIM", int(cfg.MODEL.ROI_BOX_HEAD.FC_DIM), shapes.representation_size),
        ("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", int(cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION), shapes.pool_size),
    ):  # fmt: skip
        if value != expected:
            raise CheckpointError(
                f"{source}: {key} {value} does not fit the weights, which have {expected}"
            )


def spec_from_detectron2(
    cfg: Any, tensors: Mapping[str, Tensor], arch: DetectorSpec | None = None, *, source: str
) -> DetectorSpec:
    """The jdsearch spec of a detectron2 config and its weights (renamed by
    :func:`torchvision_state`): the body, FPN and box head from the shapes, everything else from
    the config; name and resolutions from ``arch`` when given.

    Raises:
        CheckpointError: weights that do not fit the config (classes, box head).
        SpecError: a config value jdsearch cannot hold.
    """
    body, num_classes, shapes = architecture(tensors, source)
    in_1x1 = bool(cfg.MODEL.RESNETS.STRIDE_IN_1X1) and body.kind == BOTTLENECK
    body = dataclasses.replace(body, stride_in_1x1=in_1x1)
    _check_shapes(cfg, num_classes, shapes, source)
    std = arch.input.image_std if arch is not None else InputSpec().image_std
    _, mean = _input_fold(cfg, source)
    try:
        return DetectorSpec(
            name=arch.name if arch is not None else family_name(body),
            arch=body,
            rpn=_rpn(cfg),
            roi=_roi(cfg, shapes),
            input=_input(cfg, arch, mean, std),
            num_classes=num_classes,
            source=source,
        )
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None


# ---------------------------------------------------------------------- running detectron2
def _reference(cfg: Any, sd: Mapping[str, Tensor], source: str) -> nn.Module:
    """detectron2's own model of ``cfg`` holding the file's tensors, in eval mode."""
    from detectron2.modeling import build_model

    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg)
    state = {k: v for k, v in sd.items() if not k.startswith(_RUNTIME)}
    load_weights_exactly(model, state, source=source, what="detectron2's model of the config")
    return model.eval()


def detectron2_settings(model: nn.Module) -> dict[str, Any]:
    """What a detectron2 Faster R-CNN does at inference besides its weights (comparable with
    :func:`_jdsearch_settings`)."""
    rpn, heads = model.proposal_generator, model.roi_heads
    predictor = heads.box_predictor
    return {
        "rpn pre_nms_top_n": int(rpn.pre_nms_topk[False]),
        "rpn post_nms_top_n": int(rpn.post_nms_topk[False]),
        "rpn nms_thresh": float(rpn.nms_thresh),
        "box score_thresh": float(predictor.test_score_thresh),
        "box nms_thresh": float(predictor.test_nms_thresh),
        "detections_per_img": int(predictor.test_topk_per_image),
    }


def _jdsearch_settings(detector: nn.Module) -> dict[str, Any]:
    rpn, heads = detector.rpn, detector.roi_heads
    return {
        "rpn pre_nms_top_n": int(rpn_pre_nms_top_n(rpn)["testing"]),
        "rpn post_nms_top_n": int(rpn_post_nms_top_n(rpn)["testing"]),
        "rpn nms_thresh": float(rpn.nms_thresh),
        "box score_thresh": float(heads.score_thresh),
        "box nms_thresh": float(heads.nms_thresh),
        "detections_per_img": int(heads.detections_per_img),
    }


def quantised_images(size: Resolution, n: int, seed: int = 0) -> list[Tensor]:
    """:func:`~jdsearch.models.torchvision_import.check_images` on whole 0–255 levels (RGB in
    [0, 1]), so that both input conventions see the same pixels."""
    return [(img * 255).round() / 255 for img in check_images(size, n, seed)]


@torch.no_grad()
def run_detectron2(
    model: nn.Module, images: Sequence[Tensor], input_format: str
) -> list[dict[str, Tensor]]:
    """detectron2's inference (``model(inputs)``, one image a call, no resizing) on RGB images in
    [0, 1]: boxes, scores and labels ``1..K`` (detectron2's class + 1) of each."""
    dtype = next(model.parameters()).dtype
    out = []
    for img in images:
        x = img.to(dtype) * 255
        x = x.flip(0) if input_format == "BGR" else x
        (result,) = model([{"image": x, "height": x.shape[1], "width": x.shape[2]}])
        inst = result["instances"]
        out.append(
            {
                "boxes": inst.pred_boxes.tensor,
                "scores": inst.scores,
                "labels": inst.pred_classes + 1,
            }
        )
    return out


@torch.no_grad()
def _run_jdsearch(detector: nn.Module, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
    dtype = next(detector.parameters()).dtype
    out = []
    for img in images:  # at its own size: min_size/max_size are the image's sides
        short, long = sorted(img.shape[1:])
        detector.transform.min_size, detector.transform.max_size = (short,), long
        out += detector([img.to(dtype)])
    return out


def compare_with_detectron2(
    reference: nn.Module,
    detector: nn.Module,
    images: Sequence[Tensor],
    *,
    input_format: str,
    source: str,
) -> DetectionCheck:
    """Run copies of detectron2's ``reference`` and the jdsearch ``detector`` (in float32, as
    they are saved: detectron2 decodes boxes in float32 whatever its dtype; the RoI score
    threshold at 0) on ``images`` (RGB in [0, 1], each at the size it is run at) and compare
    their detections, order aside.

    Returns:
        The number of detections compared and the largest box and score differences.

    Raises:
        CheckpointError: inference settings that differ, an image on which the detections
            differ (count, label, a box beyond :data:`BOX_TOLERANCE` or a score beyond
            :data:`SCORE_TOLERANCE`), or no detection at all.
    """
    a, b = detectron2_settings(reference), _jdsearch_settings(detector)
    for key, value in a.items():
        if b[key] != value:
            raise CheckpointError(f"{source}: {key} {value} in detectron2 is {b[key]} in jdsearch")
    ref, det = copy.deepcopy(reference).float().eval(), copy.deepcopy(detector).float().eval()
    ref.roi_heads.box_predictor.test_score_thresh = 0.0
    det.roi_heads.score_thresh = 0.0
    runs = zip(run_detectron2(ref, images, input_format), _run_jdsearch(det, images), strict=True)
    return agreement(
        runs,
        len(images),
        source,
        tol=BOX_TOLERANCE,
        score_tol=SCORE_TOLERANCE,
        names=("jdsearch's detector", "detectron2's", "detectron2's model"),
    )


def import_detectron2(
    config: str | Path,
    weights: str | Path,
    *,
    arch: DetectorSpec | None = None,
    class_names: Sequence[str] | None = None,
    images: int = 2,
    seed: int = 0,
    check_short: int = CHECK_SHORT,
) -> Imported:
    """Convert a detectron2 Faster R-CNN (config + weights) into a jdsearch detector, after both
    gave the same detections.

    Args:
        config: the detectron2 YAML config (``_BASE_`` files are followed; read safely).
        weights: a ``.pth`` state dict or training checkpoint, or a model-zoo ``.pkl``.
        arch: a detector spec whose name, resolutions and image std are used.
        class_names: checked against the model's classes (K foreground names, or K+1); in
            detectron2's class order.
        images: check images both models run on.
        seed: of the check images.
        check_short: the check's short side at most (the input size scaled down).

    Returns:
        The float32 detector in eval mode, its spec, ``kind`` ``"detectron2"`` and the check.

    Raises:
        CheckpointError: detectron2 missing, unreadable or refused weights, tensors that do not
            fit, the wrong number of class names, or detections that disagree.
        SpecError: an unreadable config or a setting jdsearch does not carry over.
    """
    if images < 1:
        raise CheckpointError(f"{weights}: the check needs at least one image, got {images}")
    # the files first: a bad one (``_BASE_: /dev/zero``) is named wherever detectron2 is missing
    read_config_dict(config)
    check_weights_file(weights)
    require_detectron2("jdsearch import --from detectron2")
    cfg = detectron2_config(config)
    source = f"{config} + {weights}"
    _check_supported(cfg, str(config))
    sd = read_detectron2_weights(weights)
    std = arch.input.image_std if arch is not None else InputSpec().image_std
    tensors = torchvision_state(sd, cfg, std, str(weights))
    spec = spec_from_detectron2(cfg, tensors, arch, source=str(config))
    n = spec.num_classes
    assert n is not None
    if class_names is not None and len(class_names) not in (n, n - 1):
        raise CheckpointError(
            f"{weights}: {len(class_names)} class names for a detector with {n - 1} classes "
            f"(MODEL.ROI_HEADS.NUM_CLASSES {n - 1})"
        )
    detector = convert(tensors, spec, str(weights))
    reference = _reference(cfg, sd, str(weights))
    pictures = quantised_images(check_size(spec, check_short), images, seed)
    check = compare_with_detectron2(
        reference, detector, pictures, input_format=cfg.INPUT.FORMAT, source=source
    )
    return Imported(detector, detector.spec, "detectron2", check, source)
