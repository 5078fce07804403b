"""End to end: a short real search on synthetic data, its lineage, resume, and the optuna CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest

from jdsearch.engine.evaluate import evaluate
from jdsearch.methods.morph.actions import MorphConfig, evolve
from jdsearch.search.objective import score_h
from jdsearch.search.queries import open_study
from jdsearch.search.record import (
    BASE_ATTR,
    BASE_MOVE,
    BASE_RESOLUTION_ATTR,
    MOVE_PARAM,
    PARENT_ATTR,
    TrialRecord,
)
from jdsearch.search.run import run_search
from jdsearch.search.session import prepare
from jdsearch.search.splits import heldout_split
from jdsearch.search.summary import heldout_verdict, summary
from jdsearch.spec.pool_space import SubnetConfig
from jdsearch.spec.study import study_from_dict
from jdsearch.store.checkpoint import checkpoint_from_bytes

from .conftest import optuna_cli, tiny_study_dict


def tiny_study(tmp: Path, n_trials: int) -> dict:
    """The conftest's tiny study, trained from scratch here (base and pool included)."""
    spec = tiny_study_dict(tmp / "data", "test-study")
    spec["base"]["train"]["warmup_iters"] = 5
    spec["data"]["max_val_images"] = 6  # of 8: 2 held-out images to judge the winner on
    spec["search"].update({"n_trials": n_trials, "storage": f"sqlite:///{tmp / 'study.db'}"})
    return spec


@pytest.mark.slow
def test_short_search_lineage_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # runs/<name>/ caches land here
    spec = study_from_dict(tiny_study(tmp_path, 4), source="test-study")
    study = run_search(spec, progress=False)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4, [t.state for t in trials]

    _, ctx = prepare(spec, progress=False)
    by_number = {t.number: t for t in trials}
    root = by_number[0]
    assert root.params[MOVE_PARAM] == BASE_MOVE and TrialRecord.from_trial(root).parent is None
    assert TrialRecord.from_trial(root).teacher == str(ctx.pool.space.largest())
    for t in complete:
        if t.number == 0:
            continue
        parent = by_number[TrialRecord.from_trial(t).parent]
        assert parent.state == optuna.trial.TrialState.COMPLETE
        move = t.params[MOVE_PARAM]
        parent_teacher = SubnetConfig.parse(TrialRecord.from_trial(parent).teacher)
        if move.startswith("teacher."):
            assert TrialRecord.from_trial(t).student == TrialRecord.from_trial(parent).student
            assert SubnetConfig.parse(
                TrialRecord.from_trial(t).teacher
            ) == ctx.pool.space.apply_move(parent_teacher, move)
        else:
            # The child's arch is exactly the parent's checkpoint evolved by the move.
            with ctx.store.open_reader(TrialRecord.from_trial(parent).checkpoint) as r:
                parent_det = checkpoint_from_bytes(r.read()).detector
            expected = evolve(
                parent_det, move, config=MorphConfig(channel_fraction=spec.search.channel_fraction)
            )
            assert TrialRecord.from_trial(t).student == expected.arch.encode()
            assert TrialRecord.from_trial(t).arch == expected.arch.to_dict()
            assert TrialRecord.from_trial(t).teacher == TrialRecord.from_trial(parent).teacher
        # the trial's checkpoint is in the study's database and is the student it describes
        with ctx.store.open_reader(TrialRecord.from_trial(t).checkpoint) as r:
            assert (
                checkpoint_from_bytes(r.read()).detector.arch.encode()
                == TrialRecord.from_trial(t).student
            )
        # H is recomputed from the recorded AP and FLOPs
        best = t.user_attrs["best_resolution"]
        from jdsearch.core.resolution import Resolution

        h = score_h(
            t.user_attrs["ap"][best],
            t.user_attrs["flops"],
            ctx.base_flops,
            Resolution.parse(best),
            ctx.base_resolution,
            spec.score.alpha,
            spec.score.beta,
        )
        assert h == pytest.approx(t.value)
    assert study.best_value >= root.value

    text = summary(study)
    assert "lineage" in text and "base (#0)" in text
    # The base as given against the winner on the held-out images, each AP measured here.
    handle = open_study(spec.storage_url, spec.name)
    heldout = heldout_split(spec)
    verdict = heldout_verdict(handle, heldout).splitlines()
    assert verdict[0].split()[:5] == ["held-out", "base", "(as", "given)", "best"]
    assert f"best (trial {study.best_trial.number})" in verdict[0]
    assert f"({len(heldout)} images the search never saw)" in verdict[0]
    best = handle.checkpoint(study.best_trial).detector
    size = study.best_trial.user_attrs["best_resolution"]
    ap = evaluate(best, heldout, [size])[size].AP
    assert verdict[1].endswith(f"{100 * ap:.1f} at {size}")
    base_size = study.user_attrs[BASE_RESOLUTION_ATTR]
    base = checkpoint_from_bytes(handle.study_artifact(BASE_ATTR)).detector  # as given
    base_ap = evaluate(base, heldout, [base_size])[base_size].AP
    assert verdict[1].split()[1:4] == [f"{100 * base_ap:.1f}", "at", base_size]
    cost = TrialRecord.from_trial(study.best_trial).cost[size]
    assert verdict[2].split() == ["cost", "1.00", f"{cost:.2f}"]
    kind = "an upgrade" if ap > base_ap and cost < 1 else "a trade" if cost < 1 else "no cheaper"
    assert verdict[3].startswith(f"verdict     {kind}: {100 * (ap - base_ap):+.1f} AP ")

    # Resume: the same command adds trials to the same study and lineage.
    study2 = run_search(spec, n_trials=2, progress=False)
    trials2 = study2.get_trials(deepcopy=False)
    assert len(trials2) == len(trials) + 2
    assert all(
        t.user_attrs.get(PARENT_ATTR) in {u.number for u in trials2} for t in trials2[len(trials) :]
    )

    # A copy of the SQLite file elsewhere, with no local caches, continues the same lineage:
    # the storage alone carries the base detector, the pool and every checkpoint.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(tmp_path / "study.db", elsewhere / "copy.db")
    monkeypatch.chdir(elsewhere)
    study3 = run_search(spec, f"sqlite:///{elsewhere / 'copy.db'}", n_trials=1, progress=False)
    trials3 = study3.get_trials(deepcopy=False)
    assert len(trials3) == len(trials2) + 1 and not (elsewhere / "runs").exists()
    assert trials3[-1].state == optuna.trial.TrialState.COMPLETE
    assert TrialRecord.from_trial(trials3[-1]).parent in {t.number for t in trials2}

    # The optuna CLI sees the study.
    out = optuna_cli(
        "trials", "--study-name", spec.name, "--storage", spec.storage_url, "-f", "json"
    )
    rows = json.loads(out)
    assert len(rows) == len(trials2)
    assert {r["params"]["move"] for r in rows} >= {BASE_MOVE}
    assert all("h" in r["user_attrs"] for r in rows if r["state"] == "COMPLETE")


def test_a_starting_worker_purges_day_old_incomplete_uploads(
    search_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed mid-upload leaves an unpublished artifact; the next worker start removes
    it once it is a day old (younger ones may still be in progress)."""
    import time

    import sqlalchemy as sa

    from jdsearch.storage.artifacts import SQLArtifactStore

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'purge.db'}"
    spec = study_from_dict(search_assets.study("purge", url), source="test")
    search_assets.install_pool(tmp_path, "purge")
    prepare(spec, progress=False)
    store = SQLArtifactStore(url)
    with store.engine.begin() as conn:
        for blob, age in (("deadbeef" * 4, 2 * 86400), ("cafebabe" * 4, 60)):
            conn.execute(
                sa.insert(store.headers).values(
                    blob_id=blob,
                    artifact_id=f"x{age}",
                    complete=False,
                    size=0,
                    sha256="0" * 64,
                    n_chunks=0,
                    chunk_size=store.chunk_size,
                    created_at=time.time() - age,
                )
            )
    prepare(spec, progress=False)
    with store.engine.connect() as conn:
        left = set(
            conn.scalars(
                sa.select(store.headers.c.artifact_id).where(store.headers.c.complete.is_(False))
            )
        )
    assert left == {"x60"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "kd_mode"),
    [("greedy", "dynamic"), ("random", "dynamic"), ("hill_climb", "fixed"), ("hill_climb", "off")],
)
def test_every_strategy_and_kd_mode_runs_a_real_search(
    search_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str, kd_mode: str
) -> None:
    name = f"{strategy}-{kd_mode}".replace("_", "-")
    url = f"sqlite:///{tmp_path / 's.db'}"
    data = search_assets.study(name, url, n_trials=4, strategy=strategy, freeze_student=1)
    data["kd"]["mode"] = kd_mode
    spec = study_from_dict(data, source="test")
    search_assets.install_pool(tmp_path, name)
    monkeypatch.chdir(tmp_path)
    study = run_search(spec, progress=False)
    records = [TrialRecord.from_trial(t) for t in study.get_trials()]
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.COMPLETE] * 4
    assert study.user_attrs["strategy"] == strategy and study.user_attrs["kd_mode"] == kd_mode
    assert f"search      {strategy}, KD {kd_mode}" in summary(study)
    numbers = {r.number for r in records}
    assert all(r.parent in numbers for r in records[1:])
    largest = str(SubnetConfig.parse(records[0].teacher)) if records[0].teacher else ""
    if kd_mode != "dynamic":  # no teacher move; the teacher is the super-net, or none
        assert all(not str(r.move).startswith("teacher.") for r in records)
        assert {r.teacher for r in records} == {largest}
    if kd_mode == "off":
        assert largest == "" and all(r.teacher_params == 0 for r in records)
        assert all(r.timings["teacher_s"] == 0.0 for r in records)
    if strategy == "greedy":  # every parent is the best completed pair when the trial started
        for r in records[1:]:
            earlier = [x for x in records if x.number < r.number]
            assert r.parent == max(earlier, key=lambda x: (x.value, -x.number)).number


@pytest.mark.slow
def test_pool_strategy_searches_students_cut_from_the_teacher_pool(
    search_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ETP search (paper appendix F): after the root, every student is a sub-network of the pool
    (``pool.start``, then the pool's own mutations), cut with the pool's weights."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    data = search_assets.study("pool-search", url, n_trials=5, strategy="pool", p_student=1.0)
    spec = study_from_dict(data, source="test")
    search_assets.install_pool(tmp_path, "pool-search")
    monkeypatch.chdir(tmp_path)
    study = run_search(spec, progress=False)
    _, ctx = prepare(spec, progress=False)
    records = [TrialRecord.from_trial(t) for t in study.get_trials()]
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.COMPLETE] * 5
    assert study.user_attrs["strategy"] == "pool" and "search      pool," in summary(study)
    students = [r for r in records if r.kind == "student"]
    assert students, "p_student 1 after the freeze: student moves were taken"
    assert all(str(r.move).startswith("pool.") for r in students)
    start = ctx.pool_start()
    for r in students:
        assert r.student_subnet, r
        cfg = SubnetConfig.parse(r.student_subnet)
        assert r.student == ctx.pool.arch_of(cfg).encode()  # the sub-network's own arch
        parent = records[r.parent]
        if r.move == "pool.start":
            assert cfg == start and not parent.student_subnet
        else:  # one of the pool's mutations of the parent's sub-network
            before = SubnetConfig.parse(parent.student_subnet)
            assert ctx.pool.space.neighbours(before)["teacher." + r.move[len("pool.") :]] == cfg
    # the start costs at most the base's multiply-adds, and it is the costliest such candidate
    assert records[[r.move for r in records].index("pool.start")].flops <= ctx.base_flops
    assert ctx.pool_start() == start  # cached, and the same draw on every worker
