"""The study's RDB storage: opening it for a search, and storage URLs safe to print."""

from __future__ import annotations

import re
from pathlib import Path

from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from jdsearch.study import StudySpec


def storage_for(spec: StudySpec, url: str | None = None) -> RDBStorage:
    """The ``RDBStorage`` at ``url`` (default the spec's), with heartbeats and retries of stale
    trials; creates a SQLite file's folder."""
    url = url or spec.storage_url
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    hb = spec.search.heartbeat_s
    return RDBStorage(
        url,
        heartbeat_interval=hb,
        grace_period=2 * hb,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
            max_retry=spec.search.max_retry
        ),
        engine_kwargs={"pool_pre_ping": True},
    )


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
