"""``kd.when``: a study distils only from a teacher pool stronger than its base detector."""

from __future__ import annotations

from pathlib import Path

import pytest

from jdsearch.core.errors import JDSearchError, SpecError
from jdsearch.engine.evaluate import evaluate
from jdsearch.report.html import write_report
from jdsearch.search import teacher_check
from jdsearch.search.queries import open_study
from jdsearch.search.record import TrialRecord
from jdsearch.search.run import run_search
from jdsearch.search.session import prepare
from jdsearch.search.summary import summary
from jdsearch.search.teacher_check import TEACHER_CHECK_ATTR, TeacherCheck
from jdsearch.spec.study import study_from_dict
from jdsearch.store.checkpoint import load_checkpoint


def _spec(search_assets, tmp_path: Path, name: str, *, when: str = "stronger", n_trials: int = 3):
    data = search_assets.study(name, f"sqlite:///{tmp_path / 's.db'}", n_trials=n_trials)
    data["kd"]["when"] = when
    search_assets.install_pool(tmp_path, name)
    return study_from_dict(data, source="test")


def _fake(teacher_ap: float, base_ap: float, calls: list[int]):
    def measure(ctx, base):
        calls.append(1)
        return TeacherCheck("d2-2-3-2_w1.5-1.5-1.5-1.5_f32", teacher_ap, base_ap, "96x96")

    return measure


@pytest.mark.slow
def test_the_check_scores_the_pools_largest_subnet_and_the_base_on_the_selection_split(
    search_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec(search_assets, tmp_path, "measured")
    monkeypatch.chdir(tmp_path)
    study, ctx = prepare(spec, progress=False)
    check = TeacherCheck.from_dict(study.user_attrs[TEACHER_CHECK_ATTR], "test")
    res = ctx.base_resolution
    teacher = ctx.pool.teacher(ctx.pool.space.largest(), ctx.train_set)
    base = load_checkpoint(search_assets.base).detector
    assert len(ctx.val_set) == spec.data.max_val_images  # the selection split, not all of val
    assert check.teacher == str(ctx.pool.space.largest()) and check.resolution == str(res)
    assert check.teacher_ap == evaluate(teacher, ctx.val_set, [res])[str(res)].AP
    assert check.base_ap == evaluate(base, ctx.val_set, [res])[str(res)].AP
    assert ctx.kd.name == ("dynamic" if check.stronger else "off")


@pytest.mark.slow
def test_a_teacher_weaker_than_the_base_turns_distillation_off_for_the_whole_study(
    search_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(teacher_check, "measure_teacher", _fake(0.004, 0.112, calls))
    spec = _spec(
        search_assets, tmp_path, "weak"
    )  # freeze_student 1: a teacher move would come first
    monkeypatch.chdir(tmp_path)
    study = run_search(spec, progress=False)
    records = [TrialRecord.from_trial(t) for t in study.get_trials()]
    assert len(records) == 3 and all(r.value is not None for r in records)
    assert all(not r.teacher and r.teacher_params == 0 for r in records)
    assert all(r.kind in ("base", "student") for r in records)  # no teacher move, no freeze
    assert study.user_attrs["kd_mode"] == "dynamic"  # what the spec asked; the check says the rest
    line = "KD dynamic, off: the pool's largest sub-network AP 0.4 does not beat the base's 11.2"
    assert line in summary(study) and "teacher     none (no distillation)" in summary(study)
    # a resumed worker reads the check back: no second measurement, still no teacher
    study = run_search(spec, n_trials=1, progress=False)
    assert calls == [1] and not TrialRecord.from_trial(study.get_trials()[-1]).teacher
    # the report says why fig. 5 shows no teacher
    files = write_report(open_study(spec.storage_url), tmp_path / "report", png=False, attach=False)
    page = files.html.read_text()
    assert "This study distilled from no teacher (KD dynamic, off: the pool&#x27;s largest" in page
    # once recorded, the check decides for the whole study, whatever kd.when a later spec sets
    again = _spec(search_assets, tmp_path, "weak", when="always", n_trials=1)
    study = run_search(again, progress=False)
    assert calls == [1] and not TrialRecord.from_trial(study.get_trials()[-1]).teacher
    # finetune and noise open the study with its stored spec: the same decision
    _, ctx = prepare(open_study(spec.storage_url).spec, spec.storage_url, stored=True)
    assert ctx.kd.name == "off" and calls == [1]


@pytest.mark.slow
def test_a_stronger_teacher_keeps_dynamic_distillation(
    search_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(teacher_check, "measure_teacher", _fake(0.30, 0.10, calls))
    spec = _spec(search_assets, tmp_path, "strong")
    monkeypatch.chdir(tmp_path)
    study = run_search(spec, progress=False)
    records = [TrialRecord.from_trial(t) for t in study.get_trials()]
    assert all(r.teacher for r in records) and records[1].kind == "teacher"  # the freeze
    assert "KD dynamic (teacher check: AP 30.0 against the base's 10.0)" in summary(study)
    files = write_report(open_study(spec.storage_url), tmp_path / "report", png=False, attach=False)
    assert "distilled from no teacher" not in files.html.read_text()
    assert calls == [1]


@pytest.mark.slow
def test_always_and_studies_begun_before_the_check_distil_without_measuring(
    search_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(ctx, base):
        raise AssertionError("measured")

    monkeypatch.setattr(teacher_check, "measure_teacher", refuse)
    monkeypatch.chdir(tmp_path)
    always = _spec(search_assets, tmp_path, "old", when="always", n_trials=1)
    study = run_search(always, progress=False)
    assert TEACHER_CHECK_ATTR not in study.user_attrs
    # the same study, now asked for the check: it has trials, so it goes on as it began
    stronger = _spec(search_assets, tmp_path, "old", when="stronger", n_trials=1)
    study = run_search(stronger, progress=False)
    assert all(TrialRecord.from_trial(t).teacher for t in study.get_trials())


def test_a_bad_recorded_check_or_kd_when_is_refused_in_one_line(search_assets) -> None:
    good = TeacherCheck("t", 0.1, 0.2, "96x96").to_dict()
    assert TeacherCheck.from_dict(good, "s") == TeacherCheck("t", 0.1, 0.2, "96x96")
    for bad, where in [
        ({**good, "teacher_ap": 3.0}, "teacher_ap = 3.0"),
        ({**good, "base_ap": "high"}, "base_ap = 'high'"),
        ({**good, "base_ap": float("nan")}, "base_ap = nan"),
        ({"teacher": "t"}, "must map"),
        ({**good, "teacher": None}, "teacher = None"),
        ([1, 2], "must map"),
    ]:
        with pytest.raises(JDSearchError, match=where) as e:
            TeacherCheck.from_dict(bad, "study s")
        assert "\n" not in str(e.value) and str(e.value).startswith("study s: teacher_check")
    data = search_assets.study("w", "sqlite:///unused.db")
    data["kd"]["when"] = "sometimes"
    with pytest.raises(
        SpecError, match=r"w.yaml: kd\.when: must be one of stronger, always, got 'sometimes'"
    ):
        study_from_dict(data, source="w.yaml")
