"""The search: an Optuna study on an RDB storage, prepared once, then as many workers as you like.

:func:`jdsearch.search.session.open_run` makes sure the study's storage holds what every worker
needs — the study spec, the base detector and the elastic teacher pool (trained here when the
storage has none; the local files under ``runs/<study>/`` are only caches) — and ``run_search``
adds trials. Workers started on several machines with the same storage URL cooperate on one
study: Optuna hands out trials, heartbeats mark a killed worker's trial failed and
``RetryHeartbeatStaleTrialCallback`` re-queues it with the same parent and move. A worker that
was only cut off from the database meanwhile stops that trial when it is back, without telling
it (:func:`optimize`).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import optuna

from jdsearch.core.errors import JDSearchError
from jdsearch.engine import distributed
from jdsearch.search.assets import say
from jdsearch.search.follower import follow
from jdsearch.search.notes import NoteWriter
from jdsearch.search.objective import Objective, TrialLost
from jdsearch.search.ranks import READY, STOP, announce
from jdsearch.search.session import open_run
from jdsearch.search.summary import print_stopped, print_trial
from jdsearch.spec.study import StudySpec
from jdsearch.storage.optuna_internals import lost_trial
from jdsearch.storage.rdb import public_url

__all__ = ["optimize", "run_search"]


def run_search(
    spec: StudySpec,
    storage_url: str | None = None,
    *,
    n_trials: int | None = None,
    progress: bool = True,
    device: str | None = None,
) -> optuna.Study:
    """Run, resume or join a search: prepare the study, then add trials in this worker.

    Args:
        spec: the study spec (:func:`jdsearch.load_study`).
        storage_url: default the spec's (``sqlite:///runs/<name>.db``); workers with the same URL
            cooperate on one study.
        n_trials: trials this worker adds; default the spec's ``search.n_trials``.
        progress: progress bars and one line per trial.
        device: this worker's device instead of the spec's (``jdsearch search --device``); the
            study records the spec as given.

    Returns:
        The Optuna study.

    Raises:
        SpecError: the data, base checkpoint or pool the spec names are missing.
        JDSearchError: the base detector does not fit the dataset, or the storage fails. A trial
            that fails (a user error inside it) is recorded FAIL and the search goes on.
    """
    if n_trials is not None and n_trials < 1:
        raise JDSearchError(f"n_trials must be ≥ 1, got {n_trials}")
    # Under torchrun: rank 0 searches, the other ranks train along (jdsearch.search.ranks).
    if distributed.init_from_env(device or spec.device) and not distributed.is_main():
        return follow(spec, storage_url, device)
    try:
        return _search(spec, storage_url, n_trials, progress, device)
    finally:
        if not distributed.out_of_step():  # else the others wait elsewhere: torchrun stops them
            announce(STOP)


def _search(
    spec: StudySpec,
    storage_url: str | None,
    n_trials: int | None,
    progress: bool,
    device: str | None,
) -> optuna.Study:
    run = open_run(spec, storage_url, progress=progress, device=device)
    announce(READY, kd_mode=run.kd.name)  # the teacher check's decision, for every rank
    n = n_trials if n_trials is not None else spec.search.n_trials
    shown = public_url(storage_url or spec.storage_url)
    say(f"searching: study {spec.name!r} on {shown}, {n} trials in this worker")
    started = time.perf_counter()
    objective = run.objective()
    outcomes = _Outcomes(objective)
    notes = NoteWriter(spec.score.metric)  # the search as a log in optuna-dashboard
    with objective.failures.quiet():  # a failed trial: one line, its traceback in a file
        optimize(run.study, outcomes, n, [print_trial, notes, outcomes.finished])
    say(f"done in {time.perf_counter() - started:.0f} s")
    if outcomes.completed == 0:
        raise JDSearchError(
            f"study {spec.name}: none of the {n} trials of this worker completed; "
            f"the first failed: {outcomes.failure or 'no reason recorded'}"
        )
    return run.study


class _Abandoned(BaseException):
    """A trial the worker stops without telling it (:class:`TrialLost`). Raised from the
    objective through Optuna's ``optimize``, which would tell it FAIL (a finished trial: Optuna
    refuses, and the worker dies of it) and catches every ``Exception``; :func:`optimize`
    catches it and goes on."""

    def __init__(self, trial: optuna.Trial) -> None:
        super().__init__(f"trial {trial.number}: {TrialLost.REASON}")
        self.trial = trial


class _Tally:
    """One ``study.optimize`` call: its trials started and stopped, the trial being run (until
    told) and the error its objective raised."""

    def __init__(self) -> None:
        self.started = self.stopped = 0
        self.current: optuna.Trial | None = None
        self.error: BaseException | None = None


def optimize(
    study: optuna.Study,
    objective: Any,
    n_trials: int,
    callbacks: list[Any],
    *,
    count_stopped: bool = False,
) -> None:
    """``study.optimize``, as a worker adds its trials: a failing trial (a
    :class:`JDSearchError`) is recorded and the next one starts; garbage is collected after each
    trial (a freed trial's tensors go), but what prepare built (data, pool, base) and every module
    imported so far live as long as the search: frozen, the collections do not walk them again.

    A trial that another worker failed as stale while this one could not reach the database is
    stopped (:class:`TrialLost`; or, failed that way between the objective's end and the
    ``tell``, refused by the tell): one line says so (``STOPPED``), it is not told, the
    callbacks do not see it, and it does not count among the ``n_trials`` (its retry, which this
    worker may well run next, does). With ``count_stopped`` it counts: the caller looks for its
    retry itself (``jdsearch finetune``, which must not start a search trial instead)."""
    gc.collect()
    gc.freeze()
    left = n_trials
    try:
        while left > 0:
            tally = _Tally()
            try:
                study.optimize(
                    _stoppable(objective, tally),
                    n_trials=left,
                    catch=(JDSearchError,),
                    callbacks=[_after_tell(callbacks, tally)],
                    gc_after_trial=True,
                )
            except _Abandoned as e:
                print_stopped(e.trial, TrialLost.REASON)
                tally.stopped += 1
            except Exception:
                trial = tally.current  # not told: the tell raised (else a callback or `ask` did)
                if trial is None or tally.error is not None or not lost_trial(trial, read=True):
                    raise
                print_stopped(trial, TrialLost.REASON)
                tally.stopped += 1
            else:
                if tally.started < left:  # a callback stopped the study
                    break
            left -= tally.started - (0 if count_stopped else tally.stopped)
    finally:
        gc.unfreeze()


def _stoppable(objective: Any, tally: _Tally) -> Callable[[optuna.Trial], Any]:
    """``objective``, noting its trials; a trial lost to another worker (:class:`TrialLost`, or
    failed here for a reason of its own after that) leaves Optuna untold (:class:`_Abandoned`)."""

    def run(trial: optuna.Trial) -> Any:
        tally.started += 1
        tally.current, tally.error = trial, None
        try:
            return objective(trial)
        except TrialLost:
            raise _Abandoned(trial) from None
        except JDSearchError:
            if lost_trial(trial, read=True):
                raise _Abandoned(trial) from None
            raise
        except Exception as e:  # Optuna tells it FAIL and raises it: the worker stops
            tally.error = e
            raise

    return run


def _after_tell(callbacks: list[Any], tally: _Tally) -> Callable[..., None]:
    """The ``callbacks``, once Optuna told the trial."""

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        tally.current = None
        for callback in callbacks:
            callback(study, trial)

    return after


class _Outcomes:
    """The objective, counting this worker's completed trials and keeping the first failure."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.completed = 0
        self.failure: str | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self.objective(trial)
        except JDSearchError as e:
            distributed.check_in_step(e)  # under torchrun, a failure of this rank alone: stop
            if not isinstance(e, TrialLost):  # not a failure: its retry takes it over
                self.failure = self.failure or str(e)
            raise

    def finished(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """An ``optimize`` callback: count a completed trial."""
        if trial.state == optuna.trial.TrialState.COMPLETE:
            self.completed += 1
