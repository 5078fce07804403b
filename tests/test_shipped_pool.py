"""The trained teacher pool a study ships (``pool.checkpoint``, ``bench/ship_pool.py``) is still
the pool its study would train.

A study uses the shipped file instead of training only while the pool cache key the file records
is the study's own (``tests/test_pool_checkpoint.py``). Were the spec's pool section, the shipped
base or the data generator changed, the quickstart would silently train its pool again (minutes)
while shipping a stale one: here the key is recomputed from the spec, the shipped base and the
data regenerated from ``data.synth``, and compared with the file and its record
(``studies/quickstart-pool.json``), as is the teacher check the record reports.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from jdsearch.core.config import cache_key
from jdsearch.models.detector import build_detector
from jdsearch.search.caches import named_pool_unfit, pool_fields
from jdsearch.spec.detector import load_spec
from jdsearch.spec.study import STUDIES_DIR, StudySpec, load_study
from jdsearch.store.checkpoint import save_checkpoint
from jdsearch.testing import SHIPPED_BASE_TOLERANCE, measure_pool, shipped_pool_record


def test_the_quickstart_ships_its_pool() -> None:
    spec = load_study("quickstart")
    assert spec.pool_checkpoint == STUDIES_DIR / "quickstart-pool.safetensors"
    assert spec.pool_checkpoint.is_file()
    # The repository carries it: the super-net of the quickstart's space, in float32.
    assert spec.pool_checkpoint.stat().st_size < 12 * 2**20


def _shipped(spec: StudySpec) -> StudySpec:
    if spec.pool.checkpoint is None:
        pytest.skip(f"{spec.source} ships no pool (pool.checkpoint)")
    return spec


@pytest.mark.slow
def test_the_shipped_pool_is_the_pool_its_study_trains(regenerated_quickstart: StudySpec) -> None:
    spec = _shipped(regenerated_quickstart)
    record = json.loads(shipped_pool_record(spec).read_text())
    assert record["command"].startswith("jdsearch --threads 1 pool train ")
    torch.set_num_threads(1)
    measured = measure_pool(spec)
    why = "the pool section, the shipped base or the data generator changed: bench/ship_pool.py"
    assert measured["key_now"] == record["pool_key"], why
    for key in ("pool_key", "weights_sha256", "base_sha256", "data_sha256"):
        assert measured[key] == record[key], key
    assert named_pool_unfit(spec) is None  # what the search decides
    for ap in ("teacher_ap", "base_ap"):
        got, want = measured["teacher_check"][ap], record["teacher_check"][ap]
        assert abs(got - want) <= SHIPPED_BASE_TOLERANCE, (ap, got, want)


@pytest.mark.slow
def test_the_shipped_pool_is_not_used_by_another_spec_or_base(
    regenerated_quickstart: StudySpec, tmp_path: Path
) -> None:
    spec = _shipped(regenerated_quickstart)
    last = spec.pool.phases[-1]
    phases = (*spec.pool.phases[:-1], dataclasses.replace(last, lr=last.lr / 2))
    changed = dataclasses.replace(spec, pool=dataclasses.replace(spec.pool, phases=phases))
    i = len(phases) - 1
    why = f"pool.phases[{i}].lr is {last.lr / 2} here, {last.lr} where it was trained"
    assert cache_key(pool_fields(changed)) != cache_key(pool_fields(spec))
    assert named_pool_unfit(changed) == why
    other = tmp_path / "base.safetensors"  # the base's detector, other weights
    save_checkpoint(other, build_detector(load_spec(spec.base.detector), 7, seed=1))
    rebased = dataclasses.replace(spec, base=dataclasses.replace(spec.base, checkpoint=other))
    unfit = named_pool_unfit(rebased)
    assert unfit is not None and unfit.startswith("pool.init's base (weights sha256) is ")
