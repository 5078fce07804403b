"""What a worker computes once per search: the sub-networks it extracts from the pool (with BN
recalibration) and the FLOPs of each detector at each size. A cached copy equals a fresh
computation, and the copies a trial trains are its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jdsearch.models import flops as flops_module
from jdsearch.search import objective as objective_module
from jdsearch.search.session import prepare
from jdsearch.spec.study import study_from_dict

from .conftest import SearchAssets


@pytest.fixture
def ctx(search_assets: SearchAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    monkeypatch.chdir(tmp_path)
    search_assets.install_pool(tmp_path, "caches")
    spec = study_from_dict(
        search_assets.study("caches", f"sqlite:///{tmp_path / 's.db'}"), source="test"
    )
    return prepare(spec, progress=False)[1]


def test_a_sub_network_is_extracted_once_and_each_use_gets_its_own_copy(
    ctx: objective_module.SearchContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = type(ctx.pool).teacher

    def counted(pool, config, *args, **kw):  # type: ignore[no-untyped-def]
        calls.append(str(config))
        return real(pool, config, *args, **kw)

    monkeypatch.setattr(type(ctx.pool), "teacher", counted)
    space = ctx.pool.space
    largest, smallest = space.largest(), space.smallest()
    first = ctx.subnet(largest)
    second = ctx.subnet(largest)
    assert calls == [str(largest)]
    fresh = real(ctx.pool, largest, ctx.train_set, device=ctx.spec.device)
    for a, b, c in zip(
        first.state_dict().values(), second.state_dict().values(), fresh.state_dict().values(),
        strict=True,
    ):  # fmt: skip
        assert torch.equal(a, b) and torch.equal(a, c)  # BN statistics included
    with torch.no_grad():
        next(first.parameters()).add_(1.0)  # training one copy leaves the next one alone
    assert torch.equal(next(ctx.subnet(largest).parameters()), next(fresh.parameters()))
    for _ in range(objective_module.SUBNETS_KEPT):  # others push the oldest out
        ctx.subnet(smallest)
    assert calls == [str(largest), str(smallest)]


def test_flops_are_counted_once_per_detector_and_size(
    ctx: objective_module.SearchContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = objective_module.count_flops

    def counted(model, **kw):  # type: ignore[no-untyped-def]
        calls.append(kw["size"])
        return real(model, **kw)

    monkeypatch.setattr(objective_module, "count_flops", counted)
    student = ctx.download(ctx.base_artifact, "base").detector
    a = ctx.flops(student, (64, 64))
    b = ctx.flops(ctx.download(ctx.base_artifact, "base").detector, (64, 64))
    ctx.flops(student, (96, 96))
    assert calls == [(64, 64), (96, 96)]
    assert a is b and a.total == flops_module.count_flops(student, size=(64, 64)).total
