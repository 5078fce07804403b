"""Bad values of the command line's flags (issue 28, item 2): each is refused in one line that
names the flag as the user typed it and the value, with exit status 2 and no traceback, before
anything is read, trained or written. Every command's flags are found by walking the parser, so
a new flag is covered the day it is added."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jdsearch.cli import build_parser, main


def cli_error(capsys: pytest.CaptureFixture[str], *argv: Any) -> str:
    """The one error line of ``jdsearch ARGV`` (argparse's or jdsearch's), exit 2."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse refused a value: usage, then its one error line
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert lines and "Traceback" not in err, err
    line = lines[-1]
    assert line.startswith("jdsearch") and ": error: " in line, err
    # argparse's usage lines come before it; nothing else does
    assert all(not ln.startswith("jdsearch") or ln == line for ln in lines), err
    return line


def _commands(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[Any]:
    """``(command path, parser)`` of every command that runs something."""
    for action in p._actions:  # argparse keeps them nowhere public
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))
    if p.get_default("func") is not None:
        yield path, p


def _string_arguments() -> list[tuple[tuple[str, ...], str]]:
    """``(argv up to and including the argument's position, its name)`` for every option and
    positional argument of every command that takes a string (no type of its own)."""
    found = []
    for path, p in _commands(build_parser()):
        positionals = 0
        for action in p._actions:
            if not isinstance(action, argparse._StoreAction):
                continue
            if action.option_strings:
                if action.type is None or action.type.__name__ == "nonempty":
                    found.append(((*path, action.option_strings[0]), action.option_strings[0]))
            else:
                if action.type is None or action.type.__name__ == "nonempty":
                    found.append(((*path, *["x"] * positionals), action.dest))
                positionals += 1
    return found


STRING_ARGUMENTS = _string_arguments()


def test_the_walk_finds_the_paths_of_every_command() -> None:
    names = {(argv[0], name) for argv, name in STRING_ARGUMENTS}
    assert {
        ("train", "--out"),
        ("train", "--data"),
        ("train", "--init"),
        ("eval", "checkpoint"),
        ("eval", "--json"),
        ("predict", "images"),
        ("predict", "--ann"),
        ("import", "src"),
        ("init", "--name"),
        ("data", "--out"),
        ("pool", "--out"),
        ("gc", "--storage"),
        ("status", "--study"),
    } <= names, names
    assert len(STRING_ARGUMENTS) > 60


@pytest.mark.parametrize(
    "argv, name", STRING_ARGUMENTS, ids=[" ".join(a) for a, _ in STRING_ARGUMENTS]
)
def test_an_empty_string_is_refused_naming_the_argument(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], name: str
) -> None:
    """``--out ''`` read as ``.`` (train trained, then failed to write the folder), ``--init ''``
    and ``--json ''`` were silently ignored, ``data synth --out ''`` wrote into ``.``."""
    line = cli_error(capsys, *argv, "")
    assert line.endswith(f": error: argument {name}: must not be empty, got ''"), line


def test_data_synth_writes_nothing_for_an_empty_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, "data", "synth", "--out", "", "--images", "2", "--size", "64")
    assert "argument --out" in line and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- a config field's flag
#: A value a config dataclass refuses, given through the flag that fills the field: the line
#: names the flag and the value, never the dataclass. Each is refused before a file is read
#: (``finetune`` before its study is opened, ``evolve`` before its checkpoint).
TRAIN = ("train", "--out", "m.safetensors", "--data", "none")
FIELD_CASES = [
    (TRAIN, "--epochs", "0", "must be a positive number, got 0.0"),
    (TRAIN, "--iters", "0", "must be ≥ 1, got 0"),
    (TRAIN, "--batch-size", "0", "must be ≥ 1, got 0"),
    (TRAIN, "--lr", "-1", "must be a positive number, got -1.0"),
    (TRAIN, "--lr", "1e9", "must be ≤ 10 (detectors train at ~0.02), got 1000000000.0"),
    (TRAIN, "--warmup", "-1", "must be ≥ 0, got -1"),
    (TRAIN, "--grad-clip", "-1", "must be positive or None, got -1.0"),
    (TRAIN, "--workers", "-1", "must be ≥ 0, got -1"),
    (TRAIN, "--seed", "-1", "must be ≥ 0, got -1"),
    (TRAIN, "--seed", str(10**20), f"must be at most {2**63 - 1} (64 bits), got {10**20}"),
    (("finetune", "--study", "none"), "--epochs", "0", "must be a positive number, got 0.0"),
    (
        ("finetune", "--study", "none", "--epochs", "1"),
        "--lr",
        "1e3",
        "must be ≤ 10 (detectors train at ~0.02), got 1000.0",
    ),
    (
        ("evolve", "none.safetensors", "channel_prune", "--out", "e.safetensors"),
        "--fraction",
        "1",
        "must lie in (0, 1), got 1.0",
    ),
    (("flops", "tiny-r18-fpn"), "--num-classes", "1", "must be ≥ 2, got 1"),
    (("flops", "tiny-r18-fpn"), "--num-classes", "-1", "must be ≥ 2, got -1"),
    (
        ("flops", "tiny-r18-fpn"),
        "--num-classes",
        "100001",
        "must be at most 100000 (the background too), got 100001",
    ),
    (("latency", "tiny-r18-fpn"), "--num-classes", "0", "must be ≥ 2, got 0"),
    (
        ("latency", "tiny-r18-fpn"),
        "--num-classes",
        str(10**12),
        f"must be at most 100000 (the background too), got {10**12}",
    ),
]


@pytest.mark.parametrize(
    "argv, flag, value, why", FIELD_CASES, ids=[f"{a[0]} {f} {v}" for a, f, v, _ in FIELD_CASES]
)
def test_a_config_field_is_refused_at_the_flag_typed(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: tuple[str, ...],
    flag: str,
    value: str,
    why: str,
) -> None:
    """``flops --num-classes -1`` and ``latency --num-classes -1`` were a torch traceback,
    ``latency --num-classes 0`` timed a detector of 81 classes, ``train --seed 10**20`` a
    traceback after loading the data, ``finetune --lr 1e3`` queued a trial that then failed;
    ``evolve --fraction 1`` named ``MorphConfig.channel_fraction``."""
    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, *argv, flag, value)
    assert line.startswith("jdsearch: error: ") and f"{flag}: " in line, line
    assert line.endswith(why) and "Config." not in line and "Spec." not in line, line
    assert list(tmp_path.iterdir()) == []  # nothing generated, trained or written


def test_every_field_flag_is_a_flag_of_a_command() -> None:
    from jdsearch.cli.common import FIELD_FLAGS

    flags = {
        action.option_strings[0]
        for _, p in _commands(build_parser())
        for action in p._actions
        if action.option_strings
    }
    assert set(FIELD_FLAGS.values()) <= flags, set(FIELD_FLAGS.values()) - flags


def test_a_field_error_keeps_its_field_where_the_command_has_no_such_flag() -> None:
    """The flag is named only where the command that ran has it: ``train`` has no
    ``--num-classes``, so a class count it refuses (its data's) stays the spec's field."""
    from jdsearch.cli.common import flag_message
    from jdsearch.core.config import FieldError

    e = FieldError("DetectorSpec", "num_classes", "counts the background too", 1)
    assert flag_message(e, argparse.Namespace(num_classes=1)) == (
        "--num-classes: counts the background too, got 1"
    )
    assert flag_message(e, argparse.Namespace(epochs=1.0)) == (
        "DetectorSpec.num_classes: counts the background too, got 1"
    )
    other = FieldError("TrainConfig", "momentum", "must lie in [0, 1)", 2.0)  # no flag fills it
    assert flag_message(other, argparse.Namespace(momentum=2.0)) == str(other)


# ---------------------------------------------------------------------- every numeric flag
STUDY = ("--storage", "sqlite:///none.db")
#: A bad value of each numeric flag of each command, and the end of its one line. Each is
#: refused before a file is read: the paths named (none.db, none.safetensors, exp) do not exist.
NUMERIC_CASES = [
    ((), "--threads", "0 flops tiny-r18-fpn", "--threads must be ≥ 1, got 0"),
    (("flops", "tiny-r18-fpn"), "--size", "0x0", "resolution '0x0' has a zero side"),
    (
        ("data", "synth", "--out", "d"),
        "--images",
        "1",
        "must be an integer from 2 to 1000000, got '1'",
    ),
    (
        ("data", "synth", "--out", "d"),
        "--images",
        str(10**12),
        "from 2 to 1000000, got '1000000000000'",
    ),
    (("data", "synth", "--out", "d"), "--seed", "-1", "must be an integer ≥ 0, got '-1'"),
    (("data", "synth", "--out", "d"), "--size", "0", "from 32 to 4096 px, got 0"),
    (("data", "synth", "--out", "d"), "--classes", "0", "got 0"),
    (("data", "synth", "--out", "d"), "--object-size", "0.5 0.1", "got 0.5 0.1"),
    (("data", "synth", "--out", "d"), "--workers", "0", "must be at least 1, got 0"),
    (TRAIN, "--bn-sparsity", "-1", "must be 0 (off) or more, got -1.0"),
    (TRAIN, "--resolutions", "64x0", "resolution '64x0' has a zero side"),
    (("import", "none.pt", "--out", "x.safetensors"), "--check-images", "0", "≥ 1, got '0'"),
    (("eval", "none.safetensors"), "--sizes", "0x64", "resolution '0x64' has a zero side"),
    (("eval", "none.safetensors"), "--batch-size", "0", "must be an integer ≥ 1, got '0'"),
    (("search", "none.yaml"), "--n-trials", "0", "--n-trials must be ≥ 1, got 0"),
    (("export", *STUDY, "--out", "o"), "--trial", "-1", "must be an integer ≥ 0, got '-1'"),
    (
        ("export", *STUDY, "--out", "o"),
        "--size",
        "64",
        "'64' is not of the form LONGxSHORT, e.g. '1333x800'",
    ),
    (("export", *STUDY, "--out", "o"), "--max-latency-ms", "0", "above 0, got '0'"),
    (("export", *STUDY, "--out", "o"), "--max-flops", "-1", "above 0, got '-1'"),
    (("export", *STUDY, "--out", "o"), "--repeats", "0", "must be an integer ≥ 1, got '0'"),
    (("predict", "exp", "img", "--out", "p.json"), "--score-thresh", "2", "0 to 1, got '2'"),
    (("predict", "exp", "img", "--out", "p.json"), "--score-thresh", "-0.5", "got '-0.5'"),
    (
        ("predict", "exp", "img", "--out", "p.json"),
        "--size",
        "9x",
        "'9x' is not of the form LONGxSHORT, e.g. '1333x800'",
    ),
    (("latency", "tiny-r18-fpn"), "--size", "0x80", "expected HEIGHTxWIDTH, e.g. 800x1333"),
    (("latency", "tiny-r18-fpn"), "--repeats", "0", "must be an integer ≥ 1, got '0'"),
    (("latency", "tiny-r18-fpn"), "--warmup", "-1", "must be an integer ≥ 0, got '-1'"),
    (("latency", "tiny-r18-fpn"), "--max-images", "0", "must be an integer ≥ 1, got '0'"),
    (("report", *STUDY, "--out", "r"), "--trial", "-2", "must be an integer ≥ 0, got '-2'"),
    (("report", *STUDY, "--out", "r"), "--repeats", "-1", "must be an integer ≥ 1, got '-1'"),
    (("noise", *STUDY), "--trial", "-1", "must be an integer ≥ 0, got '-1'"),
    (("noise", *STUDY), "--seeds", "1", "must be an integer ≥ 2, got '1'"),
    (("finetune", *STUDY, "--epochs", "1"), "--trial", "-1", "≥ 0, got '-1'"),
    (("gc", "--storage", "sqlite:///none.db"), "--older-than", "-1", "≥ 0, got -1.0"),
]
NUMERIC_CASES += [  # the flags whose field a config dataclass checks, above
    (argv, flag, value, why) for argv, flag, value, why in FIELD_CASES
]


def _numeric_options() -> set[tuple[str, str]]:
    """``(command, flag)`` of every option that takes a number or a size."""
    found = set()
    parser = build_parser()
    for path, p in [((), parser), *_commands(parser)]:
        for action in p._actions:
            if not isinstance(action, argparse._StoreAction) or not action.option_strings:
                continue
            if action.type is not None and action.type.__name__ != "nonempty":
                found.add((" ".join(path), action.option_strings[0]))
    return found


def test_every_numeric_flag_has_a_bad_value_case() -> None:
    cases = {
        (" ".join(a for a in argv[:2] if not a.startswith("-") and "." not in a)[:20], flag)
        for argv, flag, _, _ in NUMERIC_CASES
    }
    commands = {(c, f) for c, f in cases}
    missing = [
        (command, flag)
        for command, flag in sorted(_numeric_options())
        if not any(c.startswith(command) and f == flag for c, f in commands)
    ]
    assert not missing, missing


@pytest.mark.parametrize(
    "argv, flag, value, why",
    NUMERIC_CASES,
    ids=[f"{' '.join(a[:2])} {f} {v[:12]}" for a, f, v, _ in NUMERIC_CASES],
)
def test_a_bad_number_is_refused_naming_the_flag_and_the_value(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: tuple[str, ...],
    flag: str,
    value: str,
    why: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, *argv, flag, *value.split())
    assert flag in line and line.endswith(why), line
    assert list(tmp_path.iterdir()) == []  # nothing generated, trained or written


def _float_options() -> list[tuple[tuple[str, ...], str, int]]:
    """``(command path, flag, nargs)`` of every option whose values are floats."""
    from jdsearch.cli.common import finite_float, positive_float, probability

    floats = (float, finite_float, positive_float, probability)
    return [
        (path, action.option_strings[0], action.nargs if isinstance(action.nargs, int) else 1)
        for path, p in _commands(build_parser())
        for action in p._actions
        if isinstance(action, argparse._StoreAction) and action.type in floats
    ]


FLOAT_OPTIONS = _float_options()


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_every_float_flag_refuses_a_non_finite_value_in_one_line(
    capsys: pytest.CaptureFixture[str], text: str
) -> None:
    assert len(FLOAT_OPTIONS) >= 12, FLOAT_OPTIONS
    for path, flag, nargs in FLOAT_OPTIONS:
        # FLAG=VALUE: argparse reads a separate '-inf' as an option, not as the flag's value
        given = [f"{flag}={text}"] if nargs == 1 else [flag, *[text] * nargs]
        line = cli_error(capsys, *path, *given)
        if nargs > 1 and text.startswith("-"):  # an option to argparse: the flag lacks values
            assert line.endswith(f"error: argument {flag}: expected {nargs} arguments"), line
        else:
            assert line.endswith(f"error: argument {flag}: must be a finite number, got {text!r}")


# ---------------------------------------------------------------------- output files
@pytest.mark.parametrize(
    "argv, flag",
    [
        (("predict", "none", "img", "--out"), "--out"),
        (("eval", "none.safetensors", "--json"), "--json"),
    ],
)
def test_an_output_file_that_is_a_folder_is_refused_before_any_work(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: tuple[str, ...],
    flag: str,
) -> None:
    """It was an IsADirectoryError traceback once every image had been run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    line = cli_error(capsys, *argv, "out")
    assert line == f"jdsearch: error: {flag} out: is a folder, expected a file to write"


# ---------------------------------------------------------------------- a device, a study name
@pytest.mark.parametrize(
    "argv, line",
    [
        (("train", "--out", "m.safetensors", "--device", "tpu"), "--device 'tpu': expected cpu"),
        (("search", "none.yaml", "--device", "gpu"), "--device 'gpu': expected cpu, cuda"),
        (("latency", "tiny-r18-fpn", "--device", "cuda:x"), "--device 'cuda:x': expected cpu"),
        (
            ("init", "--data", "d", "--out", "s.yaml", "--device", "tpu"),
            "--device 'tpu': expected a device such as cpu or cuda:0",
        ),
        (
            ("init", "--data", "d", "--out", "s.yaml", "--name", "a b/c"),
            "--name 'a b/c': a study name must use letters, digits, '-', '_' or '.'",
        ),
        (
            ("init", "--data", "d", "--out", "my study.yaml"),
            "--out my study.yaml: its stem 'my study': a study name must use letters, digits, "
            "'-', '_' or '.'; or give --name",
        ),
    ],
    ids=["train", "search", "latency", "init-device", "init-name", "init-out"],
)
def test_a_device_or_a_study_name_is_refused_at_its_flag(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: tuple[str, ...],
    line: str,
) -> None:
    """``--device`` was "device 'tpu': ..."; init's ``--device`` and ``--name`` were refused as
    fields of the spec it had not written yet (``s.yaml: device: ...``)."""
    monkeypatch.chdir(tmp_path)
    assert cli_error(capsys, *argv).startswith(f"jdsearch: error: {line}")
    assert list(tmp_path.iterdir()) == []
