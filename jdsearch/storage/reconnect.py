"""Riding out a database that blinks: a PostgreSQL restart, a failover, a dropped connection.

A worker of a shared study talks to the database throughout a trial (heartbeats, attributes,
artifact uploads). When the server goes away for a moment, the operation in flight fails with a
connection error, and without a retry the worker would mark its trial failed or crash. Here such
errors are told apart from real ones (bad SQL, a constraint, a locked SQLite file is handled where
it happens), and the operation is retried until the server is back or a time window has passed.
Connections left dead in a pool are replaced by SQLAlchemy's ``pool_pre_ping`` on next use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa

from jdsearch.core.config import env_number
from jdsearch.core.errors import first_line

__all__ = ["RETRY_WINDOW_ENV", "is_disconnect", "retry_window_s", "with_reconnect"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

RETRY_WINDOW_ENV = "JDSEARCH_DB_RETRY_S"
_DEFAULT_WINDOW_S = 300.0
# What drivers say when the server is gone, going or not yet back (psycopg 2 and 3, PyMySQL,
# mysqlclient), lower-cased. A statement error never reads like one of these.
_MARKERS = (
    "server closed the connection",
    "terminating connection",
    "connection refused",
    "could not connect to server",
    "connection to server at",
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "connection already closed",
    "connection is closed",
    "connection not open",
    "ssl connection has been closed unexpectedly",
    "lost connection to mysql server",
    "mysql server has gone away",
    "can't connect to mysql server",
    "broken pipe",
    "connection reset by peer",
    "no connection to the server",
)


def retry_window_s() -> float:
    """How long an operation is retried while the database is unreachable: the environment's
    ``JDSEARCH_DB_RETRY_S`` (seconds ≥ 0), default 300."""
    return env_number(RETRY_WINDOW_ENV, _DEFAULT_WINDOW_S)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and the driver errors SQLAlchemy wraps (``.orig``)."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen) or len(seen) > 20:
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__, getattr(e, "orig", None)]
    return seen


def is_disconnect(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) says that the database connection is down, rather than
    that the statement was wrong."""
    for e in _chain(exc):
        if isinstance(e, sa.exc.DBAPIError) and e.connection_invalidated:
            return True
        text = str(e).lower()
        if any(marker in text for marker in _MARKERS):
            return True
    return False


def _driver_words(exc: BaseException) -> str:
    """The first line of the innermost error (the driver's own words), at most 200 characters."""
    inner = _chain(exc)[-1]
    for e in _chain(exc):
        if not isinstance(e, sa.exc.SQLAlchemyError) and type(e).__module__ != "optuna.exceptions":
            inner = e
            break
    return first_line(inner, 200)


def with_reconnect(
    fn: Callable[[], _T],
    what: str,
    *,
    window_s: float | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
) -> _T:
    """``fn()``, called again while it fails because the database is unreachable, for at most
    ``window_s`` seconds (default :func:`retry_window_s`); any other error, or the last one,
    propagates. ``what`` names the operation in the log; ``on_retry`` sees each retried error."""
    window = retry_window_s() if window_s is None else window_s
    deadline = time.monotonic() + window
    delay, warned = 0.1, False
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_disconnect(e) or time.monotonic() + delay > deadline:
                raise
            if on_retry is not None:
                on_retry(e)
            if not warned:
                log.warning(
                    "%s: the database is unreachable (%s); retrying for up to %.0f s",
                    what,
                    _driver_words(e),
                    window,
                )
                warned = True
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
