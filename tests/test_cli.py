"""The command line as a user runs it: every command on tiny inputs, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jdsearch.cli import main
from jdsearch.store.checkpoint import load_checkpoint


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_flops_prints_the_paper_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "flops", "r50-fpn", "--size", "1333x800")
    assert code == 0
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert abs(float(total.split()[1]) - 215.8) / 215.8 < 0.02


def test_errors_are_one_line_with_exit_code_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "flops", "no-such-detector")
    assert (
        code == 2 and err.startswith("jdsearch: error: no-such-detector") and err.count("\n") == 1
    )
    bad = tmp_path / "ann.json"
    bad.write_text(
        json.dumps(
            {
                "images": [],
                "annotations": [],
                "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}],
            }
        )
    )
    code, _, err = run(capsys, "data", "check", "--ann", str(bad), "--images", str(tmp_path))
    assert code == 2 and "ann.json" in err and err.count("\n") == 1
    code, _, err = run(
        capsys, "eval", str(tmp_path / "missing.safetensors"), "--data", str(tmp_path)
    )
    assert code == 2 and "missing.safetensors" in err


@pytest.mark.slow
def test_synth_train_eval_evolve_and_distil(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    code, out, _ = run(
        capsys, "data", "synth", "--out", str(data), "--images", "24", "--seed", "3", "--size", "96"
    )
    assert code == 0 and (data / "train.json").is_file() and "classes:" in out
    code, out, _ = run(
        capsys, "data", "check", "--ann", str(data / "train.json"), "--images", str(data / "images")
    )
    assert code == 0 and out.strip().endswith("ok")

    base = tmp_path / "base.safetensors"
    code, out, _ = run(
        capsys,
        "train",
        "tiny-r18-fpn",
        "--data",
        str(data),
        "--iters",
        "4",
        "--out",
        str(base),
        "--quiet",
        "--resolutions",
        "64x64",
        "96x96",
    )
    assert code == 0, out
    assert "96x96" in out and "saved" in out
    ckpt = load_checkpoint(base)
    assert ckpt.extra["train"]["iterations"] == 4 and "eval" in ckpt.extra

    code, out, _ = run(
        capsys,
        "eval",
        str(base),
        "--data",
        str(data),
        "--sizes",
        "64x64",
        "--json",
        str(tmp_path / "m.json"),
    )
    assert code == 0 and "64x64" in out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"64x64"}
    # A split in its own folder (COCO's val2017/): the same images, the same AP.
    val = json.loads((data / "val.json").read_text())
    (tmp_path / "val2017").mkdir()
    for image in val["images"]:
        shutil.copyfile(
            data / "images" / image["file_name"], tmp_path / "val2017" / image["file_name"]
        )
    ann, folder = str(data / "val.json"), str(tmp_path / "val2017")
    argv = ["eval", str(base), "--ann", ann, "--images", folder, "--sizes", "64x64"]
    code, out, _ = run(capsys, *argv, "--json", str(tmp_path / "m2.json"))
    assert code == 0, out
    again = json.loads((tmp_path / "m2.json").read_text())["64x64"]
    assert again["AP"] == metrics["64x64"]["AP"]
    code, _, err = run(capsys, "eval", str(base), "--ann", ann)
    assert code == 2 and "eval: give --ann and --images together (or --data DIR)" in err

    child = tmp_path / "child.safetensors"
    code, out, _ = run(capsys, "evolve", str(base), "add_layer:3", "--out", str(child))
    assert code == 0 and "new" in out
    child_ckpt = load_checkpoint(child)
    assert child_ckpt.spec.arch.depths == (2, 2, 3, 2)
    assert child_ckpt.extra["lineage"] == ["add_layer:3"]
    code, _, err = run(capsys, "evolve", str(base), "rearrange:1->3", "--out", str(child))
    assert code == 2 and "rearrange" in err

    student = tmp_path / "student.safetensors"
    code, out, _ = run(
        capsys,
        "train",
        "--init",
        str(child),
        "--teacher",
        str(base),
        "--data",
        str(data),
        "--iters",
        "3",
        "--out",
        str(student),
        "--quiet",
        "--no-eval",
        "--fixed-size",
    )
    assert code == 0, out
    losses = load_checkpoint(student).extra["train"]["final_losses"]
    assert {"loss_kd_feat", "loss_kd_cls", "loss_kd_loc", "loss_bn_sparsity"} <= set(losses)


def test_threads_option_sets_torch_threads(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["--threads", "2", "flops", "tiny-r18-fpn"]) == 0
        assert torch.get_num_threads() == 2
        assert main(["--threads", "0", "flops", "tiny-r18-fpn"]) == 2
        assert "--threads must be ≥ 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_the_command_line_lets_idle_openmp_threads_sleep(tmp_path: Path) -> None:
    """OMP_WAIT_POLICY is PASSIVE when torch loads under the CLI (spinning threads collapse next
    to a busy process: bench/train_throughput.py --contend), and a user's own choice stands."""
    code = (
        "import os, sys; from jdsearch.cli import main; rc = main(['flops', 'tiny-r18-fpn']); "
        "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules, rc)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        if given:
            env["OMP_WAIT_POLICY"] = given
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path
        )
        assert done.stdout.splitlines()[-1] == f"{expected} True 0", done.stderr


def test_a_small_detector_trains_on_one_thread_unless_the_user_chose(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default thread count by detector size (bench/train_throughput.py --contend): one
    thread for a detector under 1 GFLOPs per image, torch's choice above; --threads and
    OMP_NUM_THREADS always win."""
    import torch

    from jdsearch.engine.threads import small_detector_threads, study_gflops
    from jdsearch.spec.study import load_study

    quickstart = study_gflops(load_study("studies/quickstart.yaml"))
    assert 0.05 < quickstart < 1.0  # the tiny R18-FPN at 208x128: a small detector
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        for gflops, threads, chosen in [(quickstart, None, 1), (18.0, None, 2), (0.1, 2, 2)]:
            torch.set_num_threads(2)
            small_detector_threads(threads, gflops)
            assert torch.get_num_threads() == chosen
        assert capsys.readouterr().out.count("torch threads: 1 (a small detector") == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        small_detector_threads(None, 0.1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_pool_train_writes_into_a_folder_that_does_not_exist_yet(
    search_assets, tmp_path: Path
) -> None:
    """The pool's phase states are saved next to the pool file from the first phase on: the folder
    must be made first (it was not: ``jdsearch pool train SPEC`` failed with a traceback)."""
    import yaml

    from .conftest import tiny_study_dict

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(tiny_study_dict(search_assets.data_dir, "fresh")))
    out = tmp_path / "new" / "folder" / "pool.safetensors"
    assert main(["pool", "train", str(spec), "--out", str(out), "--quiet"]) == 0
    assert out.is_file()


@pytest.mark.parametrize(
    ("flag", "values"),
    [
        ("--workers", ["0"]),
        ("--workers", ["-2"]),
        ("--classes", ["0"]),
        ("--classes", ["37"]),
        ("--object-size", ["0.5", "0.2"]),
        ("--object-size", ["0.1", "1.5"]),
        ("--size", ["16"]),
        ("--size", ["96", "64"]),
    ],
)
def test_data_synth_refuses_a_bad_flag_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flag: str, values: list[str]
) -> None:
    out = tmp_path / "data"
    argv = ["data", "synth", "--out", str(out), "--images", "4", flag, *values]
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.startswith(f"jdsearch: error: {flag}: ") and err.count("\n") == 1
    assert values[0] in err and not out.exists()


def test_data_synth_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "data"
    argv = ["data", "synth", "--out", str(out), "--images", "6", "--size", "64"]
    code, text, _ = run(capsys, *argv, "--classes", "8", "--object-size", "0.1", "0.4")
    assert code == 0 and "classes: red disc, red ring" in text and "green ring" in text
    doc = json.loads((out / "train.json").read_text())
    assert len(doc["categories"]) == 8
    assert {(im["width"], im["height"]) for im in doc["images"]} == {(64, 64)}
    assert all(np.sqrt(a["area"]) <= 1.2 * 0.4 * 64 + 1 for a in doc["annotations"])
