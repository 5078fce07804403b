"""bench/search_quality.py: equal budgets across strategies and controls, and a real run of every
row on the tiny assets (the figures themselves are the bench's to print, not a test's)."""

from __future__ import annotations

import ast
import copy
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

from jdsearch.data.coco import CocoDataset
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


def test_every_row_gets_the_same_budget_but_the_lineage_controls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
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
    quickstart = str(REPO / "studies/quickstart.yaml")
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit, match=f"^--finetune-epochs {bad}: must be a positive"):
            sq.main(["--study", quickstart, "--finetune-epochs", bad])
    # without the bench extra, a Torch-Pruning row says what to install, before anything runs
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name: None if name == "torch_pruning" else find_spec(name),
    )
    with pytest.raises(SystemExit, match=r"^--rows torch_pruning_kd: needs .*\[bench\]"):
        sq.main(["--study", quickstart, "--rows", "longer_all", "torch_pruning_kd"])


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
    tp_flags = ["--tp-lr", "0.004", "--tp-warmup", "0"]  # the Torch-Pruning rows' own schedule
    assert sq.main(["--study", str(spec_file), "--seeds", "1", "--out", str(out), *tp_flags]) == 0
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
    # Torch-Pruning: pruned to its target (the first step at or below it), then trained as much
    _check_torch_pruning(sq, results, tuned["train_images"], batch)
    for row in (*sq.TP_ROWS, sq.TP_FRONT_ROW):
        assert (results[f"{row}-s0"]["lr"], results[f"{row}-s0"]["warmup_iters"]) == (0.004, 0)
    assert results["torch_pruning_taylor-s0"]["pruning"]["importance"] == "taylor"
    assert "Torch-Pruning rows trained at lr 0.004, warm-up 0" in printed
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
    assert sq.main(["--study", str(spec_file), "--seeds", "1", "--out", str(out), *tp_flags]) == 0
    assert "seed 0 ..." not in capsys.readouterr().out
    # ... but not with the Torch-Pruning rows at another schedule than their results'
    with pytest.raises(SystemExit, match=r"^--tp-lr/--tp-warmup .*: .* holds Torch-Pruning rows"):
        sq.main(["--study", str(spec_file), "--out", str(out)])
    # ... but not with another budget than its results' (nothing loaded before it says so)
    with pytest.raises(SystemExit, match=r"^--finetune-epochs 1: .* finetune_epochs 0\.375;"):
        sq.main(["--study", str(spec_file), "--out", str(out), "--finetune-epochs", "1"])


def _check_pruned(sq, pruning: dict, target: float, base_flops: int) -> None:
    """At or under its target, less than one step under it, unless even the last step is above."""
    steps = pruning["flops_steps"]
    assert pruning["target_flops"] == int(target) and steps[0] == base_flops
    if not pruning["target_met"]:
        assert pruning["steps"] == sq.TP_STEPS and steps[-1] > target
        return
    assert steps[-1] <= target and (len(steps) == 1 or steps[-2] > target)
    assert target - steps[-1] <= sq.TP_STEP_TOLERANCE * base_flops


def _check_torch_pruning(sq, results: dict, total_images: int, batch: int) -> None:
    from jdsearch.store.checkpoint import load_checkpoint

    hc = results["hill_climb-s0"]
    base_flops = results["longer_all-s0"]["flops"]  # the base, trained on
    for row in sq.TP_ROWS:
        r = results[f"{row}-s0"]
        _check_pruned(sq, r["pruning"], hc["flops"], base_flops)
        assert r["flops"] == r["pruning"]["flops_steps"][-1]  # the rebuilt detector, counted
        assert load_checkpoint(r["detector"]).detector.arch.encode() == r["pruning"]["arch"]
        assert abs(r["train_images"] - total_images) < batch * 5  # the whole budget
    # the same pruning for the same importance, whatever the training after it
    assert (
        results["torch_pruning_kd-s0"]["pruning"]["arch"]
        == results["torch_pruning-s0"]["pruning"]["arch"]
    )
    assert (
        results["torch_pruning_kd-s0"]["distilled"] and not results["torch_pruning-s0"]["distilled"]
    )
    front = results["torch_pruning_front-s0"]
    assert [m["fraction"] for m in front["members"]] == list(sq.TP_FRONT) == [0.5, 0.7, 0.85]
    for m in front["members"]:
        _check_pruned(sq, m["pruning"], m["fraction"] * base_flops, base_flops)
        assert m["flops"] == m["pruning"]["flops_steps"][-1]
        assert abs(m["train_images"] - total_images) < batch * 5  # each: the whole budget
    assert all(m["pruning"]["target_met"] for m in front["members"][1:])  # 0.7× and 0.85× reached
    assert front["train_images"] == sum(m["train_images"] for m in front["members"])
    assert len(front["front"]) == 3 and math.isfinite(front["hypervolume"])


def _tiny_detector(name: str, classes: int = 4):
    """A tiny detector in eval mode whose BN scales differ, as a trained one's do (a fresh one's
    are all 1: tied, so Torch-Pruning's global threshold takes every channel of a group or none)."""
    import torch

    from jdsearch.models.detector import build_detector
    from jdsearch.spec.detector import load_spec

    detector = build_detector(load_spec(name), num_classes=classes, seed=0)
    gen = torch.Generator().manual_seed(0)
    for m in detector.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
    return detector.eval()


def test_torch_pruning_lands_on_its_flops_target_as_a_jdsearch_detector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from jdsearch.models.flops import count_flops
    from jdsearch.store.checkpoint import load_checkpoint, save_checkpoint

    sq = _bench()
    size = (128, 208)  # the tiny R18-FPN's input size
    base = _tiny_detector("tiny-r18-fpn")
    base_flops = count_flops(base, size=size).total
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    for fraction, importance in ((0.85, "bn_scale"), (0.7, "l1"), (0.3, "bn_scale")):
        if fraction == 0.3:  # out of reach: the FPN and heads cost more; the schedule ends
            monkeypatch.setattr(sq, "TP_STEPS", 10)  # (in 10 steps here, not 90: seconds)
        detector = copy.deepcopy(base)
        pruning = sq.tp_prune_in_place(detector, fraction * base_flops, size, importance)
        _check_pruned(sq, pruning, fraction * base_flops, base_flops)
        assert pruning["target_met"] == (fraction > 0.5)
        pruned = sq.described(detector).eval()
        assert count_flops(pruned, size=size).total == pruning["flops_steps"][-1]
        assert pruned.arch.fpn == base.arch.fpn and pruned.arch.stem < base.arch.stem
        with torch.no_grad():  # the rebuilt detector computes what the pruned modules did
            for a, b in zip(
                detector.backbone(image).values(), pruned.backbone(image).values(), strict=True
            ):
                assert a.shape[1] == base.arch.fpn and torch.equal(a, b)
        path = save_checkpoint(tmp_path / f"{fraction}.safetensors", pruned, class_names="abc")
        assert load_checkpoint(path).detector.arch == pruned.arch


def test_torch_pruning_taylor_ranks_by_gradients_and_leaves_the_statistics(
    shapes: CocoDataset,
) -> None:
    """Taylor importance needs data; it steps to its target like the others, from the gradients
    of training batches, and the BN statistics those batches saw do not stay behind."""
    import torch

    from jdsearch.models.flops import count_flops

    sq = _bench()
    data = shapes
    size = (64, 64)
    base = _tiny_detector("tiny-r18-fpn", data.num_classes)
    base_flops = count_flops(base, size=size).total
    with pytest.raises(ValueError, match="Taylor importance needs training data"):
        sq.tp_prune_in_place(copy.deepcopy(base), 0.9 * base_flops, size, "taylor")
    stats = copy.deepcopy(base)
    sq.tp_gradients(stats, data, size, seed=0)
    assert all(p.grad is not None for p in stats.backbone.body.parameters())
    assert not stats.training and all(  # BN statistics and mode as they were
        torch.equal(a, b) for a, b in zip(stats.buffers(), base.buffers(), strict=True)
    )
    pruned = {}
    for importance in ("taylor", "bn_scale"):
        detector = copy.deepcopy(base)
        pruning = sq.tp_prune_in_place(detector, 0.9 * base_flops, size, importance, data, seed=0)
        _check_pruned(sq, pruning, 0.9 * base_flops, base_flops)
        pruned[importance] = sq.described(detector).arch
    assert pruned["taylor"] != pruned["bn_scale"]  # another ranking, another architecture
    again = copy.deepcopy(base)
    sq.tp_prune_in_place(again, 0.9 * base_flops, size, "taylor", data, seed=0)
    assert sq.described(again).arch == pruned["taylor"]  # the same seed, the same pruning


def test_torch_pruning_leaves_what_no_architecture_could_describe() -> None:
    """A stride-1 projection keeps its stream's width (ResNet-50's first block); the rebuild
    refuses modules that its architecture would not build."""
    from jdsearch.core.errors import CheckpointError
    from jdsearch.models.flops import count_flops
    from jdsearch.models.resnet import Shortcut

    sq = _bench()
    size = (96, 96)
    base = _tiny_detector("tiny-r50-fpn")
    target = 0.95 * count_flops(base, size=size).total
    detector = copy.deepcopy(base)
    assert sq.tp_prune_in_place(detector, target, size)["target_met"]
    pruned = sq.described(detector)
    first = pruned.arch.slot(0, 0)
    assert first.has_projection and first.stride == 1
    assert pruned.arch.stage_out_channels[0] == base.arch.stage_out_channels[0]  # kept
    assert pruned.arch.stage_out_channels[1:] != base.arch.stage_out_channels[1:]  # pruned
    r18 = _tiny_detector("tiny-r18-fpn")
    r18.backbone.body.stages[0][1].shortcut = Shortcut(16, 16, 1)  # no arch has it
    with pytest.raises(CheckpointError, match=r"unexpected backbone\.body\.stages\.0\.1\.shortcut"):
        sq.described(r18)


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
