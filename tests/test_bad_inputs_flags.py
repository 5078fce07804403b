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
