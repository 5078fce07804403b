"""Detector specs: YAML files in ``detectors/`` → typed, validated, immutable values.

A detector spec names the backbone (a uniform ResNet/ResNeXt recipe or an explicit appendix-B
encoding), the FPN width, the RPN and RoI-head settings and the input sizes. Every key is checked
by the config layer (:mod:`jdsearch.core.config`): an unknown key, a wrong type or an impossible value
raises :class:`SpecError` naming the file and the dotted field, e.g.
``detectors/r50-fpn.yaml: rpn.anchor_sizes: expected 5 levels (P2–P6), got 4``. Torch-free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jdsearch.core.config import (
    MISSING,
    Fields,
    check,
    plain,
    preset_dir,
    read_dataclass,
    read_yaml,
)
from jdsearch.core.errors import SpecError
from jdsearch.core.limits import MAX_NUM_CLASSES
from jdsearch.core.resolution import Resolution
from jdsearch.spec.arch import BASIC, BOTTLENECK, BackboneArch

__all__ = [
    "DETECTORS_DIR",
    "PAPER_RESOLUTIONS",
    "PAPER_SIZE",
    "DetectorSpec",
    "InputSpec",
    "RPNSpec",
    "RoISpec",
    "load_spec",
    "spec_from_dict",
]

DETECTORS_DIR = preset_dir("detectors")  # the presets (top-level detectors/, or the wheel's copy)
FPN_LEVELS = 5  # P2..P6: four stage outputs plus the max-pooled extra level
# The paper's base resolution and dynamic-resolution set (appendix A.1.3).
PAPER_SIZE = Resolution(1333, 800)
PAPER_RESOLUTIONS = (Resolution(512, 512), Resolution(800, 600), Resolution(1080, 720), PAPER_SIZE)
# Fields of the RPN and RoI-head specs that are fractions or IoU thresholds; the others are sizes.
_FRACTIONS = ("nms_thresh", "fg_iou_thresh", "bg_iou_thresh", "score_thresh", "positive_fraction")
# Fields that may be 0 (RoIAlign's sampling ratio 0: adaptive, as detectron2's default).
_COUNTS = ("sampling_ratio",)
# Options added after the first checkpoints: written out only when set otherwise than by default,
# so that the spec of every earlier detector (and every cache keyed on it) stays as it was.
_OPTIONS = {"round_anchors": True, "fixed_anchor_strides": False, "aligned": False}


def _check_heads(spec: Any) -> None:
    """Sizes positive, fractions and thresholds in [0, 1] (the RPN and RoI-head specs)."""
    for fd in dataclasses.fields(spec):
        value = getattr(spec, fd.name)
        values = value if isinstance(value, tuple) else (value,)
        if fd.name in _OPTIONS:
            check(isinstance(value, bool), spec, fd.name, "must be true or false")
        elif fd.name in _COUNTS:
            check(value >= 0, spec, fd.name, "must be 0 (adaptive) or more")
        elif fd.name in _FRACTIONS:
            check(0.0 <= value <= 1.0, spec, fd.name, "must lie in [0, 1]")
        else:
            check(bool(values) and all(v > 0 for v in values), spec, fd.name, "must be positive")


@dataclass(frozen=True)
class RPNSpec:
    """RPN settings (torchvision's ``rpn_*`` arguments), one anchor size per FPN level. Raises
    :class:`FieldError` for a fraction or threshold outside [0, 1], any other value that is not
    positive, or not 5 anchor sizes.

    ``round_anchors`` rounds the cell anchors' corners to whole pixels (torchvision); detectron2
    keeps them exact. ``fixed_anchor_strides`` places the anchors of each level at the level's
    stride (4, 8, …, 64: detectron2) instead of the padded image size over the feature size
    (torchvision; for P6 of an 800-pixel side that is 61, not 64)."""

    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    round_anchors: bool = True
    fixed_anchor_strides: bool = False

    def __post_init__(self) -> None:
        _check_heads(self)
        n = len(self.anchor_sizes)
        check(n == FPN_LEVELS, self, "anchor_sizes", f"expected {FPN_LEVELS} levels (P2–P6)")


@dataclass(frozen=True)
class RoISpec:
    """RoI-head settings: pooler, box head and torchvision's ``box_*`` arguments. Raises
    :class:`FieldError` for a fraction or threshold outside [0, 1] or any other value that is not
    positive (``sampling_ratio`` may be 0: adaptive).

    ``aligned`` pools with RoIAlign's half-pixel alignment (detectron2's ``ROIAlignV2``);
    torchvision's Faster R-CNN pools without it."""

    representation_size: int = 1024
    pool_size: int = 7
    sampling_ratio: int = 2
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    aligned: bool = False

    def __post_init__(self) -> None:
        _check_heads(self)


@dataclass(frozen=True)
class InputSpec:
    """``size`` is the base resolution (R_base of the score H); ``resolutions`` the dynamic set."""

    size: Resolution = PAPER_SIZE
    resolutions: tuple[Resolution, ...] = PAPER_RESOLUTIONS
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    size_divisible: int = 32

    def __post_init__(self) -> None:
        check(bool(self.resolutions), self, "resolutions", "expected a non-empty list")
        check(len(self.image_mean) == 3, self, "image_mean", "expected 3 values (RGB)")
        check(len(self.image_std) == 3, self, "image_std", "expected 3 values (RGB)")
        check(all(s > 0 for s in self.image_std), self, "image_std", "must be positive")
        check(self.size_divisible > 0, self, "size_divisible", "must be positive")


@dataclass(frozen=True)
class DetectorSpec:
    """A detector: its backbone architecture (with the FPN width), RPN and RoI-head settings,
    input sizes and classes. Read one with :func:`load_spec`; ``with_arch`` swaps the backbone.

    Raises:
        FieldError: ``num_classes`` below 2 (it counts the background) or above
            :data:`~jdsearch.core.limits.MAX_NUM_CLASSES`.
    """

    name: str
    arch: BackboneArch
    rpn: RPNSpec = field(default_factory=RPNSpec)
    roi: RoISpec = field(default_factory=RoISpec)
    input: InputSpec = field(default_factory=InputSpec)
    num_classes: int | None = None  # including background; None: taken from the dataset
    source: str = ""  # the file it came from, for messages

    def __post_init__(self) -> None:
        ok = self.num_classes is None or self.num_classes >= 2
        check(ok, self, "num_classes", "counts the background too, so it must be ≥ 2")
        ok = self.num_classes is None or self.num_classes <= MAX_NUM_CLASSES
        check(ok, self, "num_classes", f"must be at most {MAX_NUM_CLASSES} (the background too)")

    def with_arch(self, arch: BackboneArch) -> DetectorSpec:
        """The same spec with backbone ``arch``."""
        return dataclasses.replace(self, arch=arch)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (round-trips through :func:`spec_from_dict`)."""
        return {
            "name": self.name,
            "backbone": {"arch": self.arch.to_dict()},
            "fpn": {"channels": self.arch.fpn},
            "rpn": _set_options(plain(self.rpn)),
            "roi_heads": _set_options(plain(self.roi)),
            "input": plain(self.input),
            **({"num_classes": self.num_classes} if self.num_classes is not None else {}),
        }


def _set_options(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` without the options of :data:`_OPTIONS` left at their defaults."""
    return {k: v for k, v in fields.items() if k not in _OPTIONS or _OPTIONS[k] != v}


# ---------------------------------------------------------------------- reading
def _ints(f: Fields, key: str, default: Any = None, length: int = 4) -> Any:
    """A list of ``length`` positive integers (``default`` when absent)."""
    if not f.has(key):
        return f.raw(key, default)
    values = f.take(key, tuple[int, ...])
    if len(values) != length:
        f.fail(key, f"expected {length} values, got {len(values)}")
    if any(v <= 0 for v in values):
        f.fail(key, f"must be positive, got {values!r}")
    return values


def _positive_int(f: Fields, key: str, default: int | None) -> Any:
    value = f.take(key, int | None, default)
    if value is not None and value <= 0:
        f.fail(key, f"must be positive, got {value!r}")
    return value


def _arch(f: Fields, key: str, make: Any) -> BackboneArch:
    """``make()``, with an arch error reported at ``key``."""
    try:
        return make()
    except SpecError as e:
        f.fail(key, str(e))


def _read_backbone(f: Fields, fpn: int) -> BackboneArch:
    if f.has("arch"):
        arch_dict = f.raw("arch")
        f.done()
        return _arch(f, "arch", lambda: BackboneArch.from_dict(arch_dict)).with_fpn(fpn)
    in_1x1 = f.take("stride_in_1x1", bool, False)
    return dataclasses.replace(_read_layout(f, fpn), stride_in_1x1=in_1x1)


def _read_layout(f: Fields, fpn: int) -> BackboneArch:
    """The backbone of an ``encoding`` or a uniform recipe (``kind``, ``depths``…)."""
    strides = _ints(f, "strides", (1, 2, 2, 2))
    stem = _positive_int(f, "stem", 64)
    if f.has("encoding"):
        text = f.take("encoding", str)
        gw = _ints(f, "group_width")
        f.done()
        kw = {"stem": stem, "fpn": fpn, "strides": strides, "group_width": gw}
        return _arch(f, "encoding", lambda: BackboneArch.parse(text, **kw))
    kind = f.take("kind", str)
    if kind not in (BASIC, BOTTLENECK):
        f.fail("kind", f"must be '{BASIC}' or '{BOTTLENECK}', got {kind!r}")
    kw = {
        "kind": kind,
        "depths": _ints(f, "depths", MISSING),
        "widths": _ints(f, "widths", (64, 128, 256, 512)),
        "expansion": _positive_int(f, "expansion", None),
        "groups": _positive_int(f, "groups", 1),
        "width_per_group": _positive_int(f, "width_per_group", None),
    }
    f.done()
    depths = kw.pop("depths")
    return _arch(
        f, "", lambda: BackboneArch.resnet(depths, stem=stem, fpn=fpn, **kw).with_strides(strides)
    )


def spec_from_dict(data: Any, source: str = "<spec>") -> DetectorSpec:
    """Validate a parsed YAML/JSON mapping into a :class:`DetectorSpec`.

    Raises:
        SpecError: one line naming ``source``, the dotted field and the value.
    """
    top = Fields(data, source)
    name = top.take("name", str)
    num_classes = top.take("num_classes", int | None, None)
    fpn_f = top.sub("fpn")
    fpn = _positive_int(fpn_f, "channels", 256)
    fpn_f.done()
    if not top.has("backbone"):
        top.fail("backbone", "required field is missing")
    arch = _read_backbone(top.sub("backbone"), fpn)
    rpn = read_dataclass(top.sub("rpn"), RPNSpec)
    roi = read_dataclass(top.sub("roi_heads"), RoISpec)
    inputs = read_dataclass(top.sub("input"), InputSpec)
    top.done()
    kw = {"rpn": rpn, "roi": roi, "input": inputs, "num_classes": num_classes, "source": source}
    return top.build(DetectorSpec, name=name, arch=arch, **kw)


def load_spec(path: str | Path) -> DetectorSpec:
    """Read a detector spec YAML, or a preset by name.

    Args:
        path: a YAML file, or the name of a preset in ``detectors/`` (``r50-fpn``,
            ``tiny-r18-fpn``…).

    Returns:
        The validated spec.

    Raises:
        SpecError: no such file or preset (the presets are listed), invalid YAML, or an invalid
            field, named with its dotted path and value.
    """
    p = Path(path)
    if not p.exists() and not p.suffix:
        candidate = DETECTORS_DIR / f"{p.name}.yaml"
        if candidate.exists():
            p = candidate
    if not p.exists():  # a folder or /dev/zero: read_yaml says why it is not read
        known = ", ".join(sorted(q.stem for q in DETECTORS_DIR.glob("*.yaml")))
        raise SpecError(f"{path}: no such detector spec file (presets: {known})")
    return spec_from_dict(read_yaml(p), source=str(p))
