"""The pool spec: the ``pool:`` section of a study spec (paper A.1.3, table 8).

:class:`PoolSpec` names the super-net (detector template, block kind, base widths ``W``), its
sub-network space and the integrated-progressive-shrinking phases (:class:`PhaseSpec`: epochs,
learning rate and the space each phase samples from), plus the training settings shared by every
phase (a :class:`~jdsearch.spec.settings.TrainConfig`) and the distillation settings. Torch-free.
:meth:`PoolSpec.paper` is the paper's pool, :meth:`PoolSpec.tiny` a CPU-sized one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jdsearch.core.config import FieldError, Fields, is_int, plain, read_dataclass
from jdsearch.spec.arch import BASIC, BOTTLENECK, NUM_STAGES, BackboneArch
from jdsearch.spec.detector import DetectorSpec
from jdsearch.spec.pool_space import SubnetConfig, SubnetSpace, singleton
from jdsearch.spec.settings import STEP, KDConfig, TrainConfig

__all__ = ["POOL_INITS", "POOL_TRAIN", "RESNET_WIDTHS", "PhaseSpec", "PoolSpec"]

RESNET_WIDTHS = (64, 128, 256, 512)
#: Training settings of every IPS phase (each phase sets its own ``epochs`` and ``lr``).
POOL_TRAIN = TrainConfig(schedule=STEP)
# What ``pool.train`` may not set: each phase sets its length and learning rate, the caller the
# device.
_PHASE_SET = ("epochs", "lr", "max_iters", "device")
# jdsearch 0.1 kept these two in ``pool.train``; they are read from there too.
_LEGACY_TRAIN_KEYS = ("reorder", "recalibration_batches")
#: ``pool.init``: the super-net starts from the base detector (function-preserving expansion) or
#: from random weights. Unset: ``base`` when the base is one of the pool's sub-networks.
POOL_INITS = ("base", "random")


@dataclass(frozen=True)
class PhaseSpec:
    """One IPS phase: its length, initial learning rate and the space it samples from."""

    name: str
    epochs: float
    lr: float
    space: SubnetSpace

    def to_dict(self, full: SubnetSpace, first: bool) -> dict[str, Any]:
        """The spec form of the phase: name, epochs, lr and, unless it is the ``first``, the keys of
        its space that differ from ``full``."""
        d: dict[str, Any] = {"name": self.name, "epochs": self.epochs, "lr": self.lr}
        if not first:
            own, base = self.space.to_dict(), full.to_dict()
            d.update({k: v for k, v in own.items() if v != base[k]})
        return d


@dataclass(frozen=True)
class PoolSpec:
    """The ``pool:`` section of a study spec: super-net, space, IPS phases, training, KD.

    ``detector`` names the detector spec (preset or file) that provides the stem, strides, RPN,
    RoI heads and input sizes; its own depths/widths are replaced by the pool's. ``base_widths``
    is ``W`` (the 1.0× inner width per stage). ``space`` is the pool's sub-network space; the
    first phase trains the super-net (``space.largest()``) alone, each later phase samples from
    its own space (default: ``space``), which must contain the previous phase's; the last phase
    must cover the whole space. ``train`` holds the training settings of every phase (its
    ``resolutions`` empty: the detector spec's dynamic set). ``reorder``: re-order channels by
    importance before each shrinking phase. ``recalibration_batches``: batches used to re-estimate
    the BN statistics of an extracted teacher (:meth:`ElasticPool.teacher`). ``init``: where the
    super-net's weights start (:data:`POOL_INITS`); ``None`` (unset): from the base detector when
    the base is one of the pool's sub-networks (:meth:`base_mismatch`), else random.
    ``checkpoint``: a trained pool file (``.safetensors``) that a study uses instead of training
    its pool, when the settings that made it are the study's (``docs/pool.md``); it is not one of
    them, and a pool file does not record it.

    Raises:
        FieldError: an invalid field; read from a file, it names the dotted field.
    """

    space: SubnetSpace
    phases: tuple[PhaseSpec, ...]
    detector: str = "r101-fpn"
    kind: str = BOTTLENECK
    base_widths: tuple[int, ...] = RESNET_WIDTHS
    train: TrainConfig = POOL_TRAIN
    kd: KDConfig = field(default_factory=KDConfig)
    reorder: bool = True
    recalibration_batches: int = 10
    init: str | None = None
    checkpoint: Path | None = None

    def __post_init__(self) -> None:
        if self.init is not None and self.init not in POOL_INITS:
            why = f"must be {' or '.join(repr(v) for v in POOL_INITS)}"
            raise FieldError("pool", "init", why, self.init)
        if self.checkpoint is not None and self.checkpoint.suffix != ".safetensors":
            why = "expected a trained pool's .safetensors file"
            raise FieldError("pool", "checkpoint", why, str(self.checkpoint))
        object.__setattr__(self, "phases", tuple(self.phases))
        object.__setattr__(self, "base_widths", tuple(self.base_widths))
        if self.kind not in (BASIC, BOTTLENECK):
            raise FieldError("pool", "kind", f"must be '{BASIC}' or '{BOTTLENECK}'", self.kind)
        if len(self.base_widths) != NUM_STAGES or not all(
            is_int(w) and w > 0 for w in self.base_widths
        ):
            why = f"expected {NUM_STAGES} positive integers"
            raise FieldError("pool", "base_widths", why, list(self.base_widths))
        if not is_int(self.recalibration_batches) or self.recalibration_batches < 1:
            why = "must be a positive integer"
            raise FieldError("pool", "recalibration_batches", why, self.recalibration_batches)
        self._check_widths()
        self._check_phases()

    def _check_widths(self) -> None:
        for si, (base, mults) in enumerate(zip(self.base_widths, self.space.widths, strict=True)):
            widths = [_scaled(base, m) for m in mults]
            if len(set(widths)) != len(widths) or min(widths) < 1:
                raise FieldError(
                    "pool",
                    "space.widths",
                    f"stage {si + 1} multipliers {list(mults)} of base width {base} give widths "
                    f"{widths}; they must be distinct and ≥ 1",
                )

    def _check_phases(self) -> None:
        if not self.phases:
            raise FieldError("pool", "phases", "at least one phase (the super-net) is needed")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise FieldError("pool", "phases", "phase names must be unique", names)
        largest = self.space.largest()
        first = self.phases[0].space
        if first.size() != 1 or first.largest() != largest:
            why = f"the first phase trains the super-net {largest} alone"
            raise FieldError("pool", "phases[0]", why)
        for i, phase in enumerate(self.phases):
            _check_phase(phase, i, self.space, self.phases[i - 1] if i else None)
        if self.phases[-1].space != self.space:
            raise FieldError(
                "pool",
                "phases",
                f"the last phase samples {self.phases[-1].space.describe()}, not the whole space "
                f"{self.space.describe()}; sub-networks outside it would never be trained",
            )

    @property
    def largest(self) -> SubnetConfig:
        """The super-net's config: the space's largest sub-network."""
        return self.space.largest()

    def widths_of(self, cfg: SubnetConfig) -> tuple[int, ...]:
        """Inner width of each stage of ``cfg``: ``round(multiplier × base width)``."""
        return tuple(_scaled(b, m) for b, m in zip(self.base_widths, cfg.widths, strict=True))

    def arch_of(self, cfg: SubnetConfig, template: BackboneArch) -> BackboneArch:
        """The backbone of sub-network ``cfg``: stem and strides from ``template`` (the detector
        template's arch), blocks of :attr:`kind` at :meth:`widths_of`, FPN ``cfg.fpn``."""
        return BackboneArch.resnet(
            cfg.depths,
            kind=self.kind,
            widths=self.widths_of(cfg),
            stem=template.stem,
            fpn=cfg.fpn,
        ).with_strides(template.strides)

    def config_of(self, arch: BackboneArch, template: BackboneArch) -> SubnetConfig | str:
        """The member of the space whose backbone is ``arch`` (stem and strides from
        ``template``); else why there is none, in words."""
        if arch.kind != self.kind:
            return f"its blocks are {arch.kind}, the pool's {self.kind}"
        mults = []
        for si, (stage, base, choices) in enumerate(
            zip(arch.stages, self.base_widths, self.space.widths, strict=True)
        ):
            width = stage.blocks[0].channels[0]
            found = [m for m in choices if _scaled(base, m) == width]
            if not found:
                widths = [_scaled(base, m) for m in choices]
                return f"its stage {si + 1} width {width} is not one of the pool's {widths}"
            mults.append(found[0])
        cfg = SubnetConfig(arch.depths, tuple(mults), arch.fpn)
        if not self.space.contains(cfg):
            return f"its shape {cfg} is not in the pool's space {self.space.describe()}"
        ours, largest = self.arch_of(cfg, template), self.arch_of(self.largest, template)
        for si in range(NUM_STAGES):
            if ours.slot(si, 0).has_projection != largest.slot(si, 0).has_projection:
                return (
                    f"its stage {si + 1} first block has no projection shortcut where the "
                    "super-net's has one (its width is the stem's)"
                )
        if ours != arch:
            return (
                f"its backbone {arch.encode()} (stem {arch.stem}, strides {list(arch.strides)}) "
                f"is not the pool's {cfg}, {self.arch_of(cfg, template).encode()} "
                f"(stem {template.stem}, strides {list(template.strides)})"
            )
        return cfg

    def base_config(self, template: DetectorSpec, base: DetectorSpec) -> SubnetConfig | str:
        """The sub-network that is the ``base`` detector (the pool's block family, with the
        template's heads and input), or why there is none, in words: where ``pool.init: base``
        can start the super-net from the base."""
        cfg = self.config_of(base.arch, template.arch)
        if isinstance(cfg, str):
            return cfg
        for name in ("rpn", "roi", "input"):
            if getattr(base, name) != getattr(template, name):
                return f"its {name} settings are not those of the pool's detector {template.name}"
        return cfg

    def same_architecture(self, other: PoolSpec) -> bool:
        """Whether ``other`` describes the same super-net and space (schedules may differ)."""
        return (self.kind, self.base_widths, self.space) == (
            other.kind,
            other.base_widths,
            other.space,
        )

    def phase_config(self, i: int, **overrides: Any) -> TrainConfig:
        """The training settings of phase ``i``: :attr:`train` with the phase's length, learning
        rate and seed (``train.seed + i``), and ``overrides``."""
        phase = self.phases[i]
        return dataclasses.replace(
            self.train, epochs=phase.epochs, lr=phase.lr, seed=self.train.seed + i, **overrides
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (reads back through :meth:`from_dict`)."""
        train = plain(self.train)
        for key in _PHASE_SET:
            train.pop(key)
        return {
            "detector": self.detector,
            "kind": self.kind,
            "base_widths": list(self.base_widths),
            "space": self.space.to_dict(),
            "phases": [p.to_dict(self.space, i == 0) for i, p in enumerate(self.phases)],
            "train": train,
            "kd": self.kd.to_dict(),
            "reorder": self.reorder,
            "recalibration_batches": self.recalibration_batches,
            **({} if self.init is None else {"init": self.init}),
            **({} if self.checkpoint is None else {"checkpoint": str(self.checkpoint)}),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "", path: str = "pool") -> PoolSpec:
        """Validate the ``pool:`` mapping of a study spec (see :meth:`from_fields`).

        Raises:
            SpecError: one line naming ``SOURCE: PATH.KEY`` and the value.
        """
        return cls.from_fields(Fields(data, source, path))

    @classmethod
    def from_fields(cls, f: Fields) -> PoolSpec:
        """Read the ``pool:`` mapping: ``detector``, ``kind``, ``base_widths``, ``space``,
        ``phases``, ``train`` (a :class:`TrainConfig` but for ``epochs``, ``lr``, ``max_iters``
        and ``device``), ``kd``, ``reorder``, ``recalibration_batches``, ``init`` and
        ``checkpoint``."""
        detector = f.take("detector", str, "r101-fpn")
        if not detector:
            f.fail("detector", "expected a detector preset name or spec path, got ''")
        kind = f.take("kind", str, BOTTLENECK)
        base = f.take("base_widths", tuple[int, ...], RESNET_WIDTHS)
        f.require("space")
        space = SubnetSpace.from_fields(f.sub("space"))
        f.require("phases")
        phases = tuple(_read_phase(pf, i, space) for i, pf in enumerate(f.each("phases")))
        tf = f.sub("train")
        legacy = {
            "reorder": tf.take("reorder", bool, True),
            "recalibration_batches": tf.take("recalibration_batches", int, 10),
        }
        train = read_dataclass(tf, TrainConfig, POOL_TRAIN, exclude=_PHASE_SET)
        kd = read_dataclass(f.sub("kd"), KDConfig)
        reorder = f.take("reorder", bool, legacy["reorder"])
        recalibration = f.take("recalibration_batches", int, legacy["recalibration_batches"])
        init = f.take("init", str | None, None)
        checkpoint = f.take("checkpoint", Path | None, None)
        f.done()
        return f.build(
            cls,
            space,
            phases,
            detector,
            kind,
            base,
            train,
            kd,
            reorder,
            recalibration,
            init,
            checkpoint,
        )

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
            PhaseSpec("supernet", 48, 0.12, singleton(space.largest())),
            PhaseSpec("shrink1", 24, 0.04, shrink1),
            PhaseSpec("shrink2", 36, 0.04, space),
        )
        return cls(
            space,
            phases,
            "r101-fpn",
            BOTTLENECK,
            RESNET_WIDTHS,
            dataclasses.replace(POOL_TRAIN, batch_size=64, warmup_iters=500),
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
            PhaseSpec("supernet", epochs[0], lr, singleton(space.largest())),
            PhaseSpec("shrink1", epochs[1], lr / 2, shrink1),
            PhaseSpec("shrink2", epochs[2], lr / 2, space),
        )
        return cls(
            space,
            phases,
            "tiny-r50-fpn",
            BOTTLENECK,
            (8, 16, 32, 64),
            dataclasses.replace(POOL_TRAIN, batch_size=4, warmup_iters=50, grad_clip=10.0),
        )


def _check_phase(phase: PhaseSpec, i: int, space: SubnetSpace, previous: PhaseSpec | None) -> None:
    where = f"phases[{i}]"
    if not phase.space.issubset(space):
        why = f"space {phase.space.describe()} leaves the pool's space"
        raise FieldError("pool", where, why)
    if previous is not None and not previous.space.issubset(phase.space):
        raise FieldError(
            "pool",
            where,
            f"space {phase.space.describe()} drops sub-networks of the previous phase "
            "(progressive shrinking only adds)",
        )
    ok = all(v > 0 and math.isfinite(v) for v in (phase.epochs, phase.lr))
    if not ok:
        why = f"epochs and lr must be positive, got {phase.epochs}, {phase.lr}"
        raise FieldError("pool", where, why)


def _read_phase(f: Fields, i: int, space: SubnetSpace) -> PhaseSpec:
    """Phase ``i`` of ``pool.phases``: name, epochs, lr and (after the first) its space."""
    f.require("epochs", "lr")
    name = f.take("name", str, "supernet" if i == 0 else f"shrink{i}")
    if not name:
        f.fail("name", "expected a non-empty string")
    epochs, lr = f.take("epochs", float), f.take("lr", float)
    for key, value in (("epochs", epochs), ("lr", lr)):
        if value <= 0:
            f.fail(key, f"must be positive, got {value!r}")
    keys = ("depths", "widths", "fpn")
    if i == 0:
        extra = sorted(set(keys) & set(f.data))
        if extra:
            f.fail(extra[0], "the first phase trains the super-net alone; it takes no space")
        phase_space = singleton(space.largest())
    else:
        sub = Fields({k: f.raw(k) for k in keys if f.has(k)}, f.source, f.path)
        phase_space = SubnetSpace.from_fields(sub, default=space)
    f.done(["name", "epochs", "lr", *keys])
    return PhaseSpec(name, epochs, lr, phase_space)


def _scaled(base: int, mult: float) -> int:
    return math.floor(base * mult + 0.5)
