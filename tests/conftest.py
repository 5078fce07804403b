"""Shared fixtures: an isolated PostgreSQL schema, and tiny prepared search assets.

``pg_url`` points at ``postgresql+psycopg2://postgres@127.0.0.1:5432/test`` inside a fresh schema
(selected through ``search_path`` in the URL, so Optuna's own tables and the artifact tables land
there too); the schema is dropped at the end of the module. Tests that need it are skipped when
psycopg2 or the server is missing. That server is shared: a test that stops or restarts PostgreSQL
uses ``private_pg``, a server of its own.

``search_assets`` trains, once per session, the smallest base detector and elastic teacher pool
that a search runs with, so that each search test only prepares its study (uploads the two files
to its storage) and runs trials.

``regenerated_quickstart`` is the quickstart study over its data regenerated, once per session,
from ``data.synth`` away from the user's ``runs/``: what its shipped base and pool are checked on.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from jdsearch.testing import install_pool, shrunk_quickstart

REPO = Path(__file__).resolve().parent.parent
PG_BASE = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def unavailable(why: str, in_ci: str = "CI must test the PostgreSQL paths") -> None:
    """Skip on a developer's machine that lacks a service or program; fail in CI (``in_ci``
    says why), where what needs it must be tested."""
    if os.environ.get("CI"):
        pytest.fail(f"{why} ({in_ci})")
    pytest.skip(why)


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    try:
        import psycopg2
    except ImportError as e:  # pragma: no cover - psycopg2 is a dev dependency
        unavailable(f"psycopg2 not installed ({e})")
    try:
        conn = psycopg2.connect(
            host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=3
        )
    except psycopg2.OperationalError as e:
        unavailable(f"PostgreSQL at 127.0.0.1:5432/test unreachable: {str(e).strip()}")
    schema = f"jdsearch_test_{uuid.uuid4().hex[:8]}"
    conn.autocommit = True
    conn.cursor().execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        # A connection left idle in a transaction must not hang the session's teardown.
        conn.cursor().execute("SET lock_timeout = '20s'")
        conn.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
        conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh SQLite file, then the test's PostgreSQL schema: a test that takes it runs on both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def private_pg() -> Iterator[Any]:
    """A PostgreSQL server of the test's own (:class:`jdsearch.testing.PrivatePostgres`), which it
    may stop, start and restart: the server at 127.0.0.1:5432 is shared and never touched."""
    from jdsearch.testing import PrivatePostgres

    try:
        server = PrivatePostgres()
    except (RuntimeError, OSError, KeyError) as e:
        unavailable(
            f"no private PostgreSQL server ({e})", "CI must test PostgreSQL outages and restarts"
        )
    try:
        yield server
    finally:
        server.close()


@dataclass(frozen=True)
class SearchAssets:
    """A synthetic dataset, a trained tiny base checkpoint and a trained tiny teacher pool."""

    data_dir: Path
    base: Path
    pool: Path

    def study(self, name: str, storage: str, *, n_trials: int = 3, **search: Any) -> dict[str, Any]:
        """A study spec (as a dict) over these assets; ``search`` overrides ``search.*`` fields."""
        spec = tiny_study_dict(self.data_dir, name)
        spec["base"]["checkpoint"] = str(self.base)
        spec["search"].update({"n_trials": n_trials, "storage": storage, **search})
        return spec

    def install_pool(self, workdir: Path, name: str) -> None:
        """Put the pool where ``prepare`` looks for its cache (``runs/<name>/`` under ``workdir``)."""
        install_pool(self.pool, workdir, name)


#: The quickstart's pool until issue 27 (bottleneck blocks, from random weights), phases at the
#: test suite's length: the session's search (``small_study``) is the one that
#: tests/test_legacy_study.py compares, trial by trial, with what jdsearch 0.1 recorded for it,
#: and the quickstart's pool now starts from its base (tests/test_pool_base.py tests that).
LEGACY_POOL: dict[str, Any] = {
    "detector": "tiny-r50-fpn",
    "kind": "bottleneck",
    "base_widths": [8, 16, 32, 64],
    "space": {"depths": [[1, 2], [1, 2], [1, 2, 3], [1, 2]], "widths": [1.0, 1.25, 1.5],
              "fpn": [16, 24, 32]},
    "phases": [
        {"name": "supernet", "epochs": 0.25, "lr": 0.02},
        {"name": "shrink1", "epochs": 0.25, "lr": 0.01, "depths": [2, 2, [2, 3], 2],
         "widths": [1.25, 1.5], "fpn": [24, 32]},
        {"name": "shrink2", "epochs": 0.25, "lr": 0.01},
    ],
    "train": {"batch_size": 4, "warmup_iters": 50, "grad_clip": 10.0},
}  # fmt: skip


def tiny_study_dict(data_dir: Path, name: str) -> dict[str, Any]:
    """``studies/quickstart.yaml`` shrunk to seconds per trial on a CPU (the test suite's sizes,
    :class:`jdsearch.testing.Shrink`'s defaults), with :data:`LEGACY_POOL`. It distils whatever
    the teacher check would decide (``kd.when: always``): seconds of training leave teacher and
    base near 0 AP, which would turn distillation off in every test. Its own tests set it back."""
    spec = shrunk_quickstart(name, data_dir)
    spec["pool"] = copy.deepcopy({**LEGACY_POOL, "recalibration_batches": 2})
    # The channel ranking the recorded search used (the quickstart's is Taylor since issue 27).
    # ... and no local recovery: every trial trains (fault and resume tests stop trainings).
    spec["search"].update(
        {"channel_importance": "bn_scale", "channel_fraction": 0.1, "recovery_iters": 0}
    )
    return spec


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The training split of 12 synthetic 64x64 images (seed 0): data for the few batches that
    rank channels, recover a child or take gradients in a test."""
    from jdsearch.data.coco import CocoDataset
    from jdsearch.data.synth import generate

    info = generate(tmp_path_factory.mktemp("shapes"), images=12, seed=0, size=64)
    return CocoDataset(info.train_json, info.image_dir)


@pytest.fixture(scope="session")
def regenerated_quickstart(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import dataclasses

    from jdsearch.search.assets import ensure_data
    from jdsearch.spec.study import load_study

    spec = load_study("quickstart")
    data = dataclasses.replace(spec.data, dir=tmp_path_factory.mktemp("quickstart") / "data")
    spec = dataclasses.replace(spec, data=data)
    ensure_data(spec)
    return spec


@pytest.fixture(scope="session")
def search_assets(tmp_path_factory: pytest.TempPathFactory) -> SearchAssets:
    import optuna

    from jdsearch.search.session import prepare
    from jdsearch.spec.study import study_from_dict

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = tmp_path_factory.mktemp("search_assets")
    spec = study_from_dict(tiny_study_dict(root / "data", "assets"), source="conftest")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # runs/assets/{base,pool}.safetensors land here
        prepare(spec, f"sqlite:///{root / 'assets.db'}", progress=False)
    runs = root / "runs" / "assets"
    assets = SearchAssets(root / "data", runs / "base.safetensors", runs / "pool.safetensors")
    assert assets.base.is_file() and assets.pool.is_file()
    return assets


@dataclass(frozen=True)
class SmallStudy:
    """A finished real search (SQLite) over the session's search assets."""

    url: str
    name: str
    workdir: Path  # where it ran (its runs/ caches); the study itself is only in ``url``
    data_dir: Path


@pytest.fixture(scope="session")
def small_study(
    search_assets: SearchAssets, tmp_path_factory: pytest.TempPathFactory
) -> SmallStudy:
    """Six trials of a real search: base, student actions and teacher moves, for export/report."""
    from jdsearch.search.run import run_search
    from jdsearch.spec.study import study_from_dict

    root = tmp_path_factory.mktemp("small_study")
    url = f"sqlite:///{root / 'small.db'}"
    spec = study_from_dict(
        search_assets.study("small", url, n_trials=6), source="conftest small_study"
    )
    search_assets.install_pool(root, "small")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        run_search(spec, progress=False)
    return SmallStudy(url, "small", root, search_assets.data_dir)


@pytest.fixture
def small_study_copy(
    small_study: SmallStudy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """A private copy of ``small_study`` (database and ``runs/`` caches), the working directory
    set beside it: a test may add trials to it. Returns its storage URL."""
    db = tmp_path / "copy.db"
    shutil.copyfile(small_study.url.removeprefix("sqlite:///"), db)
    shutil.copytree(small_study.workdir / "runs", tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{db}"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and a second thread competing with any
    other process on a 2-core machine slows training by an order of magnitude (measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def optuna_cli(*args: str) -> str:
    """Run Optuna's own command line (``optuna ARGS``) in a fresh process; its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from optuna.cli import main; sys.exit(main())", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
