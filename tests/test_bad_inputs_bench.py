"""``bench/bad_inputs.py``'s fast cases, run by the test suite: each needs nothing of the bench's
setup and ends in about a second, so every one runs here, in process, and must end as expected
(a bad input refused in one line that passes its case's check, a valid one exit 0). The slow
cases (a trained checkpoint, an export, real searches) run with the bench itself:
``python bench/bad_inputs.py``; ``--fast`` runs these alone, as subprocesses."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import bad_inputs as bench

FAST = [case for case in bench.all_cases() if case.fast]


def test_the_fast_cases_hold_every_class_the_issue_lists() -> None:
    """Unbounded sizes, unbounded reads, a bad URL, non-finite numbers, misleading messages, and
    the new classes of bad input; each name once."""
    names = [case.name for case in FAST]
    assert len(names) == len(set(names)), names
    classes = {case.cls for case in FAST}
    assert {"files", "spec", "reads", "flags"} <= classes, classes
    for needle in (
        "--size 100000x100000",  # an unbounded size
        "/dev/zero",  # an unbounded read
        "a FIFO",
        "16 MiB + 1",
        "_BASE_: /dev/zero",
        "gc --storage 'not a url'",
        "nan",  # a non-finite flag
        "random bytes: import",  # misleading: weights_only=False
        "1x1 images: init",  # misleading: names the data set
        "--fraction",  # misleading: a field, not the flag
        "''",  # an empty path
    ):
        assert any(needle in name for name in names), needle
    assert any(case.valid for case in FAST) and len(FAST) >= 50
    # the slow ones are held by the bench too: a failed trial, an empty study left behind
    slow = [case.name for case in bench.all_cases() if not case.fast]
    assert any("every trial fails" in name for name in slow)
    assert any(name.endswith(": search") for name in slow)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> bench.Setup:
    """What a fast case may use of the bench's setup: the repository and the tiny study's spec
    (its folder stays empty)."""
    return bench.Setup(tmp_path_factory.mktemp("setup"), bench.REPO, bench.tiny_study(bench.REPO))


@pytest.mark.parametrize("case", FAST, ids=[f"{c.cls}: {c.name}" for c in FAST])
def test_a_fast_case_ends_as_expected(case: bench.Case, setup: bench.Setup, tmp_path: Path) -> None:
    case.prepare(tmp_path, setup)
    res = bench.run_in_process(case.argv, tmp_path)
    outcome, why = bench.classify(case, res, 0, tmp_path)
    assert outcome == case.expected, f"{case.command}: {outcome}: {why}\n{res.out}{res.err}"


def test_the_classifier_tells_a_wrong_refusal_and_a_silent_exit(tmp_path: Path) -> None:
    """The checks can fail: a refusal whose line lacks what the case asks for is ``unclean``, a
    traceback is ``traceback``, an exit 0 of a bad input is ``silent``."""
    case = bench.Case("flags", "x", ("x",), bench.nothing, refusal=bench.says("--lr"))
    line = "jdsearch: error: TrainConfig.lr: must be a positive number, got 0.0\n"
    assert bench.classify(case, bench.Result(2, "", line, 0.1), 1, tmp_path)[0] == "unclean"
    assert (
        bench.classify(case, bench.Result(2, "", "jdsearch: error: --lr: 0\n", 0.1), 1, tmp_path)[0]
        == "clean"
    )
    traceback = "Traceback (most recent call last):\nValueError: x\n"
    assert bench.classify(case, bench.Result(1, "", traceback, 0.1), 1, tmp_path)[0] == "traceback"
    assert bench.classify(case, bench.Result(0, "done", "", 0.1), 1, tmp_path)[0] == "silent"
    valid = bench.Case("flags", "v", ("x",), bench.nothing, valid=True)
    assert bench.classify(valid, bench.Result(2, "", line, 0.1), 1, tmp_path)[0] == "broken"
    assert bench.classify(valid, bench.Result(0, "", "", 0.1), 1, tmp_path)[0] == "ok"
