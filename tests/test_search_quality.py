"""bench/search_quality.py: equal budgets across strategies and controls, and a real run of every
row on the tiny assets (the figures themselves are the bench's to print, not a test's)."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from jdsearch.search.queries import lineage, open_study
from jdsearch.search.record import TrialRecord

from .conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location(
        "search_quality", REPO / "bench/search_quality.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("search_quality", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_row_gets_the_same_budget_but_the_lineage_controls() -> None:
    """Searches: the search budget; finetuned (search, then fine-tune) and every control but the
    lineage ones: the search budget plus the fine-tune's."""
    sq = _bench()
    budgets = {row: sq.budget_epochs(row, 8, 0.5, lineage=3, finetune=2.0) for row in sq.ROWS}
    assert set(sq.ROWS) == set(sq.SEARCH_ROWS) | set(sq.CONTROL_ROWS)
    lineage_rows = set(sq.LINEAGE_ROWS)
    assert lineage_rows == {"longer", "longer_kd"} and {"finetuned", "longer_all"} <= set(sq.ROWS)
    assert {budgets[r] for r in sq.SEARCH_ROWS} == {4.0}
    assert {budgets[r] for r in sq.CONTROL_ROWS if r not in lineage_rows} == {6.0}
    assert {budgets[r] for r in lineage_rows} == {1.5}
    assert sq.default_finetune_epochs(8, 0.5) == 2.0  # half the search budget
    assert sum(sq.pipeline_split(6.0)) == 6.0
    with pytest.raises(ValueError, match="unknown row"):
        sq.budget_epochs("annealing", 8, 0.5, 3)
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit, match=f"^--finetune-epochs {bad}: must be a positive"):
            sq.main(["--study", str(REPO / "studies/quickstart.yaml"), "--finetune-epochs", bad])


@pytest.mark.slow
def test_a_real_run_spends_equal_training_images_on_every_row(
    search_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    sq = _bench()
    data = search_assets.study("sq", f"sqlite:///{tmp_path / 'sq.db'}", n_trials=3)
    data["data"]["max_val_images"] = 4  # the other val images are the held-out split
    spec_file = tmp_path / "sq.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    search_assets.install_pool(tmp_path, "sq")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert sq.main(["--study", str(spec_file), "--seeds", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*-s0.json")}
    assert set(results) == {f"{row}-s0" for row in sq.ROWS}
    # every search ran its 3 trials; what each trained is what its trial records say
    per_search = set()
    for row in sq.SEARCH_ROWS:
        r = results[f"{row}-s0"]
        study = open_study(r["study"]).study
        records = [TrialRecord.from_trial(t) for t in study.get_trials()]
        assert len(records) == 3  # the finetuned row fine-tunes in a copy of hill_climb's study
        assert r["completed"] == 3 and r["train_images"] == sum(x.train_images for x in records)
        assert r["lineage"] == [t.number for t in lineage(study, r["trial"])]
        per_search.add(r["train_images"])
    assert len(per_search) == 1  # equal budgets, measured
    search_images = per_search.pop()
    # finetuned: the search's images, then its fine-tune's (0.375 epochs: half of 3 × 0.25)
    tuned = results["finetuned-s0"]
    child = next(
        t for t in open_study(tuned["study"]).study.get_trials() if t.number == tuned["trial"]
    )
    record = TrialRecord.from_trial(child)
    assert record.is_finetune and record.parent == results["hill_climb-s0"]["trial"]
    assert tuned["finetune_epochs"] == 0.375 and tuned["finetune_images"] == record.train_images
    assert tuned["train_images"] == search_images + record.train_images
    # every other control trains as much in all; iterations round up once per training
    batch, trainings = 4, {"pipelining": 2, "longer_all": 1, "longer_all_kd": 1}
    for row, n in trainings.items():
        assert abs(results[f"{row}-s0"]["train_images"] - tuned["train_images"]) < batch * (4 + n)
    hc_lineage = len(results["hill_climb-s0"]["lineage"])
    for row in ("longer", "longer_kd"):
        expected = search_images * hc_lineage / 3
        assert abs(results[f"{row}-s0"]["train_images"] - expected) <= 3 * batch
    # the pipelining student was pruned to the hill-climbing winner's cost at most, when it could
    hc_flops = results["hill_climb-s0"]["flops"]
    pruned = results["pipelining-s0"]
    assert pruned["flops"] <= hc_flops or not pruned["pruning"]
    for r in results.values():
        assert 0 <= r["heldout_ap"] <= 1 and math.isfinite(r["h"]) and r["fps_ratio"] > 0
    for row in sq.ROWS:
        assert re.search(rf"\n{row} +1  ", printed), row
    assert "noise floor: trial" in printed and (out / "search_quality.html").is_file()
    # a second run finds every result and only prints the table
    assert sq.main(["--study", str(spec_file), "--seeds", "1", "--out", str(out)]) == 0
    assert "seed 0 ..." not in capsys.readouterr().out
    # ... but not with another budget than its results' (nothing loaded before it says so)
    with pytest.raises(SystemExit, match=r"^--finetune-epochs 1: .* finetune_epochs 0\.375;"):
        sq.main(["--study", str(spec_file), "--out", str(out), "--finetune-epochs", "1"])


def test_hypervolume_of_a_held_out_front_against_the_base_point() -> None:
    sq = _bench()
    base = (0.20, 1.0)  # held-out AP 20 %, cost 1
    front = [{"heldout_ap": 0.25, "cost": 0.5}, {"heldout_ap": 0.30, "cost": 0.8}]
    # AP 20→25 over cost 0.5→1 (5 · 0.5), then AP 25→30 over cost 0.8→1 (5 · 0.2)
    assert sq.hypervolume({"front": front}, base) == pytest.approx(5 * 0.5 + 5 * 0.2)
    worse = [{"heldout_ap": 0.15, "cost": 0.5}, {"heldout_ap": 0.35, "cost": 1.2}]
    assert sq.hypervolume({"front": worse}, base) == 0.0  # never better in both
    assert sq.hypervolume({"heldout_ap": 0.3, "cost": 0.5}, base) == pytest.approx(10 * 0.5)
    assert sq.hypervolume({"heldout_ap": 0.3}, base) == 0.0  # a control without its cost
    # H on the held-out split: held-out AP at the winner's cost, to -α
    assert sq.heldout_h({"heldout_ap": 0.3, "cost": 0.5}, 0.4) == pytest.approx(0.3 * 2**0.4)
    assert sq.row_order({"hill_climb_a1", "pareto", "hill_climb_a0.1", "hill_climb"}) == [
        "hill_climb",
        "pareto",
        "hill_climb_a0.1",
        "hill_climb_a1",
    ]
    assert sq.alpha_row(0.1) == "hill_climb_a0.1" and sq.is_search_row("hill_climb_a0.1")
    assert sq.budget_epochs("hill_climb_a0.1", 8, 0.5, 3) == sq.budget_epochs("pareto", 8, 0.5, 3)


def _imports_of(folder: Path, package: str) -> list[str]:
    """The files under ``folder`` that import ``package`` anywhere (inside functions too)."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(n.split(".")[0] == package for n in names):
                found.append(str(path.relative_to(folder)))
                break
    return found


def test_the_package_never_imports_the_bench_extra(tmp_path: Path) -> None:
    """Torch-Pruning is the ``bench`` extra, which ``dev`` (CI's) pulls in, never a dependency:
    no module of jdsearch imports it, not even inside a function, and importing jdsearch, its CLI
    and every search module leaves it unloaded."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if "pruning" in d]
    extras = project["optional-dependencies"]
    assert extras["bench"] == ["torch-pruning==1.6.1"] and "jdsearch[bench]" in extras["dev"]
    assert _imports_of(REPO / "jdsearch", "torch_pruning") == []
    (tmp_path / "lazy.py").write_text("def f():\n    from torch_pruning import pruner\n")
    assert _imports_of(tmp_path, "torch_pruning") == ["lazy.py"]  # the check finds one
    search = sorted(p.stem for p in (REPO / "jdsearch/search").glob("*.py") if p.stem != "__init__")
    modules = ", ".join(["jdsearch", "jdsearch.cli", *(f"jdsearch.search.{m}" for m in search)])
    code = f"import sys, {modules}; print(sorted({{'torch', 'torch_pruning'}} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.strip() == "['torch']"
    )  # torch loaded (the probe sees imports), not the extra
