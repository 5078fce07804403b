"""The noise floor: a trial re-run with other seeds, stored for the report's comparison."""

from __future__ import annotations

import statistics

import pytest

from jdsearch.cli import main
from jdsearch.report.compare import compare_study
from jdsearch.search.noise import measure_noise, stored_noise
from jdsearch.search.objective import Objective
from jdsearch.search.queries import open_study
from jdsearch.search.record import TrialRecord
from jdsearch.search.session import prepare


@pytest.mark.slow
def test_a_rerun_with_the_trials_own_seed_gives_its_recorded_h(small_study_copy: str) -> None:
    """The re-run path is the trial's own path: only the seed differs."""
    handle = open_study(small_study_copy)
    study, ctx = prepare(handle.spec, small_study_copy, progress=False)
    t = handle.trial()
    r = TrialRecord.from_trial(t)
    objective = Objective(ctx)
    pair = objective.load_pair(study, t.number, str(r.move), r.parent)
    objective.train_pair(pair, objective.seed_of(t.number))
    assert objective.score(t.number, pair.student).value == pytest.approx(t.value, rel=1e-9)


@pytest.mark.slow
def test_noise_is_measured_stored_and_shown_beside_the_comparison(
    small_study_copy: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--threads", "1", "noise", "--storage", small_study_copy, "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    handle = open_study(small_study_copy)
    floor = stored_noise(handle.study)
    assert floor is not None and floor.trial == handle.trial().number and len(floor.seeds) == 2
    assert len(set(floor.seeds)) == 2 and floor.recorded_h == handle.trial().value
    assert floor.sd_h == pytest.approx(statistics.stdev([floor.recorded_h, *floor.h]))
    assert floor.describe() in out
    c = compare_study(handle, fps=False)
    assert c.noise == floor.describe() and floor.describe() in c.format()
    assert len(handle.study.get_trials()) == 6  # nothing was added to the lineage


@pytest.mark.slow
def test_each_rerun_draws_its_moves_batches_with_its_own_seed(
    small_study_copy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Taylor ranking or a local recovery is drawn with the trial's seed, so a re-run must
    draw it with its own: a recovered trial that skips the fast evaluation (after_recovery:
    score) would otherwise re-run identically and show no noise at all."""
    handle = open_study(small_study_copy)
    study, ctx = prepare(handle.spec, small_study_copy, progress=False)
    asked: list[int | None] = []
    load_pair = Objective.load_pair

    def spy(self, study, number, move, parent_no, seed=None):
        asked.append(seed)
        return load_pair(self, study, number, move, parent_no, seed)

    monkeypatch.setattr(Objective, "load_pair", spy)
    floor = measure_noise(study, ctx, seeds=2)
    assert asked == list(floor.seeds) and len(set(asked)) == 2


def test_one_seed_is_no_spread(small_study_copy: str) -> None:
    from jdsearch.core.errors import JDSearchError

    handle = open_study(small_study_copy)
    with pytest.raises(JDSearchError, match="at least 2 seeds"):
        measure_noise(handle.study, None, seeds=1)  # type: ignore[arg-type]
