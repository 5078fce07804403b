"""The noise floor of a study: one trial re-run with other training seeds, and the spread of its
H and AP. A difference smaller than this spread is not a win.

A re-run loads the trial's pair exactly as the trial did (its parent's checkpoint, its move, its
teacher), trains it with the fast evaluation under another seed and scores it on the selection
split. Nothing is added to the lineage; the result is kept in the study's user attrs
(``noise_floor``) for the report.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

import optuna

from jdsearch.core.errors import JDSearchError
from jdsearch.search.objective import Objective, SearchContext
from jdsearch.search.record import NOISE_ATTR, TrialRecord

__all__ = ["NoiseFloor", "measure_noise", "stored_noise"]

_SEED_STRIDE = 1_000_003  # re-run k of trial n trains with seed_of(n) + k * stride


@dataclass(frozen=True)
class NoiseFloor:
    """H (the trial value) and AP (the score's metric at the trial's recorded best resolution)
    of one trial re-run with ``len(seeds)`` training seeds, and the trial's own recorded ones."""

    trial: int
    seeds: tuple[int, ...]
    h: tuple[float, ...]
    ap: tuple[float, ...]
    recorded_h: float
    recorded_ap: float

    @property
    def sd_h(self) -> float:
        """Sample standard deviation of H over the re-runs and the recorded value."""
        return statistics.stdev((self.recorded_h, *self.h))

    @property
    def sd_ap(self) -> float:
        """Sample standard deviation of AP (in [0, 1]) over the re-runs and the recorded value."""
        return statistics.stdev((self.recorded_ap, *self.ap))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (what the study stores)."""
        return {**asdict(self), "sd_h": self.sd_h, "sd_ap": self.sd_ap}

    def describe(self) -> str:
        """One line for tables: the spread and what it was measured on."""
        return (
            f"noise floor: trial {self.trial} re-run with {len(self.seeds)} other seeds gives sd "
            f"{self.sd_h:.4f} in H and {100 * self.sd_ap:.1f} points in AP; smaller differences "
            "are not wins"
        )


def measure_noise(
    study: optuna.Study, ctx: SearchContext, trial: int | None = None, *, seeds: int = 3
) -> NoiseFloor:
    """Re-run trial ``trial`` (default: the best) with ``seeds`` other seeds: its move's batches
    (a Taylor ranking, a local recovery) and its training are drawn with each.

    Args:
        study: the study, as :func:`jdsearch.search.session.prepare` opened it.
        ctx: what its trials share (from the same ``prepare``).
        trial: a completed trial's number; default the best.
        seeds: how many re-runs (≥ 2).

    Returns:
        The re-runs' H and AP beside the trial's own; also stored in the study's user attrs.

    Raises:
        JDSearchError: fewer than 2 seeds, or no such completed trial.
    """
    from jdsearch.search.queries import best_of

    if seeds < 2:
        raise JDSearchError(f"noise: at least 2 seeds are needed, got {seeds}")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    t = best_of(list(trials.values())) if trial is None else trials.get(trial)
    if t is None or t.state != optuna.trial.TrialState.COMPLETE:
        raise JDSearchError(f"noise: study {study.study_name!r} has no completed trial {trial}")
    record = TrialRecord.from_trial(t)
    objective = Objective(ctx)
    used, h, ap = [], [], []
    for k in range(1, seeds + 1):
        seed = objective.seed_of(t.number) + k * _SEED_STRIDE
        # the seed draws the move's batches too (Taylor ranking, local recovery), as in a trial
        pair = objective.load_pair(study, t.number, str(record.move), record.parent, seed)
        objective.train_pair(pair, seed)
        score = objective.score(t.number, pair.student)
        res = record.best_resolution or score.best_resolution
        used.append(seed)
        h.append(score.value)
        ap.append(float(getattr(score.metrics[res], ctx.spec.score.metric)))
    recorded_ap = float(record.ap.get(record.best_resolution or "", float("nan")))
    recorded_h = float(record.value)  # type: ignore[arg-type]  # H of a completed trial
    floor = NoiseFloor(t.number, tuple(used), tuple(h), tuple(ap), recorded_h, recorded_ap)
    study.set_user_attr(NOISE_ATTR, floor.to_dict())
    return floor


def stored_noise(study: optuna.Study) -> NoiseFloor | None:
    """The noise floor last measured for the study, if any."""
    d = study.user_attrs.get(NOISE_ATTR)
    if not isinstance(d, dict):
        return None
    keys = ("trial", "seeds", "h", "ap", "recorded_h", "recorded_ap")
    values = {k: tuple(d[k]) if isinstance(d[k], list) else d[k] for k in keys}
    return NoiseFloor(**values)
