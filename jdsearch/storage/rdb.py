"""The study's RDB storage: opening it for a search, and storage URLs safe to print."""

from __future__ import annotations

import copy
import datetime
import functools
import logging
import re
import uuid
from collections.abc import Callable, Container, Mapping, Sequence
from pathlib import Path
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from jdsearch.spec.study import StudySpec
from jdsearch.storage.optuna_internals import (
    HeartbeatStorage,
    beat_if_running,
    cached_storage,
    created_trial,
    pop_waiting_trial,
    read_study_system_attrs,
    running_beat_age,
    stale_trial_ids,
    trial_id_by_system_attr,
    trial_sketches,
    write_trial_attrs,
    write_trial_note,
)
from jdsearch.storage.reconnect import is_disconnect, retry_window_s, with_reconnect

_log = logging.getLogger(__name__)

OPEN_RETRY_S = 20.0  # how long opening the storage waits for a server that refuses connections
# The trial system attributes that make creating and popping a trial safe to retry: a token per
# call, written in the call's own transaction (ResilientStorage).
CREATE_TOKEN_ATTR = "jdsearch:create_token"
POP_TOKEN_ATTR = "jdsearch:pop_token"


def storage_for(
    spec: StudySpec,
    url: str | None = None,
    on_stale: Callable[[Any, Any], None] | None = None,
    retry_attrs: Callable[[Any, Any], dict[str, Any]] | None = None,
    started: Mapping[str, Any] | None = None,
) -> ResilientStorage:
    """The ``RDBStorage`` at ``url`` (default the spec's), with heartbeats and retries of stale
    trials, in a :class:`ResilientStorage`; creates a SQLite file's folder. ``on_stale(study,
    trial)`` is called after each stale trial is failed and re-queued (its note);
    ``retry_attrs(study, trial)`` gives user attributes its retry carries (why it was retried);
    ``started``: system attributes of every trial this storage starts (which worker runs it)."""
    url = url or spec.storage_url
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    hb = spec.search.heartbeat_s
    retry = RetryHeartbeatStaleTrialCallback(max_retry=spec.search.max_retry)
    # A worker (re)started while the database restarts waits for it, as running workers do, but
    # briefly: a server that is not there at all is more often a wrong URL than a restart.
    return with_reconnect(
        lambda: ResilientStorage(
            RDBStorage(
                url,
                heartbeat_interval=hb,
                grace_period=2 * hb,
                heartbeat_stale_trial_callback=StaleTrialCallback(retry, on_stale, retry_attrs),
                engine_kwargs={"pool_pre_ping": True},
            ),
            started,
        ),
        "storage: opening",
        window_s=min(OPEN_RETRY_S, retry_window_s()),
    )


class StaleTrialCallback:
    """What Optuna calls on each trial it failed for a stale heartbeat: ``retry`` (Optuna's
    ``RetryHeartbeatStaleTrialCallback``), handed the trial with the user attributes
    ``attrs(study, trial)`` adds (the retry copies a trial's user attributes: Optuna refuses
    attributes on the failed trial itself), then ``then`` when given. Attributes that cannot be
    made are logged and left out: the trial is retried all the same."""

    def __init__(
        self,
        retry: Callable[[Any, Any], None],
        then: Callable[[Any, Any], None] | None = None,
        attrs: Callable[[Any, Any], dict[str, Any]] | None = None,
    ) -> None:
        self.retry, self.then, self.attrs = retry, then, attrs

    def __call__(self, study: Any, trial: Any) -> None:
        told = trial
        if self.attrs is not None:
            try:
                extra = self.attrs(study, trial)
            except Exception as e:  # why is a courtesy: the retry is not
                _log.warning("trial %d: its retry says nothing of why (%s)", trial.number, e)
            else:
                told = copy.deepcopy(trial)
                for key, value in extra.items():
                    told.set_user_attr(key, value)
        self.retry(study, told)
        if self.then is not None:
            self.then(study, trial)


def check_dialect(url: str) -> None:
    """Check that SQLAlchemy knows ``url``'s dialect and driver (the text itself was checked at
    load, :func:`jdsearch.spec.study.check_storage_url`).

    Raises:
        ValueError: an unknown dialect or driver, saying what is expected.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ValueError("expected a database URL such as sqlite:///runs/NAME.db") from None
    try:
        parsed.get_dialect()
    except NoSuchModuleError:
        hint = " (SQLAlchemy spells it postgresql)" if parsed.drivername == "postgres" else ""
        raise ValueError(
            f"unknown database dialect or driver {parsed.drivername!r}{hint}; "
            "expected e.g. sqlite:///runs/NAME.db or postgresql://USER@HOST/DB"
        ) from None


def public_url(url: str) -> str:
    """``url`` with any password masked, for messages and exported metadata."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: keep only what follows the credentials
        return url.rsplit("@", 1)[-1]


def root_cause(e: BaseException) -> str:
    """The innermost exception's first line (the driver's own words), credentials masked."""
    while e.__cause__ is not None or getattr(e, "orig", None) is not None:
        e = e.__cause__ or e.orig  # type: ignore[attr-defined]
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {re.sub(r'://[^@/ ]*@', '://***@', text)}"


#: The drivers tried, in order, for a PostgreSQL URL that names none (``postgresql://``):
#: psycopg2 first, which the ``postgresql`` and ``dev`` extras install and through which the
#: artifact store moves chunks by binary COPY; then psycopg 3, SQLAlchemy 2.1's own default.
PG_DRIVERS = ("psycopg2", "psycopg")


def with_driver(url: str) -> str:
    """``url`` with an installed PostgreSQL driver when it names none (``postgresql://…`` →
    ``postgresql+psycopg2://…``), else as it is; call it on every URL before opening it.

    Raises:
        JDSearchError: not a database URL, an unknown dialect, or a database driver that is not
            installed (saying how to install it).
    """
    import importlib.util

    from sqlalchemy.engine import make_url

    from jdsearch.core.errors import JDSearchError

    try:
        check_dialect(url)
    except ValueError as e:
        raise JDSearchError(f"{public_url(url)!r}: {e}") from None
    if url.startswith("postgresql://"):
        found = [d for d in PG_DRIVERS if importlib.util.find_spec(d) is not None]
        url = url.replace("postgresql://", f"postgresql+{(found or PG_DRIVERS)[0]}://", 1)
    parsed = make_url(url)
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError as e:
        pg = parsed.get_backend_name() == "postgresql"
        hint = ": pip install 'jdsearch[postgresql]'" if pg else ""
        raise JDSearchError(
            f"{public_url(url)}: its database driver is not installed ({e}){hint}"
        ) from None
    return url


# The wrapper's calls that only read settings or drop a session, never the database: not retried.
NOT_RETRIED = ("get_heartbeat_interval", "get_heartbeat_stale_trial_callback", "remove_session")


def _retried(name: str) -> Callable[..., Any]:
    """The :class:`ResilientStorage` method ``name``: the call of the same name on Optuna's
    cache of the backend, retried while the database is unreachable."""

    @functools.wraps(getattr(RDBStorage, name))  # its name, signature and docs
    def call(self: ResilientStorage, *args: Any, **kwargs: Any) -> Any:
        self._fresh = None  # a write may follow: the trial just created is read again
        method = getattr(self._cached, name)
        return with_reconnect(lambda: method(*args, **kwargs), f"storage: {name}")

    call.__qualname__ = f"ResilientStorage.{name}"
    return call


class ResilientStorage(HeartbeatStorage):
    """An Optuna storage that holds an ``RDBStorage`` (:attr:`backend`) and rides out a database
    that is briefly unreachable (a PostgreSQL restart): a call that fails with a connection error
    is retried, on a fresh connection, for up to ``JDSEARCH_DB_RETRY_S`` seconds (default 300)
    instead of failing the trial or the worker (:func:`jdsearch.storage.reconnect.with_reconnect`).
    Errors that are not about the connection propagate at once.

    Every call goes through Optuna's cache of the backend (what a study puts around a bare
    ``RDBStorage``), so the database is read no more often than without the wrapper; each call is
    retried whole. Heartbeats are the backend's (:meth:`stale_trial_ids`).

    A write whose commit reached the server just before the connection dropped is sent again.
    For ``tell`` (:meth:`set_trial_state_values`) that is recognised and not an error; creating a
    trial and popping a WAITING one write a token per call in their own transaction and look for
    it before trying again (:meth:`create_new_trial`), so that neither happens twice.

    A worker cut off from the database for longer than the grace period (2 × the heartbeat
    interval) finds, once it is back, that another worker may have failed its trial as stale and
    re-queued it. Each heartbeat reads the trial's state (:meth:`record_heartbeat`), and a trial
    finished by another worker is *lost* (:meth:`is_lost`): its worker must not tell it.

    ``started``: system attributes that every trial this storage starts running carries (a new
    RUNNING trial, a popped WAITING one), written in the same transaction: which worker runs it,
    without a write of its own.
    """

    def __init__(self, backend: RDBStorage, started: Mapping[str, Any] | None = None) -> None:
        self.backend = backend
        self.started = dict(started or {})
        # The trial just created, as created, until it is read or a write comes (get_trial).
        self._fresh: tuple[int, FrozenTrial] | None = None
        self._cached = cached_storage(backend)
        self._lost: set[int] = set()  # this worker's trials that another worker failed as stale

    @property
    def engine(self) -> Any:
        """The backend's SQLAlchemy engine."""
        return self.backend.engine

    @property
    def url(self) -> str:
        """The backend's database URL (with its password: print :func:`public_url` of it)."""
        return self.backend.url

    create_new_study = _retried("create_new_study")
    delete_study = _retried("delete_study")
    set_study_user_attr = _retried("set_study_user_attr")
    set_study_system_attr = _retried("set_study_system_attr")
    get_study_id_from_name = _retried("get_study_id_from_name")
    get_study_name_from_id = _retried("get_study_name_from_id")
    get_study_directions = _retried("get_study_directions")
    get_study_user_attrs = _retried("get_study_user_attrs")
    get_study_system_attrs = _retried("get_study_system_attrs")
    get_all_studies = _retried("get_all_studies")
    set_trial_param = _retried("set_trial_param")
    get_trial_id_from_study_id_trial_number = _retried("get_trial_id_from_study_id_trial_number")
    get_best_trial = _retried("get_best_trial")
    set_trial_intermediate_value = _retried("set_trial_intermediate_value")
    set_trial_user_attr = _retried("set_trial_user_attr")
    set_trial_system_attr = _retried("set_trial_system_attr")

    def get_trial(self, trial_id: int) -> FrozenTrial:
        """Optuna's, through its cache, retried. The RUNNING trial this storage has just
        created, asked for before any write (what a study's ``ask`` does at once), is the copy
        it created: no other worker writes to a trial that another runs, and a trial that has
        just started cannot be stale."""
        fresh, self._fresh = self._fresh, None
        if fresh is not None and fresh[0] == trial_id:
            return fresh[1]
        return with_reconnect(lambda: self._cached.get_trial(trial_id), "storage: get_trial")

    def trial_sketches(
        self,
        study_id: int,
        user: Sequence[str] = (),
        params: Sequence[str] = (),
        system: Sequence[str] = (),
    ) -> list[FrozenTrial]:
        """The study's trials with only the named user attributes, parameters and system
        attributes, read at once (:func:`~jdsearch.storage.optuna_internals.trial_sketches`),
        retried."""
        return with_reconnect(
            lambda: trial_sketches(self.backend, study_id, user, params, system),
            "storage: trial_sketches",
        )

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        """Optuna's, through its cache, retried. The WAITING trials alone (what a study's ``ask``
        looks for before it creates a trial) are read from the database itself, as fresh as the
        cache would give them (it reads every unfinished trial again): the cache would also
        fetch every running and new trial with them, which the sampler fetches again a moment
        later."""
        if isinstance(states, tuple) and states == (TrialState.WAITING,):
            source = self.backend
        else:
            source = self._cached
        return with_reconnect(
            lambda: source.get_all_trials(study_id, deepcopy=deepcopy, states=states),
            "storage: get_all_trials",
        )

    def record_heartbeat(self, trial_id: int) -> None:
        """Beat the trial's heartbeat, retried, while it is RUNNING; a trial that another worker
        failed as stale meanwhile is not beaten but lost (:meth:`is_lost`). Where the database
        stays unreachable past the retry window, the beat is given up with a warning rather than
        raised: Optuna's heartbeat thread would die of it, and the next beat tries again."""
        running = self._ask_db(
            lambda: beat_if_running(self.backend, trial_id),
            "storage: record_heartbeat",
            "the next heartbeat tries again",
        )
        if running is False:
            self._lost.add(trial_id)

    def _ask_db(self, call: Callable[[], Any], what: str, then: str) -> Any:
        """``call()``, retried while the database is unreachable; past the retry window, a
        warning (``what``, ``then``) and ``None``."""
        try:
            return with_reconnect(call, what)
        except Exception as e:
            if not is_disconnect(e):
                raise
            _log.warning(
                "%s: the database is still unreachable (%s); %s", what, root_cause(e), then
            )
            return None

    def is_lost(self, trial_id: int, *, read: bool = False) -> bool:
        """Whether this worker's running trial ``trial_id`` was finished by another worker (failed
        as stale while this one could not beat its heartbeat): as a heartbeat found it, or, with
        ``read``, as the database says now (retried). The read writes nothing, unless the trial
        is RUNNING and its heartbeat is overdue (older than the interval: the worker was cut
        off, or its heartbeat thread is late): then it beats it, as the heartbeat thread would,
        so that the trial does not go stale while this worker finishes it. Ask before this
        worker tells the trial: a trial it told is finished too."""
        if trial_id in self._lost or not read:
            return trial_id in self._lost
        found = self._ask_db(
            lambda: running_beat_age(self.backend, trial_id),
            "storage: is_lost",
            "the trial is taken as still this worker's",
        )
        if found is None:
            return False
        running, age = found
        interval = self.backend.get_heartbeat_interval()
        if not running:
            self._lost.add(trial_id)
        elif interval is not None and (age is None or age >= interval):
            self.record_heartbeat(trial_id)
        return trial_id in self._lost

    def set_trial_attrs(self, trial_id: int, user: dict[str, Any], system: dict[str, Any]) -> None:
        """A running trial's user and system attributes in one transaction
        (:func:`~jdsearch.storage.optuna_internals.write_trial_attrs`), retried whole: a retry
        writes the same values again."""
        self._fresh = None
        with_reconnect(
            lambda: write_trial_attrs(self.backend, trial_id, user, system),
            "storage: set_trial_attrs",
        )

    def study_system_attrs_with(self, study_id: int, prefix: str) -> dict[str, Any]:
        """The study's system attributes whose key starts with ``prefix``, read alone
        (:func:`~jdsearch.storage.optuna_internals.read_study_system_attrs`), retried; the
        others hold every trial's dashboard note, a read that grows with the study."""
        return with_reconnect(
            lambda: read_study_system_attrs(self.backend, study_id, prefix),
            "storage: study_system_attrs_with",
        )

    def save_trial_note(self, study_id: int, trial_id: int, body: str) -> bool:
        """Save ``body`` as trial ``trial_id``'s optuna-dashboard note in one transaction
        (:func:`~jdsearch.storage.optuna_internals.write_trial_note`), retried whole: a retry
        after a lost reply saves the same body as one more version. ``False``, and nothing
        written, where the database has no upsert (the caller saves it as the dashboard does)."""
        return with_reconnect(
            lambda: write_trial_note(self.backend, study_id, trial_id, body),
            "storage: save_trial_note",
        )

    def stale_trial_ids(self, study_id: int) -> list[int]:
        """The study's running trials whose heartbeat has gone stale (what Optuna's
        ``fail_stale_trials`` fails), retried."""
        return with_reconnect(
            lambda: stale_trial_ids(self._cached, study_id), "storage: stale_trial_ids"
        )

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        """Optuna's, retried, and done once: the trial carries a fresh token (its system attribute
        ``jdsearch:create_token``, written with it), and an attempt after a lost connection first
        looks for the trial with that token. Without it, a commit whose answer was lost would
        leave a RUNNING trial that no worker runs or heartbeats, next to the one created again."""
        token = uuid.uuid4().hex
        running = template_trial is None or template_trial.state == TrialState.RUNNING
        template = _with_token(template_trial, token, self.started if running else {})
        attempts = [0]

        def call() -> int:
            attempts[0] += 1
            if attempts[0] > 1:
                found = trial_id_by_system_attr(self.backend, study_id, CREATE_TOKEN_ATTR, token)
                if found is not None:
                    _log.info("storage: the trial created before the connection dropped is found")
                    self._cached.get_all_trials(study_id, deepcopy=False, states=())  # cache it
                    return found
            return self._cached.create_new_trial(study_id, template)

        trial_id = with_reconnect(call, "storage: create_new_trial")
        made = created_trial(self._cached, trial_id)  # a new RUNNING trial is this worker's
        self._fresh = (trial_id, made) if running and made is not None else None
        return trial_id

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        """Optuna's, retried; a retry of a ``tell`` (COMPLETE or PRUNED) that finds the trial
        already in that state (the first attempt's commit did arrive) returns ``True`` instead of
        raising. Popping a WAITING trial (RUNNING, no values) writes a token with the new state
        and counts the trial as taken by this call when a retry finds it there
        (:func:`~jdsearch.storage.optuna_internals.pop_waiting_trial`): else the trial would be
        left RUNNING, unrun and without a heartbeat, as "taken by another worker"."""
        self._fresh = None
        if state == TrialState.RUNNING and values is None:
            token = uuid.uuid4().hex
            return with_reconnect(
                lambda: pop_waiting_trial(
                    self.backend, trial_id, POP_TOKEN_ATTR, token, self.started
                ),
                f"storage: set_trial_state_values({trial_id}, RUNNING)",
            )
        attempts = [0]

        def call() -> bool:
            attempts[0] += 1
            try:
                return self._cached.set_trial_state_values(trial_id, state, values)
            except UpdateFinishedTrialError:
                # Only a trial's own result: a FAIL may be another worker's (a stale trial).
                own = state in (TrialState.COMPLETE, TrialState.PRUNED)
                if own and attempts[0] > 1 and self.backend.get_trial(trial_id).state == state:
                    return True
                raise

        return with_reconnect(call, f"storage: set_trial_state_values({trial_id})")

    def get_heartbeat_interval(self) -> int | None:
        """The backend's heartbeat interval in seconds (``None``: no heartbeats)."""
        return self.backend.get_heartbeat_interval()

    def get_heartbeat_stale_trial_callback(self) -> Callable[..., None] | None:
        """What Optuna calls on each trial it failed for a stale heartbeat (the backend's)."""
        return self.backend.get_heartbeat_stale_trial_callback()

    def remove_session(self) -> None:
        """Drop the backend's SQLAlchemy session of this thread (no database round trip)."""
        self.backend.remove_session()


def _with_token(
    template: FrozenTrial | None, token: str, also: Mapping[str, Any] | None = None
) -> FrozenTrial:
    """``template`` (default: a new RUNNING trial, what Optuna creates without one), copied, with
    the system attribute ``jdsearch:create_token`` set to ``token``, and those in ``also``."""
    if template is None:
        template = FrozenTrial(
            number=-1,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=datetime.datetime.now(),
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={},
            intermediate_values={},
            trial_id=-1,
        )
    else:
        template = copy.deepcopy(template)
    template.system_attrs = {**template.system_attrs, **(also or {}), CREATE_TOKEN_ATTR: token}
    return template
