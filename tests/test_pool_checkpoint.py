"""``pool.checkpoint``: a study names a trained teacher pool and uses it instead of training its
own, but only while the settings that made it are the study's (the pool cache key its file
records); else one line says why it is not used, and the pool is trained as before."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from jdsearch.core.config import cache_key
from jdsearch.core.errors import SpecError
from jdsearch.methods.pool import load_pool, save_pool
from jdsearch.search.caches import named_pool_unfit, pool_fields
from jdsearch.search.check import check_study
from jdsearch.search.record import POOL_ATTR
from jdsearch.search.session import prepare
from jdsearch.spec.study import load_study, study_from_dict
from jdsearch.storage.artifacts import make_artifact_store, read_artifact
from jdsearch.store.checkpoint import read_checkpoint_metadata


def _named(search_assets: Any, tmp_path: Path, name: str, pool: Any, **phase1: Any) -> Any:
    raw = search_assets.study(name, f"sqlite:///{tmp_path / f'{name}.db'}")
    raw["pool"]["checkpoint"] = str(pool)
    raw["pool"]["phases"][1].update(phase1)
    return study_from_dict(raw, source=f"{name}.yaml")


def _no_training(*_: Any, **__: Any) -> None:
    raise AssertionError("the pool was trained")


def _pool_bytes(study: Any, spec: Any) -> bytes:
    store = make_artifact_store(spec.search.artifacts, spec.search.storage)
    return read_artifact(store, study.user_attrs[POOL_ATTR], "pool")


def test_pool_checkpoint_is_validated_at_load_and_read_beside_the_spec(tmp_path: Path) -> None:
    from jdsearch.testing import quickstart_path

    spec = yaml.safe_load(quickstart_path().read_text())
    spec["pool"]["checkpoint"] = "pool.pt"
    path = tmp_path / "studies" / "study.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError) as bad:
        load_study(path)
    why = "expected a trained pool's .safetensors file, got 'pool.pt'"
    assert str(bad.value) == f"{path}: pool.checkpoint: {why}"
    spec["pool"]["checkpoint"] = "pool.safetensors"
    path.write_text(yaml.safe_dump(spec))
    study = load_study(path)
    with pytest.raises(SpecError) as missing:
        study.existing_pool_checkpoint()
    where = f"(nor beside {path})"
    assert str(missing.value) == f"{path}: pool.checkpoint pool.safetensors does not exist {where}"
    (path.parent / "pool.safetensors").write_bytes(b"")
    assert study.existing_pool_checkpoint() == path.parent / "pool.safetensors"
    # Stored with the study as written; not one of the fields that make the pool.
    assert study_from_dict(study.to_dict()).pool.checkpoint == Path("pool.safetensors")
    unnamed = dataclasses.replace(study.pool, checkpoint=None)
    assert "checkpoint" not in unnamed.to_dict()
    assert unnamed.to_dict() == {k: v for k, v in study.pool.to_dict().items() if k != "checkpoint"}


def test_a_named_pool_that_the_study_would_train_is_used(
    search_assets: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = _named(search_assets, tmp_path, "named", search_assets.pool)
    # The fixture's pool was trained by `prepare`: it records the pool cache key, which the
    # checkpoint's own field is no part of.
    made_by = read_checkpoint_metadata(search_assets.pool)["extra"]["pool"]["made_by"]
    assert made_by["key"] == cache_key(pool_fields(spec)) == cache_key(made_by["fields"])
    assert named_pool_unfit(spec) is None
    used = f"by these settings: pool.checkpoint {search_assets.pool}, not trained again"
    lines = check_study(spec, steps=0).lines
    assert any(line.startswith("pool: ") and line.endswith(used) for line in lines), lines
    monkeypatch.setattr("jdsearch.search.assets.train_and_save_pool", _no_training)
    study, _ = prepare(spec, progress=False)
    out = capsys.readouterr().out
    assert f"using the trained teacher pool {search_assets.pool} (pool.checkpoint)\n" in out
    assert _pool_bytes(study, spec) == search_assets.pool.read_bytes()
    assert not (tmp_path / "runs" / "named" / "pool.safetensors").exists()


def test_a_named_pool_of_other_settings_is_not_used_and_the_pool_is_trained(
    search_assets: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = _named(search_assets, tmp_path, "changed", search_assets.pool, lr=0.003)
    why = "pool.phases[1].lr is 0.003 here, 0.01 where it was trained"
    assert named_pool_unfit(spec) == why
    lines = check_study(spec, steps=0).lines
    assert f"pool: not using pool.checkpoint {search_assets.pool}: {why}" in lines
    study, _ = prepare(spec, progress=False)
    out = capsys.readouterr().out
    assert f"not using pool.checkpoint {search_assets.pool}: {why}\n" in out
    assert "training the elastic teacher pool" in out
    trained = tmp_path / "runs" / "changed" / "pool.safetensors"
    assert _pool_bytes(study, spec) == trained.read_bytes()
    made_by = read_checkpoint_metadata(trained)["extra"]["pool"]["made_by"]
    assert made_by["fields"]["pool.phases[1].lr"] == 0.003
    assert made_by["key"] == cache_key(pool_fields(spec))


def test_a_named_pool_without_its_key_or_unfinished_is_not_used(
    search_assets: Any, tmp_path: Path
) -> None:
    pool = load_pool(search_assets.pool)
    spec = _named(search_assets, tmp_path, "named", tmp_path / "pool.safetensors")
    made_by, pool.made_by = pool.made_by, None  # a pool of an earlier jdsearch
    save_pool(tmp_path / "pool.safetensors", pool)
    why = named_pool_unfit(spec)
    assert why == "it records no pool cache key (not trained by jdsearch search or pool train)"
    pool.made_by = made_by
    save_pool(tmp_path / "pool.safetensors", pool, record=pool.record[:1])
    assert named_pool_unfit(spec) == "it holds 1 of the 3 phases trained"
    save_pool(tmp_path / "pool.safetensors", pool)
    assert named_pool_unfit(spec) is None
    # A file that is not a pool (the base, named by mistake) is refused outright.
    shutil.copyfile(search_assets.base, tmp_path / "pool.safetensors")
    with pytest.raises(SpecError) as bad:
        named_pool_unfit(spec)
    named = tmp_path / "pool.safetensors"
    assert str(bad.value) == f"named.yaml: pool.checkpoint {named}: not a teacher pool"
