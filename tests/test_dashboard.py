"""The ecosystem sees a jdsearch study: the ``optuna`` CLI and optuna-dashboard's HTTP API.

One small finished study (3 trials on SQLite) is shared by the module. The dashboard runs as a
subprocess on a free loopback port, is polled until it answers (bounded) and is always stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from jdsearch.search.objective import move_vocabulary
from jdsearch.search.record import BASE_MOVE, MOVE_PARAM, PARENT_ATTR
from jdsearch.search.run import run_search
from jdsearch.spec.study import study_from_dict
from jdsearch.storage.artifacts import make_artifact_store

from .conftest import SearchAssets, optuna_cli

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.slow  # the module's study is a real (tiny) search

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
SERVER_START_S = 90.0


@dataclass(frozen=True)
class Finished:
    url: str
    name: str
    resolutions: tuple[str, ...]
    study: optuna.Study


@pytest.fixture(scope="module")
def finished(search_assets: SearchAssets, tmp_path_factory: pytest.TempPathFactory) -> Finished:
    tmp = tmp_path_factory.mktemp("dashboard")
    name = "dash"
    url = f"sqlite:///{tmp / 'study.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        search_assets.install_pool(tmp, name)
        spec = study_from_dict(search_assets.study(name, url, n_trials=3), source="test_dashboard")
        study = run_search(spec, progress=False)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    return Finished(url, name, tuple(str(r) for r in spec.resolutions), study)


# ------------------------------------------------------------------------- optuna CLI
def test_optuna_cli_shows_the_study(finished: Finished) -> None:
    studies = json.loads(optuna_cli("studies", "--storage", finished.url, "-f", "json"))
    assert [(s["name"], s["n_trials"], s["direction"]) for s in studies] == [
        (finished.name, 3, ["MAXIMIZE"])
    ]
    assert {"base_resolution", "base_flops", "base_artifact", "pool_artifact"} <= set(
        studies[0]["user_attrs"]
    )

    rows = json.loads(
        optuna_cli("trials", "--study-name", finished.name, "--storage", finished.url, "-f", "json")
    )
    assert [r["number"] for r in rows] == [0, 1, 2] and {r["state"] for r in rows} == {"COMPLETE"}
    root, *children = rows
    assert root["params"] == {MOVE_PARAM: BASE_MOVE} and root["user_attrs"][PARENT_ATTR] is None
    vocabulary = set(move_vocabulary()) - {BASE_MOVE}
    for r in children:
        assert r["params"][MOVE_PARAM] in vocabulary
        assert r["user_attrs"][PARENT_ATTR] in {
            u["number"] for u in rows if u["number"] < r["number"]
        }
    for r in rows:
        a = r["user_attrs"]
        assert (
            set(a["h"]) == set(finished.resolutions)
            and a["best_resolution"] in finished.resolutions
        )
        # the CLI names the value by the study's metric name: H
        assert r["value"] == {"H": pytest.approx(a["h"][a["best_resolution"]])}
        assert a["student"].startswith("[(") and a["teacher"] and a["checkpoint"]
    # Internal state stays out of what the CLI prints.
    table = optuna_cli("trials", "--study-name", finished.name, "--storage", finished.url)
    assert "jdsearch:" not in table and "'move': 'base'" in table and "best_resolution" in table

    best = json.loads(
        optuna_cli(
            "best-trial", "--study-name", finished.name, "--storage", finished.url, "-f", "json"
        )
    )
    expected = finished.study.best_trial
    assert best["number"] == expected.number
    assert best["value"] == {"H": pytest.approx(expected.value)}
    assert best["params"][MOVE_PARAM] == expected.params[MOVE_PARAM]
    assert best["user_attrs"]["best_resolution"] == expected.user_attrs["best_resolution"]


# ---------------------------------------------------------------------- optuna-dashboard
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(base: str, path: str, timeout: float = 30.0) -> bytes:
    with urllib.request.urlopen(base + path, timeout=timeout) as response:
        assert response.status == 200
        return bytes(response.read())


@contextlib.contextmanager
def server(command: list[str], port: int, log: Path) -> Iterator[str]:
    """Run ``command`` (a server on ``port``) until the block ends; yields its base URL."""
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
                )
            try:
                get(base, "/api/meta", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"server not up after {SERVER_START_S:.0f} s:\n{log.read_text(errors='replace')[-3000:]}"
                    )
                time.sleep(0.3)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def dashboard_command(url: str, port: int) -> list[str]:
    script = Path(sys.executable).with_name("optuna-dashboard")
    args = [url, "--host", "127.0.0.1", "--port", str(port), "--quiet"]
    if script.is_file():
        return [str(script), *args]
    return [
        sys.executable,
        "-c",
        "import sys; from optuna_dashboard._cli import main; sys.exit(main())",
        *args,
    ]


def attrs(row: dict[str, Any]) -> dict[str, Any]:
    """The dashboard's ``[{key, value}]`` attrs as a dict (values are strings or JSON text)."""
    return {a["key"]: a["value"] for a in row["user_attrs"]}


def test_optuna_dashboard_serves_the_study(finished: Finished, tmp_path: Path) -> None:
    port = free_port()
    with server(dashboard_command(finished.url, port), port, tmp_path / "dashboard.log") as base:
        studies = json.loads(get(base, "/api/studies"))["study_summaries"]
        assert [s["study_name"] for s in studies] == [finished.name]
        detail = json.loads(get(base, f"/api/studies/{studies[0]['study_id']}"))

    assert detail["name"] == finished.name and detail["directions"] == ["maximize"]
    assert detail["objective_names"] == ["H"]  # the value is the score H, not "Objective 0"
    assert {"base.safetensors", "pool.safetensors"} <= {a["filename"] for a in detail["artifacts"]}
    trials = {t["number"]: t for t in detail["trials"]}
    assert sorted(trials) == [0, 1, 2]
    assert [b["number"] for b in detail["best_trials"]] == [finished.study.best_trial.number]
    assert {a["key"] for a in detail["union_user_attrs"]} >= {
        PARENT_ATTR,
        "h",
        "teacher",
        "student",
    }
    for t in finished.study.trials:
        served = trials[t.number]
        assert served["state"] == "Complete"
        assert {p["name"]: p["param_external_value"] for p in served["params"]} == {
            MOVE_PARAM: t.params[MOVE_PARAM]
        }
        a = attrs(served)
        parent = t.user_attrs[PARENT_ATTR]
        assert a[PARENT_ATTR] == (json.dumps(None) if parent is None else str(parent))
        assert json.loads(a["h"]) == pytest.approx(t.user_attrs["h"])
        assert (a["teacher"], a["student"]) == (
            t.user_attrs["teacher"],
            t.user_attrs["student"],
        )
        # The trial's checkpoint is listed among its artifacts.
        assert t.user_attrs["checkpoint"] in {x["artifact_id"] for x in served["artifacts"]}


def test_optuna_dashboard_downloads_checkpoints_from_the_database(
    finished: Finished, tmp_path: Path
) -> None:
    """Started with jdsearch's SQL artifact store, the dashboard serves the stored checkpoint bytes."""
    port = free_port()
    code = (
        "import sys, optuna_dashboard; from jdsearch.storage.artifacts import make_artifact_store; "
        "optuna_dashboard.run_server(sys.argv[1], host='127.0.0.1', port=int(sys.argv[2]), "
        "artifact_store=make_artifact_store('db', sys.argv[1]))"
    )
    store = make_artifact_store("db", finished.url)
    best = finished.study.best_trial
    artifact_id = best.user_attrs["checkpoint"]
    with server(
        [sys.executable, "-c", code, finished.url, str(port)], port, tmp_path / "dashboard.log"
    ) as base:
        study_id = json.loads(get(base, "/api/studies"))["study_summaries"][0]["study_id"]
        data = get(base, f"/artifacts/{study_id}/{best._trial_id}/{artifact_id}", timeout=60)
    try:
        assert hashlib.sha256(data).hexdigest() == store.stat(artifact_id).sha256
    finally:
        store.close()
