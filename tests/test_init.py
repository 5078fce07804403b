"""``jdsearch init``'s rules (resolution ladder, R_base, budgets, pool family) and the spec it
writes: it loads, explains itself, names its inputs and refuses to overwrite."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml

from jdsearch.cli import main
from jdsearch.core.errors import DataError, SpecError
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import CocoDataset
from jdsearch.init.init_study import (
    Budgets,
    budgets,
    init_study,
    matched_pool,
    native_size,
    resolution_ladder,
)
from jdsearch.spec.detector import load_spec
from jdsearch.spec.pool import PoolSpec
from jdsearch.spec.pool_space import SubnetConfig
from jdsearch.spec.study import load_study

from .test_user_layout import write_user_set

R = Resolution.parse


def _ladder(*texts: str) -> tuple[Resolution, ...]:
    return tuple(R(t) for t in texts)


# ---------------------------------------------------------------------- the resolution ladder
def test_ladder_is_the_papers_scaled_to_the_native_size() -> None:
    # COCO's training size gives the paper's short sides (512, 600, 720, 800), at COCO's aspect.
    assert resolution_ladder(R("1333x800")) == _ladder(
        "856x512", "1000x600", "1200x720", "1333x800"
    )
    # The quickstart's 128-px squares give its short sides 80, 96, 112, 128.
    assert resolution_ladder(R("128x128")) == _ladder("80x80", "96x96", "112x112", "128x128")


@pytest.mark.parametrize("native", ["640x480", "1920x1080", "333x250", "100x64", "4000x3000"])
def test_every_ladder_rises_to_the_native_size_in_multiples_of_8(native: str) -> None:
    ladder = resolution_ladder(R(native))
    assert len(ladder) == 4 and ladder[-1] == R(native)
    assert [r.pixels for r in ladder] == sorted({r.pixels for r in ladder})
    for rung in ladder[:-1]:
        assert rung.long % 8 == 0 and rung.short % 8 == 0
        assert rung.long <= R(native).long and rung.short <= R(native).short
    assert ladder[0].short == pytest.approx(0.64 * R(native).short, abs=4)


def test_small_images_give_fewer_distinct_rungs_and_tiny_ones_an_error() -> None:
    assert resolution_ladder(R("40x32")) == _ladder("24x24", "32x24", "40x32")
    with pytest.raises(SpecError, match="native image size 40x24: a short side under 32 px"):
        resolution_ladder(R("40x24"))


def test_native_size_is_the_median_long_by_the_median_short_side() -> None:
    # Portrait images count by their long side, as torchvision's resize treats them.
    assert native_size([(640, 480), (480, 640), (1280, 720)]) == R("640x480")
    assert native_size([(100, 80), (120, 90)]) == R("110x85")
    with pytest.raises(DataError):
        native_size([])


# ---------------------------------------------------------------------- budgets
def test_budgets_are_the_papers_at_cocos_size() -> None:
    assert budgets(118_287) == Budgets(12, (48, 24, 36), 3.0, 20)


def test_budgets_scale_with_the_number_of_training_images() -> None:
    assert budgets(1_000) == Budgets(20, (80, 40, 60), 5.0, 100)  # ceil(20 000 / 1 000)
    assert budgets(5_000) == Budgets(12, (48, 24, 36), 3.0, 50)
    assert budgets(24) == Budgets(100, (400, 200, 300), 25.0, 100)  # capped at 100 epochs
    plans = [budgets(n) for n in (10, 100, 500, 1_000, 1_001, 3_000, 10_001, 10**6)]
    for small, large in itertools.pairwise(plans):  # more images: never more of either
        assert large.base_epochs <= small.base_epochs and large.n_trials <= small.n_trials
    for plan in plans:  # the paper's proportions at every size
        assert plan.pool_epochs == tuple(k * plan.base_epochs for k in (4, 2, 3))
        assert plan.fast_eval_epochs == plan.base_epochs / 4
    with pytest.raises(DataError, match="no images"):
        budgets(0)


# ---------------------------------------------------------------------- the pool's family
def _pool(preset: str, n: int = 118_287):
    ladder = resolution_ladder(R("1333x800"))
    return matched_pool(load_spec(preset).arch, preset, ladder, budgets(n), n)


def test_an_r50_base_gets_the_papers_pool() -> None:
    pool, paper = _pool("r50-fpn"), PoolSpec.paper()
    assert pool.kind == "bottleneck" and pool.base_widths == (64, 128, 256, 512)
    assert pool.space == paper.space  # d[2-3, 2-4, 2-23, 2-3] w[1, 1.25, 1.5] f[256, 320, 384]
    assert [p.space for p in pool.phases] == [p.space for p in paper.phases]
    assert [p.epochs for p in pool.phases] == [p.epochs for p in paper.phases]  # 48/24/36
    assert pool.detector == "r50-fpn" and pool.train.resolutions == resolution_ladder(R("1333x800"))


def test_a_basic_block_base_gets_a_basic_pool_of_its_widths() -> None:
    pool = _pool("r18-fpn")
    assert pool.kind == "basic" and pool.base_widths == (64, 128, 256, 512)
    assert pool.space.depths == ((2, 3), (2, 3, 4), (2, 3, 4, 5, 6), (2, 3))  # up to R34's
    assert pool.space.fpn == (256, 320, 384)
    # Stage 1 is 64 wide like r18's stem: its first block has no projection shortcut, which a
    # wider super-net's would have, so it stays at 1.0x and the base is one of the pool's
    # sub-networks; the other stages take 1, 1.25 and 1.5.
    assert pool.space.widths == ((1.0,),) + ((1.0, 1.25, 1.5),) * 3
    tiny = _pool("tiny-r18-fpn")
    assert tiny.kind == "basic" and tiny.base_widths == (16, 32, 64, 128)
    assert tiny.space.fpn == (32, 40, 48)


def test_a_resnext_base_gets_a_bottleneck_pool_of_its_output_widths() -> None:
    pool = _pool("x101-32x4d-fpn")
    assert pool.kind == "bottleneck" and pool.base_widths == (64, 128, 256, 512)
    assert pool.space.depths[2] == tuple(range(2, 24))


@pytest.mark.parametrize("preset", ["tiny-r18-fpn", "tiny-r50-fpn"])
def test_every_member_of_a_matched_pool_fits_its_super_net(preset: str) -> None:
    from jdsearch.methods.pool import ElasticPool

    ElasticPool(_pool(preset, 100), num_classes=4)  # raises SpecError on a member that does not fit


@pytest.mark.parametrize("preset", ["tiny-r18-fpn", "tiny-r50-fpn", "r18-fpn", "r50-fpn"])
def test_a_matched_pool_holds_its_base(preset: str) -> None:
    pool, base = _pool(preset), load_spec(preset)
    found = pool.base_config(load_spec(pool.detector), base)  # why not, in words
    assert found == SubnetConfig(base.arch.depths, (1.0,) * 4, base.arch.fpn), found


# ---------------------------------------------------------------------- the spec it writes
@pytest.fixture(scope="module")
def user_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_user_set(tmp_path_factory.mktemp("user") / "my data: v2")  # YAML-hostile name


def test_the_written_spec_loads_and_explains_its_choices(user_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "studies" / "mine.yaml"
    result = init_study(out, user_set, base="tiny-r18-fpn", device="cpu")
    spec = load_study(out)
    assert result.spec == spec and result.written == (out,)
    assert spec.name == "mine" and spec.data.dir == user_set  # quoted, read back as is
    assert spec.resolutions == resolution_ladder(R("112x80"))
    assert spec.base.detector == "tiny-r18-fpn" and spec.base.checkpoint is None
    assert spec.base.resolution == R("112x80")  # trained here: deployed at the native size
    assert spec.base.train.epochs == 100 and spec.fast_eval.epochs == 25
    assert [p.epochs for p in spec.pool.phases] == [400, 200, 300]
    assert spec.pool.detector == "tiny-r18-fpn" and spec.pool.kind == "basic"
    assert spec.data.max_val_images is None and spec.search.n_trials == 100
    text = out.read_text()
    for why in (
        "E = clamp(ceil(20000 / N), 12, 100) = 100",
        "Teacher pool matched to the base: basic blocks",
        "the largest at the dataset's native size",
        "No training boxes for unused",
        "# backbone_weights:",
    ):
        assert why in text, why


def test_init_refuses_to_overwrite_unless_forced(user_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine.yaml"
    out.write_text("# mine\n")
    with pytest.raises(SpecError, match=rf"^{out}: already exists; pass --force"):
        init_study(out, user_set, base="tiny-r18-fpn")
    assert out.read_text() == "# mine\n"
    init_study(out, user_set, base="tiny-r18-fpn", force=True)
    assert load_study(out).name == "mine"


def test_splits_with_other_categories_are_refused(user_set: Path, tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "images").symlink_to(user_set / "images")
    (data / "train.json").write_text((user_set / "train.json").read_text())
    val = json.loads((user_set / "val.json").read_text())
    val["categories"][0]["name"] = "renamed"
    (data / "val.json").write_text(json.dumps(val))
    with pytest.raises(DataError, match=rf"^{data / 'val.json'}: its categories differ") as e:
        init_study(tmp_path / "s.yaml", data, base="tiny-r18-fpn")
    assert e.value.details[0].startswith(
        f"{data / 'val.json'}: category id {val['categories'][0]['id']} is named 'renamed', in "
        f"{data / 'train.json'} "
    )
    assert not (tmp_path / "s.yaml").exists()


def _checkpoint(path: Path, classes: int) -> Path:
    from jdsearch.models import build_detector
    from jdsearch.store.checkpoint import save_checkpoint

    return save_checkpoint(path, build_detector(load_spec("tiny-r50-fpn"), classes + 1))


def test_a_checkpoint_base_is_deployed_at_its_own_size(user_set: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "base.safetensors", classes=3)
    out = tmp_path / "studies" / "ck.yaml"
    result = init_study(out, user_set, base=str(ckpt), device="cpu")
    spec, side = load_study(out), tmp_path / "studies" / "ck-base-detector.yaml"
    assert result.written == (out, side)
    assert spec.base.checkpoint == ckpt and spec.base.resolution == R("208x128")  # its input.size
    assert spec.base.detector == str(side) == spec.pool.detector
    assert load_spec(side).arch == load_spec("tiny-r50-fpn").arch  # the checkpoint's detector
    assert spec.pool.kind == "bottleneck" and spec.pool.base_widths == (8, 16, 32, 64)

    wrong = _checkpoint(tmp_path / "wrong.safetensors", classes=5)
    with pytest.raises(SpecError, match=rf"^{wrong}: the checkpoint has 5 classes but .* has 3"):
        init_study(tmp_path / "w.yaml", user_set, base=str(wrong))


def test_other_file_names_are_named_in_the_spec_and_nothing_is_linked(
    user_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    ann = tmp_path / "annotations"
    ann.mkdir()
    for split in ("train", "val"):
        (ann / f"instances_{split}.json").write_text((user_set / f"{split}.json").read_text())
    args = ["init", "--train", str(ann / "instances_train.json"), "--val"]
    args += [str(ann / "instances_val.json"), "--images", str(user_set / "images")]
    assert main([*args, "--base", "tiny-r18-fpn", "--out", "s/named.yaml", "--device", "cpu"]) == 0
    assert f"{ann / 'instances_train.json'} over {user_set / 'images'}/" in capsys.readouterr().out
    spec = load_study("s/named.yaml")
    assert spec.data.annotations("train") == ann / "instances_train.json"
    assert spec.data.annotations("val") == ann / "instances_val.json"
    assert spec.data.images("train") == spec.data.images("val") == user_set / "images"
    train = CocoDataset(spec.data.annotations("train"), spec.data.images("train"))
    assert len(train) == 24 and train.category_ids == [3, 7, 12]
    assert not Path("runs").exists()  # nothing linked, nothing copied
    # With --data, the spec names only what is not where data.dir's layout has it.
    args = ["init", "--data", str(user_set), "--val", str(ann / "instances_val.json")]
    assert main([*args, "--base", "tiny-r18-fpn", "--out", "s/val.yaml"]) == 0
    data = yaml.safe_load(Path("s/val.yaml").read_text())["data"]
    assert data == {
        "dir": str(user_set),
        "val": str(ann / "instances_val.json"),
        "max_val_images": None,
    }
    assert "--val " in Path("s/val.yaml").read_text().splitlines()[0]  # the command, as run
    assert main(["init", "--train", "t.json", "--out", "s/x.yaml"]) == 2
    assert (
        "give --data DIR, or --train, --val and --images (or --train-images and --val-images)"
        in capsys.readouterr().err
    )
    args = ["init", "--data", "d", "--images", "i", "--train-images", "t", "--val-images", "v"]
    assert main([*args, "--out", "s/x.yaml"]) == 2
    assert (
        "--images is unused: --train-images and --val-images name both" in capsys.readouterr().err
    )
    assert not [p for p in tmp_path.rglob("*") if p.is_symlink()]


def test_an_unknown_base_is_one_line_naming_it(user_set: Path, tmp_path: Path, capsys) -> None:
    args = ["init", "--data", str(user_set), "--out", str(tmp_path / "s.yaml")]
    assert main([*args, "--base", "r7-fpn"]) == 2
    assert "r7-fpn: no such detector spec file" in capsys.readouterr().err
    assert not (tmp_path / "s.yaml").exists()


def test_the_spec_says_cpu_whatever_this_machine_has(
    user_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One data set, one spec: a machine that sees a GPU writes the same file as one that does
    not (a worker runs elsewhere with ``jdsearch search --device``)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "s.yaml"
    init_study(out, user_set, base="tiny-r18-fpn")
    seen_gpu = out.read_text()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    init_study(out, user_set, base="tiny-r18-fpn", force=True)
    assert load_study(out).device == "cpu" and out.read_text() == seen_gpu
