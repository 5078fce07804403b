"""Post-search fine-tuning (paper appendix D, table 9): a chosen pair trained longer, recorded as
a child trial of the lineage.

:func:`finetune` enqueues one trial with move ``finetune`` whose parent is the chosen trial. The
objective trains the parent's student with the parent's teacher (cut from the pool, BN
recalibrated) for the asked epochs at the study's resolutions, then scores and records it like
any trial: its own checkpoint, metrics and H, so ``export``, ``report`` and the lineage see it.
The trial carries its request (epochs, lr and a token) in its user attrs. A worker killed while it
runs leaves a stale trial that the storage's heartbeat re-queues with the same request, and
calling :func:`finetune` again runs that copy instead of asking anew; a worker only cut off from
the database meanwhile stops its attempt without telling it and runs that copy at once. The
sampler never takes a fine-tuned pair as a parent: it had more training than a step of the
search.
"""

from __future__ import annotations

import uuid

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from jdsearch.core.errors import JDSearchError
from jdsearch.search.notes import NoteWriter
from jdsearch.search.objective import Objective, SearchContext, move_vocabulary
from jdsearch.search.queries import best_of
from jdsearch.search.record import (
    FAIL_REASON_ATTR,
    FINETUNE_ATTRS,
    FINETUNE_MOVE,
    MOVE_PARAM,
    WORKER_SYSATTR,
    TrialRecord,
    decision_attrs,
    is_complete,
)
from jdsearch.search.run import optimize
from jdsearch.search.summary import print_trial
from jdsearch.spec.settings import TrainConfig

__all__ = ["check_request", "finetune"]

_EPOCHS, _LR, _TOKEN = FINETUNE_ATTRS


def finetune(
    study: optuna.Study,
    ctx: SearchContext,
    trial: int | None = None,
    *,
    epochs: float,
    lr: float | None = None,
) -> FrozenTrial:
    """Fine-tune trial ``trial``'s pair (default: the best trial of the search) as a child trial.

    Args:
        study: the study, as :func:`jdsearch.search.session.prepare` opened it.
        ctx: what its trials share (from the same ``prepare``).
        trial: a completed trial's number; default the best one that is not itself a fine-tuning.
        epochs: training epochs (> 0).
        lr: peak learning rate; default the fast evaluation's.

    Returns:
        The completed fine-tuning trial (move ``finetune``, parent ``trial``).

    Raises:
        FieldError: bad epochs or lr (:func:`check_request`).
        JDSearchError: no such trial, a study too old to hold fine-tuning
            trials, the same request running in a live worker, or the training failed.
    """
    check_request(epochs, lr)
    if FINETUNE_MOVE not in (ctx.vocabulary or move_vocabulary()):
        raise JDSearchError(
            f"finetune: study {study.study_name!r} was created by an older jdsearch whose trials "
            "cannot record a fine-tuning; fine-tune with `jdsearch train --teacher` instead"
        )
    fail_stale_trials(study)  # a killed fine-tuning's retry is queued before we look for it
    parent = _parent(study, trial)
    request = {_EPOCHS: float(epochs), _LR: None if lr is None else float(lr)}
    token = _pending(study, parent.number, request) or _enqueue(study, parent.number, request)
    return _run(study, ctx, token)


def check_request(epochs: float, lr: float | None = None) -> None:
    """Raise the :class:`~jdsearch.core.config.FieldError` of ``TrainConfig.epochs`` or
    ``TrainConfig.lr`` unless a training takes them (epochs > 0; 0 < lr ≤ 10), before anything is
    queued: inside the trial, a bad value would only fail it."""
    TrainConfig(epochs=epochs, **({} if lr is None else {"lr": lr}))


def _parent(study: optuna.Study, number: int | None) -> FrozenTrial:
    trials = study.get_trials(deepcopy=False)
    if number is None:
        searched = [t for t in trials if not TrialRecord.from_trial(t).is_finetune]
        best = best_of(searched)
        if best is None:
            raise JDSearchError(f"finetune: study {study.study_name!r} has no completed trial")
        return best
    t = next((t for t in trials if t.number == number), None)
    if t is None or not is_complete(t) or TrialRecord.from_trial(t).checkpoint is None:
        state = "missing" if t is None else t.state.name
        raise JDSearchError(
            f"finetune: study {study.study_name!r}: trial {number} is {state}, not a completed "
            "trial with a checkpoint"
        )
    return t


def _same_request(t: FrozenTrial, parent: int, request: dict[str, float | None]) -> bool:
    r = TrialRecord.from_trial(t)
    return (
        FINETUNE_MOVE in (r.move, r.kind)  # (the move is a param only once the trial asked for it)
        and r.parent == parent
        and all(t.user_attrs.get(k) == v for k, v in request.items())
    )


def _pending(study: optuna.Study, parent: int, request: dict[str, float | None]) -> str | None:
    """The token of the same request queued again after its worker died, if any; refuses while
    it still runs in a live worker."""
    for t in study.get_trials(deepcopy=False):
        if not _same_request(t, parent, request):
            continue
        if t.state == TrialState.RUNNING:
            raise JDSearchError(
                f"finetune: trial {t.number} is fine-tuning trial {parent} with the same settings "
                f"in worker {t.system_attrs.get(WORKER_SYSATTR, '?')}; if that worker is dead, "
                "run this again once its heartbeat has lapsed"
            )
        if t.state == TrialState.WAITING:
            return str(t.user_attrs[_TOKEN])
    return None


def _enqueue(study: optuna.Study, parent: int, request: dict[str, float | None]) -> str:
    token = uuid.uuid4().hex
    attrs = {**decision_attrs(parent, FINETUNE_MOVE), **request, _TOKEN: token}
    study.enqueue_trial({MOVE_PARAM: FINETUNE_MOVE}, user_attrs=attrs, skip_if_exists=False)
    return token


def _run(study: optuna.Study, ctx: SearchContext, token: str) -> FrozenTrial:
    """Run queued trials in this worker until the request's trial has run (Optuna runs the
    oldest queued trial first, which may be a search trial a dead worker left).

    An attempt that another worker failed as stale while this one could not reach the database
    is stopped, not told (one ``STOPPED`` line, :func:`~jdsearch.search.run.optimize`); its
    retry, queued with the same request, runs next, here."""

    def mine() -> list[FrozenTrial]:
        trials = study.get_trials(deepcopy=False)
        return [t for t in trials if t.user_attrs.get(_TOKEN) == token]

    waiting = sum(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False))
    objective = Objective(ctx)
    runs = max(waiting, 1)  # the queued trials before the request's, and the request's
    while runs > 0:
        before = len(mine())
        with objective.failures.quiet():  # a failed trial: one line, its traceback in a file
            # One trial; one stopped counts too: with no retry queued, the next would be a new
            # search trial.
            optimize(
                study,
                objective,
                1,
                [print_trial, NoteWriter(ctx.spec.score.metric)],
                count_stopped=True,
            )
        attempts = mine()
        done = [t for t in attempts if is_complete(t)]
        if done:
            return done[-1]
        if not any(t.state == TrialState.WAITING for t in attempts):
            last = attempts[-1]
            reason = last.user_attrs.get(FAIL_REASON_ATTR) or last.state.name
            raise JDSearchError(f"finetune: trial {last.number} failed: {reason}")
        runs -= len(attempts) == before  # else the request was stopped and its retry queued
    raise JDSearchError("finetune: the queued trial did not run")  # pragma: no cover
