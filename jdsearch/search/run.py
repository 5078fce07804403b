"""The search: an Optuna study on an RDB storage, prepared once, then as many workers as you like.

:func:`jdsearch.search.session.open_run` makes sure the study's storage holds what every worker
needs — the study spec, the base detector and the elastic teacher pool (trained here when the
storage has none; the local files under ``runs/<study>/`` are only caches) — and ``run_search``
adds trials. Workers started on several machines with the same storage URL cooperate on one
study: Optuna hands out trials, heartbeats mark a killed worker's trial failed and
``RetryHeartbeatStaleTrialCallback`` re-queues it with the same parent and move.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import optuna

from jdsearch.core.errors import JDSearchError
from jdsearch.engine import distributed
from jdsearch.search.assets import say
from jdsearch.search.follower import follow
from jdsearch.search.notes import NoteWriter
from jdsearch.search.objective import Objective
from jdsearch.search.ranks import READY, STOP, announce
from jdsearch.search.session import open_run
from jdsearch.search.summary import print_trial
from jdsearch.spec.study import StudySpec
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


def optimize(study: optuna.Study, objective: Any, n_trials: int, callbacks: list[Any]) -> None:
    """``study.optimize``, as a worker adds its trials: a failing trial (a
    :class:`JDSearchError`) is recorded and the next one starts; garbage is collected after each
    trial (a freed trial's tensors go), but what prepare built (data, pool, base) and every module
    imported so far live as long as the search: frozen, the collections do not walk them again."""
    gc.collect()
    gc.freeze()
    try:
        study.optimize(
            objective,
            n_trials=n_trials,
            catch=(JDSearchError,),
            callbacks=callbacks,
            gc_after_trial=True,
        )
    finally:
        gc.unfreeze()


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
            self.failure = self.failure or str(e)
            raise

    def finished(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """An ``optimize`` callback: count a completed trial."""
        if trial.state == optuna.trial.TrialState.COMPLETE:
            self.completed += 1
