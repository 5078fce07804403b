"""Import a torchvision Faster R-CNN (v1: ``fasterrcnn_resnet50_fpn``, or ``FasterRCNN`` over
``resnet_fpn_backbone`` / ``_resnet_fpn_extractor`` with any torchvision ResNet/ResNeXt) as a
jdsearch detector, and prove the conversion by running both.

The detector's spec is read from the file: the body from the tensor shapes
(:func:`~jdsearch.models.torchvision_body.body_arch`), the FPN width, the box head, the classes
and the anchors per location. A pickled model also carries its transform (min/max size, mean,
std), anchors and RPN/RoI settings, which are taken over; a ``state_dict`` carries none, so they
come from ``arch`` (a detector spec) or torchvision's defaults, which are jdsearch's.

The check: the two models' inference settings (transform, anchors, RPN and RoI thresholds, BN
eps) must be equal, and both run on a few images in float64 (so that no rounding can flip a
detection), with the RoI score threshold at 0 and a short side of at most :data:`CHECK_SHORT`
pixels; every box, score and label must agree within :data:`TOLERANCE`, or nothing is written.
The source of a ``state_dict`` is rebuilt with torchvision's own ResNet body.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops.misc import FrozenBatchNorm2d

from jdsearch.core.errors import CheckpointError
from jdsearch.core.resolution import Resolution
from jdsearch.models.detector import Detector, build_detector, load_weights_exactly
from jdsearch.models.torch_internals import (
    IntermediateLayerGetter,
    rpn_post_nms_top_n,
    rpn_pre_nms_top_n,
    skips_resize,
)
from jdsearch.models.torchvision_body import (
    BODY,
    WeightsFile,
    body_arch,
    body_tensors,
    map_body,
    read_weights_file,
)
from jdsearch.spec.arch import BOTTLENECK, BackboneArch
from jdsearch.spec.detector import PAPER_RESOLUTIONS, DetectorSpec, InputSpec, RoISpec, RPNSpec

__all__ = [
    "TOLERANCE",
    "DetectionCheck",
    "Imported",
    "architecture",
    "check_images",
    "check_size",
    "compare_detections",
    "compare_settings",
    "convert",
    "family_name",
    "import_torchvision",
    "match_detections",
    "scaled_size",
    "spec_from_torchvision",
]

TOLERANCE = 1e-4  # largest box-coordinate or score difference two agreeing detections may have
CHECK_SHORT = 320  # the check's short side at most (float64 on a CPU: seconds, not minutes)
_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)
_RETURN_LAYERS = {f"layer{i + 1}": str(i) for i in range(4)}
_LEGACY = (  # torchvision < 0.13 names, which its own loaders still upgrade
    (re.compile(r"rpn\.head\.conv\.(weight|bias)"), r"rpn.head.conv.0.0.\1"),
    (
        re.compile(r"backbone\.fpn\.(inner|layer)_blocks\.(\d)\.(weight|bias)"),
        r"backbone.fpn.\1_blocks.\2.0.\3",
    ),
)
_REQUIRED = (
    "backbone.fpn.layer_blocks.0.0.weight",
    "rpn.head.cls_logits.weight",
    "roi_heads.box_head.fc6.weight",
    "roi_heads.box_predictor.cls_score.weight",
)
_V2 = (
    "a fasterrcnn_resnet50_fpn_v2 (conv+BN RPN head, 4-conv box head, normalised FPN) is not "
    "supported: jdsearch imports the v1 layout (fasterrcnn_resnet50_fpn, resnet_fpn_backbone)"
)


def _normalise(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for name, t in tensors.items():
        for pattern, new in _LEGACY:
            name = pattern.sub(new, name) if pattern.fullmatch(name) else name
        out[name] = t
    return out


def _refuse_unsupported(sd: Mapping[str, Tensor], source: str) -> None:
    """One line naming what the file has that jdsearch cannot build."""

    def has(pattern: str) -> bool:
        return any(re.match(pattern, k) for k in sd)

    v2 = (
        r"rpn\.head\.conv\.(0\.1|1)\.",
        r"roi_heads\.box_head\.\d",
        r"backbone\.fpn\.\w+_blocks\.\d\.1\.",
    )
    if any(has(p) for p in v2):
        raise CheckpointError(f"{source}: {_V2}")
    for pattern, what in (
        (r"roi_heads\.(mask|keypoint)_", "Mask/Keypoint R-CNN heads"),
        (r"backbone\.fpn\.extra_blocks\.", "an FPN with learned extra levels (P6/P7)"),
        (r"roi_heads\.box_head\.(?!fc6\.|fc7\.)", "a box head other than TwoMLPHead"),
    ):
        if has(pattern):
            raise CheckpointError(
                f"{source}: {what} not supported (jdsearch builds Faster R-CNN v1)"
            )
    missing = [k for k in _REQUIRED if k not in sd]
    if not has(r"backbone\.body\.") or missing:
        raise CheckpointError(
            f"{source}: not a torchvision Faster R-CNN state_dict (no "
            f"{missing[0] if missing else 'backbone.body.*'} tensor)"
        )


def architecture(sd: Mapping[str, Tensor], source: str) -> tuple[BackboneArch, int, RoISpec]:
    """Body and FPN, number of classes and box-head sizes of a torchvision Faster R-CNN state
    dict, from the tensor shapes (:class:`CheckpointError` for what jdsearch cannot build)."""
    fpn = int(sd["backbone.fpn.layer_blocks.0.0.weight"].shape[0])
    arch = body_arch(body_tensors(sd), fpn=fpn, source=source)
    n = len({k.split(".")[3] for k in sd if k.startswith("backbone.fpn.inner_blocks.")})
    if n != 4:
        raise CheckpointError(
            f"{source}: an FPN over {n} stages is not supported (jdsearch's FPN takes all four: "
            "returned_layers=[1, 2, 3, 4])"
        )
    rep, flat = sd["roi_heads.box_head.fc6.weight"].shape
    pool = math.isqrt(int(flat) // fpn)
    if pool * pool * fpn != flat:
        raise CheckpointError(
            f"{source}: roi_heads.box_head.fc6.weight {tuple(sd['roi_heads.box_head.fc6.weight'].shape)} "
            f"takes no square RoI of {fpn} channels"
        )
    num_classes = int(sd["roi_heads.box_predictor.cls_score.weight"].shape[0])
    return arch, num_classes, RoISpec(representation_size=int(rep), pool_size=pool)


def _check(ok: bool, source: str, what: str) -> None:
    if not ok:
        raise CheckpointError(f"{source}: {what} is not supported by jdsearch's Faster R-CNN")


def _rpn_settings(model: nn.Module, source: str) -> RPNSpec:
    rpn = model.rpn
    sizes, ratios = rpn.anchor_generator.sizes, rpn.anchor_generator.aspect_ratios
    _check(all(len(s) == 1 for s in sizes), source, "more than one anchor size per FPN level")
    _check(len(set(map(tuple, ratios))) == 1, source, "aspect ratios that differ between levels")
    _check(rpn.score_thresh == 0.0, source, f"an RPN score threshold ({rpn.score_thresh})")
    _check(tuple(rpn.box_coder.weights) == (1.0,) * 4, source, "RPN box-coder weights")
    pre, post = rpn_pre_nms_top_n(rpn), rpn_post_nms_top_n(rpn)
    return RPNSpec(
        anchor_sizes=tuple(int(s[0]) for s in sizes),
        aspect_ratios=tuple(float(r) for r in ratios[0]),
        pre_nms_top_n_train=int(pre["training"]),
        pre_nms_top_n_test=int(pre["testing"]),
        post_nms_top_n_train=int(post["training"]),
        post_nms_top_n_test=int(post["testing"]),
        nms_thresh=float(rpn.nms_thresh),
        fg_iou_thresh=float(rpn.proposal_matcher.high_threshold),
        bg_iou_thresh=float(rpn.proposal_matcher.low_threshold),
        batch_size_per_image=int(rpn.fg_bg_sampler.batch_size_per_image),
        positive_fraction=float(rpn.fg_bg_sampler.positive_fraction),
    )


def _roi_settings(model: nn.Module, shapes: RoISpec, source: str) -> RoISpec:
    heads, pool = model.roi_heads, model.roi_heads.box_roi_pool
    _check(
        list(pool.featmap_names) == ["0", "1", "2", "3"], source, "RoI pooling over other levels"
    )
    _check(tuple(pool.output_size) == (shapes.pool_size,) * 2, source, "a non-square RoI pool")
    _check(tuple(heads.box_coder.weights) == (10.0, 10.0, 5.0, 5.0), source, "box-coder weights")
    return dataclasses.replace(
        shapes,
        sampling_ratio=int(pool.sampling_ratio),
        batch_size_per_image=int(heads.fg_bg_sampler.batch_size_per_image),
        positive_fraction=float(heads.fg_bg_sampler.positive_fraction),
        fg_iou_thresh=float(heads.proposal_matcher.high_threshold),
        bg_iou_thresh=float(heads.proposal_matcher.low_threshold),
        score_thresh=float(heads.score_thresh),
        nms_thresh=float(heads.nms_thresh),
        detections_per_img=int(heads.detections_per_img),
    )


def _input_settings(model: nn.Module, base: InputSpec | None, source: str) -> InputSpec:
    t = model.transform
    _check(t.fixed_size is None and not skips_resize(t), source, "a fixed-size transform")
    size = Resolution(int(t.max_size), int(t.min_size[-1]))
    if base is not None:
        resolutions = base.resolutions
    else:
        resolutions = PAPER_RESOLUTIONS if size in PAPER_RESOLUTIONS else (size,)
    return InputSpec(
        size=size,
        resolutions=tuple(resolutions),
        image_mean=tuple(float(v) for v in t.image_mean),
        image_std=tuple(float(v) for v in t.image_std),
        size_divisible=int(t.size_divisible),
    )


def family_name(arch: BackboneArch) -> str:
    """``r50-fpn``, ``x101-32x4d-fpn``…: the name torchvision's ResNet of ``arch`` goes by."""
    per_block = 3 if arch.kind == BOTTLENECK else 2
    depth = per_block * arch.num_blocks() + 2
    b = arch.stages[0].blocks[0]
    if b.groups > 1:
        return f"x{depth}-{b.groups}x{b.channels[0] // b.groups}d-fpn"
    if arch.kind == BOTTLENECK and b.channels[0] != arch.stem:  # wide_resnet50_2: 128 = 2 × 64
        return f"wide-r{depth}-{b.channels[0] // arch.stem}-fpn"
    return f"r{depth}-fpn"


def spec_from_torchvision(
    weights: WeightsFile, arch: DetectorSpec | None = None
) -> tuple[DetectorSpec, dict[str, Tensor]]:
    """The jdsearch spec of a torchvision Faster R-CNN file, and its (renamed) tensors.

    Args:
        weights: the file as :func:`~jdsearch.models.torchvision_body.read_weights_file` read it.
        arch: a detector spec whose name, resolutions and (for a state dict) RPN, RoI and input
            settings are used; its backbone must fit the file (checked when converting).

    Returns:
        The spec (classes included) and the state dict with legacy names upgraded.

    Raises:
        CheckpointError: a layout jdsearch cannot build, named in one line (the v2 model, a
            mask head, an FPN over three stages, a non-ResNet body, several anchor sizes…).
    """
    source = weights.source
    sd = _normalise(weights.tensors)
    _refuse_unsupported(sd, source)
    body, num_classes, shapes = architecture(sd, source)
    base = arch or DetectorSpec(name=family_name(body), arch=body)
    rpn, inputs = base.rpn, base.input
    roi = dataclasses.replace(
        base.roi, representation_size=shapes.representation_size, pool_size=shapes.pool_size
    )
    if weights.model is not None:
        rpn = _rpn_settings(weights.model, source)
        roi = _roi_settings(weights.model, shapes, source)
        inputs = _input_settings(weights.model, arch.input if arch else None, source)
    anchors = int(sd["rpn.head.cls_logits.weight"].shape[0])
    if anchors != len(rpn.aspect_ratios):
        raise CheckpointError(
            f"{source}: the RPN head predicts {anchors} anchors per location but the spec has "
            f"{len(rpn.aspect_ratios)} aspect ratios (one anchor size per level)"
        )
    spec = dataclasses.replace(
        base, rpn=rpn, roi=roi, input=inputs, num_classes=num_classes, source=source
    )
    return spec, sd


# ---------------------------------------------------------------------- conversion
def convert(sd: Mapping[str, Tensor], spec: DetectorSpec, source: str) -> Detector:
    """The jdsearch detector of ``spec`` holding the torchvision state dict ``sd`` (body renamed,
    ``FrozenBatchNorm2d`` buffers into trainable ``BatchNorm2d``), in eval mode.

    Raises:
        CheckpointError: a tensor that does not fit, or is left over (one line, both shapes).
    """
    assert spec.num_classes is not None
    detector = build_detector(spec, spec.num_classes)
    what = f"spec {spec.name}"
    body_state, unmapped = map_body(
        body_tensors(sd), detector.backbone.body.state_dict(), source=source, spec_name=what
    )
    if unmapped:
        raise CheckpointError(f"{source}: {BODY}{unmapped[0]} has no place in {what}")
    state = {k: v for k, v in sd.items() if not k.startswith(BODY)}
    state.update({BODY + k: v for k, v in body_state.items()})
    load_weights_exactly(detector, state, source=source, what=what)
    return detector.eval()


def _reference(sd: Mapping[str, Tensor], detector: Detector, source: str) -> nn.Module:
    """The source model rebuilt from a state dict: ``detector`` with torchvision's ResNet body
    (``FrozenBatchNorm2d`` unless the file has BN counters) and the file's tensors as they are."""
    arch = detector.arch
    first = arch.stages[0].blocks[0]
    frozen = not any(k.startswith(BODY) and k.endswith("num_batches_tracked") for k in sd)
    resnet = tv_resnet.ResNet(
        tv_resnet.Bottleneck if arch.kind == BOTTLENECK else tv_resnet.BasicBlock,
        list(arch.depths),
        groups=first.groups,
        width_per_group=first.channels[0] // first.groups if arch.kind == BOTTLENECK else 64,
        norm_layer=FrozenBatchNorm2d if frozen else nn.BatchNorm2d,
    )
    reference = copy.deepcopy(detector)
    reference.backbone.body = IntermediateLayerGetter(resnet, _RETURN_LAYERS)
    what = "torchvision's ResNet of the same depths and widths"
    load_weights_exactly(reference, sd, source=source, what=what)
    return reference.eval()


# ---------------------------------------------------------------------- the check
@dataclass(frozen=True)
class DetectionCheck:
    """Both models' detections on ``images`` images: how many, and the largest differences."""

    images: int
    detections: int
    max_box_diff: float
    max_score_diff: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (recorded in the imported checkpoint's ``extra``)."""
        return dataclasses.asdict(self)


def check_size(spec: DetectorSpec, short: int = CHECK_SHORT) -> Resolution:
    """The size the check runs at: the spec's input size, scaled down to a short side of at most
    ``short`` pixels (the weights are what is checked; the settings are compared one by one)."""
    return scaled_size(spec.input.size, short)


def scaled_size(size: Resolution, short: int = CHECK_SHORT) -> Resolution:
    """``size`` scaled down (aspect ratio kept) to a short side of at most ``short`` pixels."""
    if size.short <= short:
        return size
    return Resolution(max(short, round(size.long * short / size.short)), short)


def check_images(size: Resolution, n: int, seed: int = 0) -> list[Tensor]:
    """``n`` smooth random images (blobs, not noise) of ``size``, landscape and portrait in
    turn."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        hw = (size.short, size.long) if i % 2 == 0 else (size.long, size.short)
        coarse = torch.rand(1, 3, 6, 8, generator=g)
        img = F.interpolate(coarse, size=hw, mode="bilinear", align_corners=False)[0]
        out.append((img + 0.05 * torch.rand(img.shape, generator=g)).clamp(0, 1))
    return out


def _settings(model: nn.Module) -> dict[str, Any]:
    """What a Faster R-CNN does at inference besides its weights, in comparable form."""
    t, rpn, heads = model.transform, model.rpn, model.roi_heads
    pool = heads.box_roi_pool
    values = {
        "transform min_size": t.min_size[-1],
        "transform max_size": t.max_size,
        "image_mean": t.image_mean,
        "image_std": t.image_std,
        "size_divisible": t.size_divisible,
        "anchor sizes": rpn.anchor_generator.sizes,
        "aspect ratios": rpn.anchor_generator.aspect_ratios,
        "rpn pre_nms_top_n": rpn_pre_nms_top_n(rpn),
        "rpn post_nms_top_n": rpn_post_nms_top_n(rpn),
        "rpn nms_thresh": rpn.nms_thresh,
        "rpn score_thresh": rpn.score_thresh,
        "RoI pool": (list(pool.featmap_names), tuple(pool.output_size), pool.sampling_ratio),
        "box score_thresh": heads.score_thresh,
        "box nms_thresh": heads.nms_thresh,
        "detections_per_img": heads.detections_per_img,
        "box-coder weights": (rpn.box_coder.weights, heads.box_coder.weights),
        "BN eps": sorted({m.eps for m in model.modules() if isinstance(m, _NORMS)}),
    }
    return {k: repr(_plain(v)) for k, v in values.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return float(value) if isinstance(value, int | float) else value


def compare_settings(reference: nn.Module, detector: nn.Module, *, source: str) -> None:
    """Raise :class:`CheckpointError` naming the first inference setting (transform, anchors,
    RPN and RoI thresholds) in which the two models differ."""
    a, b = _settings(reference), _settings(detector)
    for key, value in a.items():
        if b[key] != value:
            raise CheckpointError(
                f"{source}: {key} {value} of the source became {b[key]}; nothing written"
            )


def match_detections(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], tol: float, score_tol: float | None = None
) -> tuple[bool, float, float]:
    """Whether every detection of ``a`` has one of ``b`` with its label and, within ``tol``
    (boxes, in pixels) and ``score_tol`` (scores; default ``tol``), its box and score (order
    aside), and the largest differences over the best matches."""
    if len(a["boxes"]) != len(b["boxes"]):
        return False, math.inf, math.inf
    if len(a["boxes"]) == 0:
        return True, 0.0, 0.0
    box = (a["boxes"][:, None] - b["boxes"][None]).abs().amax(-1).double()
    score = (a["scores"][:, None] - b["scores"][None]).abs().double()
    cost = torch.maximum(box / tol, score / (score_tol or tol)).masked_fill(
        a["labels"][:, None] != b["labels"][None], math.inf
    )
    best = cost.argmin(1)
    rows = torch.arange(len(best))
    ok = bool((cost[rows, best] <= 1.0).all()) and len(set(best.tolist())) == len(best)
    return ok, float(box[rows, best].max()), float(score[rows, best].max())


@torch.no_grad()
def compare_detections(
    reference: nn.Module,
    detector: nn.Module,
    images: Sequence[Tensor],
    *,
    size: Resolution | None = None,
    source: str = "<import>",
) -> DetectionCheck:
    """Run copies of both models in float64 with the RoI score threshold at 0 (and at input
    ``size``, default their own) and compare their detections, order aside.

    Returns:
        The number of detections compared and the largest box and score differences.

    Raises:
        CheckpointError: an image on which the detections differ (count, label, or a box or
            score beyond :data:`TOLERANCE`), or no detection at all to compare.
    """
    runs = []
    for model in (reference, detector):
        m = copy.deepcopy(model).double().eval()
        m.roi_heads.score_thresh = 0.0
        if size is not None:
            m.transform.min_size, m.transform.max_size = (size.short,), size.long
        runs.append(m([img.double() for img in images]))
    return agreement(zip(*runs, strict=True), len(images), source, tol=TOLERANCE)


def agreement(
    pairs: Iterable[tuple[Mapping[str, Tensor], Mapping[str, Tensor]]],
    images: int,
    source: str,
    *,
    tol: float,
    score_tol: float | None = None,
    names: tuple[str, str, str] = ("the converted detector", "the source", "the source"),
) -> DetectionCheck:
    """The :class:`DetectionCheck` of the reference's and the converted detector's detections on
    each check image (``pairs``: reference first), compared by :func:`match_detections`.
    ``names``: the converted detector, the reference, the reference as a subject.

    Raises:
        CheckpointError: an image on which they differ, or no detection at all to compare.
    """
    converted, reference, subject = names
    total, worst_box, worst_score = 0, 0.0, 0.0
    for i, (a, b) in enumerate(pairs):
        ok, box, score = match_detections(a, b, tol, score_tol)
        if not ok:
            raise CheckpointError(
                f"{source}: {converted} disagrees with {reference} on check image {i} "
                f"({len(a['boxes'])} vs {len(b['boxes'])} detections, box diff {box:.3g}, score "
                f"diff {score:.3g}); nothing written"
            )
        total += len(a["boxes"])
        worst_box, worst_score = max(worst_box, box), max(worst_score, score)
    if total == 0:  # agreeing on nothing proves nothing
        raise CheckpointError(
            f"{source}: {subject} detects nothing on the check images even at score 0, so the "
            "conversion cannot be verified; nothing written"
        )
    return DetectionCheck(images, total, worst_box, worst_score)


@dataclass(frozen=True)
class Imported:
    """A converted, checked detector; ``kind`` is ``"model"`` or ``"state_dict"``."""

    detector: Detector
    spec: DetectorSpec
    kind: str
    check: DetectionCheck
    source: str
    kept_ids: tuple[int, ...] = ()  # outputs kept when the file's are indexed by category id

    def record(self) -> dict[str, Any]:
        """What the checkpoint's ``extra`` keeps of the import."""
        out = {"from": self.source, "kind": self.kind, "check": self.check.to_dict()}
        return {**out, "kept_category_ids": list(self.kept_ids)} if self.kept_ids else out


def by_category_id(category_ids: Sequence[int] | None, num_classes: int) -> bool:
    """Whether a detector of ``num_classes`` outputs indexes them by ``category_ids`` (as
    torchvision's COCO models do: 91 outputs for ids up to 90) rather than numbering the
    dataset's K classes 1..K."""
    ids = list(category_ids or ())
    return bool(ids) and len(ids) != num_classes - 1 and max(ids) < num_classes


def import_torchvision(
    path: str | Path,
    *,
    arch: DetectorSpec | None = None,
    class_names: Sequence[str] | None = None,
    category_ids: Sequence[int] | None = None,
    images: int = 2,
    seed: int = 0,
) -> Imported:
    """Convert a torchvision Faster R-CNN file into a jdsearch detector and check it.

    Args:
        path: a ``state_dict`` or pickled-model file (``weights_only=True``; see
            :func:`~jdsearch.models.torchvision_body.read_weights_file`).
        arch: a detector spec to take the name and settings from (see
            :func:`spec_from_torchvision`); default: read from the file.
        class_names: checked against the file's classes (K foreground names, or K+1).
        category_ids: the dataset's category ids, in label order; when the file has more
            outputs than classes and every id is one of them, its outputs are indexed by id
            and only these are kept (:func:`keep_classes`), after the check.
        images: check images both models run on.
        seed: of the check images.

    Returns:
        The float32 detector in eval mode, its spec, the source kind and the check's numbers.

    Raises:
        CheckpointError: an unreadable or unsupported file, tensors that do not fit, the wrong
            number of class names, or detections that disagree.
    """
    if images < 1:
        raise CheckpointError(f"{path}: the check needs at least one image, got {images}")
    weights = read_weights_file(path)
    spec, sd = spec_from_torchvision(weights, arch)
    n = spec.num_classes
    assert n is not None
    by_id = by_category_id(category_ids, n)
    if class_names is not None and not by_id and len(class_names) not in (n, n - 1):
        raise CheckpointError(
            f"{weights.source}: {len(class_names)} class names for a detector with {n - 1} "
            f"classes (give {n - 1} names, or {n} with the background)"
        )
    detector = convert(sd, spec, weights.source)
    reference = (
        weights.model if weights.model is not None else _reference(sd, detector, weights.source)
    )
    compare_settings(reference, detector, source=weights.source)
    size = check_size(spec)
    check = compare_detections(
        reference, detector, check_images(size, images, seed), size=size, source=weights.source
    )
    kind = "model" if weights.model is not None else "state_dict"
    if not by_id:
        return Imported(detector, detector.spec, kind, check, weights.source)
    kept = tuple(int(i) for i in category_ids or ())
    detector = keep_classes(detector, kept, source=weights.source)
    return Imported(detector, detector.spec, kind, check, weights.source, kept)


@torch.no_grad()
def keep_classes(detector: Detector, labels: Sequence[int], *, source: str = "") -> Detector:
    """A copy of ``detector`` whose classes are its ``labels`` rows, in that order, after the
    background: a model whose outputs are indexed by category id (torchvision's COCO models have
    91, for 80 categories with ids up to 90) becomes one of K classes numbered 1..K in id order,
    as a study's data numbers them. The kept classes' logits and box deltas are the source's
    rows unchanged; the softmax then runs over the kept classes only.

    Raises:
        CheckpointError: a label that is the background, repeated or not an output.
    """
    n = detector.spec.num_classes
    assert n is not None
    bad = [k for k in labels if not 1 <= k < n]
    if bad or len(set(labels)) != len(labels):
        why = f"outputs 1..{n - 1}" if bad else "distinct labels"
        raise CheckpointError(f"{source}: cannot keep classes {list(labels)}: expected {why}")
    rows = torch.tensor([0, *labels])
    boxes = (rows[:, None] * 4 + torch.arange(4)).flatten()
    out = build_detector(detector.spec, len(rows))
    state = detector.state_dict()
    for layer, index in (("cls_score", rows), ("bbox_pred", boxes)):
        for p in ("weight", "bias"):
            key = f"roi_heads.box_predictor.{layer}.{p}"
            state[key] = state[key][index].clone()
    out.load_state_dict(state)
    return out.eval()
