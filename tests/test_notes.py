"""Every finished trial carries an optuna-dashboard note: the search read as a log.

The completed trials' notes are read from the session's small search (``small_study``); the notes
of failed trials and of trials whose worker was lost from trials built in memory (the worker
tests check them on real failures: ``tests/test_workers.py``).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState, create_trial
from optuna_dashboard import get_note

from jdsearch.search.notes import NoteWriter, lost_worker_note, save_trial_note, trial_note
from jdsearch.search.queries import lineage_of, open_study
from jdsearch.search.record import (
    BASE_MOVE,
    FAIL_REASON_ATTR,
    MOVE_PARAM,
    PARENT_ATTR,
    RETRY_OF_ATTR,
    RETRY_REASON_ATTR,
    WORKER_SYSATTR,
    TrialRecord,
    decision_attrs,
)
from jdsearch.search.session import open_storage
from jdsearch.spec.study import study_from_dict
from jdsearch.storage.optuna_internals import keep_alive, set_trial_system_attr, trial_of

from .conftest import optuna_cli, tiny_study_dict

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
MOVES = CategoricalDistribution([BASE_MOVE, "layer_prune", "teacher.depth3+"])


@pytest.mark.slow
def test_every_trial_of_a_search_carries_its_note(small_study) -> None:
    study = open_study(small_study.url, small_study.name).study
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 6
    for t in trials:
        r, note = TrialRecord.from_trial(t), get_note(trial_of(study, t))
        assert t.state == TrialState.COMPLETE
        assert note.startswith(f"### Trial {t.number}: H {r.value:.4f} at {r.best_resolution}\n")
        origin = "the base detector" if r.parent is None else f"trial {r.parent}"
        assert f"move `{r.move}`" in note and f" from {origin}; teacher `{r.teacher}`." in note
        for res, h in r.h.items():  # AP, cost and H at each resolution, the best in bold
            cells = [res, f"{100 * r.ap[res]:.1f}", f"{r.cost[res]:.3f}", f"{h:.4f}"]
            if res == r.best_resolution:
                cells = [f"**{c}**" for c in cells]
            row = next(line for line in note.splitlines() if line.startswith(f"| {cells[0]} |"))
            assert all(f" {c} " in row for c in cells), row
        path = lineage_of(trials, t.number)
        assert path[0].params[MOVE_PARAM] == BASE_MOVE
        assert note.rstrip().endswith(
            "**Lineage**: " + " → ".join(f"`{p.params[MOVE_PARAM]}` (#{p.number})" for p in path)
        )
        assert note == trial_note(trials, t)  # as written by the worker, after tell


def _failed(number: int, parent: int, reason: str | None, **system: object) -> object:
    return create_trial(
        state=TrialState.FAIL,
        params={MOVE_PARAM: "layer_prune"},
        distributions={MOVE_PARAM: MOVES},
        user_attrs={
            **decision_attrs(parent, "student"),
            **({} if reason is None else {FAIL_REASON_ATTR: reason}),
        },
        system_attrs=dict(system),
    )


def _study_with_failures() -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    study.add_trial(
        create_trial(
            value=0.5,
            params={MOVE_PARAM: BASE_MOVE},
            distributions={MOVE_PARAM: MOVES},
            user_attrs=decision_attrs(None, "base"),
        )
    )
    study.add_trial(_failed(1, 0, "trial 1: out of memory on cpu"))
    study.add_trial(_failed(2, 0, None, **{WORKER_SYSATTR: "node7:4242"}))
    return study


def test_a_failed_trial_names_why_and_a_lost_worker_its_retry() -> None:
    study = _study_with_failures()
    _, oom, lost = study.get_trials()
    note = trial_note(study.get_trials(), oom)
    assert note.startswith("### Trial 1: FAIL\nmove `layer_prune` (student) from trial 0.\n")
    assert "**Why**: trial 1: out of memory on cpu" in note
    assert note.rstrip().endswith("**Lineage**: `base` (#0) → `layer_prune` (#1)")
    assert "**Why**: no reason recorded" in trial_note(study.get_trials(), lost)

    assert "not retried" in lost_worker_note(study.get_trials(), lost)
    RetryHeartbeatStaleTrialCallback()(study, lost)  # what Optuna does with a stale trial
    note = lost_worker_note(study.get_trials(), lost)
    assert note.startswith("### Trial 2: FAIL, its worker was lost\n")
    assert "its worker `node7:4242` stopped beating its heartbeat" in note
    assert "retried as trial 3, same move and parent" in note


def test_the_writer_saves_notes_and_never_fails_a_trial(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    study = _study_with_failures()
    root, oom, _ = study.get_trials()
    NoteWriter()(study, oom)
    assert get_note(trial_of(study, oom)) == trial_note(study.get_trials(), oom)
    assert get_note(trial_of(study, root)) == ""  # only what the writer was handed

    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # not installed: nothing written
    assert save_trial_note(study, root, "x") is False
    monkeypatch.undo()
    assert get_note(trial_of(study, root)) == ""
    assert save_trial_note(study, root, "**x**") is True
    assert get_note(trial_of(study, root)) == "**x**"

    def refuse(*args: object) -> None:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(study._storage, "set_study_system_attr", refuse)
    NoteWriter()(study, root)  # logged, not raised
    assert "trial 0: its dashboard note was not saved (database is locked)" in caplog.text


def _lose_a_worker(study: optuna.Study, worker: str) -> optuna.Trial:
    """A worker starts the next trial (a new one, or a queued retry), beats once and dies; the
    trial's heartbeat then lapses and another worker fails it as stale (and retries it)."""
    trial = study.ask()
    set_trial_system_attr(trial, WORKER_SYSATTR, worker)
    trial.suggest_categorical(MOVE_PARAM, list(MOVES.choices))
    if PARENT_ATTR not in trial.user_attrs:
        for key, value in decision_attrs(0, "student").items():
            trial.set_user_attr(key, value)
    keep_alive(study, study._storage.get_trial(trial._trial_id))
    time.sleep(3.5)  # grace period 2 × 1 s; SQLite keeps whole seconds
    optuna.storages.fail_stale_trials(study)
    return trial


def test_a_lost_workers_trial_says_why_on_its_retry_in_optuna_trials(tmp_path: Path) -> None:
    """Optuna refuses attributes on the failed trial: its retry carries ``retry_of`` and
    ``retry_reason`` (the worker and its last heartbeat), which ``optuna trials`` prints, and the
    lost trial's note names them; a retry's retry names the trial it retries."""
    url = f"sqlite:///{tmp_path / 'lost.db'}"
    doc = tiny_study_dict(tmp_path / "data", "lost")
    doc["search"].update({"storage": url, "heartbeat_s": 1})
    spec = study_from_dict(doc, source="test")
    storage, _ = open_storage(spec)
    study = optuna.create_study(storage=storage, study_name="lost", direction="maximize")
    first = _lose_a_worker(study, "node7:4242")
    second = _lose_a_worker(study, "node8:99")  # the retry, lost too
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING]
    assert (first.number, second.number) == (0, 1)
    when = r"at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(database clock\)"
    for lost, retry, worker in (
        (trials[0], trials[1], "node7:4242"),
        (trials[1], trials[2], "node8:99"),
    ):
        assert retry.user_attrs[RETRY_OF_ATTR] == lost.number
        reason = retry.user_attrs[RETRY_REASON_ATTR]
        assert re.fullmatch(f"its worker `{worker}` stopped beating its heartbeat {when}", reason)
        note = get_note(trial_of(study, lost))
        assert f"**Why**: {reason} (killed, or cut off" in note
        assert f"retried as trial {retry.number}, same move and parent" in note
    # what `optuna trials` prints
    rows = yaml.safe_load(
        optuna_cli("trials", "--study-name", "lost", "--storage", url, "-f", "yaml")
    )
    by_number = {row["number"]: row for row in rows}
    assert by_number[2]["user_attrs"][RETRY_OF_ATTR] == 1
    assert by_number[2]["user_attrs"][RETRY_REASON_ATTR] == trials[2].user_attrs[RETRY_REASON_ATTR]
