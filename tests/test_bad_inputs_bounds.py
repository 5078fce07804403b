"""Bad inputs of issue 28: unbounded sizes, unbounded reads, non-finite flags, refusals that left
an empty study or a misleading message. Each is one line naming the input and a non-zero exit,
checked before anything is allocated or trained (bench: ``python bench/bad_inputs.py``)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from jdsearch.cli import main
from jdsearch.core.errors import DataError, ExportError, SpecError
from jdsearch.core.limits import MAX_IMAGE_SIDE, MAX_INPUT_SIDE
from jdsearch.core.resolution import Resolution
from jdsearch.spec.study import study_from_dict

from .conftest import tiny_study_dict

# ---------------------------------------------------------------------- sizes


def one_line(exc: pytest.ExceptionInfo[Exception], *needles: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one error line of ``jdsearch ARGV`` (argparse's or jdsearch's), exit 2."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse refused a value: usage, then its one error line
        code = int(e.code or 0)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and "Traceback" not in "\n".join(err)
    line = err[-1]
    assert line.startswith("jdsearch"), err
    assert ": error: " in line, err
    return line


def test_an_input_side_beyond_the_limit_is_refused_before_anything_is_allocated() -> None:
    assert Resolution.parse(f"{MAX_INPUT_SIDE}x{MAX_INPUT_SIDE}").long == MAX_INPUT_SIDE
    for text in (f"{MAX_INPUT_SIDE + 1}x800", "100000x100000", "9" * 5000 + "x3"):
        with pytest.raises(SpecError) as e:
            Resolution.parse(text)
        one_line(e, f"more than the {MAX_INPUT_SIDE} pixels")
    with pytest.raises(SpecError) as e:
        Resolution(10**5000, 3)  # a huge int is not printed (Python refuses its str())
    one_line(e, "long side over 10^12")


def test_an_export_of_a_huge_input_size_is_refused_before_its_weights(tmp_path: Path) -> None:
    from jdsearch.store.export import FORMAT_NAME, FORMAT_VERSION, INFO_FILE, load_exported

    info = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "input_size": "60000x40000",
        "files": {"weights": {"path": "model.safetensors", "sha256": "0" * 64}},
    }
    (tmp_path / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(ExportError) as e:
        load_exported(tmp_path)
    one_line(e, f"{tmp_path / INFO_FILE}: input_size: resolution '60000x40000'", "8192 pixels")


@pytest.mark.parametrize(
    "argv, flag",
    [
        (("eval", "ck.safetensors", "--sizes", "64x64", "100000x100000"), "--sizes"),
        (("train", "--out", "m.safetensors", "--resolutions", "9000x80"), "--resolutions"),
        (("flops", "tiny-r18-fpn", "--size", "100000x100000"), "--size"),
        (("latency", "tiny-r18-fpn", "--size", "80x100000"), "--size"),
        (("predict", "exp", "img", "--out", "p.json", "--size", "9999x99"), "--size"),
        (("export", "--storage", "sqlite:///s.db", "--out", "o", "--size", "9999x9"), "--size"),
    ],
)
def test_a_size_flag_beyond_the_limit_is_refused_naming_the_flag(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], flag: str
) -> None:
    line = cli_error(capsys, *argv)
    assert f"error: argument {flag}: " in line and f"{MAX_INPUT_SIDE} pixels" in line, line


def test_a_study_of_a_huge_resolution_is_refused_at_load(tmp_path: Path) -> None:
    raw = tiny_study_dict(tmp_path / "data", "huge")
    raw["resolutions"] = ["64x64", "100000x100000"]
    with pytest.raises(SpecError) as e:
        study_from_dict(raw, source="huge.yaml")
    one_line(e, "huge.yaml: resolutions: resolution '100000x100000'", "8192 pixels")


@pytest.mark.parametrize(
    "section, key, value, needle",
    [
        ("roi_heads", "representation_size", 10**6, "1000000 is larger than 16384 channels"),
        ("roi_heads", "pool_size", 1000, "1000 is larger than 64 cells a side"),
        ("input", "size_divisible", 10**5, "100000 is larger than 512 pixels"),
    ],
)
def test_head_and_padding_sizes_are_bounded(
    section: str, key: str, value: int, needle: str
) -> None:
    from jdsearch.core.config import preset_dir, read_yaml
    from jdsearch.spec.detector import spec_from_dict

    raw = read_yaml(preset_dir("detectors") / "tiny-r18-fpn.yaml")
    raw.setdefault(section, {})[key] = value
    with pytest.raises(SpecError) as e:
        spec_from_dict(raw, source="big.yaml")
    one_line(e, f"big.yaml: {section}.{key}: {needle}")


def _png_header(side: tuple[int, int]) -> bytes:
    """A small PNG whose IHDR declares ``side`` = (width, height), CRC recomputed."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = struct.pack(">II", *side)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])) & 0xFFFFFFFF)
    return bytes(png)


def _coco(root: Path, records: list[dict[str, Any]], anns: list[dict[str, Any]]) -> Path:
    doc = {"images": records, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}
    (root / "train.json").write_text(json.dumps(doc))
    return root / "train.json"


def test_image_sides_beyond_the_limit_are_refused(tmp_path: Path) -> None:
    from jdsearch.data.coco import CocoDataset, load_image

    (tmp_path / "images").mkdir()
    wide = tmp_path / "images" / "wide.png"
    wide.write_bytes(_png_header((MAX_IMAGE_SIDE + 1, 10)))  # 170 k pixels: PIL's limit passes
    with pytest.raises(DataError) as e:
        load_image(wide)
    one_line(e, f"{wide}: {MAX_IMAGE_SIDE + 1}x10: a side is more than {MAX_IMAGE_SIDE} pixels")
    record = {"id": 1, "file_name": "wide.png", "width": 10, "height": 10**9}
    ann = _coco(tmp_path, [record], [])
    with pytest.raises(DataError) as e:
        CocoDataset(ann, tmp_path / "images")
    one_line(e, f"{ann}: image id 1: size 10x1000000000: a side is more than {MAX_IMAGE_SIDE}")


# ---------------------------------------------------------------------- whole files read


def test_the_reader_takes_regular_files_within_the_limit_only(tmp_path: Path) -> None:
    import os

    from jdsearch.core.files import RefusedFile, read_bytes, read_text

    ok = tmp_path / "ok.yaml"
    ok.write_text("a: 1\n")
    assert read_text(ok) == "a: 1\n" and read_bytes(ok, limit=5) == b"a: 1\n"
    with pytest.raises(RefusedFile, match="larger than 4 bytes"):
        read_bytes(ok, limit=4)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opened for reading it would block: refused before it is opened
    for path in ("/dev/zero", "/dev/stdin", fifo):
        with pytest.raises(RefusedFile) as e:
            read_text(path)
        assert e.value.strerror == "not a regular file", e.value
    with pytest.raises(IsADirectoryError):
        read_text(tmp_path)


def test_the_reader_allocates_what_the_file_holds_not_the_limit(tmp_path: Path) -> None:
    """A small file read under a 4 GiB limit in a process of 1 GiB address space: reading
    ``limit + 1`` bytes at once allocated the whole limit (a MemoryError here)."""
    import subprocess
    import sys

    small = tmp_path / "small.json"
    small.write_text("{}")
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from jdsearch.core.files import read_bytes\n"
        "sys.stdout.write(read_bytes(sys.argv[1], limit=4 << 30).decode())\n"
    )
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", code, str(small)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        timeout=60,
        check=False,
    )
    assert (run.returncode, run.stdout) == (0, "{}"), run.stderr


def test_the_reader_reads_past_the_size_stat_gave_up_to_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that grew between stat and read is read whole, and refused beyond the limit."""
    import os

    from jdsearch.core import files
    from jdsearch.core.files import RefusedFile, read_bytes

    grown, before = tmp_path / "grown.json", tmp_path / "before.json"
    grown.write_bytes(b"x" * 10)
    before.write_bytes(b"x" * 4)
    monkeypatch.setattr(files.os, "fstat", lambda fd: os.stat(before))  # stat saw 4 bytes
    assert read_bytes(grown, limit=20) == b"x" * 10
    with pytest.raises(RefusedFile, match="larger than 8 bytes"):
        read_bytes(grown, limit=8)


def test_no_module_reads_a_whole_file_but_through_the_reader() -> None:
    """grep: ``read_text``, ``read_bytes`` and ``json.load`` of a path appear in core/files only."""
    package = Path(__file__).resolve().parents[1] / "jdsearch"
    found = [
        f"{p.relative_to(package)}:{i}"
        for p in sorted(package.rglob("*.py"))
        if p.name != "files.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if any(call in line for call in (".read_text(", ".read_bytes(", "json.load("))
    ]
    assert not found, found


def test_a_detectron2_base_of_dev_zero_is_refused_naming_the_config(tmp_path: Path) -> None:
    import yaml

    from jdsearch.models.detectron2_files import read_config_dict

    cfg = tmp_path / "mine.yaml"
    cfg.write_text(yaml.safe_dump({"_BASE_": "/dev/zero", "MODEL": {}}))
    with pytest.raises(SpecError) as e:
        read_config_dict(cfg)
    one_line(e, f"{cfg}: _BASE_ chain: /dev/zero: ", "not a regular file")


def test_import_names_a_bad_detectron2_file_whether_or_not_detectron2_is_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The files are read before detectron2 is asked for: without it, the line said only that
    detectron2 is missing, and the bad file was found once it was installed."""
    import yaml

    cfg = tmp_path / "mine.yaml"
    cfg.write_text(yaml.safe_dump({"_BASE_": "/dev/zero", "MODEL": {}}))
    weights = tmp_path / "w.pkl"
    weights.write_bytes(b"")
    out = tmp_path / "x.safetensors"
    line = cli_error(capsys, "import", "--from", "detectron2", cfg, weights, "--out", out)
    assert line == (
        f"jdsearch: error: {cfg}: _BASE_ chain: /dev/zero: not a readable YAML config "
        "(not a regular file)"
    )
    cfg.write_text(yaml.safe_dump({"MODEL": {}}))
    line = cli_error(capsys, "import", "--from", "detectron2", cfg, "/dev/zero", "--out", out)
    assert line == "jdsearch: error: /dev/zero: cannot read weights file (not a regular file)"
    assert not out.exists()


def test_an_image_path_that_is_not_a_regular_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``latency --images /dev/zero`` said "no such image file"; a FIFO named .png in a folder
    of images would have blocked its reader."""
    import os

    line = cli_error(capsys, "latency", "tiny-r18-fpn", "--images", "/dev/zero")
    assert line == "jdsearch: error: /dev/zero: not a regular file, expected an image file"
    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    os.mkfifo(folder / "b.png")
    line = cli_error(capsys, "latency", "tiny-r18-fpn", "--images", folder, "--repeats", "1")
    assert (
        line == f"jdsearch: error: {folder / 'b.png'}: not a regular file, expected an image file"
    )


def test_a_spec_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    from jdsearch.core.config import read_yaml

    link = tmp_path / "s.yaml"
    link.symlink_to("/dev/zero")
    with pytest.raises(SpecError) as e:
        read_yaml(link)
    one_line(e, f"{link}: cannot read (not a regular file)")


@pytest.mark.parametrize("what", ["/dev/zero", "fifo", "folder"])
def test_a_spec_path_that_exists_but_is_no_file_is_not_called_missing(
    tmp_path: Path, what: str
) -> None:
    """A study or detector spec linked to /dev/zero, a FIFO or a folder was "no such ... spec
    file (presets: ...)" of a path that exists."""
    import os

    from jdsearch.spec.detector import load_spec
    from jdsearch.spec.study import load_study

    path = tmp_path / "s.yaml"
    if what == "fifo":
        os.mkfifo(path)
    elif what == "folder":
        path.mkdir()
    else:
        path.symlink_to(what)
    why = "is a directory" if what == "folder" else "not a regular file"
    for load in (load_spec, load_study):
        with pytest.raises(SpecError) as e:
            load(path)
        one_line(e, f"{path}: cannot read ({why})")
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "none.yaml")
    one_line(e, "none.yaml: no such detector spec file (presets: ")


# ---------------------------------------------------------------------- float flags, train's flags


def _float_options() -> list[tuple[tuple[str, ...], Any]]:
    """Every option of every (sub-)command whose values are floats: ``(command path, action)``."""
    import argparse

    from jdsearch.cli import build_parser
    from jdsearch.cli.common import finite_float, positive_float, probability

    def walk(p: Any, path: tuple[str, ...]) -> Any:
        for action in p._actions:  # argparse keeps them nowhere public
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, (*path, name))
            elif action.type in (float, finite_float, positive_float, probability):
                yield path, action

    return list(walk(build_parser(), ()))


def test_every_float_flag_refuses_nan_and_inf() -> None:
    import argparse

    from jdsearch.cli.common import finite_float

    options = _float_options()
    flags = {a.option_strings[0] for _, a in options}
    assert {"--score-thresh", "--epochs", "--lr", "--older-than", "--fraction"} <= flags
    bare = [f"{' '.join(path)} {a.option_strings[0]}" for path, a in options if a.type is float]
    assert not bare, f"float options without the finite check: {bare}"
    for text in ("nan", "inf", "-inf", "NaN"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number"):
            finite_float(text)
    assert finite_float("1e-5") == 1e-5


def test_predict_score_thresh_nan_is_refused_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = cli_error(capsys, "predict", "exp", "img", "--out", "p.json", "--score-thresh", "nan")
    assert line == (
        "jdsearch predict: error: argument --score-thresh: must be a finite number, got 'nan'"
    )


@pytest.mark.parametrize(
    "flags, line",
    [
        (("--epochs", "0"), "--epochs: must be a positive number, got 0.0"),
        (("--batch-size", "0"), "--batch-size: must be ≥ 1, got 0"),
        (("--bn-sparsity", "-1"), "--bn-sparsity: must be 0 (off) or more, got -1.0"),
    ],
)
def test_train_names_the_flag_not_the_field(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: tuple[str, ...], line: str
) -> None:
    out = tmp_path / "m.safetensors"
    assert cli_error(capsys, "train", "--out", out, "--data", tmp_path / "none", *flags) == (
        f"jdsearch: error: {line}"
    )


def _image_cache_mb() -> float:
    from jdsearch.data.coco import image_cache_bytes

    return image_cache_bytes() / 2**20


def _db_retry_s() -> float:
    from jdsearch.storage.reconnect import retry_window_s

    return retry_window_s()


def _dist_timeout_s() -> float:
    """Reads ``JDSEARCH_DIST_TIMEOUT_S`` as ``torchrun`` would have it (a second rank), up to
    the point where the process group would be joined."""
    from jdsearch.engine import distributed

    def join(**kw: Any) -> None:
        raise _Joined(kw["timeout"])

    with pytest.MonkeyPatch.context() as m:
        m.setenv("WORLD_SIZE", "2")
        m.setattr(distributed.dist, "init_process_group", join)
        distributed.init_from_env("cpu")
    raise AssertionError("unreachable")


class _Joined(Exception):
    """Stands for joining the process group, with the timeout it was given."""

    def __init__(self, timeout: Any) -> None:
        super().__init__()
        self.seconds = timeout.total_seconds()


def _world_size() -> float:
    from jdsearch.engine import distributed

    return float(distributed.init_from_env("cpu"))


ENV_NUMBERS = {
    "JDSEARCH_IMAGE_CACHE_MB": (_image_cache_mb, "≥ 0", "0", 0.0),
    "JDSEARCH_DB_RETRY_S": (_db_retry_s, "≥ 0", "12.5", 12.5),
    "JDSEARCH_DIST_TIMEOUT_S": (_dist_timeout_s, "> 0 and ≤ 2592000", "60", 60.0),
    "WORLD_SIZE": (_world_size, "≥ 1", "1", 0.0),  # an integer; 1: not distributed
}


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "-1", "ten", ""])
@pytest.mark.parametrize("name", sorted(ENV_NUMBERS))
def test_a_bad_number_in_the_environment_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str
) -> None:
    """Every environment variable jdsearch reads as a number refuses nan, inf, a negative number
    and a word in one line naming the variable and the value; a good value is taken."""
    from jdsearch.core.errors import JDSearchError

    read, bounds, good, value = ENV_NUMBERS[name]
    kind = "an integer" if name == "WORLD_SIZE" else "a finite number"
    monkeypatch.setenv(name, raw)
    with pytest.raises(JDSearchError) as e:
        read()
    assert str(e.value) == f"{name}: must be {kind} {bounds}, got {raw!r}"
    monkeypatch.setenv(name, good)
    try:
        assert read() == value
    except _Joined as joined:
        assert joined.seconds == value


def test_env_numbers_hold_their_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bounds of :func:`env_number`: ``above`` excludes the low bound, ``high`` caps, an
    integer refuses a fraction, and an unset variable gives the default."""
    from jdsearch.core.config import env_number
    from jdsearch.core.errors import JDSearchError

    monkeypatch.delenv("JDSEARCH_TEST_N", raising=False)
    assert env_number("JDSEARCH_TEST_N", 7.5) == 7.5
    for raw, kw in [("0", {"above": True}), ("11", {"high": 10}), ("1.5", {"integer": True})]:
        monkeypatch.setenv("JDSEARCH_TEST_N", raw)
        with pytest.raises(JDSearchError, match=f"^JDSEARCH_TEST_N: .*, got '{raw}'$"):
            env_number("JDSEARCH_TEST_N", 1, **kw)  # type: ignore[arg-type]
    monkeypatch.setenv("JDSEARCH_TEST_N", "10")
    assert env_number("JDSEARCH_TEST_N", 1, above=True, high=10, integer=True) == 10


# ---------------------------------------------------------------------- gc --storage


def test_gc_with_a_bad_url_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    line = cli_error(capsys, "gc", "--storage", "not a url")
    assert line == (
        "jdsearch: error: --storage 'not a url': expected a database URL such as "
        "sqlite:///runs/NAME.db"
    )


# ---------------------------------------------------------------------- torch's advice


def test_no_message_about_an_unreadable_weights_file_suggests_running_its_pickle(
    tmp_path: Path,
) -> None:
    """torch's own message advises ``weights_only=False``: it would run the pickle."""
    import os
    import pickle

    from jdsearch.core.errors import CheckpointError
    from jdsearch.models.torchvision_body import read_weights_file

    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(256)) * 16)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(os.system, protocol=2))  # names os.system
    for path in (noise, evil):
        with pytest.raises(CheckpointError) as e:
            read_weights_file(path)
        msg = one_line(e, f"{path}: ")
        assert "False" not in msg and "trusted source" not in msg, msg


@pytest.mark.parametrize("what", ["/dev/zero", "fifo", "folder"])
def test_a_weights_path_that_is_no_regular_file_is_named_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str
) -> None:
    """``import /dev/zero`` said "no such weights file" of a path that exists."""
    import os

    from jdsearch.core.errors import CheckpointError
    from jdsearch.data import synth
    from jdsearch.models.detectron2_files import read_detectron2_weights
    from jdsearch.models.torchvision_body import read_weights_file

    path = Path(what) if what.startswith("/") else tmp_path / what
    if what == "fifo":
        os.mkfifo(path)  # opened for reading it would block: refused before it is opened
    elif what == "folder":
        path.mkdir()
    why = "is a directory" if what == "folder" else "not a regular file"
    for read in (read_weights_file, read_detectron2_weights):
        with pytest.raises(CheckpointError) as e:
            read(path)
        one_line(e, f"{path}: cannot read weights file ({why})")
    out = tmp_path / "x.safetensors"
    line = cli_error(capsys, "import", path, "--out", out)
    assert line == f"jdsearch: error: {path}: cannot read weights file ({why})"
    data = tmp_path / "data"
    synth.generate(data, images=2, seed=0, size=64, workers=1)
    line = cli_error(capsys, "train", "--backbone-weights", path, "--out", out, "--data", data)
    assert line == f"jdsearch: error: {path}: cannot read weights file ({why})"
    assert not out.exists()


def test_a_weights_file_over_the_limit_is_not_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jdsearch.core.errors import CheckpointError
    from jdsearch.models import torchvision_body

    big = tmp_path / "big.pt"
    big.write_bytes(b"\0" * 2000)
    monkeypatch.setattr(torchvision_body, "MAX_CHECKPOINT_BYTES", 1000)
    monkeypatch.setattr(torchvision_body, "_load", lambda *a: pytest.fail("opened"))
    with pytest.raises(CheckpointError) as e:
        torchvision_body.read_weights_file(big)
    one_line(e, f"{big}: cannot read weights file (larger than 1000 bytes)")
    with pytest.raises(CheckpointError) as e:
        torchvision_body.read_weights_file(tmp_path / "none.pt")
    one_line(e, f"{tmp_path / 'none.pt'}: no such weights file")


# ---------------------------------------------------------------------- init's too-small images


def test_init_on_images_too_small_names_the_data_set(tmp_path: Path) -> None:
    from jdsearch.init.init_study import init_study

    data = tmp_path / "tiny set"
    (data / "images").mkdir(parents=True)
    for split, iid in (("train", 1), ("val", 2)):
        Image.new("RGB", (1, 1)).save(data / "images" / f"{iid}.png")
        record = {"id": iid, "file_name": f"{iid}.png", "width": 1, "height": 1}
        doc = {"images": [record], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
        (data / f"{split}.json").write_text(json.dumps(doc))
    with pytest.raises(SpecError) as e:
        init_study(tmp_path / "s.yaml", data, base="tiny-r18-fpn")
    one_line(e, f"{data} (train.json, val.json): native image size 1x1")


# ---------------------------------------------------------------------- a record of the wrong size


def test_a_record_whose_size_disagrees_with_its_file_is_reported_as_such(tmp_path: Path) -> None:
    """Not as a box outside the (wrongly recorded) image."""
    from jdsearch.data.coco import CocoDataset

    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "a.png")
    record = {"id": 1, "file_name": "a.png", "width": 32, "height": 32}
    box = {"id": 9, "image_id": 1, "category_id": 1, "bbox": [40, 30, 10, 10]}
    ann = _coco(tmp_path, [record], [box])
    with pytest.raises(DataError) as e:
        CocoDataset(ann, tmp_path / "images")
    one_line(e, f"{ann}: image id 1: ", "a.png is 64x48 but the record says 32x32")
    record.update(width=64, height=48)  # the checker failing: a box outside a right record
    box["bbox"] = [60, 30, 10, 10]
    ann = _coco(tmp_path, [record], [box])
    with pytest.raises(DataError) as e:
        CocoDataset(ann, tmp_path / "images")
    one_line(e, "lies outside the 64x48 image")
