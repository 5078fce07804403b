"""The README's "From Python" blocks run as written, and give the same trials for one seed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import jdsearch
from jdsearch.search.record import TrialRecord
from jdsearch.spec.study import study_from_dict

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    section = README.read_text().split("## From Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _run(block: str, spec: Any, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run a README block in ``workdir``, ``load_study("quickstart")`` giving ``spec``."""
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(jdsearch, "load_study", lambda name: spec if name == "quickstart" else 0)
    scope: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), scope)
    return scope["study"]


def _trials(study: Any) -> list[tuple[Any, ...]]:
    out = []
    for t in study.get_trials():
        r = TrialRecord.from_trial(t)
        out.append((t.number, t.state.name, r.parent, r.move, r.teacher, r.value))
    return out


@pytest.mark.slow
def test_both_readme_blocks_run_and_give_the_same_trials(
    search_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_call, own_optuna = _blocks()
    assert "jdsearch.run_search(" in one_call and "study.optimize(run.objective()" in own_optuna
    studies = []
    for name, block in (("a", one_call), ("b", own_optuna)):
        workdir = tmp_path / name
        workdir.mkdir()
        data = search_assets.study("quickstart", f"sqlite:///{workdir / 's.db'}", n_trials=8)
        search_assets.install_pool(workdir, "quickstart")
        spec = study_from_dict(data, source=f"{name}.yaml")
        studies.append(_run(block, spec, workdir, monkeypatch))
    first, second = (_trials(s) for s in studies)
    assert len(first) == 4 and all(state == "COMPLETE" for _, state, *_ in first)
    assert first == second
