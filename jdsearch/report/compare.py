"""Base vs upgraded detector, the way table 4 of the paper compares them.

A row per detector: input size, FLOPs (multiply-adds at *that* input size), FPS (batch 1, measured
here with :func:`jdsearch.engine.latency.measure_latency`), AP, AP50, AP75, APs, APm, APl.

Both rows come from the study, so the comparison is like-for-like: the *base* row is the base
trial (the base detector after the same short fast-evaluation training with distillation that
every student gets), at the base detector's input size when the study evaluated that size and
otherwise at its best-scoring one; the *upgraded* row is the chosen trial (default: the best) at
the resolution where it scored best (the input size an export uses). The metrics are the ones the
search recorded on the study's validation set; FLOPs and FPS are measured on the checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from torch import Tensor

from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import CocoDataset
from jdsearch.engine.evaluate import evaluate
from jdsearch.engine.latency import Latency, measure_latencies
from jdsearch.models.flops import count_flops
from jdsearch.report.trials import percent, trial_h
from jdsearch.search.noise import stored_noise
from jdsearch.search.queries import StudyHandle
from jdsearch.search.record import BASE_RESOLUTION_ATTR, TrialRecord

__all__ = ["METRIC_KEYS", "Comparison", "DetectorRow", "compare_study"]

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass(frozen=True)
class DetectorRow:
    """One row of the table-4 comparison: a trial's detector at one input size, its recorded
    metrics, its FLOPs and, when timed, its latency."""

    label: str  # "base" or "upgraded"
    trial: int
    arch: str  # appendix-B encoding
    input_size: str  # LONGxSHORT
    flops: int  # multiply-adds at input_size
    params: int
    h: float  # the trial's score
    metrics: dict[str, float]  # METRIC_KEYS in [0, 1]; NaN where the val set has no such object
    latency: Latency | None = None
    heldout: dict[str, float] | None = None  # METRIC_KEYS on the held-out split, when judged

    @property
    def fps(self) -> float | None:
        """Batch-1 images/s of ``latency``; ``None`` when it was not timed."""
        return None if self.latency is None else self.latency.images_per_s

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form: every field (``latency`` as a dict) plus ``fps``."""
        d = asdict(self)
        d["latency"] = None if self.latency is None else self.latency.to_dict()
        d["fps"] = self.fps
        return d


@dataclass(frozen=True)
class Comparison:
    """The base and upgraded rows of a study's table-4 comparison (:func:`compare_study`)."""

    study: str
    base: DetectorRow
    upgraded: DetectorRow
    heldout: str | None = None  # what the held-out split is (None: not judged)
    noise: str | None = None  # the study's measured noise floor (None: not measured)

    @property
    def rows(self) -> tuple[DetectorRow, DetectorRow]:
        """``(base, upgraded)``."""
        return (self.base, self.upgraded)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form: the study name and both rows."""
        return {
            "study": self.study,
            "base": self.base.to_dict(),
            "upgraded": self.upgraded.to_dict(),
            "heldout": self.heldout,
            "noise": self.noise,
        }

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Header and cells (strings) of the table-4 comparison, with a change row."""
        header = ["detector", "trial", "input size", "GFLOPs", "FPS", *METRIC_KEYS]
        rows = [_cells(r) for r in self.rows]
        b, u = self.base, self.upgraded
        change = ["change", "", "", _ratio(u.flops, b.flops), _ratio(u.fps, b.fps)]
        change += [_delta(u.metrics.get(k), b.metrics.get(k)) for k in METRIC_KEYS]
        if b.heldout is not None and u.heldout is not None:
            header += ["held-out AP", "held-out AP50"]
            for row, r in zip(rows, self.rows, strict=True):
                row += [percent(r.heldout.get("AP")), percent(r.heldout.get("AP50"))]  # type: ignore[union-attr]
            change += [_delta(u.heldout.get(k), b.heldout.get(k)) for k in ("AP", "AP50")]
        return header, [*rows, change]

    def format(self) -> str:
        """The :meth:`table` as aligned text, with notes on how FPS (when timed) and AP were
        measured."""
        header, rows = self.table()
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
        lines = [
            "  ".join(
                h.ljust(w) if i == 0 else h.rjust(w)
                for i, (h, w) in enumerate(zip(header, widths, strict=True))
            )
        ]
        for r in rows:
            lines.append(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(r, widths, strict=True))
                )
            )
        lat = self.upgraded.latency or self.base.latency
        if lat is not None:
            threads = (
                f" ({lat.threads} thread{'s' if lat.threads != 1 else ''})"
                if lat.device == "cpu"
                else ""
            )
            lines.append(
                f"FPS: batch 1, median of {lat.repeats} interleaved runs on {lat.device}{threads}"
            )
        lines.append(
            "AP: COCO box AP (%) on the selection split, as recorded by the search (it chose the "
            "upgraded detector on it)"
        )
        if self.heldout is not None:
            lines.append(f"held-out AP: on {self.heldout}, which the search never saw")
        lines.append(self.noise or "noise floor: not measured (jdsearch noise --study NAME)")
        return "\n".join(lines)


def _cells(r: DetectorRow) -> list[str]:
    fps = "-" if r.fps is None else f"{r.fps:.1f}"
    return [
        r.label,
        str(r.trial),
        r.input_size,
        f"{r.flops / 1e9:.3f}",
        fps,
        *(percent(r.metrics.get(k)) for k in METRIC_KEYS),
    ]


def _ratio(new: float | None, old: float | None) -> str:
    if new is None or old is None or not old:
        return "-"
    return f"{new / old:.2f}×"


def _delta(new: float | None, old: float | None) -> str:
    if new is None or old is None or math.isnan(new) or math.isnan(old):
        return "-"
    return f"{100 * (new - old):+.1f}"


def _metrics_at(trial: optuna.trial.FrozenTrial, size: str) -> dict[str, float]:
    record = TrialRecord.from_trial(trial)
    values = {k: record.metric_at(size, k) for k in METRIC_KEYS}
    return {k: math.nan if v is None else v for k, v in values.items()}


def _row(
    handle: StudyHandle, trial: optuna.trial.FrozenTrial, label: str, size: str
) -> tuple[DetectorRow, Any]:
    detector = handle.checkpoint(trial).detector  # on the CPU: FLOPs are counted there
    res = Resolution.parse(size)
    report = count_flops(detector, size=res.hw)
    row = DetectorRow(
        label=label,
        trial=trial.number,
        arch=detector.arch.encode(),
        input_size=str(res),
        flops=report.total,
        params=report.params,
        h=trial_h(trial),
        metrics=_metrics_at(trial, size),
    )
    return row, detector


def compare_study(
    handle: StudyHandle,
    trial: int | None = None,
    *,
    fps: bool = True,
    device: str = "cpu",
    warmup: int = 3,
    repeats: int = 20,
    images: Sequence[Tensor] | None = None,
    heldout: CocoDataset | None = None,
) -> Comparison:
    """The table-4 comparison of the study's base trial and trial ``trial`` (default: the best).

    FPS of the two detectors is timed interleaved (:func:`jdsearch.engine.latency.measure_latencies`),
    once when both rows are the same trial. With ``heldout`` (:func:`~jdsearch.search.splits.
    heldout_split`) both are also evaluated, each at its input size, on images the search never
    saw.
    """
    base_trial = handle.base_trial()
    best = handle.trial(trial)
    base_record = TrialRecord.from_trial(base_trial)
    base_size = handle.study.user_attrs.get(BASE_RESOLUTION_ATTR, "")
    if base_size not in base_record.metrics:
        base_size = base_record.best_resolution
    base, base_det = _row(handle, base_trial, "base", base_size)
    up_size = TrialRecord.from_trial(best).best_resolution
    up, up_det = _row(handle, best, "upgraded", up_size)
    if fps:
        same = base.trial == up.trial and base.input_size == up.input_size
        entries = [(base_det, base.input_size)] + ([] if same else [(up_det, up.input_size)])
        lats = measure_latencies(
            entries, device=device, warmup=warmup, repeats=repeats, images=images
        )
        base = dataclasses.replace(base, latency=lats[0])
        up = dataclasses.replace(up, latency=lats[-1])
    described = None
    if heldout is not None:
        base = dataclasses.replace(base, heldout=_judge(base_det, heldout, base.input_size, device))
        up = dataclasses.replace(up, heldout=_judge(up_det, heldout, up.input_size, device))
        described = f"{len(heldout)} images of {heldout.ann_file}"
    floor = stored_noise(handle.study)
    noise = None if floor is None else floor.describe()
    return Comparison(handle.study.study_name, base, up, described, noise)


def _judge(detector: Any, data: CocoDataset, size: str, device: str) -> dict[str, float]:
    """COCO metrics of ``detector`` at ``size`` on ``data`` (NaN where undefined)."""
    m = evaluate(detector, data, [Resolution.parse(size)], device=device)[size]
    return {k: float(getattr(m, k)) for k in METRIC_KEYS}
