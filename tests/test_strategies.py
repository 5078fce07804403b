"""Strategies, KD modes and score modes as objects: one registry each, matching the names a spec
accepts; no module compares those names but the spec reader and the registry; the example
strategy of ``docs/search.md`` runs in a real Optuna study."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import optuna
import pytest

from jdsearch.search.record import BASE_MOVE, MOVE_PARAM, PARENT_ATTR
from jdsearch.search.sampler import HillClimbingSampler
from jdsearch.search.strategies import (
    KDMode,
    ScoreMode,
    Strategy,
    kd_mode_named,
    score_mode_named,
    strategy_named,
)
from jdsearch.spec.settings import KD_MODES
from jdsearch.spec.study import SCORE_MODES, STRATEGIES

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "jdsearch"
NAMES = {*STRATEGIES, *KD_MODES, *SCORE_MODES}
# The spec layer reads and validates these names; the registry turns them into objects.
ALLOWED = {"study.py", "settings.py", "strategies.py"}


def test_every_name_a_spec_accepts_has_exactly_one_class() -> None:
    assert set(Strategy.registry) == set(STRATEGIES)
    assert set(KDMode.registry) == set(KD_MODES)
    assert set(ScoreMode.registry) == set(SCORE_MODES)
    for name in STRATEGIES:
        assert strategy_named(name).name == name
    assert [kd_mode_named(m).distils for m in KD_MODES] == [True, True, False]
    assert [kd_mode_named(m).moves_teacher for m in KD_MODES] == [True, False, False]
    assert score_mode_named("pareto").directions == ("maximize", "minimize")


def _string_comparisons(tree: ast.AST) -> list[tuple[int, str]]:
    """Comparisons of a strategy or mode name with something named ``*mode*``/``*strategy*``."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        names = [s.value for s in sides if isinstance(s, ast.Constant) and s.value in NAMES]
        other = " ".join(ast.unparse(s) for s in sides if not isinstance(s, ast.Constant))
        if names and re.search(r"mode|strategy", other):
            out.append((node.lineno, ast.unparse(node)))
    return out


def test_no_module_compares_strategy_or_mode_names() -> None:
    problems = [
        f"{path.relative_to(REPO)}:{line}: {code}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name not in ALLOWED
        for line, code in _string_comparisons(ast.parse(path.read_text()))
    ]
    assert not problems, "\n".join(problems)
    # the check itself finds what it looks for
    found = _string_comparisons(ast.parse('if spec.search.strategy == "pool": pass'))
    assert found == [(1, "spec.search.strategy == 'pool'")]


def test_the_documented_example_strategy_runs_in_an_optuna_study() -> None:
    text = (REPO / "docs" / "search.md").read_text()
    block = text.split("## Strategies, KD modes and score modes are objects", 1)[1]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 20
    scope: dict[str, object] = {}
    exec(compile(code, "docs/search.md", "exec"), scope)
    try:
        moves = [BASE_MOVE, "channel_prune", "layer_prune", "teacher.fpn-"]
        sampler = HillClimbingSampler(
            moves,
            lambda parent: (["channel_prune", "layer_prune"], ["teacher.fpn-"]),
            strategy=scope["Chain"](),  # type: ignore[operator]
            seed=0,
        )
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.optimize(lambda t: float(len(t.suggest_categorical(MOVE_PARAM, moves))), 6)
        parents = [t.user_attrs[PARENT_ATTR] for t in study.trials]
        assert parents == [None, 0, 1, 2, 3, 4]  # one lineage: each trial extends the last
        assert strategy_named("chain").name == "chain"  # the class registered itself
    finally:
        Strategy.registry.pop("chain", None)


def test_an_unknown_name_is_refused_in_one_line() -> None:
    from jdsearch.core.errors import JDSearchError

    with pytest.raises(JDSearchError, match=r"search\.strategy must be one of hill_climb"):
        strategy_named("annealing")
    with pytest.raises(ValueError, match="strategy must be one of"):
        HillClimbingSampler([BASE_MOVE], lambda p: ([], []), strategy="annealing")
