"""Post-search fine-tuning: a child trial of the chosen pair that export and report see, retried
like any trial when its worker dies, and never a parent of the search."""

from __future__ import annotations

import json
import time
from pathlib import Path

import optuna
import pytest

from jdsearch.cli import main
from jdsearch.core.errors import JDSearchError
from jdsearch.search.finetune import finetune
from jdsearch.search.objective import Objective, TrialFailed
from jdsearch.search.queries import lineage, open_study
from jdsearch.search.record import FINETUNE_MOVE, MOVE_PARAM, TrialRecord
from jdsearch.search.run import run_search
from jdsearch.search.session import prepare
from jdsearch.spec.study import study_from_stored
from jdsearch.storage.optuna_internals import keep_alive

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.slow
def test_finetune_adds_a_child_trial_that_export_picks(
    small_study_copy: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    best = open_study(small_study_copy).trial()
    assert (
        main(
            [
                "--threads",
                "1",
                "finetune",
                "--storage",
                small_study_copy,
                "--epochs",
                "0.5",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    handle = open_study(small_study_copy)
    trials = handle.study.get_trials()
    child = trials[-1]
    r, parent = TrialRecord.from_trial(child), TrialRecord.from_trial(best)
    assert child.state == optuna.trial.TrialState.COMPLETE and len(trials) == 7
    assert (r.move, r.kind, r.parent) == (FINETUNE_MOVE, FINETUNE_MOVE, best.number)
    assert child.user_attrs["finetune_epochs"] == 0.5 and child.user_attrs["finetune_lr"] is None
    # the parent's pair, trained further: same student and teacher, its own checkpoint
    assert (r.student, r.teacher) == (parent.student, parent.teacher)
    assert r.checkpoint not in (None, parent.checkpoint) and r.metrics and r.h
    assert [t.number for t in lineage(handle.study, child.number)][-2:] == [best.number, 6]
    assert f"fine-tuned (trial {child.number})" in out
    # export picks it by number, and by default when it is the best
    dest = tmp_path / "export"
    assert (
        main(
            [
                "export",
                "--storage",
                small_study_copy,
                "--trial",
                str(child.number),
                "--out",
                str(dest),
            ]
        )
        == 0
    )
    meta = json.loads((dest / "detector.json").read_text())
    source = meta["source"]
    assert source["trial"] == child.number and source["lineage"][-1]["move"] == FINETUNE_MOVE


@pytest.mark.slow
def test_the_finetune_trial_trains_the_asked_epochs_with_its_own_seed(
    small_study_copy: str,
) -> None:
    """Re-running the child's pair through the objective with its seed gives its recorded H:
    the recorded trial is exactly the parent's pair trained for the asked epochs."""
    handle = open_study(small_study_copy)
    study, ctx = prepare(handle.spec, small_study_copy, progress=False)
    child = finetune(study, ctx, 2, epochs=0.5, lr=0.005)
    assert TrialRecord.from_trial(child).parent == 2 and child.user_attrs["finetune_lr"] == 0.005
    objective = Objective(ctx)
    pair = objective.load_pair(study, child.number, FINETUNE_MOVE, 2)
    assert pair.finetune == (0.5, 0.005) and pair.morph == {}
    objective.train_pair(pair, objective.seed_of(child.number))
    assert objective.score(child.number, pair.student).value == pytest.approx(child.value, 1e-9)


@pytest.mark.slow
def test_a_killed_finetune_is_retried_and_never_becomes_a_parent(small_study_copy: str) -> None:
    handle = open_study(small_study_copy)
    spec = study_from_stored(
        {**handle.spec.to_dict(), "search": {**handle.spec.to_dict()["search"], "heartbeat_s": 1}},
        source="test",
    )
    study, ctx = prepare(spec, small_study_copy, progress=False)
    # a worker asks for a fine-tuning, starts it (heartbeat) and dies
    study.enqueue_trial(
        {MOVE_PARAM: FINETUNE_MOVE},
        user_attrs={
            "parent": 1,
            "move_kind": FINETUNE_MOVE,
            "finetune_epochs": 0.25,
            "finetune_lr": None,
            "finetune_request": "dead-worker",
        },
    )
    dead = study.ask()
    keep_alive(study, dead._cached_frozen_trial)
    with pytest.raises(JDSearchError, match="same settings in worker"):
        finetune(study, ctx, 1, epochs=0.25)  # still alive: not asked twice
    time.sleep(3.5)  # its heartbeat lapses (grace period 2 × 1 s; SQLite keeps whole seconds)
    child = finetune(study, ctx, 1, epochs=0.25)  # runs the re-queued copy of the same request
    assert child.user_attrs["finetune_request"] == "dead-worker"
    states = [t.state for t in study.get_trials()]
    assert states[dead.number] == optuna.trial.TrialState.FAIL and child.number == dead.number + 1
    # the search goes on: a fine-tuned pair is never a parent, even when it is the best
    run_search(spec, small_study_copy, n_trials=2, progress=False)
    parents = [TrialRecord.from_trial(t).parent for t in study.get_trials()[child.number + 1 :]]
    assert len(parents) == 2 and child.number not in parents


def test_finetune_refuses_bad_requests(small_study_copy: str) -> None:
    handle = open_study(small_study_copy)
    study, ctx = prepare(handle.spec, small_study_copy, progress=False)
    with pytest.raises(JDSearchError, match=r"TrainConfig\.epochs: must be a positive number"):
        finetune(study, ctx, epochs=0)
    with pytest.raises(JDSearchError, match=r"TrainConfig\.lr: must be a positive number"):
        finetune(study, ctx, epochs=1, lr=float("nan"))
    with pytest.raises(JDSearchError, match=r"TrainConfig\.lr: must be ≤ 10 .*, got 1000\.0"):
        finetune(study, ctx, epochs=1, lr=1e3)  # was taken, and failed the trial it queued
    with pytest.raises(JDSearchError, match="trial 99 is missing"):
        finetune(study, ctx, 99, epochs=1)
    assert len(study.get_trials()) == 6  # nothing was queued


def test_a_failed_finetune_says_why_it_failed(
    small_study_copy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error names the fine-tuning trial's ``fail_reason`` (a user attribute), not just
    its state."""
    handle = open_study(small_study_copy)
    study, ctx = prepare(handle.spec, small_study_copy, progress=False)

    def refuse(self: Objective, trial: optuna.Trial, move: str, parent: int | None) -> float:
        raise TrialFailed(f"trial {trial.number}: the disk is full (injected)")

    monkeypatch.setattr(Objective, "_run", refuse)
    with pytest.raises(JDSearchError) as caught:
        finetune(study, ctx, 1, epochs=0.25)
    failed = study.get_trials()[-1]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert str(caught.value) == (
        f"finetune: trial {failed.number} failed: "
        f"trial {failed.number}: the disk is full (injected)"
    )
