"""Crafted and mismatched input files: each is refused with one line naming the file, the field
and the value, before anything is loaded, trained or written."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as st_save

from jdsearch.cli import main
from jdsearch.core.config import MAX_ANCHOR_SIZE, read_yaml
from jdsearch.core.errors import CheckpointError, DataError, ExportError, SpecError
from jdsearch.data import synth
from jdsearch.data.coco import CocoDataset, load_image, validate
from jdsearch.engine.evaluate import match_categories
from jdsearch.engine.train import train
from jdsearch.models import build_detector
from jdsearch.spec.arch import MAX_WIDTH, BackboneArch
from jdsearch.spec.detector import load_spec, spec_from_dict
from jdsearch.spec.settings import TrainConfig
from jdsearch.store import export as export_mod
from jdsearch.store.checkpoint import (
    META_HASH_KEY,
    META_KEY,
    checkpoint_from_bytes,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
)
from jdsearch.store.export import INFO_FILE, WEIGHTS_FILE, export_detector, load_exported

NAMES = ("disc", "ring", "square", "triangle", "cross", "bar")  # synth's classes, ids 1..6


def one_line(exc: pytest.ExceptionInfo[Exception], *needles: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, _, err = cli(capsys, *argv)
    assert code == 2, err
    assert err.startswith("jdsearch: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    synth.generate(out, images=8, seed=1, size=64)
    return out


@pytest.fixture(scope="module")
def detector() -> Any:
    torch.manual_seed(0)
    return build_detector(load_spec("tiny-r18-fpn"), len(NAMES) + 1).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, detector: Any) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "base.safetensors"
    return save_checkpoint(path, detector, class_names=NAMES, category_ids=range(1, 7))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, detector: Any) -> Path:
    out = tmp_path_factory.mktemp("export") / "det"
    export_detector(detector, out, class_names=NAMES, input_size="96x64", onnx=False)
    return out


def copy_with(src: Path, dst: Path, change: Any) -> Path:
    """A copy of the export folder ``src`` whose ``detector.json`` went through ``change``."""
    shutil.copytree(src, dst)
    info = json.loads((dst / INFO_FILE).read_text())
    change(info)
    (dst / INFO_FILE).write_text(json.dumps(info))
    return dst


def set_weights(path: str) -> Any:
    return lambda info: info["files"]["weights"].__setitem__("path", path)


# ---------------------------------------------------------------------- 1. export folders
@pytest.mark.parametrize(
    "path", ["/dev/zero", "/dev/stdin", "", ".", "..", "sub/model.safetensors", "a\\b"]
)
def test_export_weights_path_must_be_a_plain_name(
    exported: Path, tmp_path: Path, path: str
) -> None:
    bad = copy_with(exported, tmp_path / "bad", set_weights(path))
    with pytest.raises(ExportError) as e:
        load_exported(bad)
    one_line(e, f"{bad / INFO_FILE}: files.weights.path {path!r}", "inside the export folder")


def test_export_weights_outside_the_folder_are_not_loaded_even_with_their_hash(
    exported: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "other.safetensors"
    shutil.copyfile(exported / WEIGHTS_FILE, outside)  # the recorded hash matches it
    bad = copy_with(exported, tmp_path / "bad", set_weights("../other.safetensors"))
    (bad / WEIGHTS_FILE).unlink()
    with pytest.raises(ExportError) as e:
        load_exported(bad)
    one_line(e, "files.weights.path '../other.safetensors'")
    # A link with a plain name that leads out of the folder is refused too.
    (bad / "linked.safetensors").symlink_to(outside)
    (bad / INFO_FILE).write_text(
        (bad / INFO_FILE).read_text().replace("../other.safetensors", "linked.safetensors")
    )
    with pytest.raises(ExportError) as e:
        load_exported(bad)
    one_line(e, "linked.safetensors", "regular file inside the export folder")


def test_export_weights_over_the_size_cap_are_not_read(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    monkeypatch.setattr(export_mod, "MAX_WEIGHTS_BYTES", 1000)

    def no_read(*_: Any, **__: Any) -> Any:
        raise AssertionError("the weights were read past the cap")

    monkeypatch.setattr(export_mod, "checkpoint_from_bytes", no_read)
    with pytest.raises(ExportError) as e:
        load_exported(bad)
    one_line(e, f"{bad / WEIGHTS_FILE}: more than 1000 bytes")


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        (lambda i: i.__setitem__("class_names", i["class_names"][:2]), ["class_names", "of 6"]),
        (lambda i: i.__setitem__("class_names", "abc"), ["class_names 'abc'", "of 6"]),
        (lambda i: i.__setitem__("categories", i["categories"][:5]), ["categories", "of 6"]),
        (
            lambda i: [c.__setitem__("id", 1) for c in i["categories"]],
            ["categories[1].id 1 repeats"],
        ),
        (
            lambda i: i["categories"][2].__setitem__("id", "3"),
            ["categories[2].id '3' is not an integer"],
        ),
        (
            lambda i: i["categories"][0].__setitem__("name", "zebra"),
            ["categories[0].name 'zebra'", "class_names[0] 'disc'"],
        ),
    ],
    ids=["short-names", "string-names", "short-categories", "repeated-ids", "string-id", "renamed"],
)
def test_export_classes_must_match_the_detector(
    exported: Path, tmp_path: Path, change: Any, needles: list[str]
) -> None:
    bad = copy_with(exported, tmp_path / "bad", change)
    with pytest.raises(ExportError) as e:
        load_exported(bad)
    one_line(e, f"{bad / INFO_FILE}: ", *needles)


def test_export_description_must_be_a_small_regular_file(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    (bad / INFO_FILE).unlink()
    (bad / INFO_FILE).symlink_to("/dev/zero")
    with pytest.raises(ExportError) as e:
        load_exported(bad)
    one_line(e, f"{bad / INFO_FILE}: unreadable (not a regular file)")
    (bad / INFO_FILE).unlink()
    shutil.copyfile(exported / INFO_FILE, bad / INFO_FILE)
    monkeypatch.setattr(export_mod, "MAX_INFO_BYTES", 100)
    with pytest.raises(ExportError) as e:
        load_exported(bad)
    one_line(e, f"{bad / INFO_FILE}: unreadable (larger than 100 bytes)")


def test_cli_predict_refuses_a_crafted_export_in_one_line(
    exported: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = copy_with(exported, tmp_path / "bad", set_weights("/dev/zero"))
    out = tmp_path / "preds.json"
    err = cli_error(capsys, "predict", bad, data / "images", "--out", out)
    assert "files.weights.path '/dev/zero'" in err and not out.exists()


def test_cli_predict_that_cannot_write_its_output_says_so_in_one_line(
    exported: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "preds.json"  # under a file: no folder can be made there
    err = cli_error(capsys, "predict", exported, data / "images", "--out", out)
    assert (
        err.startswith(f"jdsearch: error: --out {out}: cannot write (") and "Traceback" not in err
    )


# ---------------------------------------------------------------------- 2. crafted files
def forged_checkpoint(text: str) -> bytes:
    """A safetensors file whose jdsearch metadata is ``text``, with its sha256 recomputed."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    return st_save({"w": torch.zeros(1)}, metadata={META_KEY: text, META_HASH_KEY: digest})


def good_doc(**change: Any) -> str:
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


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[1, 2]", ["metadata is a JSON list"]),
        ('"hello"', ["metadata is a JSON str"]),
        ("[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
        (good_doc(num_classes=0).replace(": 0", ": " + "9" * 5000), ["5000 digits"]),
        (good_doc(num_classes=0).replace(": 0", ": " + "9" * 4000), ["'num_classes'", "digits"]),
        (good_doc(num_classes=1), ["'num_classes' is 1", "2..100000"]),
        (good_doc(class_names=["a"]), ["'class_names'", "['a']"]),
        (good_doc(category_ids=[1, 1]), ["'category_ids'", "[1, 1]"]),
        (good_doc(category_ids=[1, "2"]), ["'category_ids'"]),
    ],
    ids=[
        "list",
        "string",
        "deep",
        "5000-digit",
        "4000-digit",
        "one-class",
        "short-names",
        "repeated-ids",
        "string-id",
    ],
)
def test_crafted_checkpoint_metadata_is_one_checkpoint_error(
    tmp_path: Path, text: str, needles: list[str]
) -> None:
    path = tmp_path / "forged.safetensors"
    path.write_bytes(forged_checkpoint(text))
    for read in (load_checkpoint, read_checkpoint_metadata):
        with pytest.raises(CheckpointError) as e:
            read(path)
        one_line(e, str(path), *needles)


def test_a_crafted_safetensors_header_is_one_checkpoint_error() -> None:
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    with pytest.raises(CheckpointError) as e:
        checkpoint_from_bytes(struct.pack("<Q", len(deep)) + deep, "x.safetensors")
    one_line(e, "x.safetensors", "header is nested too deeply")


def write_ann(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_coco_integers_beyond_python_or_int64_are_data_errors(data: Path, tmp_path: Path) -> None:
    text = (data / "val.json").read_text()
    doc = json.loads(text)
    first = doc["images"][0]["id"]
    huge = text.replace(f'"id": {first},', '"id": ' + "9" * 5000 + ",", 1)
    (tmp_path / "huge.json").write_text(huge)
    with pytest.raises(DataError) as e:
        validate(tmp_path / "huge.json", data / "images")
    one_line(e, "huge.json: invalid JSON", "5000 digits")

    doc["images"][0]["id"] = 2**70
    with pytest.raises(DataError) as e:
        validate(write_ann(tmp_path / "big.json", doc), data / "images")
    one_line(e, "big.json: images[0]: id 1180591620717411303424 does not fit in 64 bits")

    doc = json.loads(text)
    doc["annotations"][0]["bbox"][2] = 10**400
    with pytest.raises(DataError) as e:
        validate(write_ann(tmp_path / "bbox.json", doc), data / "images")
    one_line(e, f"annotation id {doc['annotations'][0]['id']}", "non-finite")


def png_bomb(path: Path, side: int = 40_000) -> None:
    """A valid PNG header declaring ``side``×``side`` pixels (a few dozen bytes on disk)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


@pytest.fixture
def bomb_data(data: Path, tmp_path: Path) -> tuple[Path, int, Path]:
    """A copy of the dataset whose first training image declares 40000×40000 pixels."""
    out = tmp_path / "bomb"
    shutil.copytree(data, out)
    record = json.loads((out / "train.json").read_text())["images"][0]
    image = out / "images" / record["file_name"]
    png_bomb(image)
    return out, record["id"], image


def test_a_decompression_bomb_is_a_data_error_naming_the_image(
    bomb_data: tuple[Path, int, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, image_id, image = bomb_data
    ann = root / "train.json"
    with pytest.raises(DataError) as e:
        validate(ann, root / "images")
    one_line(e, f"{ann}: image id {image_id}: {image}: image too large to decode safely")
    ds = CocoDataset(ann, root / "images")  # header-free construction still works
    index = ds.image_ids.index(image_id)
    with pytest.raises(DataError) as e:
        ds[index]
    one_line(e, f"image id {image_id}: {image}", "1600000000 pixels")
    with pytest.raises(DataError) as e:
        load_image(image)
    one_line(e, f"{image}: image too large to decode safely")
    err = cli_error(capsys, "data", "check", "--ann", ann, "--images", root / "images")
    assert str(image) in err and "too large" in err
    err = cli_error(capsys, "latency", "tiny-r18-fpn", "--images", image, "--repeats", "1")
    assert str(image) in err and "too large" in err


@pytest.mark.parametrize("command", ["latency", "flops"])
def test_a_pickle_given_as_a_model_is_refused_by_its_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pt)
    err = cli_error(capsys, command, pt)
    assert f"{pt}: not a detector spec (.yaml/.yml or a preset name)" in err
    assert ".safetensors" in err and "jdsearch import" in err


def test_a_binary_file_named_yaml_is_one_spec_error(tmp_path: Path) -> None:
    fake = tmp_path / "spec.yaml"
    torch.save({"w": torch.zeros(2)}, fake)
    with pytest.raises(SpecError) as e:
        read_yaml(fake)
    one_line(e, f"{fake}: not a YAML text file")


def tiny_spec(**rpn: Any) -> dict[str, Any]:
    spec = load_spec("tiny-r18-fpn").to_dict()
    spec["rpn"].update(rpn)
    return spec


@pytest.mark.parametrize(
    ("anchor", "needle"),
    [
        (10**30, "1000000000000000000000000000000 does not fit in 64 bits"),
        (MAX_ANCHOR_SIZE + 1, f"{MAX_ANCHOR_SIZE + 1} is larger than {MAX_ANCHOR_SIZE} pixels"),
    ],
    ids=["1e30", "over-the-cap"],
)
def test_absurd_anchor_sizes_are_refused(tmp_path: Path, anchor: int, needle: str) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(json.dumps(tiny_spec(anchor_sizes=[8, 16, 32, 64, anchor])))  # JSON is YAML
    with pytest.raises(SpecError) as e:
        load_spec(path)
    one_line(e, f"{path}: rpn.anchor_sizes: {needle}")
    assert spec_from_dict(tiny_spec(anchor_sizes=[8, 16, 32, 64, MAX_ANCHOR_SIZE])).rpn


def test_absurd_backbone_widths_are_refused() -> None:
    with pytest.raises(SpecError) as e:
        BackboneArch.parse(f"[(16, {MAX_WIDTH + 1})], [(32, 32)], [(64, 64)], [(128, 128)]")
    one_line(e, "stage 1 block 1", f"width {MAX_WIDTH + 1} is more than {MAX_WIDTH} channels")
    with pytest.raises(SpecError) as e:
        BackboneArch.parse("[(" + "9" * 5000 + ", 16)], [(32, 32)], [(64, 64)], [(128, 128)]")
    one_line(e, "stage 1 block 1: cannot read", "up to 9 digits")


# ---------------------------------------------------------------------- 3. categories
@pytest.fixture(scope="module")
def val(data: Path) -> CocoDataset:
    return CocoDataset(data / "val.json", data / "images")


def with_categories(data: Path, tmp_path: Path, change: Any) -> Path:
    """A copy of the dataset whose ``val.json`` categories (and annotations) went through
    ``change(doc)``."""
    out = tmp_path / "changed"
    shutil.copytree(data, out)
    doc = json.loads((out / "val.json").read_text())
    change(doc)
    write_ann(out / "val.json", doc)
    return out


def fewer(doc: dict[str, Any]) -> None:
    doc["categories"] = doc["categories"][:2]
    doc["annotations"] = [a for a in doc["annotations"] if a["category_id"] in (1, 2)]


def test_categories_match_by_id_and_name(val: CocoDataset) -> None:
    k = len(NAMES) + 1
    assert match_categories(val, k, NAMES, tuple(range(1, 7))) == tuple(range(1, 7))
    # By name when no ids are recorded, in the detector's own class order.
    assert match_categories(val, k, NAMES[::-1]) == tuple(range(6, 0, -1))
    with pytest.raises(DataError) as e:
        match_categories(val, k, NAMES, (1, 2, 3, 4, 5, 60), source="m.safetensors")
    one_line(e, "val.json: categories do not match m.safetensors", "'bar' has category id 60")
    renamed = ("disc", "ring", "square", "triangle", "cross", "zebra")
    with pytest.raises(DataError) as e:
        match_categories(val, k, renamed, tuple(range(1, 7)))
    one_line(e, "category id 6 is 'bar' here, 'zebra' there")
    with pytest.raises(DataError) as e:
        match_categories(val, k, renamed)
    one_line(e, "class 6 'zebra' is not a category here")
    with pytest.raises(DataError) as e:
        match_categories(val, k + 1)
    one_line(e, "6 categories here, 7 classes there")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (fewer, "2 categories here, 6 classes there"),
        (
            lambda d: d["categories"].append({"id": 99, "name": "extra"}),
            "7 categories here, 6 classes there",
        ),
        (
            lambda d: d["categories"][0].__setitem__("name", "zebra"),
            "category id 1 is 'zebra' here, 'disc' there",
        ),
    ],
    ids=["fewer", "more", "renamed"],
)
def test_eval_refuses_other_categories_before_evaluating(
    data: Path,
    ckpt: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    change: Any,
    needle: str,
) -> None:
    changed = with_categories(data, tmp_path, change)

    def no_eval(*_: Any, **__: Any) -> Any:
        raise AssertionError("evaluated despite the mismatch")

    monkeypatch.setattr("jdsearch.engine.evaluate.evaluate", no_eval)
    err = cli_error(capsys, "eval", ckpt, "--data", changed, "--sizes", "64x64")
    assert f"{changed / 'val.json'}: categories do not match {ckpt}: {needle}" in err


def test_train_refuses_other_val_categories_before_training(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    changed = with_categories(data, tmp_path, fewer)

    def no_train(*_: Any, **__: Any) -> Any:
        raise AssertionError("trained despite the mismatch")

    monkeypatch.setattr("jdsearch.engine.train.train", no_train)
    out = tmp_path / "m.safetensors"
    err = cli_error(capsys, "train", "tiny-r18-fpn", "--data", changed, "--out", out, "--quiet")
    assert "val.json: categories do not match" in err and "train.json" in err
    assert not out.exists()


def test_train_refuses_an_init_checkpoint_of_other_categories(
    data: Path, tmp_path: Path, detector: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    other = save_checkpoint(
        tmp_path / "other.safetensors", detector, class_names=NAMES, category_ids=range(11, 17)
    )
    out = tmp_path / "m.safetensors"
    err = cli_error(
        capsys, "train", "--init", other, "--data", data, "--out", out, "--quiet", "--no-eval"
    )
    assert f"train.json: categories do not match {other}: its class 1 'disc'" in err
    assert not out.exists()


def test_train_records_category_ids_and_saves_before_evaluating(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from jdsearch.core.errors import JDSearchError

    def failing_eval(*_: Any, **__: Any) -> Any:
        raise JDSearchError("evaluation failed")

    monkeypatch.setattr("jdsearch.engine.evaluate.evaluate", failing_eval)
    out = tmp_path / "m.safetensors"
    argv = ["train", "tiny-r18-fpn", "--data", data, "--out", out, "--quiet", "--iters", "1"]
    err = cli_error(capsys, *argv, "--fixed-size", "--batch-size", "2")
    assert "evaluation failed" in err
    saved = load_checkpoint(out)  # the trained model survived the failed evaluation
    assert saved.category_ids == tuple(range(1, 7)) and saved.foreground_names == NAMES


def test_predict_with_ann_refuses_other_categories(
    exported: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changed = with_categories(data, tmp_path, fewer)
    out = tmp_path / "preds.json"
    err = cli_error(
        capsys, "predict", exported, changed / "images", "--out", out, "--ann", changed / "val.json"
    )
    assert "categories do not match" in err and "2 categories here, 6 classes there" in err
    assert not out.exists()


# ---------------------------------------------------------------------- --data, a folder
@pytest.mark.parametrize(
    ("argv", "files"),
    [
        (("train", "--out", "m.safetensors"), "--train FILE --val FILE --images DIR"),
        (("init", "--out", "s.yaml"), "--train FILE --val FILE --images DIR"),
        (("eval", "CKPT"), "--ann FILE --images DIR"),
    ],
    ids=["train", "init", "eval"],
)
def test_data_naming_a_coco_file_is_refused_saying_how_to_give_files(
    data: Path,
    ckpt: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    files: str,
) -> None:
    """``--data`` is a dataset folder in every command; a JSON given there was read as a folder
    (``train.json/train.json: cannot read annotation file (Not a directory)``)."""
    monkeypatch.chdir(tmp_path)
    ann = data / "train.json"
    err = cli_error(capsys, *[str(ckpt) if a == "CKPT" else a for a in argv], "--data", ann)
    assert err.startswith(f"jdsearch: error: --data {ann}: a dataset folder (images/, "), err
    assert f"not a file; give annotation files with {files}" in err
    assert list(tmp_path.iterdir()) == []


def test_train_takes_annotation_files_where_they_lie_as_init_does(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """COCO 2017's layout: each split's file and image folder named, no --data."""
    out = tmp_path / "m.safetensors"
    files = ("--train", data / "train.json", "--val", data / "val.json")
    quick = ("--iters", "1", "--batch-size", "2", "--fixed-size", "--quiet", "--no-eval")
    err = cli_error(capsys, "train", *files, "--out", out, *quick)  # no image folder
    assert err == (
        "jdsearch: error: train: give --data DIR, or --train, --val and --images "
        "(or --train-images and --val-images)\n"
    )
    code, printed, err = cli(
        capsys, "train", *files, "--images", data / "images", "--out", out, *quick
    )
    assert code == 0, err
    assert f"on {data / 'train.json'} (" in printed
    saved = load_checkpoint(out)
    assert saved.extra["data"] == str(data / "train.json") and saved.foreground_names == NAMES


# ---------------------------------------------------------------------- 4-5. boxes
def test_a_box_flat_in_float32_is_refused_before_training(data: Path, tmp_path: Path) -> None:
    doc = json.loads((data / "train.json").read_text())
    ann = doc["annotations"][0]
    ann["bbox"] = [10.0, 10.0, 1e-9, 5.0]
    path = write_ann(tmp_path / "flat.json", doc)
    with pytest.raises(DataError) as e:
        CocoDataset(path, data / "images")
    one_line(
        e, f"annotation id {ann['id']}", "bbox [10.0, 10.0, 1e-09, 5.0] is 0 px wide", "float32"
    )
    ann["bbox"] = [10.0, 10.0, 5.0, 1e-9]
    with pytest.raises(DataError) as e:
        validate(write_ann(tmp_path / "flat.json", doc), data / "images")
    one_line(e, "0 px high")
    ann["bbox"] = [10.0, 10.0, 0.01, 5.0]  # thin but trainable
    CocoDataset(write_ann(tmp_path / "thin.json", doc), data / "images")


def test_crowd_boxes_are_left_out_of_training_and_reported(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = json.loads((data / "train.json").read_text())
    crowd = doc["annotations"][0]
    crowd["iscrowd"] = 1
    path = write_ann(tmp_path / "crowd.json", doc)
    code, out, _ = cli(capsys, "data", "check", "--ann", path, "--images", data / "images")
    assert code == 0 and "(1 crowd, left out of training)" in out

    ds = CocoDataset(path, data / "images")
    index = ds.image_ids.index(crowd["image_id"])
    ds = ds.subset([index])
    assert int(ds[0][1]["iscrowd"].sum()) == 1  # the dataset keeps it (evaluation needs it)
    torch.manual_seed(0)
    det = build_detector(load_spec("tiny-r18-fpn"), ds.num_classes)
    seen: list[list[dict[str, Any]]] = []
    det.register_forward_pre_hook(lambda _m, args: seen.append(args[1]))
    train(det, ds, TrainConfig(max_iters=1, batch_size=1, warmup_iters=1, hflip=0.0))
    (target,) = seen[0]
    n = len(ds[0][1]["boxes"])
    assert len(target["boxes"]) == len(target["labels"]) == n - 1
    assert int(target["iscrowd"].sum()) == 0
