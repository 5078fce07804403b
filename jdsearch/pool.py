"""The elastic teacher pool (paper 3.1.3, 4, A.1.3): one super-net, every teacher a sub-network.

**Sub-networks.** A :class:`SubnetConfig` picks, per backbone stage, a depth (the first ``d``
blocks run) and a width multiplier ``m`` of the base width ``W`` (``(64, 128, 256, 512)`` for
ResNets) — the stage's inner widths become ``round(m·W)`` and its output ``4·round(m·W)``
(bottleneck) — plus the FPN width, which the RPN head and the box head follow. The stem is fixed.
Its string form, used in lineage and plots, is ``d3-4-12-3_w1.25-1.5-1.5-1.25_f320``.

**Space.** A :class:`SubnetSpace` lists the allowed depths and multipliers per stage and the
allowed FPN widths; the super-net is its largest member. The paper's space (the final phase of
:meth:`PoolSpec.paper`): depths ``[2–3, 2–4, 2–23, 2–3]``, multipliers ``{1.0, 1.25, 1.5}`` per
stage, FPN ``{256, 320, 384}``, i.e. ``(2·3·22·2) · 3⁴ · 3 = 264 · 81 · 3 = 64 152`` sub-networks,
``× 4`` resolutions ``= 256 608`` (sub-network, resolution) pairs. The paper reports "roughly
765 000"; that is about three times ours (``264 · 3⁶ · 4 = 769 824`` would match if one more
three-way width choice were elastic, e.g. separate inner/output widths for one stage); the paper
does not give the arithmetic, so ours is reported as is.

**Training** (:func:`train_pool`, integrated progressive shrinking, IPS): phase 0 trains the
super-net alone with the plain detection loss; each later phase first re-orders channels by
importance (function-preserving, :func:`jdsearch.elastic.reorder_channels`), then samples one
sub-network of that phase's space per iteration — smaller depths *and* widths together, unlike
once-for-all's sequential progressive shrinking — and trains it with the detection loss plus
distillation from a frozen copy of the phase-0 super-net (:func:`jdsearch.distill.make_distiller`).
Dynamic resolution throughout. Every phase is one :func:`jdsearch.train.train` run: the next
sub-network is activated by the step callback, which runs after each optimizer step.

**Using it.** :meth:`ElasticPool.extract` returns a standalone detector built by
:func:`~jdsearch.models.detector.build_detector` from the sub-network's arch, with weights cut from
the super-net; :func:`recalibrate_bn` then re-estimates its BN statistics (the super-net's mix
every sampled sub-network's), which the paper calls "essential for performance recovery".

**Files.** A pool file is a jdsearch checkpoint of the super-net (:mod:`jdsearch.checkpoint`:
safetensors, sha256-verified, never unpickled) whose ``extra["pool"]`` holds the pool spec and
the per-phase training record; :func:`load_checkpoint` also reads it (as the largest detector).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from jdsearch.arch import BASIC, BOTTLENECK, NUM_STAGES, BackboneArch
from jdsearch.checkpoint import (
    checkpoint_from_bytes,
    checkpoint_to_bytes,
    load_checkpoint,
    save_checkpoint,
)
from jdsearch.data import Resolution, make_loader, parse_resolutions, using_resolution
from jdsearch.distill import KDConfig, make_distiller
from jdsearch.elastic import (
    ElasticConv2d,
    check_fits,
    make_elastic,
    reorder_channels,
    set_active_arch,
    sliced_state_dict,
)
from jdsearch.errors import CheckpointError, JDSearchError, SpecError
from jdsearch.models.detector import Detector, build_detector
from jdsearch.models.heads import stop_recording
from jdsearch.spec import DetectorSpec, load_spec
from jdsearch.train import COSINE, STEP, StepInfo, TrainConfig, train

__all__ = [
    "POOL_FORMAT",
    "ElasticPool",
    "PhaseRecord",
    "PhaseSpec",
    "PoolSpec",
    "PoolTrainSpec",
    "SubnetConfig",
    "SubnetSpace",
    "load_pool",
    "pool_from_bytes",
    "pool_to_bytes",
    "recalibrate_bn",
    "save_pool",
    "train_and_save_pool",
    "train_pool",
]

logger = logging.getLogger(__name__)

POOL_FORMAT = "jdsearch-pool"
POOL_VERSION = 1
RESNET_WIDTHS = (64, 128, 256, 512)
_MOVE_PREFIX = "teacher."


# ---------------------------------------------------------------------- sub-network configs
def _fmt_width(w: float) -> str:
    return repr(float(w))  # shortest round-trip text: 1.0, 1.25, 1.5


_CONFIG_RE = re.compile(r"d(\d+(?:-\d+)*)_w(\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)*)_f(\d+)")


@dataclass(frozen=True)
class SubnetConfig:
    """One sub-network: blocks per stage, width multiplier per stage, FPN width (channels)."""

    depths: tuple[int, ...]
    widths: tuple[float, ...]
    fpn: int

    def __post_init__(self) -> None:
        depths, widths = tuple(self.depths), tuple(self.widths)
        if len(depths) != NUM_STAGES or len(widths) != NUM_STAGES:
            raise SpecError(
                f"sub-network: expected {NUM_STAGES} depths and widths, got {depths} {widths}"
            )
        if any(isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 1 for d in depths):
            raise SpecError(f"sub-network: depths must be positive integers, got {list(depths)}")
        if any(
            isinstance(w, bool)
            or not isinstance(w, int | float)
            or not (math.isfinite(w) and w > 0)
            for w in widths
        ):
            raise SpecError(
                f"sub-network: width multipliers must be positive numbers, got {list(widths)}"
            )
        if isinstance(self.fpn, bool) or not isinstance(self.fpn, int | np.integer) or self.fpn < 1:
            raise SpecError(f"sub-network: FPN width must be a positive integer, got {self.fpn!r}")
        object.__setattr__(self, "depths", tuple(int(d) for d in depths))
        object.__setattr__(self, "widths", tuple(float(w) for w in widths))
        object.__setattr__(self, "fpn", int(self.fpn))

    def __str__(self) -> str:
        d = "-".join(str(x) for x in self.depths)
        w = "-".join(_fmt_width(x) for x in self.widths)
        return f"d{d}_w{w}_f{self.fpn}"

    @classmethod
    def parse(cls, text: str) -> SubnetConfig:
        """Read the string form ``d3-4-12-3_w1.25-1.5-1.5-1.25_f320``."""
        m = _CONFIG_RE.fullmatch(text.strip()) if isinstance(text, str) else None
        if m is None:
            raise SpecError(
                f"sub-network {text!r}: expected the form 'd3-4-23-3_w1.5-1.5-1.5-1.5_f384'"
            )
        depths = tuple(int(x) for x in m.group(1).split("-"))
        widths = tuple(float(x) for x in m.group(2).split("-"))
        return cls(depths, widths, int(m.group(3)))


# ---------------------------------------------------------------------- the space
def _fmt_choices(values: Sequence[float]) -> str:
    if (
        all(isinstance(v, int) for v in values)
        and len(values) > 2
        and list(values) == list(range(int(values[0]), int(values[-1]) + 1))
    ):
        return f"{values[0]}..{values[-1]}"
    return "|".join(_fmt_width(v) if isinstance(v, float) else str(v) for v in values)


def _depth_entry(values: tuple[int, ...]) -> int | str | list[int]:
    """The spec form of a stage's depth choices: ``3``, ``"2-23"`` or ``[1, 3]``."""
    if len(values) == 1:
        return values[0]
    if len(values) > 2 and list(values) == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return list(values)


def _step(choices: tuple[Any, ...], value: Any, delta: int) -> Any | None:
    i = choices.index(value) + delta
    return choices[i] if 0 <= i < len(choices) else None


@dataclass(frozen=True)
class SubnetSpace:
    """Allowed depths and width multipliers per stage, and allowed FPN widths (sorted, unique)."""

    depths: tuple[tuple[int, ...], ...]
    widths: tuple[tuple[float, ...], ...]
    fpn: tuple[int, ...]

    def __post_init__(self) -> None:
        try:
            depths = tuple(tuple(sorted({int(d) for d in stage})) for stage in self.depths)
            widths = tuple(tuple(sorted({float(w) for w in stage})) for stage in self.widths)
            fpn = tuple(sorted({int(f) for f in self.fpn}))
        except (TypeError, ValueError) as e:
            raise SpecError(f"subnet space: malformed choices ({e})") from None
        if len(depths) != NUM_STAGES or len(widths) != NUM_STAGES:
            raise SpecError(f"subnet space: needs {NUM_STAGES} stages of depth and width choices")
        for si, (ds, ws) in enumerate(zip(depths, widths, strict=True)):
            if not ds or ds[0] < 1:
                raise SpecError(f"subnet space: stage {si + 1} depths must be ≥ 1, got {list(ds)}")
            if not ws or not all(math.isfinite(w) and w > 0 for w in ws):
                raise SpecError(
                    f"subnet space: stage {si + 1} widths must be positive, got {list(ws)}"
                )
        if not fpn or fpn[0] < 1:
            raise SpecError(f"subnet space: FPN widths must be ≥ 1, got {list(fpn)}")
        object.__setattr__(self, "depths", depths)
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "fpn", fpn)

    # -- members
    def size(self, resolutions: int = 1) -> int:
        """Number of sub-networks (``× resolutions``: number of (sub-network, resolution) pairs)."""
        n = math.prod(len(d) for d in self.depths) * math.prod(len(w) for w in self.widths)
        return n * len(self.fpn) * resolutions

    def largest(self) -> SubnetConfig:
        return SubnetConfig(
            tuple(d[-1] for d in self.depths), tuple(w[-1] for w in self.widths), self.fpn[-1]
        )

    def smallest(self) -> SubnetConfig:
        return SubnetConfig(
            tuple(d[0] for d in self.depths), tuple(w[0] for w in self.widths), self.fpn[0]
        )

    def contains(self, cfg: SubnetConfig) -> bool:
        return (
            all(d in ds for d, ds in zip(cfg.depths, self.depths, strict=True))
            and all(w in ws for w, ws in zip(cfg.widths, self.widths, strict=True))
            and cfg.fpn in self.fpn
        )

    def __contains__(self, cfg: object) -> bool:
        return isinstance(cfg, SubnetConfig) and self.contains(cfg)

    def issubset(self, other: SubnetSpace) -> bool:
        return (
            all(set(a) <= set(b) for a, b in zip(self.depths, other.depths, strict=True))
            and all(set(a) <= set(b) for a, b in zip(self.widths, other.widths, strict=True))
            and set(self.fpn) <= set(other.fpn)
        )

    def sample(self, rng: np.random.Generator) -> SubnetConfig:
        """Uniform in each dimension independently (one draw per stage depth, width, and FPN)."""
        depths = tuple(int(ds[rng.integers(len(ds))]) for ds in self.depths)
        widths = tuple(float(ws[rng.integers(len(ws))]) for ws in self.widths)
        return SubnetConfig(depths, widths, int(self.fpn[rng.integers(len(self.fpn))]))

    def __iter__(self) -> Iterator[SubnetConfig]:
        for depths in itertools.product(*self.depths):
            for widths in itertools.product(*self.widths):
                for fpn in self.fpn:
                    yield SubnetConfig(depths, widths, fpn)

    # -- teacher mutation (paper algorithm 1, line 11)
    @staticmethod
    def move_names() -> tuple[str, ...]:
        """The fixed vocabulary of teacher mutations: one stage's depth or width, or the FPN
        width, one step up or down its list of choices (``teacher.depth3+``, ``teacher.fpn-``)."""
        names = [
            f"{_MOVE_PREFIX}{what}{s + 1}{sign}"
            for what in ("depth", "width")
            for s in range(NUM_STAGES)
            for sign in "+-"
        ]
        return (*names, f"{_MOVE_PREFIX}fpn+", f"{_MOVE_PREFIX}fpn-")

    def apply_move(self, cfg: SubnetConfig, move: str) -> SubnetConfig | None:
        """``cfg`` mutated by ``move``, or ``None`` where the move leaves the space.

        Raises :class:`SpecError` for an unknown move or a ``cfg`` outside the space.
        """
        if not self.contains(cfg):
            raise SpecError(f"sub-network {cfg} is not in the pool's space {self.describe()}")
        m = re.fullmatch(
            re.escape(_MOVE_PREFIX)
            + r"(depth|width)([1-4])([+-])|"
            + re.escape(_MOVE_PREFIX)
            + r"fpn([+-])",
            move,
        )
        if m is None:
            raise SpecError(
                f"teacher move {move!r}: unknown (known: {', '.join(self.move_names())})"
            )
        if m.group(4):
            fpn = _step(self.fpn, cfg.fpn, 1 if m.group(4) == "+" else -1)
            return None if fpn is None else dataclasses.replace(cfg, fpn=fpn)
        what, s, delta = m.group(1), int(m.group(2)) - 1, 1 if m.group(3) == "+" else -1
        if what == "depth":
            d = _step(self.depths[s], cfg.depths[s], delta)
            return None if d is None else dataclasses.replace(cfg, depths=_set(cfg.depths, s, d))
        w = _step(self.widths[s], cfg.widths[s], delta)
        return None if w is None else dataclasses.replace(cfg, widths=_set(cfg.widths, s, w))

    def neighbours(self, cfg: SubnetConfig) -> dict[str, SubnetConfig]:
        """Every feasible teacher mutation of ``cfg``: move name → mutated config."""
        out = {}
        for move in self.move_names():
            new = self.apply_move(cfg, move)
            if new is not None:
                out[move] = new
        return out

    def mutate(self, cfg: SubnetConfig, rng: np.random.Generator) -> tuple[str, SubnetConfig]:
        """One feasible teacher mutation of ``cfg``, uniformly: ``(move name, new config)``."""
        options = sorted(self.neighbours(cfg).items())
        if not options:
            raise SpecError(f"sub-network {cfg}: the space {self.describe()} has a single member")
        return options[int(rng.integers(len(options)))]

    # -- text and dict forms
    def describe(self) -> str:
        d = ", ".join(_fmt_choices(ds) for ds in self.depths)
        if len(set(self.widths)) == 1:
            w = f"{_fmt_choices(self.widths[0])} ×{NUM_STAGES}"
        else:
            w = ", ".join(_fmt_choices(ws) for ws in self.widths)
        return f"d[{d}] w[{w}] f[{_fmt_choices(self.fpn)}]"

    def to_dict(self) -> dict[str, Any]:
        widths: Any = (
            list(self.widths[0]) if len(set(self.widths)) == 1 else [list(ws) for ws in self.widths]
        )
        return {
            "depths": [_depth_entry(ds) for ds in self.depths],
            "widths": widths,
            "fpn": list(self.fpn),
        }

    @classmethod
    def from_dict(
        cls, data: Any, source: str = "space", default: SubnetSpace | None = None
    ) -> SubnetSpace:
        """Read ``{depths, widths, fpn}``; keys missing here come from ``default`` (if given).

        * ``depths``: one entry per stage — an integer, an inclusive range ``"2-23"``, or a list of
          allowed depths ``[1, 3]``.
        * ``widths``: a list of multipliers for every stage (``[1.0, 1.25, 1.5]``), or one such
          list per stage.
        * ``fpn``: FPN widths in channels (``[256, 320, 384]``) or a single width.
        """
        f = _Reader(source, data)
        if default is None:
            for key in ("depths", "widths", "fpn"):
                f.require(key)
        depths = default.depths if default is not None else ()
        widths = default.widths if default is not None else ()
        fpn = default.fpn if default is not None else ()
        if f.has("depths"):
            raw = f.pop("depths")
            if not isinstance(raw, list | tuple) or len(raw) != NUM_STAGES:
                f.fail("depths", f"expected {NUM_STAGES} entries (one per stage), got {raw!r}")
            depths = tuple(_depth_choices(v, f.where(f"depths[{i}]")) for i, v in enumerate(raw))
        if f.has("widths"):
            widths = _width_choices(f.pop("widths"), f.where("widths"))
        if f.has("fpn"):
            fpn = _int_choices(f.pop("fpn"), f.where("fpn"))
        f.done()
        try:
            return cls(depths, widths, fpn)
        except SpecError as e:
            raise SpecError(f"{source}: {e}") from None


def _set(values: tuple[Any, ...], i: int, v: Any) -> tuple[Any, ...]:
    return (*values[:i], v, *values[i + 1 :])


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _depth_choices(value: Any, where: str) -> tuple[int, ...]:
    if _is_int(value):
        choices: tuple[int, ...] = (value,)
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)):
        lo, hi = int(m.group(1)), int(m.group(2))
        if lo > hi:
            raise SpecError(f"{where}: range {value!r} is empty (low end above high end)")
        choices = tuple(range(lo, hi + 1))
    elif isinstance(value, list | tuple) and value and all(_is_int(v) for v in value):
        choices = tuple(value)
    else:
        raise SpecError(
            f"{where}: expected a depth, a range like '2-23' or a list of depths, got {value!r}"
        )
    if min(choices) < 1:
        raise SpecError(f"{where}: depths must be ≥ 1, got {value!r}")
    return choices


def _number_list(value: Any, where: str) -> tuple[float, ...]:
    if not isinstance(value, list | tuple) or not value or not all(_is_number(v) for v in value):
        raise SpecError(f"{where}: expected a non-empty list of numbers, got {value!r}")
    if not all(math.isfinite(v) and v > 0 for v in value):
        raise SpecError(f"{where}: width multipliers must be positive, got {value!r}")
    return tuple(float(v) for v in value)


def _width_choices(value: Any, where: str) -> tuple[tuple[float, ...], ...]:
    if (
        isinstance(value, list | tuple)
        and value
        and all(isinstance(v, list | tuple) for v in value)
    ):
        if len(value) != NUM_STAGES:
            raise SpecError(f"{where}: expected {NUM_STAGES} per-stage lists, got {len(value)}")
        return tuple(_number_list(v, f"{where}[{i}]") for i, v in enumerate(value))
    return (_number_list(value, where),) * NUM_STAGES


def _int_choices(value: Any, where: str) -> tuple[int, ...]:
    values = [value] if _is_int(value) else value
    if (
        not isinstance(values, list | tuple)
        or not values
        or not all(_is_int(v) and v > 0 for v in values)
    ):
        raise SpecError(f"{where}: expected a positive integer or a list of them, got {value!r}")
    return tuple(values)


class _Reader:
    """Pops keys from one mapping of a spec; leftovers are reported as unknown keys."""

    def __init__(self, source: str, data: Any) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise SpecError(f"{source}: expected a mapping, got {type(data).__name__}")
        self.source, self.data, self.known = source, dict(data), set(data)

    def where(self, key: str) -> str:
        return f"{self.source}.{key}"

    def fail(self, key: str, why: str) -> None:
        raise SpecError(f"{self.where(key)}: {why}")

    def has(self, key: str) -> bool:
        return key in self.data

    def require(self, key: str) -> None:
        if key not in self.data:
            self.fail(key, "required field is missing")

    def pop(self, key: str, default: Any = None) -> Any:
        return self.data.pop(key, default)

    def number(
        self,
        key: str,
        default: Any,
        *,
        integer: bool = False,
        positive: bool = True,
        allow_zero: bool = False,
        nullable: bool = False,
    ) -> Any:
        if key not in self.data:
            return default
        value = self.data.pop(key)
        if value is None and nullable:
            return None
        ok = _is_int(value) if integer else _is_number(value)
        if not ok or not math.isfinite(value):
            self.fail(key, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
        if positive and not (value > 0 or (allow_zero and value == 0)):
            self.fail(key, f"must be {'≥ 0' if allow_zero else 'positive'}, got {value!r}")
        return int(value) if integer else float(value)

    def done(self, known: Iterable[str] = ()) -> None:
        if self.data:
            key = sorted(self.data)[0]
            listed = sorted(set(known)) or sorted(self.known - set(self.data))
            hint = f" (known: {', '.join(listed)})" if listed else ""
            self.fail(key, f"unknown key{hint}")


# ---------------------------------------------------------------------- the pool spec
@dataclass(frozen=True)
class PhaseSpec:
    """One IPS phase: its length, initial learning rate and the space it samples from."""

    name: str
    epochs: float
    lr: float
    space: SubnetSpace

    def to_dict(self, full: SubnetSpace, first: bool) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "epochs": self.epochs, "lr": self.lr}
        if not first:
            own, base = self.space.to_dict(), full.to_dict()
            d.update({k: v for k, v in own.items() if v != base[k]})
        return d


@dataclass(frozen=True)
class PoolTrainSpec:
    """Training settings shared by every phase (see :class:`~jdsearch.train.TrainConfig`).

    ``resolutions`` empty: the detector spec's dynamic-resolution set. ``reorder``: re-order
    channels by importance before each shrinking phase. ``recalibration_batches``: batches used to
    re-estimate BN statistics of an extracted teacher (:meth:`ElasticPool.teacher`).
    """

    batch_size: int = 2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    schedule: str = STEP
    grad_clip: float | None = None
    amp: bool = False
    resolutions: tuple[Resolution, ...] = ()
    seed: int = 0
    reorder: bool = True
    recalibration_batches: int = 10
    log_every: int = 50

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["resolutions"] = [str(r) for r in self.resolutions]
        return d

    @classmethod
    def from_dict(cls, data: Any, source: str) -> PoolTrainSpec:
        f = _Reader(source, data)
        d = cls()
        kw: dict[str, Any] = {
            "batch_size": f.number("batch_size", d.batch_size, integer=True),
            "momentum": f.number("momentum", d.momentum, allow_zero=True),
            "weight_decay": f.number("weight_decay", d.weight_decay, allow_zero=True),
            "warmup_iters": f.number("warmup_iters", d.warmup_iters, integer=True, allow_zero=True),
            "grad_clip": f.number("grad_clip", d.grad_clip, nullable=True),
            "seed": f.number("seed", d.seed, integer=True, allow_zero=True),
            "recalibration_batches": f.number(
                "recalibration_batches", d.recalibration_batches, integer=True
            ),
            "log_every": f.number("log_every", d.log_every, integer=True),
        }
        schedule = f.pop("schedule", d.schedule)
        if schedule not in (STEP, COSINE):
            f.fail("schedule", f"must be '{STEP}' or '{COSINE}', got {schedule!r}")
        kw["schedule"] = schedule
        for key in ("amp", "reorder"):
            value = f.pop(key, getattr(d, key))
            if not isinstance(value, bool):
                f.fail(key, f"expected true or false, got {value!r}")
            kw[key] = value
        res = f.pop("resolutions", [])
        try:
            kw["resolutions"] = parse_resolutions(res) if res else ()
        except SpecError as e:
            f.fail("resolutions", str(e))
        f.done([fd.name for fd in dataclasses.fields(cls)])
        if kw["momentum"] >= 1:
            raise SpecError(f"{source}.momentum: must lie in [0, 1), got {kw['momentum']}")
        return cls(**kw)


@dataclass(frozen=True)
class PoolSpec:
    """The ``pool:`` section of a study spec: super-net, space, IPS phases, training, KD.

    ``detector`` names the detector spec (preset or file) that provides the stem, strides, RPN,
    RoI heads and input sizes; its own depths/widths are replaced by the pool's. ``base_widths``
    is ``W`` (the 1.0× inner width per stage). ``space`` is the pool's sub-network space; the
    first phase trains the super-net (``space.largest()``) alone, each later phase samples from
    its own space (default: ``space``), which must contain the previous phase's; the last phase
    must cover the whole space.
    """

    space: SubnetSpace
    phases: tuple[PhaseSpec, ...]
    detector: str = "r101-fpn"
    kind: str = BOTTLENECK
    base_widths: tuple[int, ...] = RESNET_WIDTHS
    train: PoolTrainSpec = field(default_factory=PoolTrainSpec)
    kd: KDConfig = field(default_factory=KDConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "phases", tuple(self.phases))
        object.__setattr__(self, "base_widths", tuple(self.base_widths))
        if self.kind not in (BASIC, BOTTLENECK):
            raise SpecError(f"pool.kind: must be '{BASIC}' or '{BOTTLENECK}', got {self.kind!r}")
        if len(self.base_widths) != NUM_STAGES or not all(
            _is_int(w) and w > 0 for w in self.base_widths
        ):
            raise SpecError(
                f"pool.base_widths: expected {NUM_STAGES} positive integers, "
                f"got {list(self.base_widths)}"
            )
        for si, (base, mults) in enumerate(zip(self.base_widths, self.space.widths, strict=True)):
            widths = [_scaled(base, m) for m in mults]
            if len(set(widths)) != len(widths) or min(widths) < 1:
                raise SpecError(
                    f"pool.space.widths: stage {si + 1} multipliers {list(mults)} "
                    f"of base width {base} "
                    f"give widths {widths}; they must be distinct and ≥ 1"
                )
        if not self.phases:
            raise SpecError("pool.phases: at least one phase (the super-net) is needed")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise SpecError(f"pool.phases: phase names must be unique, got {names}")
        largest = self.space.largest()
        first = self.phases[0].space
        if first.size() != 1 or first.largest() != largest:
            raise SpecError(f"pool.phases[0]: the first phase trains the super-net {largest} alone")
        for i, phase in enumerate(self.phases):
            if not phase.space.issubset(self.space):
                raise SpecError(
                    f"pool.phases[{i}]: space {phase.space.describe()} leaves the pool's space"
                )
            if i and not self.phases[i - 1].space.issubset(phase.space):
                raise SpecError(
                    f"pool.phases[{i}]: space {phase.space.describe()} drops sub-networks of the "
                    "previous phase (progressive shrinking only adds)"
                )
            if not (phase.epochs > 0 and math.isfinite(phase.epochs)) or not (
                phase.lr > 0 and math.isfinite(phase.lr)
            ):
                raise SpecError(
                    f"pool.phases[{i}]: epochs and lr must be positive, "
                    f"got {phase.epochs}, {phase.lr}"
                )
        if self.phases[-1].space != self.space:
            raise SpecError(
                f"pool.phases: the last phase samples {self.phases[-1].space.describe()}, "
                "not the whole "
                f"space {self.space.describe()}; sub-networks outside it would never be trained"
            )

    @property
    def largest(self) -> SubnetConfig:
        return self.space.largest()

    def widths_of(self, cfg: SubnetConfig) -> tuple[int, ...]:
        """Inner width of each stage of ``cfg``: ``round(multiplier × base width)``."""
        return tuple(_scaled(b, m) for b, m in zip(self.base_widths, cfg.widths, strict=True))

    def same_architecture(self, other: PoolSpec) -> bool:
        """Whether ``other`` describes the same super-net and space (schedules may differ)."""
        return (self.kind, self.base_widths, self.space) == (
            other.kind,
            other.base_widths,
            other.space,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector,
            "kind": self.kind,
            "base_widths": list(self.base_widths),
            "space": self.space.to_dict(),
            "phases": [p.to_dict(self.space, i == 0) for i, p in enumerate(self.phases)],
            "train": self.train.to_dict(),
            "kd": self.kd.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "pool") -> PoolSpec:
        """Validate the ``pool:`` mapping of a study spec; errors name the dotted field."""
        f = _Reader(source, data)
        known = ("detector", "kind", "base_widths", "space", "phases", "train", "kd")
        detector = f.pop("detector", "r101-fpn")
        if not isinstance(detector, str) or not detector:
            f.fail("detector", f"expected a detector preset name or spec path, got {detector!r}")
        kind = f.pop("kind", BOTTLENECK)
        base = f.pop("base_widths", list(RESNET_WIDTHS))
        if (
            not isinstance(base, list | tuple)
            or len(base) != NUM_STAGES
            or not all(_is_int(w) and w > 0 for w in base)
        ):
            f.fail("base_widths", f"expected {NUM_STAGES} positive integers, got {base!r}")
        f.require("space")
        space = SubnetSpace.from_dict(f.pop("space"), f.where("space"))
        f.require("phases")
        raw_phases = f.pop("phases")
        if not isinstance(raw_phases, list) or not raw_phases:
            f.fail("phases", f"expected a non-empty list of phases, got {raw_phases!r}")
        phases = []
        for i, raw in enumerate(raw_phases):
            where = f.where(f"phases[{i}]")
            pf = _Reader(where, raw)
            pf.require("epochs")
            pf.require("lr")
            name = pf.pop("name", "supernet" if i == 0 else f"shrink{i}")
            if not isinstance(name, str) or not name:
                pf.fail("name", f"expected a string, got {name!r}")
            epochs = pf.number("epochs", None)
            lr = pf.number("lr", None)
            if i == 0:
                extra = sorted({"depths", "widths", "fpn"} & set(pf.data))
                if extra:
                    pf.fail(
                        extra[0], "the first phase trains the super-net alone; it takes no space"
                    )
                phase_space = SubnetSpace.from_dict({}, where, default=_singleton(space.largest()))
            else:
                sub = {k: pf.pop(k) for k in ("depths", "widths", "fpn") if pf.has(k)}
                phase_space = SubnetSpace.from_dict(sub, where, default=space)
            pf.done(["name", "epochs", "lr", "depths", "widths", "fpn"])
            phases.append(PhaseSpec(name, epochs, lr, phase_space))
        train_spec = PoolTrainSpec.from_dict(f.pop("train"), f.where("train"))
        kd = KDConfig.from_dict(f.pop("kd"), f.where("kd"))
        f.done(known)
        try:
            return cls(space, tuple(phases), detector, kind, tuple(base), train_spec, kd)
        except SpecError as e:
            msg = str(e)
            raise SpecError(
                msg.replace("pool.", f"{source}.", 1)
                if msg.startswith("pool.")
                else f"{source}: {msg}"
            ) from None

    # -- presets
    @classmethod
    def paper(cls) -> PoolSpec:
        """The paper's pool (A.1.3, table 8): R101 depths at 1.5× width, FPN 384, three phases.

        Batch 64 is the paper's 32 GPUs × 2; scale ``lr`` linearly for another batch size.
        The paper does not give phase 1's FPN widths; we shrink them like the stages (320–384).
        """
        space = SubnetSpace(
            depths=((2, 3), (2, 3, 4), tuple(range(2, 24)), (2, 3)),
            widths=((1.0, 1.25, 1.5),) * NUM_STAGES,
            fpn=(256, 320, 384),
        )
        shrink1 = SubnetSpace(
            ((3,), (4,), tuple(range(12, 24)), (3,)), ((1.25, 1.5),) * NUM_STAGES, (320, 384)
        )
        phases = (
            PhaseSpec("supernet", 48, 0.12, _singleton(space.largest())),
            PhaseSpec("shrink1", 24, 0.04, shrink1),
            PhaseSpec("shrink2", 36, 0.04, space),
        )
        return cls(
            space,
            phases,
            "r101-fpn",
            BOTTLENECK,
            RESNET_WIDTHS,
            PoolTrainSpec(batch_size=64, warmup_iters=500),
        )

    @classmethod
    def tiny(cls, epochs: tuple[float, float, float] = (6, 3, 4), lr: float = 0.02) -> PoolSpec:
        """A CPU pool on ``tiny-r50-fpn``: base widths 8..64, depths ≤ [2,2,3,2], FPN 16–32.

        Gradients are clipped (norm 10): without it, one of two identical 16-epoch runs diverged
        (an infinite feature-KD loss) in the first shrinking phase.
        """
        space = SubnetSpace(
            depths=((1, 2), (1, 2), (1, 2, 3), (1, 2)),
            widths=((1.0, 1.25, 1.5),) * NUM_STAGES,
            fpn=(16, 24, 32),
        )
        shrink1 = SubnetSpace(((2,), (2,), (2, 3), (2,)), ((1.25, 1.5),) * NUM_STAGES, (24, 32))
        phases = (
            PhaseSpec("supernet", epochs[0], lr, _singleton(space.largest())),
            PhaseSpec("shrink1", epochs[1], lr / 2, shrink1),
            PhaseSpec("shrink2", epochs[2], lr / 2, space),
        )
        return cls(
            space,
            phases,
            "tiny-r50-fpn",
            BOTTLENECK,
            (8, 16, 32, 64),
            PoolTrainSpec(batch_size=4, warmup_iters=50, grad_clip=10.0),
        )


def _scaled(base: int, mult: float) -> int:
    return math.floor(base * mult + 0.5)


def _singleton(cfg: SubnetConfig) -> SubnetSpace:
    return SubnetSpace(tuple((d,) for d in cfg.depths), tuple((w,) for w in cfg.widths), (cfg.fpn,))


# ---------------------------------------------------------------------- training record
@dataclass(frozen=True)
class PhaseRecord:
    """What one IPS phase did (JSON-friendly; stored in the pool file)."""

    phase: int
    name: str
    space: str
    epochs: float
    lr: float
    iterations: int
    seconds: float
    images_per_s: float
    final_losses: dict[str, float]
    loss_history: tuple[float, ...]
    history_stride: int
    subnets_sampled: int  # distinct sub-networks trained in this phase
    reordered: bool

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["loss_history"] = list(self.loss_history)
        return d

    @classmethod
    def from_dict(cls, data: Any) -> PhaseRecord:
        if not isinstance(data, Mapping):
            raise TypeError("a phase record is a mapping")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data)
        if missing:
            raise KeyError(f"phase record lacks {sorted(missing)}")
        d = {k: data[k] for k in names}
        d["loss_history"] = tuple(float(x) for x in d["loss_history"])
        d["final_losses"] = {str(k): float(v) for k, v in dict(d["final_losses"]).items()}
        return cls(**d)


# ---------------------------------------------------------------------- the pool
class ElasticPool:
    """The elastic super-net and everything needed to run, extract and store its sub-networks.

    ``supernet`` is a :class:`~jdsearch.models.detector.Detector` of the largest arch made elastic
    in place (:func:`jdsearch.elastic.make_elastic`); train it as any detector. ``activate(cfg)``
    chooses what its forward computes; :meth:`extract` returns a standalone copy of a sub-network.
    """

    def __init__(
        self,
        spec: PoolSpec,
        num_classes: int,
        *,
        detector_spec: DetectorSpec | None = None,
        supernet: Detector | None = None,
        name: str | None = None,
        class_names: Sequence[str] | None = None,
        record: Sequence[PhaseRecord] = (),
    ) -> None:
        """Build a fresh super-net (``supernet=None``) or wrap a loaded one.

        ``detector_spec`` is the template (heads, input, stem, strides); default
        ``load_spec(spec.detector)``.
        """
        template = detector_spec if detector_spec is not None else load_spec(spec.detector)
        self.spec = spec
        self.template = template
        self.name = name or f"pool-{template.name}"
        self.class_names = tuple(class_names) if class_names is not None else None
        self.record: tuple[PhaseRecord, ...] = tuple(record)
        self.arch = self.arch_of(spec.largest)
        for cfg in _probes(spec.space):
            check_fits(self.arch, self.arch_of(cfg))
        if supernet is None:
            supernet = build_detector(self.spec_of(spec.largest, self.name), num_classes)
        elif supernet.arch != self.arch:
            raise SpecError(
                f"pool {self.name}: the super-net's arch {supernet.arch.encode()} "
                "is not the space's "
                f"largest {self.arch.encode()}"
            )
        self.supernet: Detector = make_elastic(supernet)  # type: ignore[assignment]
        self.num_classes = int(supernet.roi_heads.box_predictor.cls_score.out_features)
        self._active = spec.largest
        self.activate(spec.largest)

    @property
    def space(self) -> SubnetSpace:
        return self.spec.space

    @property
    def largest(self) -> SubnetConfig:
        return self.spec.largest

    @property
    def active(self) -> SubnetConfig:
        return self._active

    @property
    def resolutions(self) -> tuple[Resolution, ...]:
        """The dynamic-resolution set of training (the pool spec's, else the detector's)."""
        return self.spec.train.resolutions or tuple(self.template.input.resolutions)

    def arch_of(self, cfg: SubnetConfig) -> BackboneArch:
        """The :class:`BackboneArch` of ``cfg`` (stem and strides from the detector template)."""
        base = self.template.arch
        return BackboneArch.resnet(
            cfg.depths,
            kind=self.spec.kind,
            widths=self.spec.widths_of(cfg),
            stem=base.stem,
            fpn=cfg.fpn,
            strides=base.strides,
        )

    def spec_of(self, cfg: SubnetConfig, name: str | None = None) -> DetectorSpec:
        """The detector spec of ``cfg``: the template's heads and input with ``cfg``'s arch."""
        spec = self.template.with_arch(self.arch_of(cfg))
        return dataclasses.replace(spec, name=name or f"{self.name}:{cfg}", num_classes=None)

    def _check(self, cfg: SubnetConfig) -> None:
        if not isinstance(cfg, SubnetConfig):
            raise TypeError(f"expected a SubnetConfig, got {type(cfg).__name__}")
        if not self.space.contains(cfg):
            raise SpecError(
                f"pool {self.name}: sub-network {cfg} is not in the space {self.space.describe()}"
            )

    def activate(self, cfg: SubnetConfig) -> None:
        """Make the super-net's forward compute sub-network ``cfg``."""
        self._check(cfg)
        set_active_arch(self.supernet, self.arch, self.arch_of(cfg))
        self._active = cfg

    @contextlib.contextmanager
    def using(self, cfg: SubnetConfig) -> Iterator[Detector]:
        """``with pool.using(cfg) as net:`` — ``cfg`` active inside, the previous one after."""
        before = self._active
        self.activate(cfg)
        try:
            yield self.supernet
        finally:
            self.activate(before)

    def extract(self, cfg: SubnetConfig, *, device: str | torch.device | None = None) -> Detector:
        """A standalone detector of ``cfg`` with weights (and BN statistics) cut from the super-net.

        Built by :func:`build_detector` from :meth:`spec_of`; in eval mode, on ``device`` (default:
        the super-net's). Its BN statistics are the super-net's mixture: call
        :func:`recalibrate_bn` (or use :meth:`teacher`) before relying on it.
        """
        self._check(cfg)
        dev = (
            torch.device(device) if device is not None else next(self.supernet.parameters()).device
        )
        det = build_detector(self.spec_of(cfg), self.num_classes)
        det.load_state_dict(
            sliced_state_dict(self.supernet.state_dict(), det.state_dict()), strict=True
        )
        return det.to(dev).eval()  # type: ignore[return-value]

    def teacher(
        self,
        cfg: SubnetConfig,
        data: Any,
        *,
        batches: int | None = None,
        device: str | torch.device | None = None,
        batch_size: int | None = None,
    ) -> Detector:
        """:meth:`extract` + :func:`recalibrate_bn` over the pool's training resolutions."""
        det = self.extract(cfg, device=device)
        recalibrate_bn(
            det,
            data,
            batches=batches or self.spec.train.recalibration_batches,
            device=device,
            batch_size=batch_size or self.spec.train.batch_size,
            resolutions=self.resolutions,
        )
        return det

    def to(self, device: str | torch.device) -> ElasticPool:
        self.supernet.to(device)
        return self


def _probes(space: SubnetSpace) -> list[SubnetConfig]:
    """Configs that together use every width choice of every stage (at full depth), the
    smallest and the largest: enough to check that every member fits the super-net."""
    n = max(len(ws) for ws in space.widths)
    depths = tuple(d[-1] for d in space.depths)
    probes = [
        SubnetConfig(depths, tuple(ws[min(k, len(ws) - 1)] for ws in space.widths), space.fpn[0])
        for k in range(n)
    ]
    return [space.smallest(), *probes]


# ---------------------------------------------------------------------- BN recalibration
def _batches(data: Any, batch_size: int, seed: int) -> Iterator[Any]:
    """Endless batches: a Dataset is loaded shuffled epoch after epoch, an iterable re-iterated."""
    source = (
        make_loader(data, batch_size, shuffle=True, seed=seed)
        if isinstance(data, Dataset)
        else data
    )
    while True:
        empty = True
        for batch in source:
            empty = False
            yield batch
        if empty:
            raise JDSearchError("BN recalibration: the data is empty")


@torch.no_grad()
def recalibrate_bn(
    detector: nn.Module,
    data: Any,
    *,
    batches: int = 10,
    device: str | torch.device | None = None,
    batch_size: int = 2,
    resolutions: Sequence[Resolution | str] = (),
    seed: int = 0,
) -> int:
    """Re-estimate every BatchNorm's running statistics of ``detector`` from ``batches`` batches.

    ``data`` is a dataset of ``(image, target)`` (loaded shuffled with ``seed``) or an iterable of
    ``(images, targets)`` batches / lists of images. Statistics are reset, then each BN runs in
    training mode with ``momentum=None`` (a cumulative average of the batch statistics) while the
    rest of the detector stays in eval mode; nothing but the running statistics (and
    ``num_batches_tracked``) changes, and no gradient is computed. Only the transform and the
    backbone run (the BNs live there). Batch ``i`` is resized to ``resolutions[i % n]`` (default:
    the detector's current size). Modes and momenta are restored. Returns the batches used.
    """
    if batches < 1:
        raise SpecError(f"recalibrate_bn: batches must be ≥ 1, got {batches}")
    bns = [m for m in detector.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    dev = torch.device(device) if device is not None else next(detector.parameters()).device
    detector.to(dev)
    sizes = [Resolution.parse(r) for r in resolutions]
    saved = [(m.momentum, m.training) for m in bns]
    was_training = detector.training
    detector.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        stream = _batches(data, batch_size, seed)
        for i in range(batches):
            batch = next(stream)
            images = (
                batch[0]
                if isinstance(batch, tuple | list)
                and len(batch) == 2
                and isinstance(batch[1], list | tuple)
                else batch
            )
            images = [im.to(dev) for im in images]
            size = sizes[i % len(sizes)] if sizes else None
            with using_resolution(detector, size) if size else contextlib.nullcontext():
                image_list, _ = detector.transform(images)
                detector.backbone(image_list.tensors)
    finally:
        for m, (momentum, training) in zip(bns, saved, strict=True):
            m.momentum = momentum
            m.train(training)
        detector.train(was_training)
    return batches


# ---------------------------------------------------------------------- IPS training
class _SubnetSchedule:
    """Samples and activates one sub-network per training step of a phase (the first with
    :meth:`next` before training, each later one after the previous step)."""

    def __init__(self, pool: ElasticPool, space: SubnetSpace, rng: np.random.Generator) -> None:
        self.pool, self.space, self.rng = pool, space, rng
        self.sampled: Counter[SubnetConfig] = Counter()

    def next(self) -> None:
        cfg = self.space.sample(self.rng)
        self.pool.activate(cfg)
        self.sampled[cfg] += 1

    def after_step(self, info: StepInfo) -> None:
        if info.iteration < info.total_iters:
            self.next()


def train_pool(
    pool: ElasticPool,
    dataset: Dataset[Any],
    pool_spec: PoolSpec | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
    phases: Sequence[int] | None = None,
    max_iters: int | None = None,
    callback: Callable[[int, StepInfo], None] | None = None,
) -> tuple[PhaseRecord, ...]:
    """Train ``pool`` with integrated progressive shrinking; returns the new phase records.

    ``pool_spec`` (default ``pool.spec``) gives the schedule; it must describe the pool's
    architecture. ``phases`` (0-based indices) defaults to the phases not yet in
    ``pool.record``, so a stopped run resumes where it stopped. ``max_iters`` caps every phase
    (tests, smoke runs). ``callback(phase, StepInfo)`` runs after every step. Records are also
    appended to ``pool.record``.

    Phase 0 trains the largest sub-network with the detection loss. A later phase re-orders
    channels by importance (if ``train.reorder``), then every iteration trains one sub-network
    sampled uniformly from the phase's space, with KD from a frozen copy of the super-net taken
    as the phase starts (BN-recalibrated from phase 2 on, since the super-net's statistics are by
    then a mixture) — so running the phases in one call or one call per phase is the same. The
    distiller's adapter is made elastic, so it reads whatever FPN width the sampled student has.
    """
    spec = pool_spec or pool.spec
    if not spec.same_architecture(pool.spec):
        raise SpecError(
            f"train_pool: the pool spec describes another super-net or space than pool {pool.name}"
        )
    todo = list(range(len(pool.record), len(spec.phases))) if phases is None else list(phases)
    for i in todo:
        if not 0 <= i < len(spec.phases):
            raise SpecError(f"train_pool: no phase {i} (the spec has {len(spec.phases)})")
    dev = torch.device(device)
    pool.to(dev)
    t = spec.train
    records = []
    for i in todo:
        phase = spec.phases[i]
        reordered = False
        terms: list[nn.Module] = []
        if i > 0:
            # The teacher: a frozen copy of the super-net as this phase starts. After phase 1 its
            # BN statistics mix every sampled sub-network's, so they are re-estimated.
            teacher = pool.extract(pool.largest, device=dev)
            if i > 1:
                recalibrate_bn(
                    teacher,
                    dataset,
                    batches=t.recalibration_batches,
                    device=dev,
                    batch_size=t.batch_size,
                    resolutions=pool.resolutions,
                    seed=t.seed,
                )
            if t.reorder:
                reorder_channels(pool.supernet)
                reordered = True
            distiller = make_distiller(pool.supernet, teacher, spec.kd)
            distiller.adapter = ElasticConv2d.from_module(distiller.adapter)
            terms.append(distiller)
        config = TrainConfig(
            epochs=phase.epochs,
            max_iters=max_iters,
            batch_size=t.batch_size,
            lr=phase.lr,
            momentum=t.momentum,
            weight_decay=t.weight_decay,
            warmup_iters=t.warmup_iters,
            schedule=t.schedule,
            grad_clip=t.grad_clip,
            amp=t.amp,
            device=str(dev),
            seed=t.seed + i,
            resolutions=pool.resolutions,
            log_every=t.log_every,
        )
        schedule = _SubnetSchedule(pool, phase.space, np.random.default_rng([t.seed, 0x1B5, i]))
        logger.info(
            "IPS phase %d (%s): %s, %g epochs, lr %g",
            i,
            phase.name,
            phase.space.describe(),
            phase.epochs,
            phase.lr,
        )
        schedule.next()

        def step(info: StepInfo, i: int = i, schedule: _SubnetSchedule = schedule) -> None:
            schedule.after_step(info)
            if callback is not None:
                callback(i, info)

        try:
            result = train(
                pool.supernet, dataset, config, loss_terms=terms, progress=progress, callback=step
            )
        finally:
            stop_recording(pool.supernet)
            pool.activate(pool.largest)
        record = PhaseRecord(
            phase=i,
            name=phase.name,
            space=phase.space.describe(),
            epochs=phase.epochs,
            lr=phase.lr,
            iterations=result.iterations,
            seconds=result.seconds,
            images_per_s=result.images_per_s,
            final_losses=dict(result.final_losses),
            loss_history=tuple(result.loss_history),
            history_stride=result.history_stride,
            subnets_sampled=len(schedule.sampled),
            reordered=reordered,
        )
        logger.info(
            "IPS phase %d done: %d iterations, %d sub-networks, %.0fs, losses %s",
            i,
            record.iterations,
            record.subnets_sampled,
            record.seconds,
            record.final_losses,
        )
        records.append(record)
        pool.record = (*pool.record, record)
    return tuple(records)


# ---------------------------------------------------------------------- persistence
def _extra(pool: ElasticPool, record: Sequence[PhaseRecord] | None) -> dict[str, Any]:
    rec = pool.record if record is None else tuple(record)
    return {
        "pool": {
            "format": POOL_FORMAT,
            "version": POOL_VERSION,
            "spec": pool.spec.to_dict(),
            "record": [r.to_dict() for r in rec],
        }
    }


def pool_to_bytes(pool: ElasticPool, record: Sequence[PhaseRecord] | None = None) -> bytes:
    """The pool as safetensors bytes (a super-net checkpoint with the pool in its metadata)."""
    return checkpoint_to_bytes(
        pool.supernet, class_names=pool.class_names, extra=_extra(pool, record)
    )


def save_pool(
    path: str | Path, pool: ElasticPool, record: Sequence[PhaseRecord] | None = None
) -> Path:
    """Write the pool atomically; ``record`` defaults to ``pool.record``."""
    return save_checkpoint(
        path, pool.supernet, class_names=pool.class_names, extra=_extra(pool, record)
    )


def _pool_from_checkpoint(ck: Any, source: str) -> ElasticPool:
    doc = ck.extra.get("pool")
    if not isinstance(doc, dict) or doc.get("format") != POOL_FORMAT:
        raise CheckpointError(
            f"{source}: a detector checkpoint, not a teacher pool (no pool metadata)"
        )
    if doc.get("version") != POOL_VERSION:
        raise CheckpointError(
            f"{source}: unsupported pool version {doc.get('version')!r} "
            f"(this jdsearch reads {POOL_VERSION})"
        )
    try:
        spec = PoolSpec.from_dict(doc.get("spec"), source=f"{source}: pool")
    except SpecError as e:
        raise CheckpointError(f"{source}: invalid pool spec in metadata: {e}") from None
    try:
        record = tuple(PhaseRecord.from_dict(r) for r in doc.get("record", []))
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: malformed pool training record ({e})") from None
    try:
        return ElasticPool(
            spec,
            ck.num_classes,
            detector_spec=ck.spec,
            supernet=ck.detector,
            name=ck.spec.name,
            class_names=ck.class_names,
            record=record,
        )
    except SpecError as e:
        raise CheckpointError(
            f"{source}: the stored super-net does not match its pool spec: {e}"
        ) from None


def pool_from_bytes(
    data: bytes, source: str = "<bytes>", *, device: str | torch.device = "cpu"
) -> ElasticPool:
    """Read :func:`pool_to_bytes` output; corrupt data raises :class:`CheckpointError`."""
    return _pool_from_checkpoint(checkpoint_from_bytes(data, source, device=device), source)


def load_pool(path: str | Path, *, device: str | torch.device = "cpu") -> ElasticPool:
    """Read a pool file written by :func:`save_pool` (verified; never unpickles)."""
    return _pool_from_checkpoint(load_checkpoint(path, device=device), str(path))


def train_and_save_pool(
    pool_spec: PoolSpec,
    dataset: Dataset[Any],
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    resume: bool = True,
    max_iters: int | None = None,
    detector_spec: DetectorSpec | None = None,
) -> ElasticPool:
    """Build (or, with ``resume`` and an existing ``path``, load) a pool, train the phases still
    to do, and save it to ``path`` after every phase. Entry point of ``jdsearch pool train``.

    ``dataset`` gives the classes (``num_classes``, ``class_names``). Resuming requires the file's
    pool to have the same super-net and space; the schedule of the phases still to run comes from
    ``pool_spec``.
    """
    p = Path(path)
    if resume and p.exists():
        pool = load_pool(p, device=device)
        if not pool.spec.same_architecture(pool_spec):
            raise SpecError(
                f"{p}: holds a pool with another super-net or space; remove it or change the path"
            )
        num_classes = getattr(dataset, "num_classes", pool.num_classes)
        if num_classes != pool.num_classes:
            raise SpecError(
                f"{p}: the pool has {pool.num_classes} classes, the dataset {num_classes}"
            )
        pool.spec = pool_spec
        logger.info(
            "resuming pool %s after %d of %d phases", p, len(pool.record), len(pool_spec.phases)
        )
    else:
        num_classes = getattr(dataset, "num_classes", None)
        if not isinstance(num_classes, int):
            raise SpecError("train_and_save_pool: the dataset does not tell its num_classes")
        pool = ElasticPool(
            pool_spec,
            num_classes,
            detector_spec=detector_spec,
            class_names=getattr(dataset, "class_names", None),
        )
    for i in range(len(pool.record), len(pool_spec.phases)):
        train_pool(
            pool,
            dataset,
            pool_spec,
            device=device,
            progress=progress,
            phases=[i],
            max_iters=max_iters,
        )
        save_pool(p, pool)
        logger.info("saved pool after phase %d to %s", i, p)
    if not p.exists():
        save_pool(p, pool)
    return pool
