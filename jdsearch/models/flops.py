"""Multiply-add ("FLOPs") counting of a built detector, total, per part and per backbone stage,
with mmcv's convention (it reproduces the paper's tables to ≤ 0.1 %). The count runs on the meta
device and never touches the weights. How and why: ``docs/search.md``, "Complexity".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torchvision.ops.misc import FrozenBatchNorm2d

from jdsearch.core.errors import JDSearchError
from jdsearch.models.torch_internals import BATCH_NORM_BASE, INSTANCE_NORM_BASE

log = logging.getLogger(__name__)

COCO_NUM_CLASSES = 81  # 80 classes + background: the paper's (and the default CLI's) head size

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (
    BATCH_NORM_BASE,
    nn.GroupNorm,
    nn.LayerNorm,
    INSTANCE_NORM_BASE,
    FrozenBatchNorm2d,
)
_ACT = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU)
_POOL = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveAvgPool2d,
)
# Leaf modules that hold parameters but cost nothing under the convention (lookup tables).
_FREE = (nn.Embedding,)


@dataclass(frozen=True)
class FlopsReport:
    """Multiply-adds of one detector at one input size (all counts are plain ints).

    ``backbone`` is the ResNet body incl. the stem, ``per_stage`` splits it as (stem, stage 1..4) and
    sums to it; ``backbone + fpn + rpn + roi_heads == total``. ``elementwise`` is the part of
    ``total`` that is not conv/linear weight MACs (conv bias, norm, activation, pooling).
    """

    name: str
    size: tuple[int, int]  # (h, w) of the counted input
    num_rois: int
    total: int
    backbone: int
    per_stage: tuple[int, ...]
    fpn: int
    rpn: int
    roi_heads: int
    elementwise: int
    params: int
    backbone_params: int

    @property
    def gflops(self) -> float:
        """``total`` in billions of multiply-adds."""
        return self.total / 1e9

    @property
    def backbone_gflops(self) -> float:
        """``backbone`` in billions of multiply-adds."""
        return self.backbone / 1e9

    @property
    def per_stage_gflops(self) -> tuple[float, ...]:
        """``per_stage`` in billions of multiply-adds."""
        return tuple(s / 1e9 for s in self.per_stage)

    @property
    def mparams(self) -> float:
        """``params`` in millions."""
        return self.params / 1e6

    @property
    def backbone_mparams(self) -> float:
        """``backbone_params`` in millions."""
        return self.backbone_params / 1e6

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form: every field plus ``gflops`` / ``backbone_gflops``."""
        d = asdict(self)
        d["size"] = list(self.size)
        d["per_stage"] = list(self.per_stage)
        d["gflops"] = self.gflops
        d["backbone_gflops"] = self.backbone_gflops
        return d


# ---------------------------------------------------------------------------- the hooked pass
class _Tally:
    """Per-module-name ``[weight MACs, elementwise ops]``, accumulated over calls."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        self.uncounted: set[str] = set()

    def add(self, name: str, weights: int, elementwise: int) -> None:
        c = self.counts.setdefault(name, [0, 0])
        c[0] += int(weights)
        c[1] += int(elementwise)

    def total(self, prefix: str = "") -> int:
        return sum(w + e for n, (w, e) in self.counts.items() if _under(n, prefix))

    def elementwise(self) -> int:
        return sum(e for _, e in self.counts.values())


def _under(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def _module_cost(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> tuple[int, int] | None:
    """(weight MACs, elementwise ops) of one call, or None for a module the convention ignores."""
    if isinstance(m, _CONV):
        k = 1
        for s in m.kernel_size:
            k *= s
        per_out = k * (m.in_channels // m.groups)
        return output.numel() * per_out, output.numel() if m.bias is not None else 0
    if isinstance(m, nn.Linear):
        return inputs[0].numel() * m.out_features, 0
    if isinstance(m, _NORM):
        affine = isinstance(m, FrozenBatchNorm2d) or bool(
            getattr(m, "affine", getattr(m, "elementwise_affine", False))
        )
        return 0, inputs[0].numel() * (2 if affine else 1)
    if isinstance(m, _ACT):
        return 0, output.numel()
    if isinstance(m, _POOL):
        return 0, inputs[0].numel()
    if isinstance(m, nn.Upsample):
        return 0, output.numel()
    return None


def _make_hook(tally: _Tally, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        cost = _module_cost(module, inputs, output)
        if cost is None:
            if any(True for _ in module.parameters(recurse=False)) and not isinstance(
                module, _FREE
            ):
                tally.uncounted.add(f"{name} ({type(module).__name__})")
            return
        tally.add(name, *cost)

    return hook


@contextmanager
def _hooked(model: nn.Module, tally: _Tally) -> Iterator[None]:
    handles = []
    try:
        for name, m in model.named_modules():
            if next(m.children(), None) is None:  # leaf modules only: no double counting
                handles.append(m.register_forward_hook(_make_hook(tally, name)))
        yield
    finally:
        for h in handles:
            h.remove()
    if tally.uncounted:
        log.warning(
            "flops: modules with parameters not counted: %s", ", ".join(sorted(tally.uncounted))
        )


def _meta_call(module: nn.Module, *args: Any) -> Any:
    """Run ``module`` with meta stand-ins for its parameters and buffers (its own are untouched)."""
    state = {
        k: torch.empty_like(v, device="meta") for k, v in module.state_dict(keep_vars=True).items()
    }
    return functional_call(module, state, args, strict=False)


def _dtype(module: nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise JDSearchError(f"flops: size must be (height, width), got {size!r}") from None
    if h <= 0 or w <= 0 or (h, w) != tuple(size):
        raise JDSearchError(
            f"flops: size must be two positive integers (height, width), got {size!r}"
        )
    return h, w


# ---------------------------------------------------------------------------- public API
def count_module(module: nn.Module, *input_shapes: Sequence[int]) -> int:
    """Multiply-adds (same convention) of one forward of ``module`` on inputs of these shapes."""
    tally = _Tally()
    dtype = _dtype(module)
    with torch.no_grad(), _hooked(module, tally):
        _meta_call(module, *(torch.empty(*s, device="meta", dtype=dtype) for s in input_shapes))
    return tally.total()


def count_flops(
    detector: nn.Module,
    size: Sequence[int] | None = None,
    *,
    num_rois: int | None = None,
) -> FlopsReport:
    """Count the multiply-adds of a built detector on a ``1×3×h×w`` input.

    Args:
        detector: a jdsearch :class:`~jdsearch.models.detector.Detector`, on any device
            (``meta`` included); do not count it while it runs a forward elsewhere.
        size: ``(h, w)``; default the spec's base size as ``(long, short)``.
        num_rois: the box head's batch; default the spec's ``rpn.post_nms_top_n_test``.

    Returns:
        The total, per part (backbone stem and stages, FPN, RPN, RoI head) and the parameters.

    Raises:
        JDSearchError: ``size`` is not two positive integers, or ``num_rois`` is negative.

    Example:
        ``count_flops(det, size=(800, 1333)).total / 1e9`` is 215.84 for R50-FPN (paper: 215.8).
    """
    spec = getattr(detector, "spec", None)
    if size is None:
        assert spec is not None, "count_flops: a detector without a spec needs an explicit size"
        size = (spec.input.size.long, spec.input.size.short)
    h, w = _check_size(size)
    if num_rois is None:
        assert spec is not None, "count_flops: a detector without a spec needs num_rois"
        num_rois = spec.rpn.post_nms_top_n_test
    if num_rois < 0:
        raise JDSearchError(f"flops: num_rois must be >= 0, got {num_rois}")

    tally = _trace(detector, h, w, num_rois)
    body = detector.backbone.body
    stages = [tally.total(f"backbone.body.stages.{i}") for i in range(len(body.stages))]
    per_stage = (tally.total("backbone.body.stem"), *stages)
    report = FlopsReport(
        name=spec.name if spec is not None else type(detector).__name__,
        size=(h, w),
        num_rois=num_rois,
        total=tally.total(),
        backbone=tally.total("backbone.body"),
        per_stage=per_stage,
        fpn=tally.total("backbone.fpn"),
        rpn=tally.total("rpn"),
        roi_heads=tally.total("roi_heads"),
        elementwise=tally.elementwise(),
        params=sum(p.numel() for p in detector.parameters()),
        backbone_params=sum(p.numel() for p in body.parameters()),
    )
    assert sum(report.per_stage) == report.backbone, "flops: body modules outside stem/stages"
    assert report.backbone + report.fpn + report.rpn + report.roi_heads == report.total, (
        "flops: counted modules outside backbone/rpn/roi_heads"
    )
    return report


def _trace(detector: nn.Module, h: int, w: int, num_rois: int) -> _Tally:
    """Run the detector's parts on the meta device with counting hooks: backbone and RPN head on
    the image, box head and predictor on ``num_rois`` pooled RoIs."""
    backbone, roi_heads = detector.backbone, detector.roi_heads
    tally = _Tally()
    dtype = _dtype(detector)
    with torch.no_grad(), _hooked(detector, tally):
        feats = _meta_call(backbone, torch.empty(1, 3, h, w, device="meta", dtype=dtype))
        _meta_call(detector.rpn.head, list(feats.values()))
        if num_rois:
            ph, pw = roi_heads.box_roi_pool.output_size
            pooled = torch.empty(
                num_rois, backbone.out_channels, ph, pw, device="meta", dtype=dtype
            )
            _meta_call(roi_heads.box_predictor, _meta_call(roi_heads.box_head, pooled))
    return tally


def count_spec_flops(
    spec: Any,
    size: Sequence[int] | None = None,
    *,
    num_classes: int | None = None,
    num_rois: int | None = None,
) -> FlopsReport:
    """Build the spec's detector on the ``meta`` device (no weights allocated) and count it.

    Args:
        spec: a :class:`~jdsearch.spec.detector.DetectorSpec`.
        size: ``(h, w)``; default the spec's base size.
        num_classes: classes including the background; default the spec's, else COCO's 81.
        num_rois: as in :func:`count_flops`.

    Returns:
        As :func:`count_flops`.

    Raises:
        JDSearchError: as :func:`count_flops`.
    """
    from jdsearch.models.detector import build_detector

    n = num_classes if num_classes is not None else (spec.num_classes or COCO_NUM_CLASSES)
    with torch.device("meta"):
        detector = build_detector(spec, n)
    return count_flops(detector, size, num_rois=num_rois)


def format_report(report: FlopsReport) -> str:
    """A short human table: GFLOPs and share per part and per backbone stage, then parameters."""
    h, w = report.size
    total = report.total or 1
    rows: list[tuple[str, int]] = [("backbone", report.backbone)]
    labels = ["stem"] + [f"stage {i}" for i in range(1, len(report.per_stage))]
    rows += [(f"  {lab}", v) for lab, v in zip(labels, report.per_stage, strict=True)]
    rows += [("fpn", report.fpn), ("rpn head", report.rpn), ("roi heads", report.roi_heads)]
    lines = [
        f"{report.name}: input {h}x{w} (h x w), {report.num_rois} RoIs, multiply-adds",
        f"{'part':<12}{'GFLOPs':>10}{'share':>9}",
    ]
    lines += [f"{lab:<12}{v / 1e9:>10.2f}{100 * v / total:>8.1f}%" for lab, v in rows]
    lines.append(f"{'total':<12}{report.gflops:>10.2f}{100.0 if report.total else 0.0:>8.1f}%")
    lines.append(f"params: {report.mparams:.2f} M (backbone {report.backbone_mparams:.2f} M)")
    return "\n".join(lines)
