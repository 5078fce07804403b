"""Detector specs: YAML files in ``detectors/`` → typed, validated, immutable values.

A detector spec names the backbone (a uniform ResNet/ResNeXt recipe or an explicit appendix-B
encoding), the FPN width, the RPN and RoI-head settings and the input sizes. Every key is checked:
an unknown key, a wrong type or an impossible value raises :class:`SpecError` naming the file and
the dotted field, e.g. ``detectors/r50-fpn.yaml: rpn.anchor_sizes: expected 5 levels, got 4``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jdsearch.arch import BASIC, BOTTLENECK, BackboneArch
from jdsearch.errors import SpecError
from jdsearch.resolution import Resolution

DETECTORS_DIR = Path(__file__).resolve().parent.parent / "detectors"
FPN_LEVELS = 5  # P2..P6: four stage outputs plus the max-pooled extra level
# The paper's base resolution and dynamic-resolution set (appendix A.1.3).
PAPER_SIZE = Resolution(1333, 800)
PAPER_RESOLUTIONS = (Resolution(512, 512), Resolution(800, 600), Resolution(1080, 720), PAPER_SIZE)


@dataclass(frozen=True)
class RPNSpec:
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


@dataclass(frozen=True)
class RoISpec:
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


@dataclass(frozen=True)
class InputSpec:
    """``size`` is the base resolution (R_base of the score H); ``resolutions`` the dynamic set."""

    size: Resolution = PAPER_SIZE
    resolutions: tuple[Resolution, ...] = PAPER_RESOLUTIONS
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisible: int = 32


@dataclass(frozen=True)
class DetectorSpec:
    name: str
    arch: BackboneArch
    rpn: RPNSpec = field(default_factory=RPNSpec)
    roi: RoISpec = field(default_factory=RoISpec)
    input: InputSpec = field(default_factory=InputSpec)
    num_classes: int | None = None  # including background; None: taken from the dataset
    source: str = ""  # the file it came from, for messages

    def with_arch(self, arch: BackboneArch) -> DetectorSpec:
        return dataclasses.replace(self, arch=arch)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (round-trips through :func:`spec_from_dict`)."""
        return {
            "name": self.name,
            "backbone": {"arch": self.arch.to_dict()},
            "fpn": {"channels": self.arch.fpn},
            "rpn": _dc_to_dict(self.rpn),
            "roi_heads": _dc_to_dict(self.roi),
            "input": {
                "size": str(self.input.size),
                "resolutions": [str(r) for r in self.input.resolutions],
                "image_mean": list(self.input.image_mean),
                "image_std": list(self.input.image_std),
                "size_divisible": self.input.size_divisible,
            },
            **({"num_classes": self.num_classes} if self.num_classes is not None else {}),
        }


def _dc_to_dict(obj: Any) -> dict[str, Any]:
    return {
        f.name: (list(v) if isinstance(v := getattr(obj, f.name), tuple) else v)
        for f in dataclasses.fields(obj)
    }


# ---------------------------------------------------------------------- reading
class _Fields:
    """Pops typed values out of one mapping and reports leftovers as unknown keys."""

    def __init__(self, source: str, prefix: str, data: Any) -> None:
        self.source, self.prefix = source, prefix
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            self.fail("", f"expected a mapping, got {type(data).__name__}")
        self.data = dict(data)

    def where(self, key: str) -> str:
        path = f"{self.prefix}.{key}" if self.prefix and key else (self.prefix or key)
        return f"{self.source}: {path}" if path else self.source

    def fail(self, key: str, msg: str) -> None:
        raise SpecError(f"{self.where(key)}: {msg}")

    def has(self, key: str) -> bool:
        return key in self.data

    def pop(self, key: str, kind: type, default: Any = dataclasses.MISSING) -> Any:
        if key not in self.data:
            if default is dataclasses.MISSING:
                self.fail(key, "required field is missing")
            return default
        value = self.data.pop(key)
        return self.check(key, value, kind)

    def check(self, key: str, value: Any, kind: type) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, bool):
            self.fail(key, f"expected an integer, got {value!r}")
        if not isinstance(value, kind):
            self.fail(key, f"expected {kind.__name__}, got {value!r}")
        return value

    def pop_list(
        self, key: str, kind: type, default: Any = dataclasses.MISSING, length: int | None = None
    ) -> Any:
        if key not in self.data:
            if default is dataclasses.MISSING:
                self.fail(key, "required field is missing")
            return default
        value = self.data.pop(key)
        if not isinstance(value, list | tuple) or not value:
            self.fail(key, f"expected a non-empty list, got {value!r}")
        if length is not None and len(value) != length:
            self.fail(key, f"expected {length} values, got {len(value)}")
        return tuple(self.check(key, v, kind) for v in value)

    def sub(self, key: str) -> _Fields:
        return _Fields(
            self.source, f"{self.prefix}.{key}" if self.prefix else key, self.data.pop(key, None)
        )

    def done(self) -> None:
        if self.data:
            self.fail(
                sorted(self.data)[0],
                f"unknown key (known keys are listed in {DETECTORS_DIR.name}/README or the spec docs)",
            )


def _positive(f: _Fields, key: str, value: Any) -> None:
    values = value if isinstance(value, tuple) else (value,)
    if any(v <= 0 for v in values):
        f.fail(key, f"must be positive, got {value!r}")


def _fill(f: _Fields, cls: type) -> Any:
    """Read every field of dataclass ``cls`` from ``f`` (types from its defaults)."""
    kwargs = {}
    for fd in dataclasses.fields(cls):
        default = getattr(cls(), fd.name)
        if isinstance(default, tuple):
            kind = type(default[0])
            kwargs[fd.name] = f.pop_list(fd.name, kind, default)
        else:
            kwargs[fd.name] = f.pop(fd.name, type(default), default)
        if fd.name not in (
            "nms_thresh",
            "fg_iou_thresh",
            "bg_iou_thresh",
            "score_thresh",
            "positive_fraction",
        ):
            _positive(f, fd.name, kwargs[fd.name])
        elif not all(0.0 <= v <= 1.0 for v in (kwargs[fd.name],)):
            f.fail(fd.name, f"must lie in [0, 1], got {kwargs[fd.name]!r}")
    f.done()
    return cls(**kwargs)


def _resolution(f: _Fields, key: str, text: Any) -> Resolution:
    if not isinstance(text, str):
        f.fail(key, f"expected a size like '1333x800', got {text!r}")
    try:
        return Resolution.parse(text)
    except SpecError as e:
        f.fail(key, str(e))
        raise  # unreachable


def _read_backbone(f: _Fields, fpn: int) -> BackboneArch:
    if f.has("arch"):
        arch_dict = f.data.pop("arch")
        f.done()
        try:
            arch = BackboneArch.from_dict(arch_dict)
        except SpecError as e:
            f.fail("arch", str(e))
        return arch.with_fpn(fpn)
    strides = f.pop_list("strides", int, (1, 2, 2, 2), length=4)
    stem = f.pop("stem", int, 64)
    _positive(f, "stem", stem)
    if f.has("encoding"):
        text = f.pop("encoding", str)
        gw = f.pop_list("group_width", int, None, length=4)
        f.done()
        try:
            return BackboneArch.parse(text, stem=stem, fpn=fpn, strides=strides, group_width=gw)
        except SpecError as e:
            f.fail("encoding", str(e))
    kind = f.pop("kind", str)
    if kind not in (BASIC, BOTTLENECK):
        f.fail("kind", f"must be '{BASIC}' or '{BOTTLENECK}', got {kind!r}")
    depths = f.pop_list("depths", int, length=4)
    widths = f.pop_list("widths", int, (64, 128, 256, 512), length=4)
    _positive(f, "depths", depths)
    _positive(f, "widths", widths)
    expansion = f.pop("expansion", int, None)
    groups = f.pop("groups", int, 1)
    width_per_group = f.pop("width_per_group", int, None)
    f.done()
    try:
        return BackboneArch.resnet(
            depths,
            kind=kind,
            widths=widths,
            expansion=expansion,
            stem=stem,
            fpn=fpn,
            groups=groups,
            width_per_group=width_per_group,
            strides=strides,
        )
    except SpecError as e:
        f.fail("", str(e))
        raise  # unreachable


def spec_from_dict(data: Any, source: str = "<spec>") -> DetectorSpec:
    """Validate a parsed YAML/JSON mapping into a :class:`DetectorSpec`."""
    top = _Fields(source, "", data)
    name = top.pop("name", str)
    num_classes = top.pop("num_classes", int, None)
    if num_classes is not None and num_classes < 2:
        top.fail("num_classes", f"counts the background too, so it must be ≥ 2, got {num_classes}")
    fpn_f = top.sub("fpn")
    fpn = fpn_f.pop("channels", int, 256)
    _positive(fpn_f, "channels", fpn)
    fpn_f.done()
    if not top.has("backbone"):
        top.fail("backbone", "required field is missing")
    arch = _read_backbone(top.sub("backbone"), fpn)
    rpn = _fill(top.sub("rpn"), RPNSpec)
    if len(rpn.anchor_sizes) != FPN_LEVELS:
        top.fail(
            "rpn.anchor_sizes", f"expected {FPN_LEVELS} levels (P2–P6), got {len(rpn.anchor_sizes)}"
        )
    roi = _fill(top.sub("roi_heads"), RoISpec)
    inp_f = top.sub("input")
    size = _resolution(inp_f, "size", inp_f.pop("size", str, "1333x800"))
    res_texts = inp_f.pop_list("resolutions", str, None)
    resolutions = (
        tuple(_resolution(inp_f, "resolutions", t) for t in res_texts)
        if res_texts
        else InputSpec().resolutions
    )
    mean = inp_f.pop_list("image_mean", float, InputSpec().image_mean, length=3)
    std = inp_f.pop_list("image_std", float, InputSpec().image_std, length=3)
    _positive(inp_f, "image_std", std)
    divisible = inp_f.pop("size_divisible", int, 32)
    _positive(inp_f, "size_divisible", divisible)
    inp_f.done()
    top.done()
    return DetectorSpec(
        name=name,
        arch=arch,
        rpn=rpn,
        roi=roi,
        input=InputSpec(size, resolutions, mean, std, divisible),
        num_classes=num_classes,
        source=source,
    )


def load_spec(path: str | Path) -> DetectorSpec:
    """Read a detector spec YAML. ``path`` may also be a preset name (``r50-fpn``)."""
    p = Path(path)
    if not p.exists() and not p.suffix:
        candidate = DETECTORS_DIR / f"{p.name}.yaml"
        if candidate.exists():
            p = candidate
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in DETECTORS_DIR.glob("*.yaml")))
        raise SpecError(f"{path}: no such detector spec file (presets: {known})")
    return spec_from_dict(read_yaml(p), source=str(p))


def read_yaml(p: Path) -> Any:
    """Parse a YAML file; a syntax error becomes one :class:`SpecError` line with its line number."""
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{p}: invalid YAML{at}: {getattr(e, 'problem', e)}") from None
