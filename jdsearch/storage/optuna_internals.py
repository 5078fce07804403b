"""Every use of Optuna's internals, in one place, each with why the public API does not suffice.

Checked against optuna 5.0 (``pyproject.toml`` bounds the major version); the behaviour jdsearch
relies on is pinned by ``tests/test_optuna_contract.py``, which fails first when it changes.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import datetime
import functools
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import optuna
from optuna.exceptions import StorageInternalError
from optuna.storages import BaseStorage, RDBStorage, _CachedStorage, fail_stale_trials
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from jdsearch.storage.reconnect import is_disconnect

__all__ = [
    "HeartbeatStorage",
    "HeldAttrs",
    "beat_if_running",
    "cached_storage",
    "created_trial",
    "heartbeat_ages",
    "keep_alive",
    "last_heartbeat",
    "lost_trial",
    "muted_trial_failures",
    "pop_waiting_trial",
    "read_study_system_attrs",
    "running_beat_age",
    "save_dashboard_note",
    "set_running_attrs",
    "set_running_user_attr",
    "set_study_system_attr",
    "set_trial_attrs",
    "set_trial_system_attr",
    "stale_trial_ids",
    "storage_of",
    "stored_trial",
    "study_system_attrs",
    "trial_by_number",
    "trial_id_by_system_attr",
    "trial_of",
    "trial_sketches",
    "trials_with",
    "write_trial_attrs",
    "write_trial_note",
]


def storage_of(study: optuna.Study) -> BaseStorage:
    """The study's storage. ``Study`` does not expose it (``_storage``), and the system-attribute
    and heartbeat calls below are methods of the storage."""
    return study._storage


def study_system_attrs(study: optuna.Study, prefix: str = "") -> dict[str, Any]:
    """The study's system attributes (with ``prefix``: only those whose key starts with it, read
    alone where the storage can: ``ResilientStorage.study_system_attrs_with``; the others hold
    the spec and every trial's dashboard note). ``Study.system_attrs`` was removed in optuna 5;
    the storage method is public but needs the private ``_study_id``."""
    storage = storage_of(study)
    some = getattr(storage, "study_system_attrs_with", None)
    if prefix and some is not None:
        return some(study._study_id, prefix)
    attrs = storage.get_study_system_attrs(study._study_id)
    return {k: v for k, v in attrs.items() if k.startswith(prefix)}


def read_study_system_attrs(storage: RDBStorage, study_id: int, prefix: str) -> dict[str, Any]:
    """The system attributes of study ``study_id`` whose key starts with ``prefix``, read alone:
    Optuna reads them all (``get_study_system_attrs``). Its tables are private models."""
    import sqlalchemy
    from optuna.storages._rdb import models

    attr = models.StudySystemAttributeModel
    query = sqlalchemy.select(attr.key, attr.value_json).where(
        attr.study_id == study_id, attr.key.startswith(prefix, autoescape=True)
    )
    with storage.engine.connect() as conn:
        return {key: json.loads(value) for key, value in conn.execute(query).all()}


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


def _write_attrs(
    storage: Any, trial_id: int, user: Mapping[str, Any], system: Mapping[str, Any]
) -> None:
    """``user`` and ``system`` attributes of trial ``trial_id``: in one transaction where the
    storage has ``set_trial_attrs`` (:func:`write_trial_attrs`), else one call each."""
    many = getattr(storage, "set_trial_attrs", None)
    if many is not None:
        many(trial_id, dict(user), dict(system))
        return
    for key, value in user.items():
        storage.set_trial_user_attr(trial_id, key, value)
    for key, value in system.items():
        storage.set_trial_system_attr(trial_id, key, value)


def set_trial_attrs(
    trial: optuna.Trial, user: Mapping[str, Any], system: Mapping[str, Any]
) -> None:
    """Set many user and system attributes of a running trial: in one transaction where the
    storage has ``set_trial_attrs`` (``ResilientStorage``, :func:`write_trial_attrs`), else one
    call each. Like ``Trial.set_user_attr``, the trial's own copy sees the user attributes."""
    storage = trial.storage
    _write_attrs(storage, trial._trial_id, user, system)
    trial._cached_frozen_trial.user_attrs.update(user)


def write_trial_attrs(
    storage: RDBStorage, trial_id: int, user: Mapping[str, Any], system: Mapping[str, Any]
) -> None:
    """Write a running trial's user and system attributes in one transaction: one upsert
    statement per kind on PostgreSQL and SQLite, Optuna's own write per attribute elsewhere.
    Optuna commits each attribute on its own (``set_trial_user_attr``): a trial's record of
    ~25 attributes cost ~25 transactions, the largest part of the storage's time in a trial
    (bench/load.py). The rows are those Optuna writes (``value_json`` is ``json.dumps`` of the
    value), and a finished trial is refused as Optuna refuses it."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session, True) as session:
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
        storage.check_trial_is_updatable(trial_id, trial.state)
        for model, attrs in (
            (models.TrialUserAttributeModel, user),
            (models.TrialSystemAttributeModel, system),
        ):
            if not attrs:
                continue
            if _upsert(session, storage, model, "trial_id", trial_id, attrs):
                continue
            for key, value in attrs.items():
                storage._set_trial_attr_without_commit(session, model, trial_id, key, value)


def _upsert(
    session: Any, storage: RDBStorage, model: Any, owner: str, owner_id: int, attrs: Mapping
) -> bool:
    """Insert or replace the attribute rows ``attrs`` of ``model`` (a trial's or a study's
    attribute table; ``owner``: its id column) in one statement, where the dialect has an upsert
    (PostgreSQL, SQLite 3.24+); ``False``, and nothing written, elsewhere. Optuna's own models
    are private (``optuna.storages._rdb.models``)."""
    statement = _upsert_statement(storage.engine.name, model.__table__, owner)
    if statement is None:
        return False
    rows = [{owner: owner_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
    session.execute(statement, rows)  # one statement for all the rows (insertmanyvalues)
    return True


@functools.lru_cache(maxsize=8)
def _upsert_statement(dialect: str, table: Any, owner: str) -> Any:
    """:func:`_upsert`'s statement for ``table``, built once (building it costs more than
    sending it); ``None`` where ``dialect`` has no upsert."""
    import sqlite3

    from sqlalchemy.dialects import postgresql, sqlite

    inserts = {"postgresql": postgresql.insert}
    if sqlite3.sqlite_version_info >= (3, 24, 0):
        inserts["sqlite"] = sqlite.insert
    if dialect not in inserts:
        return None
    stmt = inserts[dialect](table)
    return stmt.on_conflict_do_update(
        index_elements=[table.c[owner], table.c.key],
        set_={"value_json": stmt.excluded.value_json},
    )


def write_trial_note(storage: RDBStorage, study_id: int, trial_id: int, body: str) -> bool:
    """Save ``body`` as optuna-dashboard's note of trial ``trial_id`` (its next version) as
    ``optuna_dashboard.save_note`` stores it, study system attributes: the version, the body in
    chunks, and a former version's extra chunks emptied. One transaction, which reads this
    trial's note only; ``save_note`` reads every study system attribute (every note of the
    study) twice and commits each attribute on its own. On PostgreSQL the commit does not wait
    for the disk (``synchronous_commit`` off for this transaction alone): other sessions see the
    note at once, and the next synchronous commit (the worker's next write) makes it durable; a
    server crash in between loses the note only, a courtesy. The keys and chunks are the private
    ``optuna_dashboard._note``'s, the tables Optuna's private models. ``False``, and nothing
    written, where the dialect has no upsert (:func:`_upsert`)."""
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna_dashboard._note import note_str_key_prefix, note_ver_key, split_body

    attr = models.StudySystemAttributeModel
    ver_key, prefix = note_ver_key(trial_id), note_str_key_prefix(trial_id)
    mine = sqlalchemy.or_(attr.key == ver_key, attr.key.startswith(prefix, autoescape=True))
    with _create_scoped_session(storage.scoped_session, True) as session:
        if storage.engine.name == "postgresql":
            session.execute(sqlalchemy.text("SET LOCAL synchronous_commit TO OFF"))
        query = sqlalchemy.select(attr.key, attr.value_json).where(attr.study_id == study_id, mine)
        old = dict(session.execute(query).all())
        chunks = split_body(body, trial_id)
        was = sum(1 for k in old if k.startswith(prefix))
        attrs = {
            ver_key: int(json.loads(old.get(ver_key, "0"))) + 1,
            **chunks,
            **{f"{prefix}{i}": "" for i in range(len(chunks), was)},
        }
        return _upsert(session, storage, attr, "study_id", study_id, attrs)


def save_dashboard_note(study: optuna.Study, trial: FrozenTrial, body: str) -> None:
    """``optuna_dashboard.save_note`` of ``trial`` (any state), through the storage's
    ``save_trial_note`` in one transaction where it has one (``ResilientStorage``,
    :func:`write_trial_note`), else through ``save_note`` itself on a :func:`trial_of`. The
    storage calls need the private ``_study_id`` and ``_trial_id``."""
    from optuna_dashboard import save_note

    at_once = getattr(storage_of(study), "save_trial_note", None)
    if at_once is None or not at_once(study._study_id, trial._trial_id, body):
        save_note(trial_of(study, trial), body)


def trial_by_number(study: optuna.Study, number: int) -> FrozenTrial | None:
    """Trial ``number`` of ``study``; ``None`` when it has none. A finished trial comes from the
    cache Optuna keeps in front of an RDB storage (filled by the reads of the study's trials),
    without a round trip, where ``study.get_trials`` reads every running and new trial again.
    The storage's calls need the private ``_study_id``."""
    storage = storage_of(study)
    try:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    except KeyError:
        return None
    return storage.get_trial(trial_id)


def trials_with(
    study: optuna.Study,
    user: Sequence[str] = (),
    params: Sequence[str] = (),
    system: Sequence[str] = (),
) -> list[FrozenTrial]:
    """The study's trials as the database holds them now, by number, with (at least) the named
    user attributes, parameters and system attributes: in one query where the storage has
    ``trial_sketches`` (``ResilientStorage``, :func:`trial_sketches`), else whole
    (``study.get_trials``). The storage call needs the private ``_study_id``."""
    sketches = getattr(storage_of(study), "trial_sketches", None)
    if sketches is None:
        return study.get_trials(deepcopy=False)
    return sketches(study._study_id, user, params, system)


def stored_trial(trial: optuna.Trial) -> FrozenTrial:
    """The running ``trial`` as Optuna read it from the storage when the trial began (its system
    attributes, those a retry inherits included), and the user attributes set through it since:
    ``Trial`` keeps that copy in the private ``_cached_frozen_trial`` and no longer exposes its
    system attributes (optuna 5); reading it again would cost a read of the trial."""
    return trial._cached_frozen_trial


def set_running_attrs(
    study: optuna.Study, trial: FrozenTrial, user: Mapping[str, Any], system: Mapping[str, Any]
) -> None:
    """Set user and system attributes of a running trial from inside a sampler (see
    :func:`set_running_user_attr`): in one transaction where the storage has
    ``set_trial_attrs`` (:func:`write_trial_attrs`), else one call each; the frozen copy gets the
    user attributes."""
    storage = storage_of(study)
    _write_attrs(storage, trial._trial_id, user, system)
    for key, value in user.items():
        trial.set_user_attr(key, value)


class HeldAttrs:
    """A stand-in for a storage, for ``optuna.artifacts.upload_artifact(..., storage=...)`` of a
    trial: the artifact's attribute (``artifacts:<id>``, the artifact's description) goes into
    ``system`` rather than to the database, to be written with the trial's other attributes in
    one transaction (:func:`set_trial_attrs`). ``upload_artifact`` calls nothing else of a
    trial's storage (``tests/test_optuna_contract.py`` checks it)."""

    def __init__(self, system: dict[str, Any]) -> None:
        self.system = system

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.system[key] = value


def trial_of(study: optuna.Study, trial: FrozenTrial) -> optuna.Trial:
    """An ``optuna.Trial`` of ``trial`` (any state), for a call that takes one: optuna-dashboard's
    ``save_note`` after ``tell``. Optuna hands its callbacks (``optimize``'s, the stale-trial
    callback) a ``FrozenTrial``, whose storage id is private (``_trial_id``). ``Trial``'s
    constructor reads the trial and calls the sampler's ``before_trial``: the trial is opened
    through the same storage with a ``RandomSampler``, whose ``before_trial`` writes nothing."""
    quiet = optuna.load_study(
        study_name=study.study_name,
        storage=storage_of(study),
        sampler=optuna.samplers.RandomSampler(),
    )
    return optuna.Trial(quiet, trial._trial_id)


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


def beat_if_running(backend: RDBStorage, trial_id: int) -> bool:
    """Beat trial ``trial_id``'s heartbeat, as ``RDBStorage.record_heartbeat`` does, if the
    trial is still RUNNING, and say whether it was: ``False`` (and no beat, so that its last one
    still says when its worker fell silent) when another worker has failed it as stale. One
    transaction reads the state and writes the beat; Optuna's call beats a finished trial as
    well and says nothing, and the tables are in the private ``optuna.storages._rdb.models``."""
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(backend.scoped_session, True) as session:
        state = session.scalar(
            sqlalchemy.select(models.TrialModel.state).where(models.TrialModel.trial_id == trial_id)
        )
        if state != TrialState.RUNNING:
            return False
        beat = models.TrialHeartbeatModel.where_trial_id(trial_id, session, True)
        if beat is None:
            session.add(models.TrialHeartbeatModel(trial_id=trial_id))
        else:
            beat.heartbeat = session.execute(sqlalchemy.func.now()).scalar_one()
    return True


def running_beat_age(backend: RDBStorage, trial_id: int) -> tuple[bool, float | None]:
    """Whether trial ``trial_id`` is RUNNING, and the seconds since its last heartbeat on the
    database's clock (``None``: it never beat), in one read that writes nothing (a commit waits
    for the disk, ~4 ms on PostgreSQL; a read ~0.3 ms). The tables are in the private
    ``optuna.storages._rdb.models``."""
    import sqlalchemy
    from optuna.storages._rdb import models

    trials, beats = models.TrialModel, models.TrialHeartbeatModel
    with backend.engine.connect() as conn:
        row = conn.execute(
            sqlalchemy.select(trials.state, beats.heartbeat, sqlalchemy.func.now())
            .select_from(trials)
            .outerjoin(beats, beats.trial_id == trials.trial_id)
            .where(trials.trial_id == trial_id)
        ).first()
    if row is None:
        return False, None
    state, beat, now = row
    return state == TrialState.RUNNING, None if beat is None else _seconds_since(beat, now)


def lost_trial(trial: optuna.Trial | FrozenTrial, storage: Any = None, read: bool = False) -> bool:
    """Whether this worker's running ``trial`` was finished by another worker, which failed it
    as stale while this one's heartbeat could not reach the database
    (``ResilientStorage.is_lost``; ``read``: ask the database now). ``storage``: the trial's
    study's, for a ``FrozenTrial`` (default: an ``optuna.Trial``'s own). A storage that does not
    tell (not the search's) says ``False``. The storage's trial id is private (``_trial_id``)."""
    storage = trial.storage if storage is None else storage  # type: ignore[union-attr]
    is_lost = getattr(storage, "is_lost", None)
    return bool(is_lost is not None and is_lost(trial._trial_id, read=read))


def heartbeat_ages(study: optuna.Study) -> dict[int, float]:
    """Seconds since each RUNNING trial of ``study`` last beat its heartbeat, by trial number
    (a trial that never beat is absent), measured against the database's clock as Optuna's
    ``fail_stale_trials`` does. Optuna reads heartbeats only to list the stale trials; their
    times are in the private ``optuna.storages._rdb.models`` (table ``trial_heartbeats``).

    Raises:
        TypeError: the study's storage is not (a wrapper of) an ``RDBStorage``.
    """
    import sqlalchemy
    from optuna.storages._rdb import models

    backend = _rdb_backend(storage_of(study))
    with backend.engine.connect() as conn:
        now = conn.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar_one()
        rows = conn.execute(
            sqlalchemy.select(models.TrialModel.number, models.TrialHeartbeatModel.heartbeat)
            .join(models.TrialHeartbeatModel)
            .where(models.TrialModel.study_id == study._study_id)
            .where(models.TrialModel.state == optuna.trial.TrialState.RUNNING)
        ).all()
    return {int(n): _seconds_since(beat, now) for n, beat in rows}


def _seconds_since(beat: datetime.datetime, now: datetime.datetime) -> float:
    """Seconds from a stored heartbeat to the database's ``now()``: PostgreSQL's ``now()`` is
    aware, the stored times naive, so both lose their time zone first."""
    return (now.replace(tzinfo=None) - beat.replace(tzinfo=None)).total_seconds()


def last_heartbeat(study: optuna.Study, trial: FrozenTrial) -> datetime.datetime | None:
    """When ``trial`` (any state: a trial failed as stale keeps its row) last beat its heartbeat,
    on the database's clock, without time zone; ``None``: it never beat. The times are in the
    private ``optuna.storages._rdb.models``, keyed by the private ``FrozenTrial._trial_id``.

    Raises:
        TypeError: the study's storage is not (a wrapper of) an ``RDBStorage``.
    """
    import sqlalchemy
    from optuna.storages._rdb import models

    backend = _rdb_backend(storage_of(study))
    with backend.engine.connect() as conn:
        beat = conn.execute(
            sqlalchemy.select(models.TrialHeartbeatModel.heartbeat).where(
                models.TrialHeartbeatModel.trial_id == trial._trial_id
            )
        ).scalar_one_or_none()
    return None if beat is None else beat.replace(tzinfo=None)


def _rdb_backend(storage: BaseStorage) -> RDBStorage:
    """The ``RDBStorage`` under ``storage``: itself, or what a wrapper (``ResilientStorage``'s
    ``backend``, Optuna's cache's private ``_backend``) holds."""
    backend = getattr(storage, "backend", None) or getattr(storage, "_backend", storage)
    backend = getattr(backend, "backend", backend)  # under cached_storage's _CreateOnce
    if not isinstance(backend, RDBStorage):
        raise TypeError(f"{type(storage).__name__} keeps no heartbeats")
    return backend


# Optuna's warnings on a failed trial ("Trial 3 failed with parameters: … because of the following
# error: …", with the traceback, then "Trial 3 failed with value None."): the logger of its private
# module optuna.study._optimize, and the message's start.
_OPTIMIZE_LOGGER = "optuna.study._optimize"
_TRIAL_FAILED = re.compile(r"Trial (\d+) failed ")


@contextlib.contextmanager
def muted_trial_failures(muted: Callable[[int], bool]) -> Iterator[None]:
    """Drop Optuna's warnings on a failed trial ``n`` where ``muted(n)`` (one that the caller
    has reported already), inside the ``with``; every other record passes. Optuna logs them, the
    traceback included, after the objective returns, with no option to leave them out."""

    def keep(record: logging.LogRecord) -> bool:
        failed = _TRIAL_FAILED.match(record.getMessage())
        return failed is None or not muted(int(failed.group(1)))

    logger = logging.getLogger(_OPTIMIZE_LOGGER)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


# ---------------------------------------------------------------------- storage wrappers
def cached_storage(backend: RDBStorage) -> BaseStorage:
    """Optuna's cache of a study's trials in front of ``backend``: finished trials are read from the
    database once, later reads fetch only new and running ones.

    ``optuna.create_study``/``load_study`` put this cache (the private ``_CachedStorage``) around
    an ``RDBStorage`` only, and use any other storage as it is; a wrapper that holds an
    ``RDBStorage`` (:class:`jdsearch.storage.rdb.ResilientStorage`) builds it itself so that a
    search reads the database no more often than with a bare ``RDBStorage``.
    """
    return _CachedStorage(_CreateOnce(backend))


class _CreateOnce:
    """``backend`` (an ``RDBStorage``) whose trial creation does not repeat a commit that lost
    its connection; every other attribute is the backend's own.

    The cache creates trials through the private ``RDBStorage._create_new_trial``, which retries
    any failed transaction up to 5 times. After a commit that took effect but whose answer was
    lost with the connection, that creates the trial a second time, and the first one stays
    RUNNING with no heartbeat. Here a lost connection goes to the caller, who looks the trial up by
    its token (:func:`trial_id_by_system_attr`); other errors (a deadlock, rolled back) are retried
    as Optuna does."""

    def __init__(self, backend: RDBStorage) -> None:
        self.backend = backend
        self.created: FrozenTrial | None = None  # the trial created last, as created

    def __getattr__(self, name: str) -> Any:  # what the proxy itself lacks: the backend's
        if "backend" not in self.__dict__:  # being unpickled
            raise AttributeError(name)
        return getattr(self.__dict__["backend"], name)

    def _create_new_trial(self, study_id: int, template: FrozenTrial | None = None) -> FrozenTrial:
        for attempt in range(1, 6):
            try:
                frozen = _create_trial(self.backend, study_id, template)
                self.created = copy.deepcopy(frozen)  # the cache keeps (and may update) its own
                return frozen
            except StorageInternalError as e:
                if attempt == 5 or is_disconnect(e):
                    raise
                time.sleep(random.random() * 2.0)
        raise AssertionError("unreachable")


def created_trial(storage: BaseStorage, trial_id: int) -> FrozenTrial | None:
    """Trial ``trial_id`` as :func:`cached_storage` ``storage`` has just created it (what the
    database holds until it is written to), taken once; ``None`` when it created another one
    last, or none since the last take. The creator is under the cache's private ``_backend``,
    and a trial's id is the private ``_trial_id``."""
    creator = getattr(storage, "_backend", None)
    if not isinstance(creator, _CreateOnce):
        return None
    made, creator.created = creator.created, None
    return made if made is not None and made._trial_id == trial_id else None


def trial_sketches(
    storage: RDBStorage,
    study_id: int,
    user: Sequence[str] = (),
    params: Sequence[str] = (),
    system: Sequence[str] = (),
) -> list[FrozenTrial]:
    """Every trial of study ``study_id``, by number, with its state and only the named user
    attributes, parameters and system attributes (those it has), in one query. Optuna reads a
    trial whole, with five more queries for its attributes, parameters and values, and its cache
    reads every running trial again at each read of the study. The tables are its private
    models."""
    query, columns = _sketch_query(tuple(user), tuple(params), tuple(system))
    with storage.engine.connect() as conn:
        rows = conn.execute(query, {"study_id": study_id}).all()
    dists: dict[str, Any] = {}  # json_to_distribution, once per distinct text
    return [_sketch(row, columns, dists) for row in rows]


@functools.lru_cache(maxsize=8)
def _sketch_query(
    user: tuple[str, ...], params: tuple[str, ...], system: tuple[str, ...]
) -> tuple[Any, list[tuple[str, str]]]:
    """:func:`trial_sketches`' statement (the study id bound at execution), built once, and the
    (kind, name) of each table it joins, in its order: two cells each."""
    import sqlalchemy
    import sqlalchemy.orm
    from optuna.storages._rdb import models

    trial = models.TrialModel
    query = sqlalchemy.select(trial.trial_id, trial.number, trial.state)
    columns = []
    for kind, model, names in (
        ("user", models.TrialUserAttributeModel, user),
        ("param", models.TrialParamModel, params),
        ("system", models.TrialSystemAttributeModel, system),
    ):
        for name in names:
            a = sqlalchemy.orm.aliased(model)
            if kind == "param":
                on, cells = a.param_name == name, (a.param_value, a.distribution_json)
            else:
                on, cells = a.key == name, (a.value_json, a.value_json)
            query = query.outerjoin(a, sqlalchemy.and_(a.trial_id == trial.trial_id, on))
            query = query.add_columns(*cells)
            columns.append((kind, name))
    study = sqlalchemy.bindparam("study_id")
    return query.where(trial.study_id == study).order_by(trial.number), columns


def _sketch(row: Any, columns: list[tuple[str, str]], dists: dict[str, Any]) -> FrozenTrial:
    """A :func:`trial_sketches` row as a ``FrozenTrial``: what the row holds, nothing else;
    ``dists``: the distributions decoded so far, by their JSON text."""
    from optuna.distributions import json_to_distribution

    trial_id, number, state, *cells = row
    found: dict[str, dict[str, Any]] = {"user": {}, "param": {}, "system": {}, "dist": {}}
    for (kind, name), value, extra in zip(columns, cells[::2], cells[1::2], strict=True):
        if extra is None:  # the trial has no such attribute or parameter
            continue
        if kind == "param":
            if extra not in dists:
                dists[extra] = json_to_distribution(extra)
            found["dist"][name] = dists[extra]
            found["param"][name] = dists[extra].to_external_repr(value)
        else:
            found[kind][name] = json.loads(value)
    return FrozenTrial(
        number=number,
        state=state,
        value=None,
        datetime_start=None,
        datetime_complete=None,
        params=found["param"],
        distributions=found["dist"],
        user_attrs=found["user"],
        system_attrs=found["system"],
        intermediate_values={},
        trial_id=trial_id,
    )


def _create_trial(backend: RDBStorage, study_id: int, template: FrozenTrial | None) -> FrozenTrial:
    """One transaction of ``RDBStorage._create_new_trial``, with its private helpers: lock the
    study's row, insert the trial (and the template's attributes), number it."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(backend.scoped_session) as session:
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        row = backend._get_prepared_new_trial(study_id, template, session)
        if template is None:
            frozen = FrozenTrial(
                number=row.number,
                state=row.state,
                value=None,
                datetime_start=row.datetime_start,
                datetime_complete=None,
                params={},
                distributions={},
                user_attrs={},
                system_attrs={},
                intermediate_values={},
                trial_id=row.trial_id,
            )
        else:
            frozen = copy.deepcopy(template)
            frozen.number, frozen.datetime_start = row.number, row.datetime_start
            frozen._trial_id = row.trial_id
    return frozen


def trial_id_by_system_attr(backend: RDBStorage, study_id: int, key: str, value: Any) -> int | None:
    """The id of the study's trial whose system attribute ``key`` is ``value`` (``None``: none
    is), read under the lock on the study's row that trial creation takes, so that a creation
    still committing is waited for. Optuna reads attributes by trial only; the tables are in the
    private ``optuna.storages._rdb.models``."""
    import sqlalchemy
    from optuna.storages._rdb import models

    study, trial, attr = models.StudyModel, models.TrialModel, models.TrialSystemAttributeModel
    with backend.engine.begin() as conn:
        lock = sqlalchemy.select(study.study_id).where(study.study_id == study_id)
        conn.execute(lock.with_for_update())
        return conn.scalar(
            sqlalchemy.select(trial.trial_id)
            .join(attr, attr.trial_id == trial.trial_id)
            .where(
                trial.study_id == study_id, attr.key == key, attr.value_json == json.dumps(value)
            )
        )


def pop_waiting_trial(
    backend: RDBStorage,
    trial_id: int,
    key: str,
    token: str,
    also: Mapping[str, Any] | None = None,
) -> bool:
    """``backend.set_trial_state_values(trial_id, RUNNING)`` (what a study's ``ask`` does to run
    a WAITING trial: ``False`` when another worker took it first), with the system attribute
    ``key`` set to ``token`` (and those in ``also``) in the same transaction; ``True`` also when
    the trial is RUNNING with that token already: this pop's earlier attempt, whose commit took
    effect but whose answer was lost. Optuna's call writes no attribute; this one uses its private models and helpers.

    Raises:
        UpdateFinishedTrialError: the trial is finished (as Optuna's call does).
    """
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(backend.scoped_session) as session:
        row = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
        backend.check_trial_is_updatable(trial_id, row.state)
        if row.state != TrialState.WAITING:
            mine = models.TrialSystemAttributeModel.find_by_trial_and_key(row, key, session)
            return mine is not None and mine.value_json == json.dumps(token)
        row.state = TrialState.RUNNING
        row.datetime_start = datetime.datetime.now()
        for name, value in {**(also or {}), key: token}.items():
            backend._set_trial_attr_without_commit(
                session, models.TrialSystemAttributeModel, trial_id, name, value
            )
    return True


class HeartbeatStorage(BaseStorage, BaseHeartbeat):
    """A storage that Optuna treats as one with heartbeats: its trial heartbeat thread and
    ``fail_stale_trials`` test ``isinstance(storage, BaseHeartbeat)``, a class of the private
    ``optuna.storages._heartbeat``, and call its abstract method with a private name,
    ``_get_stale_trial_ids``. A subclass implements :meth:`stale_trial_ids` instead, and
    ``BaseHeartbeat``'s public ``record_heartbeat``, ``get_heartbeat_interval`` and
    ``get_heartbeat_stale_trial_callback``."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        # The name Optuna calls (fail_stale_trials); forwarded to the public one.
        return self.stale_trial_ids(study_id)

    @abc.abstractmethod
    def stale_trial_ids(self, study_id: int) -> list[int]:
        """The ids of the study's running trials whose heartbeat has gone stale."""


def stale_trial_ids(storage: BaseStorage, study_id: int) -> list[int]:
    """The stale running trials of the study, as ``storage`` (an Optuna storage with heartbeats,
    e.g. :func:`cached_storage`'s) reports them; the method has a private name,
    ``BaseHeartbeat._get_stale_trial_ids``, and no public counterpart.

    Raises:
        TypeError: ``storage`` has no heartbeats.
    """
    if not isinstance(storage, BaseHeartbeat):
        raise TypeError(f"{type(storage).__name__} has no heartbeats")
    return storage._get_stale_trial_ids(study_id)
