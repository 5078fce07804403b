"""The trial record: the one place that knows attribute names, and it reads old studies."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from jdsearch.search.record import (
    BASE_MOVE,
    KIND_ATTR,
    MOVE_PARAM,
    PARENT_ATTR,
    WORKER_SYSATTR,
    TrialRecord,
    decision_attrs,
)

LEGACY = Path(__file__).parent / "data" / "study_v0_1.sqlite"


def _trial(record: TrialRecord, *, parent: int | None, move: str, value: float) -> FrozenTrial:
    user, system = record.to_attrs()
    return create_trial(
        state=TrialState.COMPLETE,
        value=value,
        params={MOVE_PARAM: move},
        distributions={MOVE_PARAM: CategoricalDistribution([BASE_MOVE, "layer_prune"])},
        user_attrs={**user, **decision_attrs(parent, "student")},
        system_attrs={**system, WORKER_SYSATTR: "host:1"},
    )


def test_a_record_round_trips_through_a_trial() -> None:
    record = TrialRecord(
        student="[(8, 8)], [(16, 16)], [(32, 32)], [(64, 64)]",
        teacher="d1-1-1-1_w1.0-1.0-1.0-1.0_f16",
        checkpoint="abc",
        teacher_params=1234,
        flops=10_000,
        flops_at={"64x64": 9_000, "96x96": 20_000},
        backbone_flops=7_000,
        stage_flops=(1, 2, 3, 4, 5),
        params=999,
        metrics={"64x64": {"AP": 0.25, "AP50": 0.5, "APl": None}},
        ap={"64x64": 0.25},
        h={"64x64": 0.3, "96x96": 0.2},
        best_resolution="64x64",
        morph={"new_params": 0, "inherited_params": 999},
        timings={"train_s": 1.5, "eval_s": 0.5, "teacher_s": 0.1, "load_s": 0.2, "upload_s": 0.3},
        arch={"stem": 8, "fpn": 16, "stages": []},
        student_moves=("layer_prune", "channel_prune"),
    )
    t = _trial(record, parent=3, move="layer_prune", value=0.3)
    back = TrialRecord.from_trial(t)
    lineage = {
        "number": t.number,
        "move": "layer_prune",
        "parent": 3,
        "kind": "student",
        "value": 0.3,
    }
    assert back == TrialRecord(**{**record.__dict__, **lineage, "worker": "host:1"})
    assert back.metric_at("64x64") == 0.25 and back.metric_at("64x64", "APl") is None
    assert back.metric_at("96x96") is None
    assert back.flops_where_scored() == (9_000, "64x64")


def test_a_trial_recorded_before_flops_at_and_teacher_params_reads_with_defaults() -> None:
    t = create_trial(
        state=TrialState.COMPLETE,
        value=0.1,
        params={MOVE_PARAM: BASE_MOVE},
        distributions={MOVE_PARAM: CategoricalDistribution([BASE_MOVE])},
        user_attrs={
            PARENT_ATTR: None,
            KIND_ATTR: BASE_MOVE,
            "student": "s",
            "teacher": "t",
            "flops": 500,
            "best_resolution": "64x64",
            "ap": {"64x64": 0.1},
        },
    )
    r = TrialRecord.from_trial(t)
    assert (r.move, r.parent, r.teacher_params, r.flops_at, r.student_moves) == (
        BASE_MOVE,
        None,
        None,
        {},
        (),
    )
    assert r.flops_where_scored() == (500, None)  # at the base resolution
    assert r.metric_at("64x64") is None and r.ap == {"64x64": 0.1}


def test_every_trial_of_a_0_1_study_reads_and_writes_back_the_same_attributes(
    tmp_path: Path,
) -> None:
    """The record format did not change: what 0.1 wrote is exactly what to_attrs writes."""
    copy = tmp_path / "legacy.sqlite"
    shutil.copyfile(LEGACY, copy)
    study = optuna.load_study(study_name="small", storage=f"sqlite:///{copy}")
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 6
    for t in trials:
        user, system = TrialRecord.from_trial(t).to_attrs()
        stored_user = {k: v for k, v in t.user_attrs.items() if k not in (PARENT_ATTR, KIND_ATTR)}
        assert user == stored_user, t.number
        stored_system = {k: v for k, v in t.system_attrs.items() if k in system}
        assert system == stored_system, t.number
        ours = {k for k in t.system_attrs if not k.startswith("artifacts:")}  # optuna's own
        assert ours - set(system) <= {WORKER_SYSATTR}


@pytest.mark.parametrize("bad", [{PARENT_ATTR: "x"}])
def test_a_hand_edited_parent_that_is_not_a_number_fails_loudly(bad: dict) -> None:
    t = create_trial(state=TrialState.COMPLETE, value=0.0, user_attrs=bad)
    with pytest.raises(ValueError):
        TrialRecord.from_trial(t)
