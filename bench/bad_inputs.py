"""Bad inputs, fed to the command line as a new user would: how each one ends.

Usage::

    python bench/bad_inputs.py [--repo DIR] [--timeout 60] [--only CLASS] [--match TEXT] [--fast]
        [--list] [--keep]

Each case runs one ``python -m jdsearch ...`` command in a fresh temporary folder (a subprocess
with ``OMP_NUM_THREADS=1``, ``CUDA_VISIBLE_DEVICES=`` so that "no GPU" holds everywhere, stdin
from ``/dev/null``, a timeout, and a 6 GiB address-space limit so that a ``/dev/zero``-style input
cannot exhaust the machine) and is classified as:

* ``clean``: a bad input refused with a non-zero exit whose last stderr line is one
  ``jdsearch: error: ...`` line (or argparse's ``jdsearch CMD: error: ...``), and no traceback;
* ``ok``: a valid input (marked expected-valid) that exits 0 (and passes its output check);
* ``traceback``: a ``Traceback`` in stderr, or a non-zero exit without that one error line
  (a signal, a MemoryError, a multi-line message);
* ``unclean``: refused in one line, but the refusal is wrong: its line misleads (names a field,
  not the flag typed; suggests ``weights_only=False``; blames a box for a wrong image record) or
  it left something behind (an empty study in the storage);
* ``hang``: timed out;
* ``silent``: a bad input that exits 0 (a silent wrong result, or a failure left for later),
  or an exit 0 whose output fails the case's check (e.g. crowd boxes not reported);
* ``broken``: a valid input that does not exit 0 cleanly.

The cases come in seven classes: ``export`` (crafted export folders), ``files`` (crafted
checkpoints, COCO files, images, pickles and detector YAML), ``spec`` (bad study specs and search
arguments, mostly with ``search --check``, a few as real searches), ``classes`` (datasets whose
categories differ from the checkpoint's), ``reads`` (``/dev/zero``, a FIFO or a file over its
size limit given to every reader of a whole YAML or JSON file, a checkpoint, weights or an
image), ``flags`` (a bad value of a flag: a config dataclass's field, a count, a non-finite
number, an empty string, an output that is a folder, ``--data`` that is a file) and ``trials``
(a search whose trials fail). Together they hold every class of bad input of issue 28: unbounded
sizes, unbounded reads, bad URLs, non-finite numbers, a failed trial's traceback, refusals that
leave an empty study, and misleading messages. The inputs are built here from a tiny setup made
once with the probed CLI itself: an 8-image synthetic dataset, a checkpoint trained for one
iteration, and a one-trial study search on 16 synthetic images with its export.

A case may check its refusal (its line names the flag, the file and the value; no study is left)
or its output; the summary counts, per class, each outcome and the cases that ended as expected
(a bad input ``clean``, a valid one ``ok``). A ``fast`` case needs nothing of the setup and ends
in about a second: ``--fast`` runs those alone (no setup), and ``tests/test_bad_inputs_bench.py``
runs every one of them in the test suite, in process (:func:`run_in_process`), and asserts its
expected outcome.

``--repo DIR`` probes another checkout (e.g. ``git worktree add /tmp/old COMMIT``): the CLI runs
with ``PYTHONPATH=DIR`` from a temporary folder, and a first probe checks that ``jdsearch`` is
imported from DIR (the bench itself shrinks DIR's ``studies/quickstart.yaml`` with the installed
``jdsearch.testing``). The output is one table (a row per case) and a summary per class; the exit
status is 0 whatever the outcomes (it is a measurement), 1 when the setup itself fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import os
import re
import resource
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jdsearch.testing import Shrink, shrunk_quickstart

REPO = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 6 << 30
OUTCOMES = ("clean", "ok", "unclean", "traceback", "hang", "silent", "broken")
CLASSES = ("export", "files", "spec", "classes", "reads", "flags", "trials")
ERROR_LINE = re.compile(r"^jdsearch(?: [\w-]+)*: error: ")
STUDY = "tiny"  # the setup study's name: its caches are runs/tiny/{base,pool}.safetensors
PG_README = "postgresql://postgres@127.0.0.1:5432/test"
PG_UNREACHABLE = "postgresql+psycopg2://postgres@127.0.0.1:1/test"
HUGE = "9" * 5000
DELETE = "<delete detector.json>"


# ---------------------------------------------------------------------- running one command
@dataclass(frozen=True)
class Result:
    rc: int | None  # None: timed out
    out: str
    err: str
    seconds: float


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_command(cmd: list[str], repo: Path, cwd: Path, timeout: float) -> Result:
    """``cmd`` in ``cwd`` with ``repo`` on ``PYTHONPATH``; its whole process group is killed at
    ``timeout``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo), CUDA_VISIBLE_DEVICES="")
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_limit_memory,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    text = (out.decode(errors="replace"), err.decode(errors="replace"))
    return Result(rc, *text, time.monotonic() - start)


def jdsearch(argv: tuple[str, ...] | list[str]) -> list[str]:
    return [sys.executable, "-m", "jdsearch", *argv]


def run_in_process(argv: tuple[str, ...], cwd: Path) -> Result:
    """``jdsearch ARGV`` run by this process's ``jdsearch.cli.main`` in ``cwd``, its output
    captured: how the tests run the fast cases (no interpreter and torch start-up per case, no
    memory limit or timeout: a fast case needs neither). An exception that escapes ``main`` is
    written to stderr as its traceback, as the interpreter would."""
    import traceback

    from jdsearch.cli import main as jdsearch_main

    out, err = io.StringIO(), io.StringIO()
    start, here = time.monotonic(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = jdsearch_main(list(argv))
            except SystemExit as e:  # argparse's refusal
                rc = e.code if isinstance(e.code, int) else 1
            except Exception:
                traceback.print_exc()
                rc = 1
    finally:
        os.chdir(here)
    return Result(rc, out.getvalue(), err.getvalue(), time.monotonic() - start)


# ---------------------------------------------------------------------- the cases
Prepare = Callable[[Path, "Setup"], None]
Check = Callable[[Result], "str | None"]
Refusal = Callable[[Result, Path], "str | None"]  # a clean refusal and the case's folder


@dataclass(frozen=True)
class Case:
    cls: str
    name: str
    argv: tuple[str, ...]  # after `python -m jdsearch`, paths relative to the case's folder
    prepare: Prepare
    valid: bool = False
    check: Check | None = None  # on exit 0: None when the output is right, else why not
    refusal: Refusal | None = None  # on a clean refusal: None when it is right, else why not
    fast: bool = False  # needs nothing of the setup and ends in a second (the tests run these)

    @property
    def command(self) -> str:
        return "jdsearch " + shlex.join(self.argv)

    @property
    def expected(self) -> str:
        """The outcome the case should have: ``ok`` for a valid input, else ``clean``."""
        return "ok" if self.valid else "clean"


@dataclass(frozen=True)
class Setup:
    """What the cases are built from: ``root`` holds data/ (8 images), ckpt.safetensors, exp/
    (an export folder), model.pt, data16/ and runs/tiny/ (the study's caches)."""

    root: Path
    repo: Path
    study: dict[str, Any] = field(default_factory=dict)  # the tiny study spec


def copy_in(cwd: Path, setup: Setup, *names: str) -> None:
    for name in names:
        src, dst = setup.root / name, cwd / name
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=1))


def nothing(cwd: Path, setup: Setup) -> None:
    pass


def needs(*names: str) -> Prepare:
    return lambda cwd, setup: copy_in(cwd, setup, *names)


# ---- 1. export folders
def export_with(change: Callable[[dict[str, Any], Path], Any] | None = None) -> Prepare:
    """exp/ (a copy of the setup's export) and img/ (two images), detector.json through
    ``change(info, cwd)``, which may return a replacement text for the whole file (or
    :data:`DELETE`)."""

    def prepare(cwd: Path, setup: Setup) -> None:
        copy_in(cwd, setup, "exp")
        (cwd / "img").mkdir()
        for p in sorted((setup.root / "data" / "images").iterdir())[:2]:
            shutil.copyfile(p, cwd / "img" / p.name)
        if change is None:
            return
        info_path = cwd / "exp" / "detector.json"
        info = read_json(info_path)
        text = change(info, cwd)
        if text is None:
            write_json(info_path, info)
        elif text == DELETE:
            info_path.unlink()
        else:
            info_path.write_text(text)

    return prepare


def weights_path(path: str | Callable[[Path], str], move_to: str | None = None) -> Prepare:
    """files.weights.path set to ``path``; the weights moved to ``move_to`` (their recorded
    sha256 still matches them there)."""

    def change(info: dict[str, Any], cwd: Path) -> None:
        if move_to is not None:
            (cwd / move_to).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(cwd / "exp" / "model.safetensors", cwd / move_to)
        info["files"]["weights"]["path"] = path(cwd) if callable(path) else path

    return export_with(change)


def set_key(key: str, value: Callable[[Any], Any]) -> Prepare:
    def change(info: dict[str, Any], cwd: Path) -> None:
        info[key] = value(info[key])

    return export_with(change)


def repeated_ids(info: dict[str, Any], cwd: Path) -> None:
    for cat in info["categories"]:
        cat["id"] = 1


def no_info(info: dict[str, Any], cwd: Path) -> str:
    return DELETE


def export_cases() -> list[Case]:
    bad: list[tuple[str, Prepare]] = [
        ("weights /dev/zero", weights_path("/dev/zero")),
        ("weights /dev/stdin", weights_path("/dev/stdin")),
        ("weights ''", weights_path("")),
        (
            "weights ../other.safetensors (hash matches)",
            weights_path("../other.safetensors", move_to="other.safetensors"),
        ),
        (
            "weights absolute path (hash matches)",
            weights_path(lambda cwd: str(cwd / "abs" / "m.safetensors"), "abs/m.safetensors"),
        ),
        ("class_names short", set_key("class_names", lambda names: names[:2])),
        ("class_names a string", set_key("class_names", lambda _: "abc")),
        ("categories duplicate ids", export_with(repeated_ids)),
        ("detector.json missing", export_with(no_info)),
        ("detector.json not JSON", export_with(lambda info, cwd: "{not json")),
        ("detector.json a list", export_with(lambda info, cwd: "[1, 2]")),
        ("input_size 60000x40000", set_key("input_size", lambda _: "60000x40000")),
    ]
    predict = ("predict", "exp", "img", "--out", "p.json")
    latency = ("latency", "exp", "--repeats", "1", "--warmup", "1")
    # the line each of these must hold (issue 28's cases); the others are checked for one line
    lines = {"input_size 60000x40000": says("input_size", "'60000x40000'", "8192 pixels")}
    cases = []
    for name, prepare in bad:
        refusal = lines.get(name)
        cases.append(Case("export", f"{name}: predict", predict, prepare, refusal=refusal))
        cases.append(Case("export", f"{name}: latency", latency, prepare, refusal=refusal))
    renamed = weights_path("weights.safetensors", move_to="exp/weights.safetensors")
    cases += [
        Case(
            "export",
            "predict --score-thresh nan",
            (*predict, "--score-thresh", "nan"),
            export_with(),
            refusal=says("--score-thresh"),
        ),
        Case("export", "valid export: predict", predict, export_with(), valid=True),
        Case("export", "valid export: latency", latency, export_with(), valid=True),
        Case("export", "valid: weights renamed in the folder", predict, renamed, valid=True),
        Case(
            "export",
            "valid: predict --ann val.json",
            ("predict", "exp", "data/images", "--out", "p.json", "--ann", "data/val.json"),
            lambda cwd, setup: (export_with()(cwd, setup), copy_in(cwd, setup, "data")),
            valid=True,
        ),
    ]
    return cases


# ---- 2. crafted files
def forged_checkpoint(text: str) -> bytes:
    """A safetensors file (one float32 tensor) whose jdsearch metadata is ``text``, with the
    metadata's sha256 recomputed so that it gets past the hash check."""
    meta = {"jdsearch": text, "jdsearch.sha256": hashlib.sha256(text.encode()).hexdigest()}
    header = {"__metadata__": meta, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 4


def metadata_doc(**change: Any) -> str:
    doc = {
        "format": "jdsearch-checkpoint",
        "version": 1,
        "spec": {},
        "num_classes": 3,
        "class_names": ["a", "b"],
        "extra": {},
        "tensors_sha256": "0" * 64,
    }
    return json.dumps({**doc, **change})


FORGED = {
    "a list": "[1, 2]",
    "a string": '"hello"',
    "deeply nested": "[" * 100_000 + "]" * 100_000,
    "a 5000-digit integer": metadata_doc(num_classes=0).replace(
        '"num_classes": 0', '"num_classes": ' + HUGE
    ),
}


def forged(text: str) -> Prepare:
    def prepare(cwd: Path, setup: Setup) -> None:
        copy_in(cwd, setup, "data")
        (cwd / "forged.safetensors").write_bytes(forged_checkpoint(text))

    return prepare


def with_data(change: Callable[[Path], None]) -> Prepare:
    """data/ (a copy of the 8-image dataset) changed by ``change(data_dir)``."""

    def prepare(cwd: Path, setup: Setup) -> None:
        copy_in(cwd, setup, "data")
        change(cwd / "data")

    return prepare


def huge_image_id(split: str) -> Callable[[Path], None]:
    def change(data: Path) -> None:
        doc = read_json(data / f"{split}.json")
        doc["images"][0]["id"] = "HUGE-ID"
        text = json.dumps(doc, indent=1).replace('"HUGE-ID"', HUGE)
        (data / f"{split}.json").write_text(text)

    return change


def png_bomb_bytes(side: int = 40_000) -> bytes:
    """A small PNG written by PIL whose IHDR then declares ``side``×``side`` pixels (its CRC
    recomputed): a few hundred bytes that decode to 4.8 GB."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    assert png[12:16] == b"IHDR"
    png[16:24] = struct.pack(">II", side, side)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])) & 0xFFFFFFFF)
    return bytes(png)


def bomb_first_train_image(data: Path) -> None:
    name = read_json(data / "train.json")["images"][0]["file_name"]
    (data / "images" / name).write_bytes(png_bomb_bytes())


def bomb_file(cwd: Path, setup: Setup) -> None:
    export_with()(cwd, setup)
    (cwd / "bomb.png").write_bytes(png_bomb_bytes())


def set_box(bbox: list[float], *, crowd: bool = False) -> Callable[[Path], None]:
    """The first train annotation's bbox (and iscrowd)."""

    def change(data: Path) -> None:
        doc = read_json(data / "train.json")
        doc["annotations"][0]["bbox"] = bbox
        if crowd:
            doc["annotations"][0]["iscrowd"] = 1
        write_json(data / "train.json", doc)

    return change


def mentions_crowd(res: Result) -> str | None:
    text = res.out + res.err
    if re.search(r"\b[1-9]\d* crowd", text):
        return None
    return "exit 0, the summary does not report the crowd box"


def anchor_yaml(cwd: Path, setup: Setup) -> None:
    copy_in(cwd, setup, "data")
    text = (setup.repo / "detectors" / "tiny-r18-fpn.yaml").read_text()
    big = text.replace(
        "anchor_sizes: [8, 16, 32, 64, 128]", f"anchor_sizes: [8, 16, 32, 64, {10**30}]"
    )
    assert big != text, "tiny-r18-fpn.yaml has other anchor sizes"
    (cwd / "big.yaml").write_text(big)


def plain_yaml(cwd: Path, setup: Setup) -> None:
    shutil.copyfile(setup.repo / "detectors" / "tiny-r18-fpn.yaml", cwd / "mine.yaml")


def noise_pt(cwd: Path, setup: Setup) -> None:
    """noise.pt: 4 kB of fixed pseudo-random bytes, not a torch.save file."""
    import random

    (cwd / "noise.pt").write_bytes(random.Random(0).randbytes(4096))


def one_pixel_set(cwd: Path, setup: Setup) -> None:
    """px/: a COCO set of two 1x1 images (train and val), one category, no boxes."""
    from PIL import Image

    (cwd / "px" / "images").mkdir(parents=True)
    for split, iid in (("train", 1), ("val", 2)):
        Image.new("RGB", (1, 1)).save(cwd / "px" / "images" / f"{iid}.png")
        doc = {
            "images": [{"id": iid, "file_name": f"{iid}.png", "width": 1, "height": 1}],
            "annotations": [],
            "categories": [{"id": 1, "name": "a"}],
        }
        write_json(cwd / "px" / f"{split}.json", doc)


def halve_first_record(data: Path) -> None:
    """The first train image's record says half its real size (its boxes then lie outside)."""
    doc = read_json(data / "train.json")
    rec = doc["images"][0]
    rec["width"], rec["height"] = rec["width"] // 2, rec["height"] // 2
    write_json(data / "train.json", doc)


TRAIN = ("train", "tiny-r18-fpn", "--data", "data", "--out", "m.safetensors", "--quiet")
TRAIN_ALL = (*TRAIN, "--iters", "1", "--batch-size", "6", "--fixed-size", "--no-eval")
LATENCY = ("--repeats", "1", "--warmup", "1")


def files_cases() -> list[Case]:
    cases = []
    for what, text in FORGED.items():
        prepare = forged(text)
        for argv in (
            ("eval", "forged.safetensors", "--data", "data", "--sizes", "64x64"),
            ("flops", "forged.safetensors"),
            ("latency", "forged.safetensors", *LATENCY),
        ):
            cases.append(Case("files", f"checkpoint metadata {what}: {argv[0]}", argv, prepare))
    check = ("data", "check", "--ann", "data/train.json", "--images", "data/images")
    cases += [
        Case(
            "files",
            "COCO 5000-digit image id: data check",
            check,
            with_data(huge_image_id("train")),
        ),
        Case(
            "files", "COCO 5000-digit image id: train", TRAIN_ALL, with_data(huge_image_id("train"))
        ),
        Case(
            "files",
            "COCO 5000-digit image id: predict --ann",
            ("predict", "exp", "data/images", "--out", "p.json", "--ann", "data/val.json"),
            lambda cwd, setup: (
                export_with()(cwd, setup),
                with_data(huge_image_id("val"))(cwd, setup),
            ),
        ),
        Case(
            "files",
            "PNG declaring 40000x40000: data check",
            check,
            with_data(bomb_first_train_image),
        ),
        Case(
            "files",
            "PNG declaring 40000x40000: train",
            TRAIN_ALL,
            with_data(bomb_first_train_image),
        ),
        Case(
            "files",
            "PNG declaring 40000x40000: predict",
            ("predict", "exp", "bomb.png", "--out", "p.json"),
            bomb_file,
        ),
        Case(
            "files",
            "PNG declaring 40000x40000: latency --images",
            ("latency", "tiny-r18-fpn", "--images", "bomb.png", *LATENCY),
            bomb_file,
        ),
        Case("files", ".pt pickle: latency", ("latency", "model.pt", *LATENCY), needs("model.pt")),
        Case("files", ".pt pickle: flops", ("flops", "model.pt"), needs("model.pt")),
        Case("files", "anchor_sizes 1e30: flops", ("flops", "big.yaml"), anchor_yaml),
        Case("files", "anchor_sizes 1e30: latency", ("latency", "big.yaml", *LATENCY), anchor_yaml),
        Case(
            "files",
            "anchor_sizes 1e30: train",
            ("train", "big.yaml", *TRAIN_ALL[2:]),
            anchor_yaml,
        ),
        Case(
            "files", "box 1e-9 wide: data check", check, with_data(set_box([10.0, 10.0, 1e-9, 5.0]))
        ),
        Case(
            "files", "box 1e-9 wide: train", TRAIN_ALL, with_data(set_box([10.0, 10.0, 1e-9, 5.0]))
        ),
        Case(
            "files",
            "crowd box: data check reports it",
            check,
            with_data(set_box([10.0, 10.0, 20.0, 20.0], crowd=True)),
            valid=True,
            check=mentions_crowd,
        ),
        Case(
            "files",
            "eval --sizes 100000x100000",
            ("eval", "ckpt.safetensors", "--data", "data", "--sizes", "100000x100000"),
            needs("ckpt.safetensors", "data"),
            refusal=says("--sizes"),
        ),
        Case(
            "files",
            "flops --size 100000x100000",
            ("flops", "tiny-r18-fpn", "--size", "100000x100000"),
            nothing,
            refusal=says("--size"),
            fast=True,
        ),
        Case(
            "files",
            "latency --size 100000x100000",
            ("latency", "tiny-r18-fpn", "--size", "100000x100000", *LATENCY),
            nothing,
            refusal=says("--size"),
            fast=True,
        ),
        Case(
            "files",
            "random bytes: import",
            ("import", "noise.pt", "--out", "x.safetensors"),
            noise_pt,
            refusal=says("noise.pt", never=("False", "trusted source")),
            fast=True,
        ),
        Case(
            "files",
            "train --epochs 0",
            (*TRAIN, "--epochs", "0"),
            needs("data"),
            refusal=says("--epochs", never=("TrainConfig",)),
        ),
        Case(
            "files",
            "1x1 images: init",
            ("init", "--data", "px", "--base", "tiny-r18-fpn", "--out", "s.yaml"),
            one_pixel_set,
            refusal=says("px", "1x1"),
            fast=True,
        ),
        Case(
            "files",
            "record half its image's size: data check",
            check,
            with_data(halve_first_record),
            refusal=says("but the record says"),
        ),
        # expected-valid
        Case("files", "valid: data check", check, needs("data"), valid=True),
        Case(
            "files",
            "valid: box 0.01 wide: data check",
            check,
            with_data(set_box([10.0, 10.0, 0.01, 5.0])),
            valid=True,
        ),
        Case(
            "files",
            "valid: flops checkpoint",
            ("flops", "ckpt.safetensors"),
            needs("ckpt.safetensors"),
            valid=True,
        ),
        Case(
            "files",
            "valid: latency checkpoint",
            ("latency", "ckpt.safetensors", *LATENCY),
            needs("ckpt.safetensors"),
            valid=True,
        ),
        Case(
            "files",
            "valid: flops detector YAML",
            ("flops", "mine.yaml"),
            plain_yaml,
            valid=True,
            fast=True,
        ),
        Case("files", "valid: train 1 iteration", TRAIN_ALL, needs("data"), valid=True),
    ]
    return cases


# ---- 3. study specs
#: How far the setup study shrinks the quickstart: 16 synthetic 64-px images, 0.1-epoch base,
#: 0.05-epoch pool phases and fast evaluation (it keeps the quickstart's kd.when).
SHRINK = Shrink(
    images=16,
    seed=0,
    size=64,
    max_val_images=4,
    base_epochs=0.1,
    pool_epochs=0.05,
    recalibration_batches=1,
    resolutions=("64x64", "96x64"),
    eval_epochs=0.05,
    eval_warmup_iters=1,
    kd_when=None,
)


def tiny_study(repo: Path) -> dict[str, Any]:
    """The repository's ``studies/quickstart.yaml`` shrunk to seconds (:data:`SHRINK`), one
    trial."""
    quickstart = repo / "studies" / "quickstart.yaml"
    return shrunk_quickstart(
        STUDY, "data16", SHRINK, quickstart=quickstart, n_trials=1, storage="sqlite:///study.db"
    )


def merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def study_spec(patch: dict[str, Any], *, caches: bool) -> Prepare:
    """s.yaml: the tiny study with ``patch``; with ``caches``, the setup's data16/ and
    runs/tiny/ (base and pool) too, so that a real search only runs its trial."""

    def prepare(cwd: Path, setup: Setup) -> None:
        (cwd / "s.yaml").write_text(yaml.safe_dump(merged(setup.study, patch), sort_keys=False))
        if caches:
            copy_in(cwd, setup, "data16", "runs")

    return prepare


SPEC_CASES: list[tuple[str, dict[str, Any], tuple[str, ...], bool]] = [
    # name, patch, extra search arguments, also as a real search
    ("storage garbage", {"search": {"storage": "garbage"}}, (), True),
    ("storage foo://bar", {"search": {"storage": "foo://bar"}}, (), True),
    ("storage unreachable PostgreSQL", {"search": {"storage": PG_UNREACHABLE}}, (), True),
    ("storage sqlite://", {"search": {"storage": "sqlite://"}}, (), True),
    ("storage sqlite:///", {"search": {"storage": "sqlite:///"}}, (), True),
    ("data.max_val_images 0", {"data": {"max_val_images": 0}}, (), True),
    ("data.max_val_images -1", {"data": {"max_val_images": -1}}, (), False),
    ("search.heartbeat_s 0", {"search": {"heartbeat_s": 0}}, (), True),
    ("score.alpha 1e6", {"score": {"alpha": 1e6}}, (), False),
    ("score.beta .nan", {"score": {"beta": float("nan")}}, (), False),
    ("device tpu", {"device": "tpu"}, (), False),
    ("device cuda (no GPU)", {"device": "cuda"}, (), True),
    ("unknown kd key", {"kd": {"bogus": 1}}, (), False),
    ("negative kd weight", {"kd": {"cls_weight": -1}}, (), False),
    ("fast_eval.epochs 0", {"fast_eval": {"epochs": 0}}, (), True),
    ("fast_eval.batch_size 0", {"fast_eval": {"batch_size": 0}}, (), True),
    ("fast_eval.schedule unknown", {"fast_eval": {"schedule": "linear"}}, (), False),
    ("--n-trials -1", {}, ("--n-trials", "-1"), True),
    ("base.detector nope-fpn", {"base": {"detector": "nope-fpn"}}, (), False),
    ("base.train.lr 1e6", {"base": {"train": {"lr": 1e6}}}, (), False),
    ("resolutions 100000x100000", {"resolutions": ["64x64", "100000x100000"]}, (), True),
]


def spec_cases() -> list[Case]:
    # the line each of these must hold (issue 28's cases); the others are checked for one line
    lines = {
        "resolutions 100000x100000": says("s.yaml", "resolutions", "'100000x100000'", "8192 pixels")
    }
    cases = []
    for name, patch, extra, real in SPEC_CASES:
        line = lines.get(name)
        cases.append(
            Case(
                "spec",
                f"{name}: --check",
                ("search", "s.yaml", "--check", *extra),
                study_spec(patch, caches=False),
                refusal=line,
            )
        )
        if real:
            cases.append(
                Case(
                    "spec",
                    f"{name}: search",
                    ("search", "s.yaml", "--quiet", *extra),
                    study_spec(patch, caches=True),
                    # a refused start leaves no study
                    refusal=all_of(no_study("study.db"), *([line] if line else [])),
                )
            )
    # The cached base of the setup's search (tiny-r18-fpn), a spec now asking for tiny-r50-fpn and
    # a fresh storage: reusing the r18 base without a word is a silent wrong result.
    r50 = study_spec({"base": {"detector": "tiny-r50-fpn"}}, caches=True)
    cases += [
        Case(
            "spec", "cached r18 base, spec now r50: --check", ("search", "s.yaml", "--check"), r50
        ),
        Case(
            "spec",
            "cached r18 base, spec now r50: search",
            ("search", "s.yaml", "--quiet"),
            r50,
            refusal=no_study("study.db"),
        ),
        Case(
            "spec",
            "gc --storage 'not a url'",
            ("gc", "--storage", "not a url"),
            nothing,
            refusal=says("--storage", "'not a url'"),
            fast=True,
        ),
        # expected-valid
        Case(
            "spec",
            "valid tiny spec: --check",
            ("search", "s.yaml", "--check"),
            study_spec({}, caches=False),
            valid=True,
        ),
        Case(
            "spec",
            "valid tiny spec: search",
            ("search", "s.yaml", "--quiet"),
            study_spec({}, caches=True),
            valid=True,
        ),
        Case(
            "spec",
            "valid: studies/quickstart.yaml --check",
            ("search", "quickstart.yaml", "--check"),
            lambda cwd, setup: [  # the spec and the base and pool it ships beside it
                shutil.copyfile(setup.repo / "studies" / f, cwd / f)
                for f in (
                    "quickstart.yaml",
                    "quickstart-base.safetensors",
                    "quickstart-pool.safetensors",
                )
            ],
            valid=True,
        ),
    ]
    return cases


# ---- 4. classes and categories
def val_categories(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(data: Path) -> None:
        doc = read_json(data / "val.json")
        change(doc)
        write_json(data / "val.json", doc)

    return apply


def fewer(doc: dict[str, Any]) -> None:
    doc["categories"] = doc["categories"][:2]
    keep = {c["id"] for c in doc["categories"]}
    doc["annotations"] = [a for a in doc["annotations"] if a["category_id"] in keep]


def renamed(doc: dict[str, Any]) -> None:
    doc["categories"][0]["name"] = "zebra"


def extra(doc: dict[str, Any]) -> None:
    doc["categories"].append({"id": 99, "name": "extra", "supercategory": "shape"})


def reordered(doc: dict[str, Any]) -> None:
    doc["categories"] = doc["categories"][::-1]


def ckpt_and(change: Callable[[dict[str, Any]], None]) -> Prepare:
    def prepare(cwd: Path, setup: Setup) -> None:
        copy_in(cwd, setup, "ckpt.safetensors")
        with_data(val_categories(change))(cwd, setup)

    return prepare


def classes_cases() -> list[Case]:
    evaluate = ("eval", "ckpt.safetensors", "--data", "data", "--sizes", "64x64")
    train = (*TRAIN, "--iters", "1", "--batch-size", "2")
    predict = ("predict", "exp", "data/images", "--out", "p.json", "--ann", "data/val.json")

    def export_and(change: Callable[[dict[str, Any]], None]) -> Prepare:
        return lambda cwd, setup: (
            export_with()(cwd, setup),
            with_data(val_categories(change))(cwd, setup),
        )

    readme = ("search", "s.yaml", "--check", "--storage", PG_README)
    return [
        Case("classes", "val.json fewer categories: eval", evaluate, ckpt_and(fewer)),
        Case("classes", "val.json renamed category: eval", evaluate, ckpt_and(renamed)),
        Case("classes", "val.json extra category: eval", evaluate, ckpt_and(extra)),
        Case(
            "classes", "val.json fewer categories: train", train, with_data(val_categories(fewer))
        ),
        Case("classes", "val.json fewer categories: predict --ann", predict, export_and(fewer)),
        # expected-valid
        Case(
            "classes",
            "README PostgreSQL URL: search --check",
            readme,
            study_spec({}, caches=False),
            valid=True,
        ),
        Case(
            "classes",
            "valid: eval, same categories",
            evaluate,
            ckpt_and(lambda doc: None),
            valid=True,
        ),
        Case(
            "classes",
            "valid: eval, categories listed in reverse",
            evaluate,
            ckpt_and(reordered),
            valid=True,
        ),
        Case("classes", "valid: train, same categories", train, needs("data"), valid=True),
    ]


# ---- 5. whole files read: every YAML and JSON reader takes a regular file within a size limit
BIG_TEXT = (16 << 20) + 1  # a byte over MAX_TEXT_BYTES (16 MiB)


def at(name: str, make: Callable[[Path], None]) -> Prepare:
    """``make(cwd / name)``, its folder made first."""

    def prepare(cwd: Path, setup: Setup) -> None:
        (cwd / name).parent.mkdir(parents=True, exist_ok=True)
        make(cwd / name)

    return prepare


def to_dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def big_text(path: Path) -> None:
    """A text file one byte over 16 MiB (YAML comments: what it says is never read)."""
    line = "#" * 1023 + "\n"
    path.write_text(line * (BIG_TEXT // len(line)) + "#" * (BIG_TEXT % len(line)))


def both(*prepares: Prepare) -> Prepare:
    def prepare(cwd: Path, setup: Setup) -> None:
        for p in prepares:
            p(cwd, setup)

    return prepare


def d2_files(config: dict[str, Any] | None) -> Prepare:
    """cfg.yaml (``config``; ``None``: none written) and an empty w.pkl."""

    def prepare(cwd: Path, setup: Setup) -> None:
        if config is not None:
            (cwd / "cfg.yaml").write_text(yaml.safe_dump(config))
        (cwd / "w.pkl").write_bytes(b"")

    return prepare


def one_image(cwd: Path, setup: Setup) -> None:
    """img/a.png, 16x16."""
    from PIL import Image

    (cwd / "img").mkdir(exist_ok=True)
    Image.new("RGB", (16, 16), (120, 30, 200)).save(cwd / "img" / "a.png")


def not_regular() -> Refusal:
    return says("not a regular file")


INIT = ("--base", "tiny-r18-fpn", "--out", "s.yaml")


def reads_cases() -> list[Case]:
    """Each reader of a whole file given ``/dev/zero``, a FIFO (opened, it would block) or a file
    over its size limit: refused, saying why, before a byte is read."""
    info = "exp/detector.json"
    d2 = ("import", "--from", "detectron2", "cfg.yaml", "w.pkl", "--out", "x.safetensors")
    data_check = ("data", "check", "--ann", "ann.json", "--images", ".")
    rows: list[tuple[str, tuple[str, ...], Prepare, Refusal]] = [
        (
            "study spec -> /dev/zero: search --check",
            ("search", "s.yaml", "--check"),
            at("s.yaml", to_dev_zero),
            says("s.yaml", "not a regular file"),
        ),
        (
            "study spec of 16 MiB + 1: search --check",
            ("search", "s.yaml", "--check"),
            at("s.yaml", big_text),
            says("s.yaml", "larger than 16 MiB"),
        ),
        (
            "detector spec a FIFO: flops",
            ("flops", "mine.yaml"),
            at("mine.yaml", os.mkfifo),
            says("mine.yaml", "not a regular file"),
        ),
        (
            "detector spec of 16 MiB + 1: flops",
            ("flops", "mine.yaml"),
            at("mine.yaml", big_text),
            says("mine.yaml", "larger than 16 MiB"),
        ),
        (
            "detectron2 _BASE_: /dev/zero: import",
            d2,
            d2_files({"_BASE_": "/dev/zero", "MODEL": {}}),
            says("cfg.yaml: _BASE_ chain: /dev/zero", "not a regular file"),
        ),
        (
            "detectron2 config a FIFO: import",
            d2,
            both(d2_files(None), at("cfg.yaml", os.mkfifo)),
            says("cfg.yaml", "not a regular file"),
        ),
        (
            "detectron2 config of 16 MiB + 1: import",
            d2,
            both(d2_files(None), at("cfg.yaml", big_text)),
            says("cfg.yaml", "larger than 16 MiB"),
        ),
        (
            "detectron2 weights /dev/zero: import",
            ("import", "--from", "detectron2", "cfg.yaml", "/dev/zero", "--out", "x.safetensors"),
            d2_files({"MODEL": {}}),
            says("/dev/zero: cannot read weights file (not a regular file)"),
        ),
        (
            "weights /dev/zero: import",
            ("import", "/dev/zero", "--out", "x.safetensors"),
            nothing,
            says("/dev/zero: cannot read weights file (not a regular file)"),
        ),
        (
            "--classes /dev/zero: import",
            ("import", "noise.pt", "--classes", "/dev/zero", "--out", "x.safetensors"),
            noise_pt,
            says("/dev/zero", "not a regular file"),
        ),
        (
            "--classes of 16 MiB + 1: import",
            ("import", "noise.pt", "--classes", "names.txt", "--out", "x.safetensors"),
            both(noise_pt, at("names.txt", big_text)),
            says("names.txt", "larger than 16 MiB"),
        ),
        (
            "--ann /dev/zero: import",
            ("import", "noise.pt", "--ann", "/dev/zero", "--out", "x.safetensors"),
            noise_pt,
            says("/dev/zero", "not a regular file"),
        ),
        (
            "COCO file /dev/zero: data check",
            ("data", "check", "--ann", "/dev/zero", "--images", "."),
            nothing,
            says("/dev/zero", "not a regular file"),
        ),
        ("COCO file a FIFO: data check", data_check, at("ann.json", os.mkfifo), not_regular()),
        (
            "COCO files /dev/zero: init --train --val",
            (*("init", "--train", "/dev/zero", "--val", "/dev/zero", "--images", "."), *INIT),
            nothing,
            says("/dev/zero", "not a regular file"),
        ),
        (
            "detector.json -> /dev/zero: predict",
            ("predict", "exp", "img", "--out", "p.json"),
            both(one_image, at(info, to_dev_zero)),
            says("detector.json", "not a regular file"),
        ),
        (
            "detector.json of 16 MiB + 1: predict",
            ("predict", "exp", "img", "--out", "p.json"),
            both(one_image, at(info, big_text)),
            says("detector.json", "larger than 16 MiB"),
        ),
        (
            "checkpoint /dev/zero: eval",
            ("eval", "/dev/zero", "--data", "data"),
            nothing,
            says("/dev/zero", "not a regular file"),
        ),
        (
            "image /dev/zero: latency --images",
            ("latency", "tiny-r18-fpn", "--images", "/dev/zero", *LATENCY),
            nothing,
            says("/dev/zero: not a regular file"),
        ),
        (
            "image a FIFO in a folder: latency --images",
            ("latency", "tiny-r18-fpn", "--images", "img", *LATENCY),
            both(one_image, at("img/b.png", os.mkfifo)),
            says("img/b.png: not a regular file"),
        ),
    ]
    cases = [Case("reads", name, argv, prep, refusal=r, fast=True) for name, argv, prep, r in rows]

    def record_to_dev_zero(cwd: Path, setup: Setup) -> None:
        """The setup's caches, the base's record of what made it swapped for /dev/zero."""
        study_spec({}, caches=True)(cwd, setup)
        record = cwd / "runs" / STUDY / "base.safetensors.made-by.json"
        record.unlink(missing_ok=True)
        record.symlink_to("/dev/zero")

    def checked(res: Result) -> str | None:
        return None if "ok: nothing was trained" in res.out else "exit 0 without the plan's end"

    # jdsearch's own record of what made a cache: one it cannot read counts as none (the cache
    # is then checked against the spec it stores), so the search goes on; read whole, it would
    # never end.
    cases.append(
        Case(
            "reads",
            "valid: cache record -> /dev/zero: search --check",
            ("search", "s.yaml", "--check"),
            record_to_dev_zero,
            valid=True,
            check=checked,
        )
    )
    return cases


# ---- 6. flags: each bad value refused at the flag typed, in one line naming it and the value
def folder(name: str) -> Prepare:
    return at(name, lambda p: p.mkdir())


def a_file(name: str, text: str = "{}") -> Prepare:
    return at(name, lambda p: p.write_text(text))


NO_STUDY = ("--storage", "sqlite:///none.db")
FIELDS = ("TrainConfig", "MorphConfig", "DetectorSpec")  # never named for a flag
HUGE_SEED = "1" + "0" * 20  # beyond 64 bits


def flags_cases() -> list[Case]:
    """A bad value of a flag: refused before anything is read, in one line that names the flag
    as typed (never the dataclass field it fills) and the value."""
    train = ("train", "--out", "m.safetensors", "--data", "none")
    rows: list[tuple[str, tuple[str, ...], Prepare, Refusal]] = [
        # a config dataclass's field
        (
            "evolve --fraction 1",
            ("evolve", "none.safetensors", "channel_prune", "--out", "x", "--fraction", "1"),
            nothing,
            says("--fraction: ", "got 1.0", never=FIELDS),
        ),
        (
            "flops --num-classes -1",
            ("flops", "tiny-r18-fpn", "--num-classes", "-1"),
            nothing,
            says("--num-classes: ", "got -1", never=FIELDS),
        ),
        (
            "latency --num-classes 0",
            ("latency", "tiny-r18-fpn", "--num-classes", "0", *LATENCY),
            nothing,
            says("--num-classes: ", "got 0", never=FIELDS),
        ),
        (
            "latency --num-classes 10**12",
            ("latency", "tiny-r18-fpn", "--num-classes", str(10**12), *LATENCY),
            nothing,
            says("--num-classes: ", f"got {10**12}", never=FIELDS),
        ),
        (
            "train --iters 0",
            (*train, "--iters", "0"),
            nothing,
            says("--iters: ", "got 0", never=FIELDS),
        ),
        (
            "train --seed 10**20",
            (*train, "--seed", HUGE_SEED),
            nothing,
            says("--seed: ", HUGE_SEED, never=FIELDS),
        ),
        (
            "finetune --lr 1e3",
            ("finetune", *NO_STUDY, "--epochs", "1", "--lr", "1e3"),
            nothing,
            says("--lr: ", "got 1000.0", never=FIELDS),
        ),
        # a count or a bound no dataclass checks
        (
            "latency --repeats 0",
            ("latency", "tiny-r18-fpn", "--repeats", "0"),
            nothing,
            says("argument --repeats: ", "'0'"),
        ),
        (
            "eval --batch-size 0",
            ("eval", "none.safetensors", "--batch-size", "0"),
            nothing,
            says("argument --batch-size: ", "'0'"),
        ),
        (
            "noise --seeds 1",
            ("noise", *NO_STUDY, "--seeds", "1"),
            nothing,
            says("argument --seeds: ", "'1'"),
        ),
        (
            "data synth --images 10**12",
            ("data", "synth", "--out", "d", "--images", str(10**12)),
            nothing,
            says("argument --images: ", f"'{10**12}'"),
        ),
        (
            "export --max-flops -1",
            ("export", *NO_STUDY, "--out", "o", "--max-flops", "-1"),
            nothing,
            says("argument --max-flops: ", "'-1'"),
        ),
        (
            "predict --score-thresh 2",
            ("predict", "none", "img", "--out", "p.json", "--score-thresh", "2"),
            nothing,
            says("argument --score-thresh: ", "'2'"),
        ),
        # non-finite numbers (FLAG=VALUE: argparse reads a lone -inf as an option)
        (
            "train --lr nan",
            (*train, "--lr", "nan"),
            nothing,
            says("argument --lr: must be a finite number, got 'nan'"),
        ),
        (
            "gc --older-than inf",
            ("gc", *NO_STUDY, "--older-than", "inf"),
            nothing,
            says("argument --older-than: must be a finite number, got 'inf'"),
        ),
        (
            "export --max-latency-ms=-inf",
            ("export", *NO_STUDY, "--out", "o", "--max-latency-ms=-inf"),
            nothing,
            says("argument --max-latency-ms: must be a finite number, got '-inf'"),
        ),
        # empty strings
        *[
            (
                f"{argv[0]} {flag} ''",
                (*argv, flag, ""),
                nothing,
                says(f"argument {flag}: must not be empty, got ''"),
            )
            for argv, flag in (
                (("train",), "--out"),
                (("train", "--out", "m.safetensors"), "--init"),
                (("data", "synth"), "--out"),
                (("eval", "none.safetensors"), "--json"),
                (("predict", "none", "img", "--out", "p.json"), "--ann"),
                (("search", "s.yaml"), "--storage"),
            )
        ],
        # a device, a study name
        (
            "train --device tpu",
            (*train, "--device", "tpu"),
            nothing,
            says("--device 'tpu': "),
        ),
        (
            "init --name 'a b'",
            ("init", "--data", "d", "--out", "s.yaml", "--name", "a b"),
            nothing,
            says("--name 'a b': "),
        ),
        # an output file that is a folder; --data that is a file
        (
            "predict --out a folder",
            ("predict", "none", "img", "--out", "out"),
            folder("out"),
            says("--out out: is a folder"),
        ),
        (
            "eval --json a folder",
            ("eval", "none.safetensors", "--json", "out"),
            folder("out"),
            says("--json out: is a folder"),
        ),
        (
            "train --data a COCO file",
            ("train", "--data", "train.json", "--out", "m.safetensors"),
            a_file("train.json"),
            says("--data train.json: a dataset folder", "--train FILE"),
        ),
        (
            "init --data a COCO file",
            ("init", "--data", "train.json", "--out", "s.yaml"),
            a_file("train.json"),
            says("--data train.json: a dataset folder", "--train FILE"),
        ),
    ]
    cases = [Case("flags", name, argv, prep, refusal=r, fast=True) for name, argv, prep, r in rows]
    cases += [
        Case(
            "flags",
            "valid: flops --num-classes 2",
            ("flops", "tiny-r18-fpn", "--num-classes", "2"),
            nothing,
            valid=True,
            fast=True,
        ),
        Case(
            "flags",
            "valid: latency --repeats 1 --warmup 0",
            ("latency", "tiny-r18-fpn", "--repeats", "1", "--warmup", "0", "--num-classes", "3"),
            nothing,
            valid=True,
            fast=True,
        ),
    ]
    return cases


# ---- 7. a failed trial: one line, its traceback in a log file
FAILED_LOG = f"runs/{STUDY}/failed-trials.log"


def failed_trials_logged(res: Result, cwd: Path) -> str | None:
    """Every failed trial printed in one line naming the log, whose traceback is in the log."""
    fails = [line for line in res.out.splitlines() if " FAIL: " in line]
    if not fails:
        return "no trial line says FAIL"
    if any(f"(traceback in {FAILED_LOG})" not in line for line in fails):
        return f"a FAIL line does not name {FAILED_LOG}"
    log = cwd / FAILED_LOG
    if not log.is_file() or "Traceback" not in log.read_text():
        return f"{FAILED_LOG} holds no traceback"
    return None


def trials_cases() -> list[Case]:
    """A study whose trials fail: distillation weights of 1e300 make every loss infinite, so
    each trial's training diverges (a weight this large is finite, so the spec takes it)."""
    kd = {"kd": {"cls_weight": 1e300, "feat_weight": 1e300, "loc_weight": 1e300, "when": "always"}}
    return [
        Case(
            "trials",
            "kd weights 1e300: search (every trial fails)",
            ("search", "s.yaml", "--quiet"),
            study_spec(kd, caches=True),
            refusal=all_of(says("none of the 1 trials", "completed"), failed_trials_logged),
        )
    ]


def all_cases() -> list[Case]:
    return (
        export_cases()
        + files_cases()
        + spec_cases()
        + classes_cases()
        + reads_cases()
        + flags_cases()
        + trials_cases()
    )


# ---------------------------------------------------------------------- setup
def make_setup(root: Path, repo: Path, timeout: float) -> Setup:
    """The shared inputs, made by the probed CLI itself; exits 1 when a step fails."""
    setup = Setup(root, repo, tiny_study(repo))
    (root / "s.yaml").write_text(yaml.safe_dump(setup.study, sort_keys=False))
    steps: list[list[str]] = [
        [sys.executable, "-c", "import jdsearch; print(jdsearch.__file__)"],
        jdsearch(
            ("data", "synth", "--out", "data", "--images", "8", "--seed", "0", "--size", "64")
        ),
        jdsearch(
            (
                "train",
                "tiny-r18-fpn",
                "--data",
                "data",
                "--epochs",
                "0.1",
                "--out",
                "ckpt.safetensors",
                "--quiet",
                "--no-eval",
            )
        ),
        jdsearch(("search", "s.yaml", "--quiet")),
        jdsearch(("export", "--storage", "sqlite:///study.db", "--out", "exp", "--no-onnx")),
        [sys.executable, "-c", "import torch; torch.save({'w': torch.zeros(2)}, 'model.pt')"],
    ]
    for i, cmd in enumerate(steps):
        res = run_command(cmd, repo, root, max(timeout, 300))
        shown = shlex.join(cmd[1:] if cmd[1] == "-c" else cmd[3:])
        if res.rc != 0:
            print(f"setup failed: {shown}\n{res.out}{res.err}", file=sys.stderr)
            sys.exit(1)
        if i == 0:
            imported = Path(res.out.strip()).resolve()
            if not imported.is_relative_to(repo.resolve()):
                print(
                    f"setup: jdsearch is imported from {imported}, not from {repo}", file=sys.stderr
                )
                sys.exit(1)
            print(f"jdsearch imported from {imported}")
        print(f"setup: {shown} ({res.seconds:.1f} s)", flush=True)
    for name in (
        "data16",
        "runs/tiny/base.safetensors",
        "runs/tiny/pool.safetensors",
        "exp/detector.json",
    ):
        if not (root / name).exists():
            print(f"setup: the tiny search left no {name}", file=sys.stderr)
            sys.exit(1)
    return setup


# ---------------------------------------------------------------------- classify and report
def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def exception_line(err: str) -> str:
    """The exception line of the last traceback in ``err`` ("" when there is none)."""
    _, found, after = err.rpartition("Traceback (most recent call last):")
    lines = after.splitlines() if found else []
    return next((line.strip() for line in lines if line.strip() and not line[0].isspace()), "")


def says(*needles: str, never: tuple[str, ...] = ()) -> Refusal:
    """A refusal whose last stderr line holds every one of ``needles`` and none of ``never``."""

    def check(res: Result, cwd: Path) -> str | None:
        line = last_line(res.err)
        missing = [n for n in needles if n not in line]
        found = [n for n in never if n in line]
        if missing or found:
            return f"the line {'lacks ' + repr(missing) if missing else 'has ' + repr(found)}"
        return None

    return check


def no_study(db: str) -> Refusal:
    """A refusal that leaves no study in the SQLite file ``db`` of the case's folder."""

    def check(res: Result, cwd: Path) -> str | None:
        import sqlite3

        if not (cwd / db).is_file():
            return None
        with contextlib.closing(sqlite3.connect(cwd / db)) as con:
            try:
                names = [r[0] for r in con.execute("SELECT study_name FROM studies")]
            except sqlite3.Error:
                return None
        return f"left the study {names[0]!r} in {db}" if names else None

    return check


def all_of(*checks: Refusal) -> Refusal:
    """A refusal that passes every one of ``checks`` (the first failure says why)."""

    def check(res: Result, cwd: Path) -> str | None:
        return next((why for c in checks if (why := c(res, cwd)) is not None), None)

    return check


def classify(case: Case, res: Result, timeout: float, cwd: Path) -> tuple[str, str]:
    """(outcome, what to show: the last stderr line, the exception of a traceback, or why)."""
    last = last_line(res.err)
    if res.rc is None:
        return "hang", f"timed out after {timeout:g} s" + (f"; stderr: {last}" if last else "")
    tail = exception_line(res.err) or last
    tail = tail or (f"stdout: {last_line(res.out)}" if res.out.strip() else "")
    if res.rc < 0:
        tail = f"killed by signal {-res.rc}" + (f"; {tail}" if tail else "")
    traceback = "Traceback" in res.err
    if res.rc == 0 and not traceback:
        wrong = case.check(res) if case.check is not None else None
        if wrong is not None:
            return "silent", wrong
        return ("ok", tail) if case.valid else ("silent", tail or "exit 0")
    if case.valid:
        return "broken", tail
    if not traceback and ERROR_LINE.match(last):
        wrong = case.refusal(res, cwd) if case.refusal is not None else None
        return ("unclean", f"{wrong}: {tail}") if wrong is not None else ("clean", tail)
    return "traceback", tail


def cell(text: str, width: int | None = None) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text[:width] if width else text


def summary(rows: list[tuple[Case, str]]) -> str:
    """The count of each outcome per class, and how many cases ended as expected (a bad input
    ``clean``, a valid one ``ok``)."""
    head = "| class | " + " | ".join(OUTCOMES) + " | total | as expected |"
    lines = [head, "|---" * (len(OUTCOMES) + 3) + "|"]
    classes = [c for c in CLASSES if any(case.cls == c for case, _ in rows)]
    for name in [*classes, "all"]:
        picked = [(case, o) for case, o in rows if name in ("all", case.cls)]
        outcomes = [o for _, o in picked]
        counts = [str(outcomes.count(o)) for o in OUTCOMES]
        expected = sum(o == case.expected for case, o in picked)
        lines.append(f"| {name} | " + " | ".join(counts) + f" | {len(picked)} | {expected} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose CLI to probe")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    parser.add_argument("--only", choices=CLASSES, help="run one class of cases")
    parser.add_argument(
        "--match", action="append", help="run the cases whose name holds TEXT (repeatable)"
    )
    parser.add_argument(
        "--fast", action="store_true", help="run the fast cases only (no setup: seconds)"
    )
    parser.add_argument("--list", action="store_true", help="print the cases, run nothing")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (each case's output too)"
    )
    args = parser.parse_args(argv)
    cases = [c for c in all_cases() if args.only in (None, c.cls) and (c.fast or not args.fast)]
    if args.match:
        cases = [c for c in cases if any(m in c.name for m in args.match)]
    if args.list:
        for c in cases:
            kind = ("valid" if c.valid else "bad") + (", fast" if c.fast else "")
            print(f"{c.cls:<8} {kind:<11} {c.name:<50} {c.command}")
        print(f"{len(cases)} cases")
        return 0

    repo = args.repo.resolve()
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="jdsearch-bad-inputs-"))
    try:
        (root / "setup").mkdir()
        if all(c.fast for c in cases):  # they need nothing of it
            setup = Setup(root / "setup", repo, tiny_study(repo))
        else:
            setup = make_setup(root / "setup", repo, args.timeout)
        print(f"probing {repo}: {len(cases)} cases, timeout {args.timeout:g} s\n")
        print("| class | case | command | outcome | stderr (last line) |")
        print("|---|---|---|---|---|", flush=True)
        rows: list[tuple[Case, str]] = []
        for i, case in enumerate(cases):
            cwd = root / "cases" / f"{i:03d}"
            cwd.mkdir(parents=True)
            case.prepare(cwd, setup)
            res = run_command(jdsearch(case.argv), repo, cwd, args.timeout)
            outcome, tail = classify(case, res, args.timeout, cwd)
            (cwd / "stdout.txt").write_text(res.out)
            (cwd / "stderr.txt").write_text(res.err)
            rows.append((case, outcome))
            name = case.name + (" (valid)" if case.valid else "")
            print(
                f"| {case.cls} | {cell(name)} | `{cell(case.command)}` | {outcome} | {cell(tail, 120)} |",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(cwd, ignore_errors=True)
        print(f"\nsummary ({repo}):\n")
        print(summary(rows))
        print(f"\nwall time: {time.monotonic() - start:.0f} s")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
