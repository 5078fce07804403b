"""Study specs: the quickstart loads; bad keys and values name the file and the dotted field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jdsearch.core.errors import SpecError
from jdsearch.core.resolution import Resolution
from jdsearch.search.objective import score_h
from jdsearch.spec.study import load_study

QUICKSTART = Path(__file__).resolve().parent.parent / "studies" / "quickstart.yaml"
SHAPES20 = QUICKSTART.with_name("shapes20.yaml")


def test_quickstart_loads_with_its_pool() -> None:
    spec = load_study(QUICKSTART)
    assert spec.name == "quickstart" and spec.storage_url == "sqlite:///runs/quickstart.db"
    assert spec.score.alpha == 0.4 and spec.score.beta == 0.8
    assert [str(r) for r in spec.resolutions] == ["80x80", "128x96", "176x112", "208x128"]
    assert spec.pool.space.size() > 1
    assert load_study("quickstart") == spec  # by name from studies/


def test_shapes20_differs_from_the_quickstart_only_in_its_data_and_shipped_files() -> None:
    spec, quick = load_study(SHAPES20), load_study(QUICKSTART)
    synth = spec.data.synth
    assert synth is not None and load_study("shapes20") == spec
    assert (synth.classes, synth.object_size, synth.size) == (20, (0.05, 0.5), 96)
    assert spec.name == "shapes20" and spec.data.dir == Path("runs/shapes20/data")
    assert spec.storage_url == "sqlite:///runs/shapes20.db"
    assert all(r.long <= synth.size for r in spec.resolutions)
    assert spec.resolutions[-1] == spec.base.resolution == Resolution(96, 96)
    mine, theirs = spec.to_dict(), quick.to_dict()
    for d in (mine, theirs):
        for key in ("name", "data", "resolutions"):
            d.pop(key)
        d["base"].pop("resolution")
    # Each ships its own base, trained with the same recipe; shapes20 trains its pool itself.
    assert theirs["base"].pop("checkpoint") == "quickstart-base.safetensors"
    assert mine["base"].pop("checkpoint") == "shapes20-base.safetensors"
    assert theirs["pool"].pop("checkpoint") == "quickstart-pool.safetensors"
    assert "checkpoint" not in mine["pool"]
    assert mine == theirs


@pytest.mark.parametrize(
    ("synth", "needle"),
    [
        ({"classes": 0}, "data.synth.classes: must be an integer from 1 to 36"),
        ({"classes": 37}, "data.synth.classes: must be an integer from 1 to 36"),
        ({"classes": "20"}, "data.synth.classes: expected an integer, got '20'"),
        ({"object_size": [0.5, 0.2]}, "data.synth.object_size: must be a min and a max"),
        ({"object_size": [0.1]}, "data.synth.object_size: must be a min and a max"),
        ({"object_size": [0, 0.5]}, "data.synth.object_size: must be a min and a max"),
        ({"object_size": "small"}, "data.synth.object_size: expected a list, got 'small'"),
        ({"size": 16}, "data.synth.size: must be 32 to 4096, got 16"),
        ({"images": 1}, "data.synth.images: must be ≥ 2"),
    ],
)
def test_bad_synth_options_name_the_field_in_one_line(
    tmp_path: Path, synth: dict, needle: str
) -> None:
    data = yaml.safe_load(QUICKSTART.read_text())
    data["data"]["synth"].update(synth)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as info:
        load_study(p)
    message = str(info.value)
    assert message.startswith(f"{p}: {needle}") and "\n" not in message, message


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"serch": {}}, "serch: unknown key"),
        ({"search": {"top_k": 0}}, "search.top_k: must be ≥ 1, got 0"),
        ({"search": {"p_student": 1.5}}, "search.p_student"),
        ({"score": {"alpha": "big"}}, "score.alpha: expected a number, got 'big'"),
        ({"score": {"metric": "AR"}}, "score.metric"),
        ({"resolutions": ["80x80", "80x80"]}, "resolutions:"),
        ({"base": {"train": {"epochs": 1}}}, "base.detector: required field is missing"),
        ({"name": "bad name!"}, "name: use letters"),
        ({"fast_eval": {"epochs": -1}}, "fast_eval.epochs: must be a positive number, got -1.0"),
        # typos found only inside trials before the one config layer
        ({"fast_eval": {"schedule": "cosin"}}, "fast_eval.schedule: must be 'cosine' or 'step'"),
        ({"kd": {"feat_wieght": 2}}, "kd.feat_wieght: unknown key (known: cls_weight"),
        ({"fast_eval": {"device": "cuda"}}, "fast_eval.device: unknown key"),
        ({"pool": {"detector": "tiny-r50-fpn"}}, "pool.space: required field is missing"),
        ({"device": "gpu"}, "device: expected a device such as cpu or cuda:0, got 'gpu'"),
        ({"search": {"strategy": "annealing"}}, "search.strategy: must be one of hill_climb"),
        ({"kd": {"mode": "static"}}, "kd.mode: must be one of dynamic, fixed, off"),
    ],
)
def test_bad_study_specs_name_file_and_field(tmp_path: Path, patch: dict, needle: str) -> None:
    data = yaml.safe_load(QUICKSTART.read_text())
    data.update(patch)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as info:
        load_study(p)
    assert str(p) in str(info.value) and needle in str(info.value), str(info.value)


def _merged(data: dict, patch: dict) -> dict:
    """``data`` with ``patch`` merged in, mapping by mapping (lists and values replace)."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            _merged(data[key], value)
        else:
            data[key] = value
    return data


#: One bad value per field family of a study, set deep inside the quickstart: each fails when the
#: file loads, with one line naming the file, the dotted field and the value.
FIELD_FAMILIES = {
    "data": ({"data": {"max_val_images": 0}}, "data.max_val_images: must be ≥ 1, got 0"),
    "data.synth": ({"data": {"synth": {"sise": 3}}}, "data.synth.sise: unknown key"),
    "data.test": ({"data": {"test": ["a"]}}, "data.test: expected a string, got ['a']"),
    "data.train_images": (
        {"data": {"synth": None, "train_images": "annotations/instances_train2017.json"}},
        "data.train_images: names the folder of the train images, not a .json file, "
        "got 'annotations/instances_train2017.json'",
    ),
    "data.val_images": ({"data": {"val_images": 7}}, "data.val_images: expected a string, got 7"),
    "data.test_images": (
        {"data": {"test_images": "test2017"}},
        "data.test_images: names the images of data.test, which is unset, got 'test2017'",
    ),
    "data.val": (
        {"data": {"val": "annotations/instances_val2017.json"}},
        "data.val: data.synth writes the data into data.dir; not with data.synth, "
        "got 'annotations/instances_val2017.json'",
    ),
    "base": ({"base": {"resolution": "big"}}, "base.resolution: resolution 'big' is not"),
    "base.checkpoint": ({"base": {"checkpoint": 3}}, "base.checkpoint: expected a string, got 3"),
    "base.backbone_weights": (
        {"base": {"checkpoint": "b.safetensors", "backbone_weights": "r50.pth"}},
        "base.backbone_weights: initialises a base the study trains; not with base.checkpoint "
        "(already trained), got 'r50.pth'",
    ),
    "base.train": ({"base": {"train": {"schedule": "cosin"}}}, "base.train.schedule: must be"),
    "pool": ({"pool": {"kind": "wide"}}, "pool.kind: must be 'basic' or 'bottleneck', got 'wide'"),
    "pool.space": (
        {"pool": {"space": {"widths": [0.0001, 1.0]}}},
        "pool.space.widths: stage 1 multipliers [0.0001, 1.0]",
    ),
    "pool.phases": (
        {"pool": {"phases": [{"name": "supernet", "epochs": 1, "lr": 0.02, "depth": 1}]}},
        "pool.phases[0].depth: unknown key",
    ),
    "pool.train": ({"pool": {"train": {"grad_clip": -1}}}, "pool.train.grad_clip: must be"),
    "pool.kd": ({"pool": {"kd": {"temperature": 0}}}, "pool.kd.temperature: must be"),
    "resolutions": ({"resolutions": ["80"]}, "resolutions: resolution '80' is not"),
    "score": ({"score": {"beta": -1}}, "score.beta: must be ≥ 0, got -1.0"),
    "kd": ({"kd": {"feat_normalize": "yes"}}, "kd.feat_normalize: expected true or false"),
    "fast_eval": ({"fast_eval": {"milestones": [2]}}, "fast_eval.milestones: must be increasing"),
    "search": ({"search": {"artifacts": "s3:x"}}, "search.artifacts: expected 'db' or 'file:DIR'"),
    "search.storage": ({"search": {"storage": "runs/x.db"}}, "search.storage: expected a database"),
    "amp": ({"amp": "yes"}, "amp: expected true or false, got 'yes'"),
}


@pytest.mark.parametrize("family", sorted(FIELD_FAMILIES))
def test_every_field_family_fails_at_load(tmp_path: Path, family: str) -> None:
    patch, needle = FIELD_FAMILIES[family]
    data = _merged(yaml.safe_load(QUICKSTART.read_text()), patch)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as info:
        load_study(p)
    message = str(info.value)
    assert message.startswith(f"{p}: ") and needle in message and "\n" not in message, message


def test_missing_pool_and_fractional_epochs(tmp_path: Path) -> None:
    data = yaml.safe_load(QUICKSTART.read_text())
    data["base"]["train"]["epochs"] = 0.5
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(data))
    assert load_study(p).base.train.epochs == 0.5
    del data["pool"]
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match="pool: required field is missing"):
        load_study(p)


def test_score_h_follows_the_paper() -> None:
    base = Resolution(1333, 800)
    # the base detector at the base resolution scores its own AP
    assert score_h(0.395, 215.8, 215.8, base, base, 0.4, 0.8) == pytest.approx(0.395)
    # paper table 4, R50: 42.3 AP with 145.7 vs 215.8 GFLOPs at a smaller input: H rewards it
    h = score_h(0.423, 145.7, 215.8, Resolution(1080, 720), base, 0.4, 0.8)
    assert h == pytest.approx(
        0.423 * ((145.7 / 215.8) * (1080 * 720 / (1333 * 800)) ** 0.8) ** -0.4
    )
    assert h > 0.423 > 0.395


def test_to_dict_round_trips_through_study_from_dict() -> None:
    """What a study stores (``jdsearch:spec``) reads back as the same spec."""
    from jdsearch.spec.study import study_from_dict

    spec = load_study(QUICKSTART)
    stored = spec.to_dict()
    assert stored["resolutions"] == ["80x80", "128x96", "176x112", "208x128"]
    again = study_from_dict(stored, source=spec.source)
    assert again == spec


def test_specs_stored_by_jdsearch_0_1_0_still_open() -> None:
    """0.1.0 stored resolutions as mappings and unset fields as null."""
    from jdsearch.spec.study import study_from_dict, study_from_stored

    spec = load_study(QUICKSTART)
    old = spec.to_dict()
    old["resolutions"] = [{"long": r.long, "short": r.short} for r in spec.resolutions]
    old["base"]["resolution"] = None
    old["search"]["storage"] = None
    with pytest.raises(SpecError):
        study_from_dict(old)
    assert study_from_stored(old, source=spec.source) == spec


def test_a_bare_checkpoint_name_is_read_from_the_working_directory_then_beside_the_spec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = yaml.safe_load(QUICKSTART.read_text())
    studies, work = tmp_path / "studies", tmp_path / "work"
    studies.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    data["base"]["checkpoint"] = "base.safetensors"
    (studies / "s.yaml").write_text(yaml.safe_dump(data))
    spec = load_study(studies / "s.yaml")
    assert spec.base_checkpoint == Path("base.safetensors")  # neither exists: as written
    with pytest.raises(
        SpecError,
        match=r"s.yaml: base.checkpoint base.safetensors does not exist \(nor beside .*s.yaml\)",
    ):
        spec.existing_base_checkpoint()
    (studies / "base.safetensors").write_bytes(b"beside")
    assert spec.base_checkpoint == studies / "base.safetensors"
    (work / "base.safetensors").write_bytes(b"here")
    assert spec.base_checkpoint == Path("base.safetensors")  # the working directory's comes first
    assert spec.to_dict()["base"]["checkpoint"] == "base.safetensors"  # stored as written
    # A path with a folder is never looked up beside the spec.
    data["base"]["checkpoint"] = "sub/base.safetensors"
    (studies / "sub").mkdir()
    (studies / "sub" / "base.safetensors").write_bytes(b"beside")
    (studies / "t.yaml").write_text(yaml.safe_dump(data))
    assert load_study(studies / "t.yaml").base_checkpoint == Path("sub/base.safetensors")


def test_each_split_names_its_own_files_and_unset_ones_are_not_stored() -> None:
    """A dataset as it ships (COCO 2017) names each split's annotation file and image folder;
    a spec without them reads ``data.dir``'s layout and stores what it stored before."""
    from jdsearch.search.assets import same_spec
    from jdsearch.spec.study import study_from_dict, study_from_stored

    quick = load_study(QUICKSTART)
    data = quick.data
    assert (data.annotations("train"), data.annotations("val")) == (
        Path("runs/quickstart/data/train.json"),
        Path("runs/quickstart/data/val.json"),
    )
    assert {data.images(s) for s in ("train", "val", "test")} == {
        Path("runs/quickstart/data/images")
    }
    assert data.annotations("test") is None
    stored = quick.to_dict()
    assert set(stored["data"]) == {"dir", "synth", "max_val_images", "test"}  # as before
    assert study_from_stored(stored, source=quick.source) == quick and same_spec(stored, quick)

    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["data"] = {
        "dir": "coco",
        "train": "coco/annotations/instances_train2017.json",
        "val": "coco/annotations/instances_val2017.json",
        "train_images": "coco/train2017",
        "val_images": "coco/val2017",
        "test": "coco/annotations/mine.json",
        "test_images": "coco/mine",
    }
    coco = study_from_dict(raw, source="coco.yaml")
    assert coco.data.annotations("train") == Path("coco/annotations/instances_train2017.json")
    assert coco.data.annotations("test") == Path("coco/annotations/mine.json")
    assert [coco.data.images(s) for s in ("train", "val", "test")] == [
        Path("coco/train2017"),
        Path("coco/val2017"),
        Path("coco/mine"),
    ]
    stored = coco.to_dict()
    assert stored["data"] == raw["data"] | {"synth": None, "max_val_images": None}
    assert study_from_stored(stored, source="coco.yaml") == coco and same_spec(stored, coco)
    raw["data"]["val_images"] = "coco/val2017-resized"  # another folder: another spec
    assert not same_spec(stored, study_from_dict(raw, source="coco.yaml"))
