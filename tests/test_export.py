"""Export folders: ONNX vs PyTorch, loading without search state, predict, latency, study access."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from jdsearch.cli import main
from jdsearch.core.errors import ExportError, JDSearchError
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import get_resolution, load_image, set_resolution
from jdsearch.engine.latency import measure_latency
from jdsearch.models import build_detector
from jdsearch.search.export import export_trial
from jdsearch.search.queries import open_study
from jdsearch.spec.detector import load_spec
from jdsearch.store.checkpoint import load_checkpoint
from jdsearch.store.export import INFO_FILE, ONNX_FILE, WEIGHTS_FILE, export_detector, load_detector
from jdsearch.store.onnx import check_onnx, export_onnx

NAMES = ["circle", "square", "triangle", "star", "ring", "cross"]


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_detector(load_spec("tiny-r18-fpn"), len(NAMES) + 1).eval()


@pytest.fixture(scope="module")
def trained(search_assets):
    """A trained detector: with random weights nearly all scores tie (≈ 1/K), so float noise of
    1e-7 lets NMS keep the other box of a tied pair and no two runtimes can be compared."""
    det = load_checkpoint(search_assets.base).detector
    det.roi_heads.score_thresh = (
        0.01  # the session's base is trained for seconds: keep its weak boxes
    )
    return det


def images(seed: int, *shapes: tuple[int, int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in shapes]


def run_onnx(path: Path, image: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["boxes", "scores", "labels"], {"image": image.numpy()})


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, trained, search_assets):
    out = tmp_path_factory.mktemp("export") / "det"
    checks = [load_image(p) for p in sorted((search_assets.data_dir / "images").iterdir())[:2]]
    return export_detector(
        trained,
        out,
        class_names=NAMES,
        input_size="96x64",
        category_ids=[3, 5, 7, 9, 11, 13],
        check_images=checks,
    )


def test_export_folder_describes_and_hashes_its_files(exported) -> None:
    info = json.loads((exported.path / INFO_FILE).read_text())
    assert info["input_size"] == "96x64" and info["class_names"] == NAMES
    assert [c["id"] for c in info["categories"]] == [3, 5, 7, 9, 11, 13]
    assert info["arch"] == exported.detector.arch.encode()
    import hashlib

    for key, name in (("weights", WEIGHTS_FILE), ("onnx", ONNX_FILE)):
        assert (
            info["files"][key]["sha256"]
            == hashlib.sha256((exported.path / name).read_bytes()).hexdigest()
        )
    check = info["onnx_check"]
    assert check["images"] == 2 and check["detections"] > 0
    assert (
        check["max_box_diff"] <= check["box_atol"]
        and check["max_score_diff"] <= check["score_atol"]
    )


@pytest.mark.parametrize("view", ["as is", "crop 120x70", "crop 37x101", "upscaled 200x200"])
def test_onnx_graph_matches_the_loaded_pytorch_detector(exported, search_assets, view: str) -> None:
    """Any input size (dynamic axes), resized inside the graph as PyTorch does. Real image content:
    a squashed or noise image makes even a trained detector output tied scores, and NMS may then
    keep either box of a tied pair in either runtime."""
    det = load_detector(exported.path)
    real = load_image(sorted((search_assets.data_dir / "images").iterdir())[5])
    image = {
        "as is": real,
        "crop 120x70": real[:, 4:124, 10:80],
        "crop 37x101": real[:, 20:57, 3:104],
        "upscaled 200x200": torch.nn.functional.interpolate(
            real[None], size=(200, 200), mode="bilinear"
        )[0],
    }[view].contiguous()
    with torch.no_grad():
        ref = det([image])[0]
    boxes, scores, labels = run_onnx(exported.path / ONNX_FILE, image)
    assert len(scores) == len(ref["scores"]) > 0
    # Random weights give near-tied scores, so the two orders may differ: pair detections up
    # one-to-one by label and nearest box, then compare.
    free = np.ones(len(scores), dtype=bool)
    for box, score, label in zip(
        ref["boxes"].numpy(), ref["scores"].numpy(), ref["labels"].numpy(), strict=True
    ):
        cand = np.flatnonzero(free & (labels == label))
        assert len(cand), f"no ONNX detection of label {label}"
        j = cand[np.argmin(np.abs(boxes[cand] - box).max(axis=1))]
        free[j] = False
        np.testing.assert_allclose(boxes[j], box, atol=1e-3)
        assert abs(scores[j] - score) < 1e-4


def test_loaded_detector_equals_the_exported_one_at_the_chosen_size(exported, trained) -> None:
    det = load_detector(exported.path)
    assert get_resolution(det) == Resolution(96, 64) and not det.training
    assert det.class_names == tuple(NAMES)
    src = copy.deepcopy(trained)
    set_resolution(src, Resolution(96, 64))
    (image,) = images(3, (100, 150))
    with torch.no_grad():
        a, b = det([image])[0], src([image])[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])


def test_check_onnx_fails_when_the_graphs_disagree(tmp_path: Path) -> None:
    path = export_onnx(tiny(0), tmp_path / "a.onnx")
    other = tiny(1)  # different weights
    with pytest.raises(ExportError, match=r"a\.onnx: ONNX and PyTorch disagree on check image 0"):
        check_onnx(path, other, images(0, (64, 96)))


def test_damaged_exports_are_refused_with_one_line_naming_the_file(
    exported, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(exported.path, bad)
    data = bytearray((bad / WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (bad / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ExportError, match=rf"{WEIGHTS_FILE}: sha256 does not match") as e:
        load_detector(bad)
    assert "\n" not in str(e.value)
    (bad / WEIGHTS_FILE).unlink()
    with pytest.raises(ExportError, match=r"weights file named in detector\.json is missing"):
        load_detector(bad)
    with pytest.raises(ExportError, match="not an export folder"):
        load_detector(tmp_path)
    (bad / INFO_FILE).write_text("{not json")
    with pytest.raises(ExportError, match=r"detector\.json: unreadable"):
        load_detector(bad)


def test_export_folder_loads_in_a_fresh_process_without_optuna(exported, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere"
    shutil.copytree(exported.path, moved)
    code = (
        "import sys, torch, jdsearch\n"
        f"d = jdsearch.load_detector({str(moved)!r})\n"
        "out = d([torch.rand(3, 64, 96)])[0]\n"
        "assert set(out) == {'boxes', 'scores', 'labels'}\n"
        "print(sorted(m for m in ('optuna', 'sqlalchemy', 'onnxruntime') if m in sys.modules))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert r.stdout.strip() == "[]"


# ---------------------------------------------------------------------- latency
def test_latency_times_batch_one_at_the_requested_size() -> None:
    det = tiny()
    det.train()
    seen: list[tuple[int, ...]] = []
    handle = det.backbone.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    try:
        lat = measure_latency(
            det, "128x96", warmup=2, repeats=5, images=images(0, (300, 200), (50, 80))
        )
    finally:
        handle.remove()
    assert len(seen) == 7 and all(s == (1, 3, 96, 128) for s in seen)  # batch 1, exactly 128x96
    assert lat.repeats == 5 and lat.size == "128x96" and lat.device == "cpu"
    assert lat.p10_ms <= lat.median_ms <= lat.p90_ms and lat.images_per_s == pytest.approx(
        1000 / lat.median_ms
    )
    assert det.training and get_resolution(det) == load_spec("tiny-r18-fpn").input.size  # restored


# ---------------------------------------------------------------------- from a study
def test_export_trial_writes_the_best_student_at_its_best_resolution(
    small_study, tmp_path: Path
) -> None:
    handle = open_study(small_study.url, small_study.name)
    best = handle.trial()
    assert best.value == max(t.value for t in handle.study.trials if t.value is not None)
    e = export_trial(handle, tmp_path / "best")
    assert (
        e.info["source"]["trial"] == best.number
        and e.info["input_size"] == best.user_attrs["best_resolution"]
    )
    assert e.info["arch"] == best.user_attrs["student"]
    assert (
        e.info["source"]["lineage"][-1]["trial"] == best.number
        and e.info["source"]["lineage"][0]["move"] == "base"
    )
    assert e.info["onnx_check"]["images"] == 3  # the study's own validation images
    # the synthetic dataset's category ids, in label order
    cats = json.loads((small_study.data_dir / "train.json").read_text())["categories"]
    assert [c["id"] for c in e.info["categories"]] == [c["id"] for c in cats]
    # weights are the trial's checkpoint
    ref = handle.checkpoint(best).detector
    set_resolution(ref, Resolution.parse(best.user_attrs["best_resolution"]))
    image = load_image(next((small_study.data_dir / "images").iterdir()))
    with torch.no_grad():
        a, b = load_detector(e.path)([image])[0], ref([image])[0]
    assert torch.equal(a["boxes"], b["boxes"])


def test_study_access_errors_name_what_exists(small_study, tmp_path: Path) -> None:
    with pytest.raises(JDSearchError, match=r"no study 'nope' \(studies: small\)"):
        open_study(small_study.url, "nope")
    with pytest.raises(JDSearchError, match="no such database file"):
        open_study(f"sqlite:///{tmp_path / 'missing.db'}", "small")
    assert not (tmp_path / "missing.db").exists()
    handle = open_study(small_study.url)  # the only study
    with pytest.raises(JDSearchError, match="has no trial 999"):
        handle.trial(999)


def test_cli_export_predict_latency(
    small_study, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exp"
    assert (
        main(
            [
                "export",
                "--storage",
                small_study.url,
                "--study",
                small_study.name,
                "--trial",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert (
        "exported trial 2 of study 'small'" in text and "ONNX" in text and "matches PyTorch" in text
    )
    info = json.loads((out / INFO_FILE).read_text())
    assert info["source"]["trial"] == 2

    data = small_study.data_dir
    preds = tmp_path / "preds.json"
    val = json.loads((data / "val.json").read_text())
    files = [str(data / "images" / im["file_name"]) for im in val["images"][:4]]
    assert (
        main(["predict", str(out), *files, "--out", str(preds), "--ann", str(data / "val.json")])
        == 0
    )
    text = capsys.readouterr().out
    assert "detections on 4 images" in text and "AP50" in text
    rows = json.loads(preds.read_text())
    ids = {im["file_name"]: im["id"] for im in val["images"]}
    cat_ids = {c["id"] for c in val["categories"]}
    assert rows and all(
        r["image_id"] == ids[r["file_name"]] and r["category_id"] in cat_ids for r in rows
    )
    assert all(len(r["bbox"]) == 4 and r["bbox"][2] >= 0 and 0 <= r["score"] <= 1 for r in rows)

    assert (
        main(
            [
                "latency",
                str(out),
                "tiny-r18-fpn",
                "--repeats",
                "3",
                "--warmup",
                "1",
                "--size",
                "96x64",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "speed-up" in text and text.count("img/s") == 2

    assert main(["predict", str(tmp_path), files[0], "--out", str(preds)]) == 2
    assert "not an export folder" in capsys.readouterr().err


def test_a_check_that_would_compare_nothing_compares_at_score_zero(trained, tmp_path: Path) -> None:
    det = copy.deepcopy(trained)
    det.roi_heads.score_thresh = (
        0.999  # nothing survives: comparing the shipped graph proves nothing
    )
    e = export_detector(det, tmp_path / "x", class_names=NAMES, check_images=images(0, (64, 96)))
    check = e.info["onnx_check"]
    assert check["score_thresh"] == 0.0 and check["detections"] > 0
    assert e.info["spec"]["roi_heads"]["score_thresh"] == 0.999  # the shipped graph keeps its own
    assert e.info["categories_source"].startswith("assumed")


def test_export_away_from_the_data_uses_the_ids_recorded_in_the_study(
    small_study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The stored data.dir is relative to where the search ran; elsewhere the category ids
    still come from the study and the check falls back to noise images, saying so."""
    handle = open_study(small_study.url, small_study.name)
    monkeypatch.chdir(tmp_path)
    moved = dataclasses.replace(
        handle,
        spec=dataclasses.replace(
            handle.spec, data=dataclasses.replace(handle.spec.data, dir=Path("gone"))
        ),
    )
    with caplog.at_level("WARNING", logger="jdsearch.store.export"):
        e = export_trial(moved, tmp_path / "away")
    cats = json.loads((small_study.data_dir / "train.json").read_text())["categories"]
    assert [c["id"] for c in e.info["categories"]] == [c["id"] for c in cats]
    assert e.info["categories_source"] == "study"
    assert e.info["onnx_check"]["image_source"].startswith("noise")
    assert "noise images" in caplog.text


def test_errors_hide_the_database_password() -> None:
    with pytest.raises(JDSearchError) as e:
        open_study("postgresql+psycopg2://alice:s3cretPW@127.0.0.1:1/db", "x")
    assert (
        "s3cretPW" not in str(e.value) and "alice:***@" in str(e.value) and "\n" not in str(e.value)
    )


def test_a_missing_checkpoint_artifact_is_one_line(small_study, tmp_path: Path) -> None:
    from jdsearch.storage.artifacts import SQLArtifactStore

    db = tmp_path / "copy.db"
    shutil.copyfile(small_study.url.removeprefix("sqlite:///"), db)
    handle = open_study(f"sqlite:///{db}")
    best = handle.trial()
    SQLArtifactStore(f"sqlite:///{db}").remove(best.user_attrs["checkpoint"])
    with pytest.raises(
        JDSearchError, match=rf"checkpoint of trial {best.number} \(artifact .*\) is missing"
    ):
        export_trial(handle, tmp_path / "x")


def test_re_export_without_onnx_leaves_no_stale_graph(exported, tmp_path: Path, trained) -> None:
    """A folder re-exported with --no-onnx must not keep the previous detector's ONNX file."""
    again = tmp_path / "again"
    shutil.copytree(exported.path, again)
    other = copy.deepcopy(trained)
    with torch.no_grad():
        other.roi_heads.box_predictor.cls_score.bias.add_(1.0)
    e = export_detector(other, again, class_names=NAMES, onnx=False)
    assert (
        not (again / ONNX_FILE).exists()
        and "onnx" not in e.info["files"]
        and e.info["onnx_check"] is None
    )
    assert torch.equal(
        load_detector(again).roi_heads.box_predictor.cls_score.bias,
        other.roi_heads.box_predictor.cls_score.bias,
    )
