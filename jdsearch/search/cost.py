"""C of the score H (``score.cost``), as a ratio to the base detector's: multiply-adds at the
base resolution (``flops``, the paper's), parameters (``params``), or the median batch-1 latency
on the worker's own device (``latency``).

A latency is timed interleaved against the base detector at the same resolution
(:func:`jdsearch.engine.latency.measure_latencies`), so a machine's load and speed hit both alike and the
ratio of workers on different machines stays comparable. It is cached per (architecture,
resolution, device name): in this worker, and in the study, whose completed trials record their
measurements, so a trial whose student has an architecture timed before on this device (a teacher
move keeps the student) is not timed again. The base detector's own architecture costs 1 by
definition and is never timed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from jdsearch.core.config import plain
from jdsearch.core.resolution import Resolution
from jdsearch.engine.latency import device_name, measure_latencies
from jdsearch.models import Detector
from jdsearch.search.record import TrialRecord

__all__ = ["CostMeter", "arch_key", "weighted_cost"]

log = logging.getLogger(__name__)


def arch_key(detector: Detector) -> str:
    """What a detector's latency depends on: its backbone and FPN, RPN and RoI-head settings and
    class count (a hash: equal for students of one architecture, whatever their weights)."""
    spec = detector.spec
    doc = {
        "arch": spec.arch.to_dict(),
        "rpn": plain(spec.rpn),
        "roi": plain(spec.roi),
        "classes": detector.roi_heads.box_predictor.cls_score.out_features,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def weighted_cost(ratio: float, res: Resolution, res_base: Resolution, beta: float) -> float:
    """``(C/C_base)·(R/R_base)^β``: the cost H raises to −α, and a Pareto study minimises."""
    return ratio * (res.pixels / res_base.pixels) ** beta


@dataclass
class CostMeter:
    """C/C_base of students, per resolution, for one study on one worker.

    Args:
        kind: ``flops``, ``params`` or ``latency`` (``score.cost``).
        base: loads the base detector (only ``params`` and ``latency`` need it, once).
        base_flops: C_base of ``flops``: the base's multiply-adds at the base resolution.
        device: where latencies are timed (the study's ``device``).
        warmup, repeats: untimed and timed calls of each detector per measurement.
    """

    kind: str
    base: Callable[[], Detector]
    base_flops: int
    device: str = "cpu"
    warmup: int = 3
    repeats: int = 20
    timed: int = 0  # measurements this meter ran (each: the base and a student, interleaved)
    _base: Detector | None = None
    _cache: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)

    def _base_detector(self) -> Detector:
        if self._base is None:
            self._base = self.base().eval()
        return self._base

    def ratios(
        self,
        student: Detector,
        resolutions: Sequence[str],
        *,
        flops: int,
        params: int,
        known: Iterable[FrozenTrial] = (),
    ) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
        """``({resolution: C/C_base}, {resolution: latency record})`` of ``student``; ``flops``
        (at the base resolution) and ``params`` are its counts, ``known`` trials whose recorded
        latencies serve as a cache. The latency records are empty unless ``kind`` is
        ``latency``."""
        if self.kind == "flops":
            return {r: flops / self.base_flops for r in resolutions}, {}
        if self.kind == "params":
            base_params = sum(p.numel() for p in self._base_detector().parameters())
            return {r: params / base_params for r in resolutions}, {}
        records = self.latencies(student, resolutions, known)
        return {r: float(records[r]["ratio"]) for r in resolutions}, records

    def latencies(
        self, student: Detector, resolutions: Sequence[str], known: Iterable[FrozenTrial] = ()
    ) -> dict[str, dict[str, Any]]:
        """The latency record ``{ratio, ms, base_ms, device}`` of ``student`` at each
        resolution: cached, or timed now interleaved with the base at that resolution."""
        key, name = arch_key(student), device_name(self.device)
        self._learn(known, name)
        out = {}
        for res in resolutions:
            cached = self._cache.get((key, res, name))
            if cached is None:
                cached = self._measure(student, key, res, name)
                self._cache[(key, res, name)] = cached
            out[res] = dict(cached)
        return out

    def _learn(self, trials: Iterable[FrozenTrial], name: str) -> None:
        """Take the latencies that completed trials measured on this device into the cache."""
        for t in trials:
            if t.state != TrialState.COMPLETE:
                continue
            r = TrialRecord.from_trial(t)
            if r.arch_key is None:
                continue
            for res, rec in r.latency.items():
                if isinstance(rec, Mapping) and rec.get("device") == name:
                    self._cache.setdefault((r.arch_key, res, name), dict(rec))

    def _measure(self, student: Detector, key: str, res: str, name: str) -> dict[str, Any]:
        base = self._base_detector()
        if key == arch_key(base):  # the base's own architecture: 1 by definition
            return {"ratio": 1.0, "ms": None, "base_ms": None, "device": name}
        pair = [(base, res), (student, res)]
        timed = measure_latencies(
            pair, device=self.device, warmup=self.warmup, repeats=self.repeats
        )
        self.timed += 1
        base_ms, ms = timed[0].median_ms, timed[1].median_ms
        log.info("latency at %s on %s: %.2f ms, base %.2f ms", res, name, ms, base_ms)
        return {"ratio": ms / base_ms, "ms": ms, "base_ms": base_ms, "device": name}
