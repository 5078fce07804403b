"""A small real Pareto search (``score.mode: pareto``, ``score.cost: latency``) on the tiny
assets: its values and records, the latency cache, its front exported and loaded, a budgeted
export, the report's front, and optuna-dashboard's view of a study of each mode."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.study import StudyDirection
from optuna.trial import TrialState

from jdsearch.cli import main
from jdsearch.core.errors import JDSearchError
from jdsearch.core.resolution import Resolution
from jdsearch.engine.latency import device_name
from jdsearch.report.figures import build_figures
from jdsearch.search import cost as cost_module
from jdsearch.search.cost import weighted_cost
from jdsearch.search.front import FRONT_FILE, choose_trial
from jdsearch.search.objective import score_h
from jdsearch.search.pareto import dominates
from jdsearch.search.queries import create_or_load, front_of, open_study
from jdsearch.search.record import KIND_ATTR, MOVE_PARAM, PARENT_ATTR, TrialRecord
from jdsearch.search.run import run_search
from jdsearch.search.session import prepare
from jdsearch.search.summary import summary
from jdsearch.spec.study import study_from_dict
from jdsearch.store.export import INFO_FILE, load_detector

from .conftest import SearchAssets
from .test_dashboard import dashboard_command, free_port, get, server

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.slow  # real (tiny) searches


@dataclass
class Searched:
    url: str
    spec: object
    study: optuna.Study
    timed: list[tuple[str, ...]]  # every latency measurement: the sizes timed
    workdir: Path


@pytest.fixture(scope="module")
def searched(search_assets: SearchAssets, tmp_path_factory: pytest.TempPathFactory) -> Searched:
    tmp = tmp_path_factory.mktemp("pareto")
    url = f"sqlite:///{tmp / 'p.db'}"
    data = search_assets.study("pareto", url, n_trials=5, p_student=1.0)
    data["score"] = {"mode": "pareto", "cost": "latency", "latency_repeats": 3}
    data["data"]["max_val_images"] = 4  # the other val images: a held-out split for export
    spec = study_from_dict(data, source="test_pareto_search")
    timed: list[tuple[str, ...]] = []
    real = cost_module.measure_latencies

    def counting(pairs, **kw):
        timed.append(tuple(str(r) for _, r in pairs))
        return real(pairs, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setattr(cost_module, "measure_latencies", counting)
        search_assets.install_pool(tmp, "pareto")
        study = run_search(spec, progress=False)
    return Searched(url, spec, study, timed, tmp)


def test_a_pareto_study_maximises_ap_and_minimises_the_measured_cost(searched: Searched) -> None:
    study, spec = searched.study, searched.spec
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    assert study.directions == [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]
    assert study.metric_names == ["AP", "latency ratio"]
    base_res, here = Resolution.parse(study.user_attrs["base_resolution"]), device_name("cpu")
    for t in trials:
        r = TrialRecord.from_trial(t)
        res = r.best_resolution
        assert t.values == [r.ap[res], r.cost[res]]  # AP and cost where H is best
        for key in spec.resolutions:  # H uses the measured latency ratio as C/C_base
            key = str(key)
            ratio = r.latency[key]["ratio"]
            assert r.latency[key]["device"] == here
            res_k = Resolution.parse(key)
            assert r.cost[key] == pytest.approx(weighted_cost(ratio, res_k, base_res, 0.8))
            h = score_h(r.ap[key], ratio, 1.0, res_k, base_res, 0.4, 0.8)
            assert r.h[key] == pytest.approx(h)
        assert r.value == r.h_value == max(r.h.values())  # H recorded in a Pareto study too
        if r.move == "base":  # the base's own architecture: 1, never timed
            assert {v["ratio"] for v in r.latency.values()} == {1.0}
    students = [TrialRecord.from_trial(t) for t in trials if t.user_attrs[KIND_ATTR] == "student"]
    assert students, "p_student 1 after the freeze: student moves were taken"
    # each (architecture, resolution) other than the base's was timed once, against the base
    first = str(spec.resolutions[0])
    archs = {r.arch_key for r in students if r.latency[first]["ms"] is not None}
    assert len(searched.timed) == len(archs) * len(spec.resolutions)
    assert all(len(set(sizes)) == 1 for sizes in searched.timed)
    assert "front       " in summary(study) and "non-dominated" in summary(study)


def test_a_trial_with_an_architecture_timed_before_is_not_timed_again(
    searched: Searched, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A teacher move keeps the student: its latency comes from the study's records, even on a
    fresh worker (a new process has an empty cache)."""
    monkeypatch.chdir(searched.workdir)
    study, ctx = prepare(searched.spec, searched.url, progress=False)
    parent = next(
        t
        for t in study.get_trials()
        if t.user_attrs[KIND_ATTR] == "student"
        and TrialRecord.from_trial(t).latency[str(ctx.spec.resolutions[0])]["ms"] is not None
    )
    move = ctx.feasible(parent)[1][0]
    study.enqueue_trial(
        {MOVE_PARAM: move}, user_attrs={PARENT_ATTR: parent.number, KIND_ATTR: "teacher"}
    )
    calls: list[object] = []
    monkeypatch.setattr(cost_module, "measure_latencies", lambda *a, **k: calls.append(a))
    run_search(searched.spec, searched.url, n_trials=1, progress=False)
    child = max(optuna.load_study(study_name="pareto", storage=searched.url).get_trials(), key=lambda t: t.number)  # fmt: skip
    assert child.state == TrialState.COMPLETE and child.params[MOVE_PARAM] == move
    a, b = TrialRecord.from_trial(child), TrialRecord.from_trial(parent)
    assert a.arch_key == b.arch_key and a.latency == b.latency and calls == []


def test_the_front_exports_to_folders_that_load_and_a_front_json(
    searched: Searched, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(searched.workdir)
    out = tmp_path / "front"
    argv = [
        "export",
        "--storage",
        searched.url,
        "--study",
        "pareto",
        "--front",
        "--out",
        str(out),
        "--no-onnx",
    ]
    assert main([*argv, "--repeats", "2"]) == 0
    doc = json.loads((out / FRONT_FILE).read_text())
    trials = [t for t in optuna.load_study(study_name="pareto", storage=searched.url).get_trials()]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    points = {t.number: (-t.values[0], t.values[1]) for t in done}
    brute = {n for n, p in points.items() if not any(dominates(q, p) for q in points.values())}
    assert {e["trial"] for e in doc["front"]} == brute == {t.number for t in front_of(trials)}
    assert [e["cost"] for e in doc["front"]] == sorted(e["cost"] for e in doc["front"])
    for e in [*doc["front"], doc["base"]]:
        assert e["FPS"] > 0 and e["GFLOPs"] > 0 and 0 <= e["AP"] <= 1 and e["cost"] > 0
    assert doc["base"]["trial"] == 0 and doc["score"]["cost"] == "latency"
    for e in doc["front"]:
        t = next(t for t in done if t.number == e["trial"])
        assert (e["AP"], e["cost"]) == (t.values[0], t.values[1])
        detector = load_detector(out / e["folder"])
        info = json.loads((out / e["folder"] / INFO_FILE).read_text())
        assert info["source"]["trial"] == e["trial"]
        assert info["source"]["cost"] == {"kind": "latency", "value": e["cost"]}
        assert detector.arch.encode() == TrialRecord.from_trial(t).student


def test_a_budget_picks_the_most_accurate_student_that_fits(
    searched: Searched, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(searched.workdir)
    handle = open_study(searched.url, "pareto")
    done = [t for t in handle.study.get_trials() if t.state == TrialState.COMPLETE]

    def gflops(t):
        flops, _ = TrialRecord.from_trial(t).flops_where_scored()
        return flops / 1e9

    def ap(t):
        r = TrialRecord.from_trial(t)
        return r.ap[r.best_resolution]

    bound = sorted(gflops(t) for t in done)[len(done) // 2]
    fits = [t for t in done if gflops(t) <= bound]
    best = max(fits, key=lambda t: (ap(t), -gflops(t), -t.number))
    out = tmp_path / "fits"
    argv = ["export", "--storage", searched.url, "--study", "pareto", "--out", str(out)]
    argv.append("--no-onnx")
    assert main([*argv, "--max-flops", str(bound)]) == 0
    assert json.loads((out / INFO_FILE).read_text())["source"]["trial"] == best.number
    most = max(done, key=lambda t: (ap(t), -gflops(t), -t.number))
    roomy = choose_trial(handle, max_latency_ms=1e6, repeats=2)
    assert roomy.trial == most.number and list(roomy.measured) == [most.number]
    with pytest.raises(JDSearchError, match="no trial of study 'pareto' runs within 1e-06 ms"):
        choose_trial(handle, max_latency_ms=1e-6, repeats=2)
    assert main([*argv, "--max-flops", "1e-9"]) == 2  # nothing fits: one line, exit 2


def test_the_report_draws_the_study_s_own_front(searched: Searched) -> None:
    handle = open_study(searched.url, "pareto")
    trials = handle.study.get_trials()
    fig = build_figures(handle)["pareto"]
    traces = {t.name: t for t in fig.data}
    front = [t.number for t in front_of(trials)]
    assert list(traces["Pareto front"].customdata) == front
    assert list(traces["Pareto front"].x) == [TrialRecord.from_trial(t).point()[1] for t in front_of(trials)]  # fmt: skip
    assert list(traces["base (trial 0)"].customdata) == [0]
    best = max(trials, key=lambda t: (TrialRecord.from_trial(t).value, -t.number))
    assert list(traces[f"upgraded (trial {best.number}, best H)"].customdata) == [best.number]
    assert "latency ratio" in fig.layout.xaxis.title.text


def test_a_study_keeps_its_score_mode(searched: Searched) -> None:
    h_spec = study_from_dict(
        {**searched.spec.to_dict(), "score": {"mode": "h"}}, source="h.yaml"
    )  # same name, same storage
    with pytest.raises(JDSearchError, match=r"score\.mode is h, but study 'pareto' was created"):
        create_or_load(h_spec, searched.url, None)


def test_a_study_of_each_mode_opens_in_optuna_dashboard(
    searched: Searched, search_assets: SearchAssets, tmp_path: Path
) -> None:
    data = search_assets.study("hmode", searched.url, n_trials=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(searched.workdir)
        search_assets.install_pool(searched.workdir, "hmode")
        run_search(study_from_dict(data, source="test"), progress=False)
    port = free_port()
    with server(dashboard_command(searched.url, port), port, tmp_path / "dash.log") as base:
        summaries = json.loads(get(base, "/api/studies"))["study_summaries"]
        ids = {s["study_name"]: s["study_id"] for s in summaries}
        details = {n: json.loads(get(base, f"/api/studies/{i}")) for n, i in ids.items()}
    assert set(details) == {"pareto", "hmode"}
    assert details["pareto"]["directions"] == ["maximize", "minimize"]
    assert details["pareto"]["objective_names"] == ["AP", "latency ratio"]
    assert details["hmode"]["directions"] == ["maximize"]
    assert details["hmode"]["objective_names"] == ["H"]
    study = optuna.load_study(study_name="pareto", storage=searched.url)
    front = {t.number for t in front_of(study.get_trials())}
    assert {b["number"] for b in details["pareto"]["best_trials"]} == front
    assert {t.number for t in study.best_trials} == front  # Optuna's own front agrees
    keys = {a["key"] for a in details["pareto"]["union_user_attrs"]}
    assert {"h_value", "cost", "latency"} <= keys
