"""The search as a log in optuna-dashboard: a Markdown note on every finished trial.

A completed trial's note gives its parent, move and teacher, the AP, cost and H at each
resolution, the held-out AP where ``jdsearch export`` measured it (rewritten then), and its lineage
back to the base; a failed trial's note says why it failed (its ``fail_reason``), or that its worker was lost
(a stale heartbeat) and which trial retries it. Notes are written after ``tell``, by an
``optimize`` callback (:class:`NoteWriter`) and by the stale-trial callback
(:func:`note_lost_worker`), as ``optuna_dashboard.save_note`` stores them (study system
attributes, which Optuna accepts for a finished trial; in one transaction on the search's
storage, :func:`~jdsearch.storage.optuna_internals.save_dashboard_note`). Without optuna-dashboard nothing is written; a note that
cannot be written is logged and never fails a trial.

A trial whose worker was lost cannot take a ``fail_reason``: it is failed by another worker, and
Optuna refuses attributes on a finished trial. Its retry carries why instead
(:func:`retry_attrs`): ``retry_of`` (the lost trial's number) and ``retry_reason`` (the worker,
and when it last beat its heartbeat), user attributes that ``optuna trials`` and the dashboard's
trial page show beside the retry's other attributes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from jdsearch.search.queries import ancestry, lineage_of
from jdsearch.search.record import (
    FAIL_REASON_ATTR,
    RETRY_OF_ATTR,
    RETRY_REASON_ATTR,
    WORKER_SYSATTR,
    TrialRecord,
)
from jdsearch.storage.optuna_internals import last_heartbeat, save_dashboard_note

__all__ = [
    "NoteWriter",
    "lost_worker_note",
    "note_lost_worker",
    "retry_attrs",
    "save_trial_note",
    "trial_note",
]

log = logging.getLogger(__name__)


def _moved(r: TrialRecord) -> str:
    """``move `depth2+` (student) from trial 3``."""
    kind = f" ({r.kind})" if r.kind and r.kind != r.move else ""
    origin = "the base detector" if r.parent is None else f"trial {r.parent}"
    return f"move `{r.move}`{kind} from {origin}"


def _lineage(trials: Sequence[FrozenTrial], number: int) -> str:
    path = [TrialRecord.from_trial(t) for t in lineage_of(trials, number)]
    return "**Lineage**: " + " → ".join(f"`{p.move}` (#{p.number})" for p in path)


def _percent(v: Any) -> str:
    return "–" if v is None else f"{100 * float(v):.1f}"


def _scores(r: TrialRecord, metric: str) -> list[str]:
    """The table of AP, cost, GFLOPs and H at each resolution, the best row in bold."""
    rows = [f"| resolution | {metric} | cost | GFLOPs | H |", "| --- | ---: | ---: | ---: | ---: |"]
    for res in r.h:  # the study's resolutions, in its order
        cost = r.cost.get(res)
        gflops = r.flops_at.get(res)
        cells = [
            res,
            _percent(r.ap.get(res)),
            "–" if cost is None else f"{cost:.3f}",
            "–" if gflops is None else f"{gflops / 1e9:.3f}",
            f"{r.h[res]:.4f}",
        ]
        if res == r.best_resolution:
            cells = [f"**{c}**" for c in cells]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _heldout(heldout: Mapping[str, Any]) -> str:
    m = heldout.get("metrics") or {}
    return (
        f"**Held-out AP**: {_percent(m.get('AP'))} (AP50 {_percent(m.get('AP50'))}) at "
        f"{heldout.get('resolution', '?')}, on {heldout.get('images', '?')} images of "
        f"`{heldout.get('file', '?')}` that the search never saw"
    )


def trial_note(
    trials: Sequence[FrozenTrial],
    trial: FrozenTrial,
    *,
    metric: str = "AP",
    heldout: Mapping[str, Any] | None = None,
) -> str:
    """The Markdown note of a finished ``trial`` among the study's ``trials`` (its ancestry is
    enough: :func:`~jdsearch.search.queries.ancestry`): ``metric`` names
    the score's metric (``score.metric``); ``heldout``: the trial's metrics on the held-out split
    (``metrics``, ``resolution``, ``images``, ``file``), where they were measured."""
    r = TrialRecord.from_trial(trial)
    if trial.state != TrialState.COMPLETE:
        reason = trial.user_attrs.get(FAIL_REASON_ATTR) or "no reason recorded"
        lines = [
            f"### Trial {trial.number}: {trial.state.name}",
            f"{_moved(r)}.",
            "",
            f"**Why**: {reason}",
        ]
    else:
        h = "–" if r.value is None else f"{r.value:.4f}"
        lines = [
            f"### Trial {trial.number}: H {h} at {r.best_resolution}",
            f"{_moved(r)}; teacher `{r.teacher or 'none (no distillation)'}`.",
            "",
            *_scores(r, metric),
        ]
        if heldout is not None:
            lines += ["", _heldout(heldout)]
    return "\n".join([*lines, "", _lineage(trials, trial.number)]) + "\n"


def retry_attrs(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """The user attributes of the retry of ``trial``, failed as stale: its number and why, e.g.
    ``its worker `node7:4242` stopped beating its heartbeat at 2025-06-01 10:00:03 (database
    clock)``. Called by the stale-trial callback before Optuna re-queues the trial."""
    worker = trial.system_attrs.get(WORKER_SYSATTR) or "unknown"
    beat = last_heartbeat(study, trial)
    when = (
        "before its first beat"
        if beat is None
        else f"at {beat.isoformat(sep=' ', timespec='seconds')} (database clock)"
    )
    reason = f"its worker `{worker}` stopped beating its heartbeat {when}"
    return {RETRY_OF_ATTR: trial.number, RETRY_REASON_ATTR: reason}


def lost_worker_note(trials: Sequence[FrozenTrial], trial: FrozenTrial) -> str:
    """The note of a trial failed as stale: its worker stopped beating its heartbeat (when, as
    its retry records it)."""
    r = TrialRecord.from_trial(trial)
    retry = next(  # the trial Optuna re-queued from this one (a retry's retry names its parent last)
        (
            t
            for t in trials
            if RetryHeartbeatStaleTrialCallback.retry_history(t)[-1:] == [trial.number]
        ),
        None,
    )
    then = (
        "not retried" if retry is None else f"retried as trial {retry.number}, same move and parent"
    )
    worker = trial.system_attrs.get(WORKER_SYSATTR) or "unknown"
    why = f"its worker `{worker}` stopped beating its heartbeat"
    if retry is not None and retry.user_attrs.get(RETRY_OF_ATTR) == trial.number:
        why = retry.user_attrs.get(RETRY_REASON_ATTR) or why
    lines = [
        f"### Trial {trial.number}: FAIL, its worker was lost",
        f"{_moved(r)}.",
        "",
        f"**Why**: {why} (killed, or cut off from the database); another worker failed it as "
        f"stale; {then}.",
    ]
    return "\n".join([*lines, "", _lineage(trials, trial.number)]) + "\n"


def save_trial_note(study: optuna.Study, trial: FrozenTrial, body: str) -> bool:
    """Save ``body`` as ``trial``'s optuna-dashboard note (a new version of it); ``False``, and
    nothing written, without optuna-dashboard or when the storage refuses (logged)."""
    try:
        import optuna_dashboard  # noqa: F401
    except ImportError:
        return False
    try:
        save_dashboard_note(study, trial, body)
    except Exception as e:  # a note is a courtesy: never fail a trial or a worker over it
        log.warning("trial %d: its dashboard note was not saved (%s)", trial.number, e)
        return False
    return True


class NoteWriter:
    """An ``optimize`` callback: the note of each trial the worker finishes (:func:`trial_note`).
    ``metric``: the score's metric (``score.metric``)."""

    def __init__(self, metric: str = "AP") -> None:
        self.metric = metric

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        try:
            body = trial_note(ancestry(study, trial), trial, metric=self.metric)
        except Exception as e:  # a hand-edited or foreign trial: no note rather than no search
            log.warning("trial %d: no dashboard note (%s)", trial.number, e)
            return
        save_trial_note(study, trial, body)


def note_lost_worker(study: optuna.Study, trial: FrozenTrial) -> None:
    """Called after a stale trial is failed (and re-queued): its note (:func:`lost_worker_note`)."""
    try:
        body = lost_worker_note(study.get_trials(deepcopy=False), trial)
    except Exception as e:
        log.warning("trial %d: no dashboard note (%s)", trial.number, e)
        return
    save_trial_note(study, trial, body)
