"""A teacher pool that starts at the base (``pool.init: base``, issue 27 item 1): at step 0 the
base is one of the super-net's sub-networks and the largest computes the base's function."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from jdsearch.core.errors import SpecError
from jdsearch.data.coco import CocoDataset
from jdsearch.data.synth import generate
from jdsearch.methods.pool import ElasticPool, pool_from_bytes, pool_to_bytes, train_and_save_pool
from jdsearch.methods.pool.elastic import reorder_channels
from jdsearch.models.detector import Detector, build_detector
from jdsearch.search.caches import POOL_BASE_FIELD, check_cache, pool_cache, pool_init_fields
from jdsearch.spec.detector import load_spec
from jdsearch.spec.pool import POOL_TRAIN, PhaseSpec, PoolSpec
from jdsearch.spec.pool_space import SubnetConfig, SubnetSpace, singleton
from jdsearch.spec.study import load_study, pool_base
from jdsearch.store.checkpoint import load_checkpoint, save_checkpoint, tensors_sha256
from jdsearch.testing import quickstart_path

BASE_SHAPE = SubnetConfig((2, 2, 2, 2), (1.0, 1.0, 1.0, 1.0), 32)


def _pool_spec(**kw: Any) -> PoolSpec:
    """A pool of the shipped base's family (tiny-r18-fpn): depths 2-3, widths up to 1.5x (stage 1
    at the stem's width), FPN 32 or 48."""
    space = SubnetSpace(((2, 3),) * 4, ((1.0,), *((1.0, 1.5),) * 3), (32, 48))
    phases = (
        PhaseSpec("supernet", 1, 0.01, singleton(space.largest())),
        PhaseSpec("shrink", 1, 0.01, space),
    )
    return PoolSpec(space, phases, "tiny-r18-fpn", "basic", (16, 32, 64, 128), POOL_TRAIN, **kw)


@pytest.fixture(scope="module")
def base() -> Detector:
    """The quickstart's shipped base: trained, so its detections are not noise."""
    return load_checkpoint(load_study(quickstart_path()).existing_base_checkpoint()).detector.eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[torch.Tensor]:
    root = tmp_path_factory.mktemp("synth")
    generate(root, images=8, seed=3, size=128)
    data = CocoDataset(root / "val.json", root / "images")
    return [data[i][0] for i in range(min(4, len(data)))]


def _detect(det: torch.nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    det.eval()
    with torch.no_grad():
        return det(images)


def _same_detections(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return all(
        x["boxes"].shape == y["boxes"].shape
        and torch.equal(x["labels"], y["labels"])
        and torch.allclose(x["boxes"], y["boxes"], atol=1e-4)
        and torch.allclose(x["scores"], y["scores"], atol=1e-5)
        for x, y in zip(a, b, strict=True)
    )


def test_the_base_shaped_subnetwork_is_the_base(base: Detector, images: list[torch.Tensor]) -> None:
    pool = ElasticPool(_pool_spec(), 7, base=base)
    assert pool.spec.base_config(pool.template, base.spec) == BASE_SHAPE
    sub = pool.extract(BASE_SHAPE)
    assert sub.arch == base.arch
    for name, t in base.state_dict().items():
        assert torch.equal(sub.state_dict()[name], t), name
    expected = _detect(base, images)
    assert sum(len(d["boxes"]) for d in expected) > 0
    assert _same_detections(_detect(sub, images), expected)


def test_the_largest_subnetwork_computes_the_base(
    base: Detector, images: list[torch.Tensor]
) -> None:
    pool = ElasticPool(_pool_spec(), 7, base=base)
    largest = pool.extract(pool.largest)
    assert largest.arch.depths == (3, 3, 3, 3) and largest.arch.fpn == 48  # wider and deeper
    expected = _detect(base, images)
    assert _same_detections(_detect(largest, images), expected)
    with pool.using(pool.largest) as net:  # the super-net's own forward too
        assert _same_detections(_detect(net, images), expected)
    # Reordering channels by importance (before each shrinking phase) keeps that function, also
    # in stage 1, whose first block adds the stem's channels.
    reorder_channels(pool.supernet)
    assert _same_detections(_detect(pool.extract(pool.largest), images), expected)
    # The comparison can fail: the same super-net from random weights detects otherwise.
    random = ElasticPool(_pool_spec(), 7).extract(pool.largest)
    assert not _same_detections(_detect(random, images), expected)


def test_the_pool_records_which_base_it_started_from(base: Detector, tmp_path: Path) -> None:
    pool = ElasticPool(_pool_spec(), 7, base=base)
    assert pool.base_sha256 == tensors_sha256(base.state_dict())
    assert pool_from_bytes(pool_to_bytes(pool)).base_sha256 == pool.base_sha256
    assert ElasticPool(_pool_spec(), 7).base_sha256 is None
    # A pool file started from one base is not resumed from another (nor from random weights).
    path = tmp_path / "pool.safetensors"
    path.write_bytes(pool_to_bytes(pool))
    other = build_detector(load_spec("tiny-r18-fpn"), 7, seed=1)

    class Classes:
        num_classes = 7

    for start in (other, None):
        with pytest.raises(SpecError, match="holds a pool that started from another base"):
            train_and_save_pool(_pool_spec(), Classes(), path, base=start)  # type: ignore[arg-type]


def test_a_base_of_another_family_is_refused(base: Detector) -> None:
    wrong = build_detector(load_spec("tiny-r50-fpn"), 7)
    with pytest.raises(SpecError, match="blocks are bottleneck, the pool's basic"):
        ElasticPool(_pool_spec(), 7, base=wrong)
    deep = SubnetSpace(((3,),) * 4, ((1.0,),) * 4, (32,))
    narrow = dataclasses.replace(
        _pool_spec(), space=deep, phases=(PhaseSpec("supernet", 1, 0.01, deep),)
    )
    with pytest.raises(SpecError, match="not in the pool's space"):
        ElasticPool(narrow, 7, base=base)


def _study(tmp_path: Path, **pool: Any) -> Path:
    spec = yaml.safe_load(quickstart_path().read_text())
    spec["base"]["checkpoint"] = str(load_study(quickstart_path()).existing_base_checkpoint())
    spec["data"]["dir"] = str(tmp_path / "data")
    spec["pool"].update(pool)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_pool_init_is_validated_at_load(tmp_path: Path) -> None:
    quickstart = load_study(quickstart_path())
    assert quickstart.pool.init is None and pool_base(quickstart) == BASE_SHAPE  # default: base
    assert pool_base(load_study(_study(tmp_path, init="random"))) is None
    path = _study(tmp_path, init="bogus")
    with pytest.raises(SpecError) as bad:
        load_study(path)
    assert str(bad.value) == f"{path}: pool.init: must be 'base' or 'random', got 'bogus'"
    # The old quickstart pool (bottleneck blocks): random by default, refused when base is asked.
    old = {"detector": "tiny-r50-fpn", "kind": "bottleneck", "base_widths": [8, 16, 32, 64]}
    old["space"] = {"depths": [[1, 2]] * 4, "widths": [1.0, 1.5], "fpn": [16, 32]}
    old["phases"] = [{"name": "supernet", "epochs": 1, "lr": 0.01}, {"epochs": 1, "lr": 0.01}]
    assert pool_base(load_study(_study(tmp_path, **old))) is None
    path = _study(tmp_path, **old, init="base")
    with pytest.raises(SpecError) as bad:
        load_study(path)
    assert "\n" not in str(bad.value)
    assert str(bad.value).startswith(f"{path}: pool.init: base: the base tiny-r18-fpn is not")
    assert "its blocks are basic, the pool's bottleneck" in str(bad.value)


def test_the_pool_cache_key_changes_with_the_base(tmp_path: Path) -> None:
    shipped = load_study(quickstart_path()).existing_base_checkpoint()
    spec = load_study(_study(tmp_path))
    spec = dataclasses.replace(
        spec, base=dataclasses.replace(spec.base, checkpoint=tmp_path / "base.safetensors")
    )
    shutil.copyfile(shipped, tmp_path / "base.safetensors")
    before = pool_init_fields(spec)
    digest = tensors_sha256(load_checkpoint(shipped).detector.state_dict())
    assert before == {"pool.init": "base", POOL_BASE_FIELD: digest}
    save_checkpoint(tmp_path / "base.safetensors", build_detector(load_spec("tiny-r18-fpn"), 7))
    after = pool_init_fields(spec)
    assert after[POOL_BASE_FIELD] != before[POOL_BASE_FIELD]
    with pytest.raises(SpecError, match=r"pool.init's base \(weights sha256\) is "):
        check_cache(spec, pool_cache(spec), after, before)  # a pool of the old base is stale
    # A pool from random weights does not depend on the base.
    rand = dataclasses.replace(spec, pool=dataclasses.replace(spec.pool, init="random"))
    assert pool_init_fields(rand) == {"pool.init": "random"}
    with pytest.raises(SpecError, match=r"pool\.init is random, but"):
        check_cache(rand, pool_cache(rand), pool_init_fields(rand), before)
