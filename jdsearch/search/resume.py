"""Mid-trial resume: a trial's training state in the study's artifact store, picked up by its retry.

Every ``search.trial_checkpoint_every`` iterations a trial uploads its resumable training state
(:class:`~jdsearch.store.trainstate.TrainState`: weights, optimizer, data position, RNGs) as the
artifact ``trainstate-<uuid>`` of this attempt, overwriting the previous one, and records it in
the trial system attribute :data:`~jdsearch.search.record.STATE_SYSATTR`. When the worker is killed, optuna's
``RetryHeartbeatStaleTrialCallback`` re-queues the trial with the killed attempt's system
attributes, this one included: the retry downloads that state and trains on from its iteration
(recorded as the user attribute :data:`RESUMED_ATTR`). Every attempt of a trial trains with the
seed of the first one, so the resumed run is the killed one continued. The state artifacts of a
trial are removed when an attempt ends (completed or failed: a trial that fails is not retried);
only a killed attempt leaves its state behind, for its retry, and so does one that its worker
stops because another worker failed it as stale while it could not reach the database
(:class:`~jdsearch.search.objective.TrialLost`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import uuid
import warnings
from typing import Any

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial

from jdsearch.core.errors import CheckpointError
from jdsearch.engine.train import StateHook
from jdsearch.search.record import STATE_SYSATTR
from jdsearch.storage.artifacts import check_artifact_id
from jdsearch.storage.optuna_internals import lost_trial, set_trial_system_attr, stored_trial
from jdsearch.store.trainstate import TrainState, trainstate_from_bytes, trainstate_to_bytes

__all__ = ["RESUMED_ATTR", "TrialStates", "first_attempt"]

log = logging.getLogger(__name__)

#: Trial system attribute: the latest saved training state of the trial,
#: ``{"artifact": ID, "iteration": K, "trial": N}`` (``artifact`` None once removed).
#: User attribute of a retried attempt: the iteration it resumed at (0: it started over).
RESUMED_ATTR = "resumed_from"
_PREFIX = "trainstate-"


def first_attempt(trial: FrozenTrial) -> int | None:
    """The number of the trial a retry retries (its first attempt); ``None`` for a first try."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


class TrialStates:
    """The training states of one trial attempt: the one it may resume from, the ones it saves."""

    def __init__(self, store: Any, trial: optuna.Trial, every: int) -> None:
        self.store, self.trial, self.every = store, trial, every
        self.number = trial.number
        frozen = stored_trial(trial)  # as read when it began: inherited attributes too
        first = first_attempt(frozen)
        self.retry = first is not None
        #: Whose seed this attempt trains with: the first attempt's.
        self.first_number = trial.number if first is None else int(first)
        attr = frozen.system_attrs.get(STATE_SYSATTR)
        self.inherited: str | None = None
        if self.retry and isinstance(attr, dict) and attr.get("artifact"):
            self.inherited = str(attr["artifact"])
        self.own: str | None = None

    @property
    def hook(self) -> StateHook | None:
        """What :func:`jdsearch.engine.train.train` saves through (``None`` when saving is off)."""
        return StateHook(self.every, self.save) if self.every > 0 else None

    def load(self) -> TrainState | None:
        """The state the killed attempt saved last, or ``None`` (a first try, none saved, or one
        that cannot be read: then the retry starts over, with a warning)."""
        if self.inherited is None:
            return None
        what = f"trial {self.trial.number}: training state"
        try:
            artifact_id = check_artifact_id(self.inherited, what)
            with self.store.open_reader(artifact_id) as reader:
                data = reader.read()
            return trainstate_from_bytes(data, source=f"{what} {artifact_id}")
        except (CheckpointError, ArtifactNotFound, OSError) as e:
            log.warning("%s: cannot resume, training from the start (%s)", what, e)
            return None

    def resumed(self, iteration: int) -> None:
        """Record where a retry resumed (0: it started over); nothing for a first try."""
        if self.retry:
            # A lost trial refuses it: the training's first step stops it (rank 0 alone must
            # not raise here, under torchrun).
            with contextlib.suppress(UpdateFinishedTrialError):
                self.trial.set_user_attr(RESUMED_ATTR, int(iteration))

    def lost(self) -> bool:
        """Whether the trial is lost to this worker (another worker failed it as stale)."""
        return lost_trial(self.trial)

    def save(self, state: TrainState) -> None:
        """Upload ``state`` over this attempt's previous one and record it; then the inherited
        state is obsolete and removed. A failing upload is logged: the trial goes on. Nothing is
        saved for a lost trial: its retry resumes the state saved before."""
        if self.lost():
            return
        first = self.own is None
        self.own = self.own or f"{_PREFIX}{uuid.uuid4().hex}"
        try:
            self.store.write(self.own, io.BytesIO(trainstate_to_bytes(state)))
            value = {"artifact": self.own, "iteration": state.iteration, "trial": self.trial.number}
            set_trial_system_attr(self.trial, STATE_SYSATTR, value)
        except UpdateFinishedTrialError:  # lost meanwhile: its retry names the state saved before
            if first:  # named by nobody
                self._remove(self.own)
                self.own = None
            return
        except Exception as e:  # saving only shortens a retry: never fail the trial for it
            log.warning("trial %d: saving its training state failed (%s)", self.trial.number, e)
            return
        log.info(
            "trial %d: training state saved at iteration %d", self.trial.number, state.iteration
        )
        if self.inherited is not None and self.inherited != self.own:
            self._remove(self.inherited)
            self.inherited = None

    def discard(self) -> None:
        """Remove every state of the trial (the attempt is over) and clear the record."""
        ids = [i for i in (self.own, self.inherited) if i is not None]
        for artifact_id in ids:
            self._remove(artifact_id)
        if ids:
            with contextlib.suppress(Exception):
                set_trial_system_attr(self.trial, STATE_SYSATTR, {"artifact": None})
        self.own = self.inherited = None

    def _remove(self, artifact_id: str) -> None:
        try:
            self.store.remove(check_artifact_id(artifact_id, "training state"))
        except ArtifactNotFound:
            pass
        except Exception as e:  # `jdsearch gc` removes what is left
            log.warning("could not remove training state %s (%s)", artifact_id, e)


class FollowedStates:
    """What a rank other than 0 under ``torchrun`` has of a trial's training states: its share.
    It saves nothing, but gives its own generators to each state rank 0 saves (its :attr:`hook`,
    every ``every`` iterations as rank 0's); the state it resumes is rank 0's, which
    :meth:`~jdsearch.search.objective.Objective.train_pair` broadcasts, and it takes its own
    generators from it."""

    def __init__(self, first_number: int, every: int = 0) -> None:
        self.first_number = self.number = first_number
        self.hook = StateHook(every, _not_saved) if every > 0 else None

    def load(self) -> TrainState | None:
        return None

    def resumed(self, iteration: int) -> None:
        pass

    def lost(self) -> bool:
        return False  # rank 0 knows, and says so to every rank (objective._StopWhenLost)


def _not_saved(state: TrainState) -> None:
    """A rank other than 0 saves nothing (it is never handed a state)."""
