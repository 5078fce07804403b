"""The trained base a study ships (``studies/quickstart-base.safetensors``) still fits its data.

Its record (``studies/quickstart-base.json``, written by ``bench/ship_base.py``) names the digest
of the data it was trained on and its AP. The data is regenerated here from the study's
``data.synth``: a change of the generator that moved one byte fails the digest, and the base's AP
on the regenerated held-out images must match the record within
:data:`~jdsearch.testing.SHIPPED_BASE_TOLERANCE`.
"""

from __future__ import annotations

import json

import pytest
import torch

from jdsearch.spec.study import STUDIES_DIR, StudySpec, load_study
from jdsearch.testing import SHIPPED_BASE_TOLERANCE, measure_base, shipped_base_record

SHIPPING = sorted(
    p.stem for p in STUDIES_DIR.glob("*.yaml") if load_study(p).base_checkpoint is not None
)


def test_the_quickstart_ships_its_base() -> None:
    spec = load_study("quickstart")
    assert spec.base_checkpoint == STUDIES_DIR / "quickstart-base.safetensors"
    assert spec.base_checkpoint.is_file() and "quickstart" in SHIPPING
    # A few MB: the repository carries it.
    assert spec.base_checkpoint.stat().st_size < 8 * 2**20


@pytest.mark.slow
def test_a_shipped_base_scores_what_its_record_says(regenerated_quickstart: StudySpec) -> None:
    # The data regenerated from data.synth, away from the user's runs/ folder.
    _assert_scores_its_record(regenerated_quickstart)


@pytest.mark.slow
def test_the_shapes20_base_scores_what_its_record_says(tmp_path) -> None:
    """The second data set's shipped base (issue 26), checked as the quickstart's is."""
    import dataclasses

    spec = load_study("shapes20")
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, dir=tmp_path / "data"))
    _assert_scores_its_record(spec)


def _assert_scores_its_record(spec: StudySpec) -> None:
    """``spec``'s shipped base, on its data regenerated where ``spec`` says, has the weights,
    the data digest and (within the tolerance) the AP at the base size that its record holds."""
    record = json.loads(shipped_base_record(spec).read_text())
    assert set(record) >= {"command", "weights_sha256", "data_sha256", "ap"}
    assert record["command"].startswith("jdsearch --threads 1 train ")
    base_size = str(spec.resolutions[-1])
    torch.set_num_threads(1)
    measured = measure_base(spec, (base_size,))
    assert measured["weights_sha256"] == record["weights_sha256"]
    assert measured["data_sha256"] == record["data_sha256"], "the data generator changed its output"
    for split in ("selection", "heldout"):
        got, want = measured["ap"][split][base_size], record["ap"][split][base_size]
        assert abs(got - want) <= SHIPPED_BASE_TOLERANCE, (split, got, want)
