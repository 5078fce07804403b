"""A study's live status (``jdsearch status``): who works on it now, how far it got, how long it
has left — read from the database alone, so from any machine that reaches it.

A *live worker* is one whose RUNNING trial beat its heartbeat within the grace period Optuna
fails stale trials after (2 × ``search.heartbeat_s``); a RUNNING trial past it belongs to a lost
worker, which the next worker to start a trial fails and re-queues. The worker is the
``hostname:pid`` its trial records (:data:`~jdsearch.search.record.WORKER_SYSATTR`, set as the
objective starts, before the move is chosen: a trial has none only for the moment between
Optuna's ``ask`` and the objective). A trial without a move is choosing it: a worker waits there
while the root trial runs.

The time left assumes each live worker runs ``search.n_trials`` trials (the stored spec's: a
worker started with another ``--n-trials`` is not known to the study): the trials it has not
started yet take the study's mean trial duration each, and its running trial the rest of one.
"""

from __future__ import annotations

import datetime
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from jdsearch.search.queries import best_of
from jdsearch.search.record import WORKER_SYSATTR, TrialRecord
from jdsearch.search.summary import lineage_line
from jdsearch.storage.optuna_internals import heartbeat_ages

__all__ = ["RunningTrial", "StudyStatus", "study_status"]

STATES = ("COMPLETE", "FAIL", "RUNNING", "WAITING")


@dataclass(frozen=True)
class RunningTrial:
    """A RUNNING trial: its worker (``None``: not recorded yet), how long it has run and how long
    ago it beat its heartbeat (``None``: not yet), and whether that is past the grace period."""

    number: int
    worker: str | None
    move: str | None
    parent: int | None
    running_s: float
    heartbeat_age_s: float | None
    stale: bool

    def line(self) -> str:
        who = self.worker or "worker not recorded yet"
        what = "choosing its move" if self.move is None else f"{self.move} from {self.parent}"
        beat = (
            "no heartbeat yet"
            if self.heartbeat_age_s is None
            else f"heartbeat {_duration(self.heartbeat_age_s)} ago"
        )
        lost = ", STALE: its worker is lost" if self.stale else ""
        return (
            f"  {who:<28} trial {self.number} ({what}), running {_duration(self.running_s)}, "
            f"{beat}{lost}"
        )


@dataclass(frozen=True)
class StudyStatus:
    """What ``jdsearch status`` prints (:meth:`format`) or writes as JSON (:meth:`to_dict`)."""

    study: str
    counts: dict[str, int]
    running: tuple[RunningTrial, ...]
    grace_s: float  # a heartbeat older than this: the worker is lost
    n_trials: int  # search.n_trials: what each worker runs
    best: int | None
    best_h: float | None
    best_resolution: str | None
    lineage: str | None
    mean_trial_s: float | None  # over the completed trials
    left_s: float | None  # None: no completed trial to time yet

    @property
    def live(self) -> tuple[RunningTrial, ...]:
        """The running trials of live workers (heartbeat within the grace period, or none yet)."""
        return tuple(r for r in self.running if not r.stale)

    @property
    def live_workers(self) -> int:
        """Live workers: one per worker id (a trial that records none yet is its own worker)."""
        return len({r.worker or f"trial {r.number}" for r in self.live})

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "counts": dict(self.counts),
            "live_workers": self.live_workers,
            "running": [r.__dict__ for r in self.running],
            "grace_s": self.grace_s,
            "n_trials": self.n_trials,
            "best": {
                "trial": self.best,
                "H": self.best_h,
                "resolution": self.best_resolution,
                "lineage": self.lineage,
            },
            "mean_trial_s": self.mean_trial_s,
            "left_s": self.left_s,
        }

    def format(self) -> str:
        counts = ", ".join(f"{self.counts[s]} {s}" for s in STATES)
        lines = [f"study       {self.study}", f"trials      {counts}"]
        lines.append(f"workers     {self.live_workers} live")
        lines += [r.line() for r in self.running]
        if self.best is None:
            lines.append("best        no completed trial yet")
        else:
            lines.append(
                f"best        trial {self.best}: H {self.best_h:.4f} at {self.best_resolution}"
            )
            lines.append(f"lineage     {self.lineage}")
        lines.append(f"time left   {self._left()}")
        return "\n".join(lines)

    def _left(self) -> str:
        if not self.live:
            return "none: no live worker"
        if self.left_s is None or self.mean_trial_s is None:
            return "unknown until a trial completes"
        return (
            f"about {_duration(self.left_s)} (each live worker runs search.n_trials = "
            f"{self.n_trials}; a trial takes {_duration(self.mean_trial_s)} on average)"
        )


def _duration(s: float) -> str:
    s = max(0.0, s)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _seconds(t: FrozenTrial) -> float | None:
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    return (t.datetime_complete - t.datetime_start).total_seconds()


def _running(
    t: FrozenTrial, ages: dict[int, float], grace_s: float, now: datetime.datetime
) -> RunningTrial:
    r = TrialRecord.from_trial(t)
    age = ages.get(t.number)
    start = t.datetime_start or now
    return RunningTrial(
        number=t.number,
        worker=t.system_attrs.get(WORKER_SYSATTR),
        move=r.move,
        parent=r.parent,
        running_s=(now - start).total_seconds(),
        heartbeat_age_s=age,
        stale=age is not None and age > grace_s,
    )


def time_left(
    trials: Sequence[FrozenTrial], live: Sequence[RunningTrial], n_trials: int, mean_s: float
) -> float:
    """Seconds until the last live worker is done: per worker, the trials of its
    ``n_trials`` it has not started take ``mean_s`` each, its running one what remains of it."""
    started = Counter(
        t.system_attrs.get(WORKER_SYSATTR) for t in trials if t.state != TrialState.WAITING
    )
    # A trial that records no worker yet is a worker's first as far as the study knows.
    left = [
        max(n_trials - (started[r.worker] if r.worker else 1), 0) * mean_s
        + max(mean_s - r.running_s, 0.0)
        for r in live
    ]
    return max(left, default=0.0)


def study_status(
    study: optuna.Study,
    n_trials: int,
    heartbeat_s: float,
    now: datetime.datetime | None = None,
) -> StudyStatus:
    """The status of ``study``, whose workers each run ``n_trials`` trials and beat their
    heartbeat every ``heartbeat_s`` seconds; ``now``: the local time (trials record their start
    in the worker's local time)."""
    now = now or datetime.datetime.now()
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state.name == s for t in trials) for s in STATES}
    grace_s = 2.0 * heartbeat_s
    ages = heartbeat_ages(study)
    running = tuple(
        _running(t, ages, grace_s, now) for t in trials if t.state == TrialState.RUNNING
    )
    durations = [
        d for t in trials if t.state == TrialState.COMPLETE and (d := _seconds(t)) is not None
    ]
    mean_s = sum(durations) / len(durations) if durations else None
    live = [r for r in running if not r.stale]
    left = None if mean_s is None else time_left(trials, live, n_trials, mean_s)
    best = best_of(trials)
    r = None if best is None else TrialRecord.from_trial(best)
    return StudyStatus(
        study=study.study_name,
        counts=counts,
        running=running,
        grace_s=grace_s,
        n_trials=n_trials,
        best=None if best is None else best.number,
        best_h=None if r is None or r.value is None or not math.isfinite(r.value) else r.value,
        best_resolution=None if r is None else r.best_resolution,
        lineage=None if best is None else lineage_line(trials, best.number),
        mean_trial_s=mean_s,
        left_s=left,
    )
