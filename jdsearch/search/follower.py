"""A rank other than 0 of a worker under ``torchrun``: it trains what rank 0 announces.

See :mod:`jdsearch.search.ranks` for the commands. A follower reads the study (the pair of each
trial, the base and the pool) but writes nothing to it, nor to the run folder: rank 0 saves,
uploads, evaluates and tells Optuna.
"""

from __future__ import annotations

import logging

import optuna

from jdsearch.core.config import cache_key
from jdsearch.core.errors import JDSearchError
from jdsearch.engine import distributed
from jdsearch.methods.pool import train_pool_along
from jdsearch.search.assets import ensure_data, pool_start, train_base
from jdsearch.search.caches import pool_cache, pool_fields
from jdsearch.search.objective import Objective
from jdsearch.search.ranks import BASE, POOL, READY, STOP, TRIAL, receive
from jdsearch.search.session import open_run
from jdsearch.spec.study import StudySpec

__all__ = ["follow"]

log = logging.getLogger(__name__)


def follow(
    spec: StudySpec, storage_url: str | None = None, device: str | None = None
) -> optuna.Study:
    """Train along with rank 0 until it stops; returns the study (as rank 0 left it).

    Raises:
        JDSearchError: rank 0 stopped before its study was ready (its own error says why).
    """
    objective: Objective | None = None
    study: optuna.Study | None = None
    while True:
        command, payload = receive()
        log.debug("rank command %s %s", command, payload)
        if command == STOP:
            break
        if command in (BASE, POOL):
            _train_along(spec, command)
        elif command == READY:
            study, objective = _ready(spec, storage_url, payload.get("kd_mode"), device)
        elif command == TRIAL and objective is not None and study is not None:
            objective.follow(study, **payload)
        else:
            raise JDSearchError(f"rank command {command!r} out of order")
    if study is None:
        raise JDSearchError(f"study {spec.name}: rank 0 stopped before the study was ready")
    return study


def _train_along(spec: StudySpec, command: str) -> None:
    """Train the base detector or the pool with rank 0; an error every rank shared (a diverged
    training) is rank 0's to report, and its ``stop`` follows."""
    train_set, _ = ensure_data(spec, generate=False)
    try:
        with distributed.lockstep(command):
            if command == BASE:
                train_base(spec, train_set, progress=False)
            else:
                path, base = pool_cache(spec).path, pool_start(spec)
                key = cache_key(pool_fields(spec))  # rank 0's (assets._pool_file)
                train_pool_along(spec.pool, train_set, path, device=spec.device, base=base, key=key)
    except JDSearchError as e:
        distributed.check_in_step(e)
        log.info("%s on this rank: %s", command, e)


def _ready(
    spec: StudySpec, storage_url: str | None, kd_mode: str | None, device: str | None
) -> tuple[optuna.Study, Objective]:
    """The study rank 0 prepared, built as a run read-only from its storage, and its objective;
    ``kd_mode``: rank 0's, after its teacher check (the ranks must build the same losses)."""
    if kd_mode is None:
        raise JDSearchError(f"study {spec.name}: rank 0 sent no KD mode")
    run = open_run(spec, storage_url, progress=False, decided_kd=kd_mode, device=device)
    return run.study, run.objective()
