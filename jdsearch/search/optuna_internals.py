"""Every use of Optuna's internals, in one place, each with why the public API does not suffice.

Checked against optuna 5.0 (``pyproject.toml`` bounds the major version); the behaviour jdsearch
relies on is pinned by ``tests/test_optuna_contract.py``, which fails first when it changes.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.storages import BaseStorage, fail_stale_trials
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.trial import FrozenTrial

__all__ = [
    "keep_alive",
    "set_running_user_attr",
    "set_study_system_attr",
    "set_trial_system_attr",
    "storage_of",
    "study_system_attrs",
]


def storage_of(study: optuna.Study) -> BaseStorage:
    """The study's storage. ``Study`` does not expose it (``_storage``), and the system-attribute
    and heartbeat calls below are methods of the storage."""
    return study._storage


def study_system_attrs(study: optuna.Study) -> dict[str, Any]:
    """The study's system attributes. ``Study.system_attrs`` was removed in optuna 5; the storage
    method is public but needs the private ``_study_id``."""
    return storage_of(study).get_study_system_attrs(study._study_id)


def set_study_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    """Set a study system attribute (the spec, the category ids: too long for user attributes,
    which ``optuna studies`` prints). ``Study.set_system_attr`` was removed in optuna 5."""
    storage_of(study).set_study_system_attr(study._study_id, key, value)


def set_trial_system_attr(trial: optuna.Trial, key: str, value: Any) -> None:
    """Set a system attribute of a running trial (machine-facing state hidden from
    ``optuna trials``). ``Trial.set_system_attr`` was removed in optuna 5; the storage method is
    public but needs the private ``_trial_id``."""
    trial.storage.set_trial_system_attr(trial._trial_id, key, value)


def set_running_user_attr(study: optuna.Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """Set a user attribute of a running trial from inside a sampler, which is handed a
    ``FrozenTrial`` (no ``set_user_attr`` that reaches the storage): write it to the storage (what
    other workers and the dashboard see) and to the frozen copy that optuna's ``Trial`` caches
    (what the objective reads through ``trial.user_attrs``)."""
    storage_of(study).set_trial_user_attr(trial._trial_id, key, value)
    trial.set_user_attr(key, value)


def keep_alive(study: optuna.Study, trial: FrozenTrial) -> None:
    """Beat ``trial``'s heartbeat and fail the stale trials of dead workers.

    Optuna starts a trial's heartbeat thread only after sampling, and fails stale trials only when
    a worker starts a trial; a sampler that waits (for the root trial) must do both itself. The
    heartbeat classes live in the private ``optuna.storages._heartbeat``.
    """
    storage = storage_of(study)
    if isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage):
        storage.record_heartbeat(trial._trial_id)
        fail_stale_trials(study)
