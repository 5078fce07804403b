"""Bad study specs and search arguments: each is one line naming the file, the field and the value,
at load or when ``search`` starts — before anything trains — and never a traceback or exit 0.

Also the caches under ``runs/<name>/`` (data, base, pool): one made by other spec settings is
refused, naming the field that differs, instead of silently overriding the spec.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from jdsearch.cli import main
from jdsearch.core.errors import JDSearchError, SpecError
from jdsearch.spec.study import load_study

from .conftest import tiny_study_dict

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "studies" / "quickstart.yaml"


def _merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merged(out[k], v)
        else:
            out[k] = v
    return out


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _quickstart(tmp: Path, patch: dict[str, Any]) -> Path:
    return _write(tmp / "s.yaml", _merged(yaml.safe_load(QUICKSTART.read_text()), patch))


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("jdsearch: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------------- refused at load
LOAD_CASES = {
    "unknown base detector": (
        {"base": {"detector": "nope-fpn"}},
        "base.detector: nope-fpn: no such detector spec file",
    ),
    "unknown pool detector": (
        {"pool": {"detector": "nope-fpn"}},
        "pool.detector: nope-fpn: no such detector spec file",
    ),
    "garbage storage URL": (
        {"search": {"storage": "garbage"}},
        "search.storage: expected a database URL such as sqlite:///runs/NAME.db, got 'garbage'",
    ),
    "sqlite://": (
        {"search": {"storage": "sqlite://"}},
        "search.storage: an in-memory SQLite database is lost when the search exits",
    ),
    "sqlite:///": (
        {"search": {"storage": "sqlite:///"}},
        "search.storage: an in-memory SQLite database is lost when the search exits",
    ),
    "sqlite memory": (
        {"search": {"storage": "sqlite:///:memory:"}},
        "search.storage: an in-memory SQLite database",
    ),
    "max_val_images 0": (
        {"data": {"max_val_images": 0}},
        "data.max_val_images: must be ≥ 1, got 0",
    ),
    "max_val_images negative": (
        {"data": {"max_val_images": -3}},
        "data.max_val_images: must be ≥ 1, got -3",
    ),
    "heartbeat 0": ({"search": {"heartbeat_s": 0}}, "search.heartbeat_s: must be ≥ 1, got 0"),
    "lr 1e6": ({"base": {"train": {"lr": 1e6}}}, "base.train.lr: must be ≤ 10"),
    "alpha overflow": ({"score": {"alpha": 1e6}}, "score.alpha: must be ≤ 10"),
    "beta underflow": ({"score": {"beta": 1e6}}, "score.beta: must be ≤ 10"),
    "beta nan": ({"score": {"beta": float("nan")}}, "score.beta: expected a number, got nan"),
    "device tpu": ({"device": "tpu"}, "device: expected a device such as cpu or cuda:0, got 'tpu'"),
    "unknown kd key": ({"kd": {"bogus": 1}}, "kd.bogus: unknown key"),
    "negative kd weight": (
        {"kd": {"cls_weight": -1}},
        "kd.cls_weight: must be a finite number ≥ 0",
    ),
    "fast_eval epochs 0": ({"fast_eval": {"epochs": 0}}, "fast_eval.epochs: must be a positive"),
    "fast_eval batch 0": ({"fast_eval": {"batch_size": 0}}, "fast_eval.batch_size: must be ≥ 1"),
    "unknown schedule": (
        {"fast_eval": {"schedule": "linear"}},
        "fast_eval.schedule: must be 'cosine' or 'step', got 'linear'",
    ),
}


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_a_bad_spec_is_one_line_at_load(tmp_path: Path, case: str) -> None:
    patch, needle = LOAD_CASES[case]
    p = _quickstart(tmp_path, patch)
    with pytest.raises(SpecError) as info:
        load_study(p)
    message = str(info.value)
    assert message.startswith(f"{p}: ") and needle in message and "\n" not in message, message


# Whether SQLAlchemy knows a URL's dialect and driver is asked when the search starts (the spec
# layer does not import SQLAlchemy), before anything is generated, trained or opened.
START_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "unknown dialect": (
        {"search": {"storage": "foo://bar"}},
        "search.storage: unknown database dialect or driver 'foo'",
    ),
    "postgres spelling": (
        {"search": {"storage": "postgres://u@h/db"}},
        "(SQLAlchemy spells it postgresql)",
    ),
    "unknown driver": (
        {"search": {"storage": "postgresql+nodriver://u@h/db"}},
        "search.storage: unknown database dialect or driver 'postgresql+nodriver'",
    ),
}


@pytest.mark.parametrize("case", sorted(START_CASES))
def test_an_unknown_database_dialect_is_one_line_when_the_search_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    monkeypatch.chdir(tmp_path)
    patch, needle = START_CASES[case]
    p = _quickstart(tmp_path, patch)
    load_study(p)  # the text is a database URL
    for check in ([], ["--check"]):
        assert main(["search", str(p), "--quiet", *check]) == 2
        err = _one_line_error(capsys)
        assert f"{p}: search.storage: " in err and needle in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", ["unknown base detector", "sqlite:///", "alpha overflow"])
def test_the_cli_prints_it_and_exits_2_before_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    monkeypatch.chdir(tmp_path)
    patch, needle = LOAD_CASES[case]
    p = _quickstart(tmp_path, patch)
    assert main(["search", str(p), "--quiet"]) == 2
    assert needle in _one_line_error(capsys)
    assert not (tmp_path / "runs").exists()  # nothing generated, trained or opened


def test_the_valid_score_bounds_still_load(tmp_path: Path) -> None:
    spec = load_study(_quickstart(tmp_path, {"score": {"alpha": 10, "beta": 0}}))
    assert (spec.score.alpha, spec.score.beta) == (10.0, 0.0)


# ---------------------------------------------------------------------- refused when search starts
@pytest.mark.parametrize("check", [True, False])
def test_a_device_that_is_not_here_stops_search_before_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], check: bool
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: device cuda is usable here")
    monkeypatch.chdir(tmp_path)
    p = _quickstart(tmp_path, {"device": "cuda"})
    assert main(["search", str(p), "--quiet", *(["--check"] if check else [])]) == 2
    assert f"{p}: device: 'cuda' is not usable" in _one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("check", [True, False])
def test_an_unreachable_postgresql_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], check: bool
) -> None:
    monkeypatch.chdir(tmp_path)
    # A search waits a while for a server that refuses (it may be restarting); not this long here.
    monkeypatch.setenv("JDSEARCH_DB_RETRY_S", "2")
    url = "postgresql+psycopg2://alice:s3cret@127.0.0.1:1/db"  # nothing listens on port 1
    p = _quickstart(tmp_path, {"search": {"storage": url}})
    assert main(["search", str(p), "--quiet", *(["--check"] if check else [])]) == 2
    err = _one_line_error(capsys)
    assert "postgresql+psycopg2://alice:***@127.0.0.1:1/db: cannot open the study's storage" in err
    assert "OperationalError" in err and "s3cret" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("sqlite://", "storage sqlite://: an in-memory SQLite database"),
        ("sqlite:///", "storage sqlite:///: an in-memory SQLite database"),
        ("nope", "storage nope: expected a database URL"),
        ("foo://bar", "storage foo://bar: unknown database dialect or driver 'foo'"),
    ],
)
def test_a_bad_storage_option_is_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    url: str,
    needle: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    p = _quickstart(tmp_path, {})
    for check in ([], ["--check"]):
        assert main(["search", str(p), "--quiet", "--storage", url, *check]) == 2
        assert needle in _one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("psycopg") is not None, reason="psycopg 3 is installed here"
)
def test_a_missing_driver_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    p = _quickstart(tmp_path, {"search": {"storage": "postgresql+psycopg://u:pw@h/db"}})
    assert main(["search", str(p), "--quiet"]) == 2
    err = _one_line_error(capsys)
    assert "postgresql+psycopg://u:***@h/db: its database driver is not installed" in err
    assert "pip install 'jdsearch[postgresql]'" in err and "pw@" not in err


@pytest.mark.parametrize("n", ["-1", "0"])
def test_n_trials_below_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], n: str
) -> None:
    monkeypatch.chdir(tmp_path)
    p = _quickstart(tmp_path, {})
    assert main(["search", str(p), "--quiet", "--n-trials", n]) == 2
    assert f"--n-trials must be ≥ 1, got {n}" in _one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_a_search_in_which_no_trial_completed_exits_non_zero(
    search_assets: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from jdsearch.search import session
    from jdsearch.search.failures import FailureLog

    class Failing:  # the objective's interface, failing every trial without logging it
        def __init__(self, ctx: Any) -> None:
            self.failures = FailureLog(tmp_path / "failed-trials.log")

        def __call__(self, trial: Any) -> float:
            raise JDSearchError(f"trial {trial.number}: boom")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(session, "Objective", Failing)
    spec = search_assets.study("allfail", f"sqlite:///{tmp_path / 'f.db'}", n_trials=2)
    search_assets.install_pool(tmp_path, "allfail")
    p = _write(tmp_path / "allfail.yaml", spec)
    assert main(["search", str(p), "--quiet"]) == 2
    # before it, optuna's own warning on each failed trial (its handler may hold a closed stream)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("jdsearch: error: "), err
    assert "study allfail: none of the 2 trials of this worker completed" in err
    assert "the first failed: trial 0: boom" in err


# ---------------------------------------------------------------------- the README's PostgreSQL URL
def test_the_readme_postgresql_url_works_as_written(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--storage postgresql://...``: no driver named, which SQLAlchemy 2.1 maps to psycopg 3;
    jdsearch opens it with the installed psycopg2 (whose binary COPY the artifact store uses)."""
    import optuna

    from jdsearch.search.session import open_storage
    from jdsearch.spec.study import study_from_dict
    from jdsearch.storage.artifacts import SQLArtifactStore, make_artifact_store

    written = re.findall(r"--storage (postgresql://)\.\.\.", (REPO / "README.md").read_text())
    assert written == ["postgresql://"]
    readme_url = pg_url.replace("postgresql+psycopg2://", written[0], 1)
    assert readme_url.startswith("postgresql://postgres@127.0.0.1:5432/test?")

    monkeypatch.chdir(tmp_path)
    p = _quickstart(tmp_path, {})
    assert main(["search", str(p), "--check", "--storage", readme_url]) == 0
    assert "storage: postgresql+psycopg2://postgres@127.0.0.1:5432/test" in capsys.readouterr().out

    spec = study_from_dict(tiny_study_dict(tmp_path / "data", "readme"), source="readme")
    storage, url = open_storage(spec, readme_url)
    assert url.startswith("postgresql+psycopg2://")
    study = optuna.create_study(study_name="readme", storage=storage)
    assert optuna.load_study(study_name="readme", storage=pg_url).study_name == study.study_name
    store = make_artifact_store("db", url)
    assert isinstance(store, SQLArtifactStore)


# ---------------------------------------------------------------------- the runs/<name>/ caches
def _own_base_spec(search_assets: Any, tmp: Path, name: str, **base: Any) -> Any:
    """A study over the shared assets that trains its own base (none given)."""
    from jdsearch.spec.study import study_from_dict

    raw = search_assets.study(name, f"sqlite:///{tmp / (name + '.db')}")
    del raw["base"]["checkpoint"]
    raw["base"].update(base)
    return study_from_dict(raw, source=f"{name}.yaml"), raw


def _cache_base(search_assets: Any, spec: Any, record: bool) -> Path:
    """Put a trained tiny-r18 base where ``spec`` caches its base, recorded as made by ``spec``."""
    from jdsearch.search.caches import base_cache, base_fields, write_made_by

    cache = base_cache(spec)
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(search_assets.base, cache.path)
    if record:
        write_made_by(cache, base_fields(spec))
    return cache.path


@pytest.mark.parametrize("record", [True, False])
def test_a_cached_base_of_another_detector_is_refused(
    search_assets: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    record: bool,
) -> None:
    """The issue's case: base.detector tiny-r18 → tiny-r50 on a fresh storage used the cached r18
    base. With a record (this jdsearch) or without one (an earlier jdsearch), it is refused."""
    from jdsearch.search.caches import check_cached_base

    monkeypatch.chdir(tmp_path)
    r18, _ = _own_base_spec(search_assets, tmp_path, "swap")
    path = _cache_base(search_assets, r18, record)
    check_cached_base(r18)  # the spec that made it: reused
    r50, raw = _own_base_spec(search_assets, tmp_path, "swap", detector="tiny-r50-fpn")
    field = "base.detector" if record else "base.detector's name"
    expected = (
        f"swap.yaml: {field} is tiny-r50-fpn, but the base trained earlier, {path}, started "
        "from tiny-r18-fpn: delete it to train a new base"
    )
    with pytest.raises(SpecError) as info:
        check_cached_base(r50)
    assert str(info.value) == expected
    p = _write(tmp_path / "swap.yaml", raw)
    for check in (["--check"], []):  # --check and the search itself (a fresh storage)
        assert main(["search", str(p), "--quiet", *check]) == 2
        assert _one_line_error(capsys).endswith(expected.removeprefix("swap.yaml"))
    # The refused start leaves no (empty) study behind in the storage it opened.
    import optuna

    assert optuna.get_all_study_names(f"sqlite:///{tmp_path / 'swap.db'}") == []


def test_a_cached_base_of_other_training_images_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The base and the pool record data.train_images, so that another image folder is noticed;
    unset (or data.dir/images itself) it is not recorded: such a spec makes the key it made
    before the field existed, and a record without it was made from data.dir/images."""
    from jdsearch.search.caches import (
        base_cache,
        base_fields,
        check_cached_base,
        pool_fields,
        write_made_by,
    )
    from jdsearch.spec.study import study_from_dict

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("{}")  # hashed, never read

    def spec(**data: str) -> Any:
        raw = tiny_study_dict(Path("data"), "moved")
        del raw["data"]["synth"]
        raw["data"].update(data)
        return study_from_dict(raw, source="moved.yaml")

    default, same = spec(), spec(train_images="data/images")
    other = spec(train_images="coco/train2017")
    cache = base_cache(default)
    cache.path.parent.mkdir(parents=True)
    cache.path.write_bytes(b"weights")
    for fields in (base_fields, pool_fields):
        assert "data.train_images" not in fields(default) | fields(same)
        assert fields(other)["data.train_images"] == "coco/train2017"
    write_made_by(cache, base_fields(default))
    check_cached_base(default)
    check_cached_base(same)
    made = f"the base trained earlier, {cache.path}, started from"
    with pytest.raises(SpecError) as info:
        check_cached_base(other)
    assert str(info.value) == (
        f"moved.yaml: data.train_images is coco/train2017, but {made} unset: delete it to train "
        "a new base"
    )
    write_made_by(cache, base_fields(other))
    check_cached_base(other)
    with pytest.raises(SpecError, match=re.escape(f"is unset, but {made} coco/train2017")):
        check_cached_base(default)


def test_a_missing_annotation_file_is_named_by_its_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "instances_train2017.json").write_text("{}")
    raw = tiny_study_dict(Path("coco"), "gone")
    raw["data"] = {
        "dir": "coco",
        "train": "coco/annotations/instances_train2017.json",
        "val": "coco/annotations/instances_val2017.json",
    }
    p = _write(tmp_path / "gone.yaml", raw)
    for check in (["--check"], []):  # --check and the search itself
        assert main(["search", str(p), "--quiet", *check]) == 2
        err = _one_line_error(capsys)
        assert err.endswith("data.val coco/annotations/instances_val2017.json: no such file"), err


def test_a_cached_base_trained_with_other_settings_is_refused(
    search_assets: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jdsearch.search.caches import check_cached_base

    monkeypatch.chdir(tmp_path)
    made, _ = _own_base_spec(search_assets, tmp_path, "lr")
    path = _cache_base(search_assets, made, record=True)
    train = {"epochs": 1, "lr": 0.05, "batch_size": 4, "warmup_iters": 1}
    other, _ = _own_base_spec(search_assets, tmp_path, "lr", train=train)
    with pytest.raises(
        SpecError,
        match=re.escape(
            f"base.train.lr is 0.05, but the base trained earlier, {path}, started from 0.02"
        ),
    ):
        check_cached_base(other)
    noisy = {**train, "lr": 0.02, "log_every": 7}  # logging changes nothing: still reused
    check_cached_base(_own_base_spec(search_assets, tmp_path, "lr", train=noisy)[0])


def test_a_cached_pool_trained_with_another_schedule_is_refused(
    search_assets: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool from `jdsearch pool train` or a copy (no record) is checked on its own stored spec:
    before, only its architecture was compared and another schedule was silently reused."""
    from jdsearch.search.caches import cached_pool_done
    from jdsearch.search.check import check_study
    from jdsearch.spec.study import study_from_dict

    monkeypatch.chdir(tmp_path)
    raw = search_assets.study("sched", f"sqlite:///{tmp_path / 's.db'}")
    search_assets.install_pool(tmp_path, "sched")
    assert cached_pool_done(study_from_dict(raw, source="sched.yaml"))
    raw["pool"]["phases"][1]["lr"] = 0.003
    spec = study_from_dict(raw, source="sched.yaml")
    pool = Path("runs/sched/pool.safetensors")
    expected = (
        f"sched.yaml: pool.phases[1].lr is 0.003, but the pool trained earlier, {pool}, was "
        "trained with 0.01: delete it to train a new pool"
    )
    for step in (lambda: cached_pool_done(spec), lambda: check_study(spec, steps=0)):
        with pytest.raises(SpecError) as info:
            step()
        assert str(info.value) == expected


def _ensure_synth_data(raw: dict[str, Any]) -> None:
    """Generate (or reuse) the synthetic data of the study ``raw``, read as ``synth.yaml``."""
    from jdsearch.search.assets import ensure_data
    from jdsearch.spec.study import study_from_dict

    ensure_data(study_from_dict(raw, source="synth.yaml"))


def _synth_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A tiny study whose 12 synthetic images are generated in ``tmp_path/data``, run there."""
    monkeypatch.chdir(tmp_path)
    raw = tiny_study_dict(tmp_path / "data", "synth")
    raw["data"] = {"dir": str(tmp_path / "data"), "synth": {"images": 12, "seed": 1, "size": 64}}
    _ensure_synth_data(raw)
    return raw


def _refused_synth_data(
    raw: dict[str, Any], tmp_path: Path, field: str, now: Any, then: Any
) -> None:
    with pytest.raises(SpecError) as info:
        _ensure_synth_data(raw)
    assert str(info.value) == (
        f"synth.yaml: data.synth.{field} is {now}, but the data generated earlier in "
        f"{tmp_path / 'data'} had {then}: delete it to regenerate it"
    )


def test_synthetic_data_generated_with_other_settings_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = _synth_study(tmp_path, monkeypatch)
    _ensure_synth_data(raw)  # the same settings: reused
    raw["data"]["synth"]["images"] = 20
    _refused_synth_data(raw, tmp_path, "images", 20, 12)


def test_synthetic_data_recorded_before_an_option_was_drawn_with_its_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from jdsearch.search.caches import MADE_BY

    raw = _synth_study(tmp_path, monkeypatch)
    record = tmp_path / "data" / MADE_BY.lstrip(".")
    doc = json.loads(record.read_text())
    assert doc["fields"]["data.synth.classes"] == 6  # recorded now; an earlier jdsearch did not
    for key in ("data.synth.classes", "data.synth.object_size"):
        del doc["fields"][key]
    record.write_text(json.dumps(doc))
    _ensure_synth_data(raw)  # the defaults: reused
    raw["data"]["synth"]["classes"] = 20
    _refused_synth_data(raw, tmp_path, "classes", 20, 6)
