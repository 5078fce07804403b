"""The elastic super-net wrapper (:class:`ElasticPool`): activate, extract and teach sub-networks.

**Using it.** :meth:`ElasticPool.extract` returns a standalone detector built by
:func:`~jdsearch.models.detector.build_detector` from the sub-network's arch, with weights cut from
the super-net; :func:`~jdsearch.methods.pool.bn.recalibrate_bn` then re-estimates its BN statistics (the
super-net's mix every sampled sub-network's), which the paper calls "essential for performance
recovery". :meth:`ElasticPool.teacher` does both.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from jdsearch.core.errors import SpecError
from jdsearch.core.resolution import Resolution
from jdsearch.methods.pool.bn import recalibrate_bn
from jdsearch.methods.pool.elastic import (
    check_fits,
    make_elastic,
    set_active_arch,
    sliced_state_dict,
)
from jdsearch.methods.pool.expand import expand_base
from jdsearch.methods.pool.record import PhaseRecord
from jdsearch.models.detector import Detector, build_detector
from jdsearch.spec.arch import BackboneArch
from jdsearch.spec.detector import DetectorSpec, load_spec
from jdsearch.spec.pool import PoolSpec
from jdsearch.spec.pool_space import SubnetConfig, SubnetSpace
from jdsearch.store.checkpoint import tensors_sha256

__all__ = ["ElasticPool"]


class ElasticPool:
    """The elastic super-net and everything needed to run, extract and store its sub-networks.

    ``supernet`` is a :class:`~jdsearch.models.detector.Detector` of the largest arch made elastic
    in place (:func:`jdsearch.methods.pool.elastic.make_elastic`); train it as any detector.
    ``activate(cfg)`` chooses what its forward computes; :meth:`extract` returns a standalone copy
    of a sub-network and :meth:`teacher` one with recalibrated BN.

    Args:
        spec: the pool spec (space, phases, training).
        num_classes: classes including the background.
        detector_spec: the template (heads, input, stem, strides); default
            ``load_spec(spec.detector)``.
        supernet: a loaded super-net to wrap; default a fresh one, seeded by ``spec.train.seed``.
        name: for messages; default ``pool-<template>``.
        class_names: the dataset's foreground names, stored with the pool.
        record: the phases already trained.
        base: a new super-net starts from this detector by function-preserving expansion
            (:func:`jdsearch.methods.pool.expand.expand_base`): it must be one of the space's
            sub-networks (``pool.init: base``). Not with ``supernet``. Its weights' digest is
            :attr:`base_sha256`, stored with the pool.

    Raises:
        SpecError: a sub-network of the space that does not fit the super-net, a super-net whose
            arch is not the space's largest, or a base that is not one of the sub-networks.
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
        base: Detector | None = None,
    ) -> None:
        template = detector_spec if detector_spec is not None else load_spec(spec.detector)
        self.spec = spec
        self.template = template
        self.name = name or f"pool-{template.name}"
        self.class_names = tuple(class_names) if class_names is not None else None
        self.record: tuple[PhaseRecord, ...] = tuple(record)
        self.arch = self.arch_of(spec.largest)
        for cfg in _probes(spec.space):
            check_fits(self.arch, self.arch_of(cfg))
        #: The digest of the base detector's weights (as its checkpoint records it) that the
        #: super-net started from; ``None``: random weights.
        self.base_sha256 = None if base is None else tensors_sha256(base.state_dict())
        #: What made the pool, as the study that trained it keys its pool cache
        #: (``{"key": ..., "fields": {...}}``, stored with the pool); ``None``: not recorded.
        self.made_by: dict[str, Any] | None = None
        if supernet is None:
            supernet = build_detector(
                self.spec_of(spec.largest, self.name), num_classes, seed=spec.train.seed
            )
            if base is not None:
                self._expand(supernet, base)
        elif base is not None:
            raise ValueError("a pool starts from its base or from a loaded super-net, not both")
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

    def _expand(self, supernet: Detector, base: Detector) -> None:
        found = self.spec.base_config(self.template, base.spec)
        if isinstance(found, str):
            raise SpecError(
                f"pool {self.name}: the base {base.spec.name} is not a sub-network: {found}"
            )
        expand_base(supernet, base)

    @property
    def space(self) -> SubnetSpace:
        """The pool's sub-network space (``spec.space``)."""
        return self.spec.space

    @property
    def largest(self) -> SubnetConfig:
        """The super-net's config: the space's largest sub-network."""
        return self.spec.largest

    @property
    def active(self) -> SubnetConfig:
        """The sub-network the super-net's forward computes now."""
        return self._active

    @property
    def resolutions(self) -> tuple[Resolution, ...]:
        """The dynamic-resolution set of training (the pool spec's, else the detector's)."""
        return self.spec.train.resolutions or tuple(self.template.input.resolutions)

    def arch_of(self, cfg: SubnetConfig) -> BackboneArch:
        """The :class:`BackboneArch` of ``cfg`` (stem and strides from the detector template)."""
        return self.spec.arch_of(cfg, self.template.arch)

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
            batches=batches or self.spec.recalibration_batches,
            device=device,
            batch_size=batch_size or self.spec.train.batch_size,
            resolutions=self.resolutions,
        )
        return det

    def to(self, device: str | torch.device) -> ElasticPool:
        """Move the super-net to ``device``; returns the pool."""
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
