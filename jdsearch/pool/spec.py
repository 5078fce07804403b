"""The pool spec: the ``pool:`` section of a study spec (paper A.1.3, table 8).

:class:`PoolSpec` names the super-net (detector template, block kind, base widths ``W``), its
sub-network space and the integrated-progressive-shrinking phases (:class:`PhaseSpec`: epochs,
learning rate and the space each phase samples from), plus the training settings shared by every
phase (:class:`PoolTrainSpec`) and the distillation settings. :meth:`PoolSpec.paper` is the
paper's pool, :meth:`PoolSpec.tiny` a CPU-sized one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from jdsearch.arch import BASIC, BOTTLENECK, NUM_STAGES
from jdsearch.distill import KDConfig
from jdsearch.errors import SpecError
from jdsearch.pool.reader import _is_int, _Reader
from jdsearch.pool.space import SubnetConfig, SubnetSpace, _singleton
from jdsearch.resolution import Resolution, parse_resolutions
from jdsearch.train import COSINE, STEP

__all__ = ["RESNET_WIDTHS", "PhaseSpec", "PoolSpec", "PoolTrainSpec"]

RESNET_WIDTHS = (64, 128, 256, 512)


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
