"""A failed trial in a worker's output: one line, its traceback in a log file.

A trial that fails with a :class:`~jdsearch.core.errors.JDSearchError` is recorded FAIL with its
``fail_reason`` (the objective's), and the worker prints one line for it
(:func:`jdsearch.search.summary.print_trial`) naming the reason and the file that holds the
traceback: ``runs/<study>/failed-trials.log`` under the folder the worker runs in, each entry
headed by the trial, the study, the worker and the time. The trial's system attribute
``jdsearch:traceback_log`` names that file for the line. Optuna's own warnings on such a trial,
which print the whole traceback, are muted while the worker's trials run
(:meth:`FailureLog.quiet`); with ``jdsearch -v`` (``--verbose``) the traceback is logged too.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import traceback
from collections.abc import Iterator
from pathlib import Path

import optuna

from jdsearch.search.caches import run_dir
from jdsearch.search.record import TRACEBACK_SYSATTR
from jdsearch.spec.study import StudySpec
from jdsearch.storage.optuna_internals import muted_trial_failures, set_trial_system_attr

__all__ = ["FAILURE_LOG", "FailureLog"]

log = logging.getLogger(__name__)

FAILURE_LOG = "failed-trials.log"  # in the study's runs/<study>/ folder


class FailureLog:
    """Where a worker writes the tracebacks of its failed trials (appended; several workers may
    share the file), and which trials it wrote."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written: set[int] = set()

    @classmethod
    def of(cls, spec: StudySpec) -> FailureLog:
        """The study's log, ``runs/<study>/failed-trials.log``."""
        return cls(run_dir(spec) / FAILURE_LOG)

    def record(self, trial: optuna.Trial, error: BaseException, worker: str) -> None:
        """Append ``error``'s traceback under a header naming ``trial`` and ``worker``, and name
        the file in the trial's system attributes. Never raises: a log that cannot be written
        leaves the trial's line without a file (Optuna's warning then shows the traceback)."""
        log.debug("trial %d failed: %s", trial.number, error, exc_info=error)
        stamp = datetime.datetime.now().astimezone().isoformat(sep=" ", timespec="seconds")
        header = (
            f"=== trial {trial.number} of study {trial.study.study_name!r}, "
            f"worker {worker}, {stamp}: {error}\n"
        )
        text = header + "".join(traceback.format_exception(error)) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            log.warning(
                "trial %d: its traceback was not written to %s (%s)", trial.number, self.path, e
            )
            return
        self.written.add(trial.number)
        with contextlib.suppress(Exception):  # the line without the file, rather than no line
            set_trial_system_attr(trial, TRACEBACK_SYSATTR, str(self.path))

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Optuna's warnings (the traceback again) muted for the trials written here."""
        with muted_trial_failures(self.written.__contains__):
            yield
