"""A front the user can ship: every non-dominated trial of a study exported (``jdsearch export
--front``), and the most accurate student that fits a budget (``--max-latency-ms``,
``--max-flops``).

The front is over (AP, cost) where each trial scored best (:func:`~jdsearch.search.queries.
front_of`: a Pareto study's own values; in an H study the same pair, recorded with every trial).
FPS and latencies are measured *here*, batch 1 on the given device: the machine that will run the
detector, not the search's workers.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial

from jdsearch.core.errors import JDSearchError
from jdsearch.engine.latency import Latency, device_name, measure_latencies, measure_latency
from jdsearch.search.cost import arch_key
from jdsearch.search.export import export_trial
from jdsearch.search.queries import completed_trials, front_of, root_of
from jdsearch.search.record import TrialRecord
from jdsearch.store.files import atomic_path

__all__ = ["FRONT_FILE", "Choice", "FrontExport", "choose_trial", "export_front"]

log = logging.getLogger(__name__)

FRONT_FILE = "front.json"


@dataclass(frozen=True)
class FrontExport:
    """What ``export --front`` wrote: ``front.json`` and one export folder per front trial."""

    path: Path  # front.json
    doc: dict[str, Any]

    @property
    def folders(self) -> list[Path]:
        """The export folders, by ascending cost."""
        return [self.path.parent / e["folder"] for e in self.doc["front"]]


def _point(t: FrozenTrial) -> dict[str, Any]:
    """AP, cost, FLOPs and H where the trial scored best (as its export is sized)."""
    r = TrialRecord.from_trial(t)
    res = str(r.best_resolution)
    flops, _ = r.flops_where_scored()
    return {
        "trial": t.number,
        "move": r.move,
        "resolution": res,
        "AP": r.ap.get(res, r.metric_at(res)),  # the score's metric (AP unless set otherwise)
        "cost": r.cost.get(res),
        "GFLOPs": None if flops is None else flops / 1e9,
        "params": r.params,
        "H": r.value,
    }


def export_front(
    handle: Any,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    repeats: int = 10,
    onnx: bool = True,
    heldout: Any = None,
) -> FrontExport:
    """Export every non-dominated trial of an opened study to ``out_dir/trial-N`` and write
    ``out_dir/front.json``: for each (and for the base trial) AP, cost, FLOPs and FPS, FPS
    measured here on ``device``, all detectors timed interleaved (``repeats`` calls each).

    Raises:
        JDSearchError: no completed trial records a cost (a study from before ``score.cost``).
    """
    trials = handle.study.get_trials(deepcopy=False)
    front = front_of(trials)
    if not front:
        raise JDSearchError(
            f"study {handle.study.study_name!r}: no completed trial records its cost (AP and "
            "cost are recorded since score.cost exists): no front to export"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries, detectors = [], []
    for t in front:
        folder = f"trial-{t.number}"
        if (out / folder).is_dir():
            shutil.rmtree(out / folder)  # an earlier export of the front: replaced
        exported = export_trial(handle, out / folder, trial=t.number, onnx=onnx, heldout=heldout)
        held = exported.info["source"].get("heldout")
        entries.append(
            {**_point(t), "folder": folder, "heldout_AP": held and held["metrics"]["AP"]}
        )
        detectors.append((exported.detector, exported.input_size))
    base = root_of(trials)
    base_entry = None if base is None else _point(base)
    timed_entries = list(entries)
    if base is not None and base_entry is not None:
        detectors.append((handle.checkpoint(base).detector, base_entry["resolution"]))
        timed_entries.append(base_entry)
    timed = measure_latencies(detectors, device=device, warmup=2, repeats=repeats)
    for entry, lat in zip(timed_entries, timed, strict=True):
        entry.update({"FPS": lat.images_per_s, "latency_ms": lat.median_ms})
    doc = _front_doc(handle, entries, base_entry, device, timed)
    path = out / FRONT_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
    return FrontExport(path, doc)


def _front_doc(
    handle: Any,
    entries: list[dict[str, Any]],
    base: dict[str, Any] | None,
    device: str,
    timed: Sequence[Latency],
) -> dict[str, Any]:
    score = handle.spec.score
    return {
        "study": handle.study.study_name,
        "score": {
            "mode": score.mode,
            "metric": score.metric,
            "cost": score.cost,
            "cost_is": "(C/C_base)·(R/R_base)^beta at the trial's best resolution",
            "alpha": score.alpha,
            "beta": score.beta,
        },
        "fps": {"device": device_name(device), "repeats": timed[0].repeats if timed else 0},
        "base": base,
        "front": entries,
    }


# ---------------------------------------------------------------------- a budget
@dataclass
class Choice:
    """The trial ``choose_trial`` picked, and the latencies it measured on the way (ms)."""

    trial: int
    measured: dict[int, float] = field(default_factory=dict)
    device: str = ""

    def describe(self) -> str:
        """One line per measured trial, then the choice."""
        lines = [f"  trial {n}: {ms:.2f} ms on {self.device}" for n, ms in self.measured.items()]
        return "\n".join([*lines, f"chosen: trial {self.trial}"])


def choose_trial(
    handle: Any,
    *,
    max_latency_ms: float | None = None,
    max_gflops: float | None = None,
    device: str = "cpu",
    repeats: int = 10,
) -> Choice:
    """The most accurate completed trial (AP where it scored best; ties: the cheaper, then the
    earlier) whose FLOPs there are at most ``max_gflops`` G and whose batch-1 latency there,
    measured here on ``device``, is at most ``max_latency_ms``. Latencies are measured from the
    most accurate trial down, until one fits (one measurement per architecture and size).

    Raises:
        JDSearchError: a bound that is not a positive number, or no trial fits (naming the
            closest).
    """
    for name, bound in (("--max-latency-ms", max_latency_ms), ("--max-flops", max_gflops)):
        if bound is not None and not (math.isfinite(bound) and bound > 0):
            raise JDSearchError(f"{name} must be a positive number, got {bound}")
    points = [_point(t) for t in completed_trials(handle.study.get_trials(deepcopy=False))]
    points = [p for p in points if p["AP"] is not None and p["GFLOPs"] is not None]
    fits = [p for p in points if max_gflops is None or p["GFLOPs"] <= max_gflops]
    if not fits:
        least = min((p["GFLOPs"] for p in points), default=math.nan)
        raise JDSearchError(
            f"no trial of study {handle.study.study_name!r} fits --max-flops {max_gflops:g} G "
            f"(the cheapest costs {least:.3f} G where it scored best)"
        )
    fits.sort(key=lambda p: (-p["AP"], p["GFLOPs"], p["trial"]))
    if max_latency_ms is None:
        return Choice(fits[0]["trial"])
    return _fastest_fit(handle, fits, max_latency_ms, device, repeats)


def _fastest_fit(
    handle: Any, ranked: list[dict[str, Any]], bound: float, device: str, repeats: int
) -> Choice:
    """The first of ``ranked`` whose latency here is at most ``bound`` ms."""
    choice = Choice(-1, device=device_name(device))
    seen: dict[tuple[str, str], float] = {}
    by_number = {t.number: t for t in handle.study.get_trials(deepcopy=False)}
    for p in ranked:
        detector = handle.checkpoint(by_number[p["trial"]], device=device).detector
        key = (arch_key(detector), p["resolution"])
        if key not in seen:
            lat = measure_latency(detector, p["resolution"], device=device, repeats=repeats)
            seen[key] = lat.median_ms
        choice.measured[p["trial"]] = seen[key]
        if seen[key] <= bound:
            choice.trial = p["trial"]
            return choice
    fastest = min(choice.measured.items(), key=lambda x: x[1])
    raise JDSearchError(
        f"no trial of study {handle.study.study_name!r} runs within {bound:g} ms on "
        f"{choice.device}: the fastest, trial {fastest[0]}, takes {fastest[1]:.2f} ms"
    )
