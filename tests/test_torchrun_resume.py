"""Mid-trial resume under ``torchrun``, with a real kill: a worker of 2 gloo ranks is SIGKILLed
(its agent and both ranks) right after its trial saved a training state; the next worker retries
the trial, resumes at the saved iteration and gets the weights and H of an uninterrupted 2-rank
run. The same for a pool phase killed during ``prepare``: the worker started again continues the
phase at its saved iteration and ends with the pool of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import torch.distributed as dist
import yaml
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from jdsearch.search.record import STATE_SYSATTR
from jdsearch.search.resume import RESUMED_ATTR

from .conftest import SearchAssets, tiny_study_dict

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing"),
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
]
optuna.logging.set_verbosity(optuna.logging.WARNING)

NAME = "ranks"
RUN_TIMEOUT_S = 300.0  # one torchrun worker, start to finish (2 shared CPU cores)


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux ``/proc``): torchrun starts its ranks in sessions of
    their own, so killing its process group leaves them running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class _Runs:
    """``torchrun --nproc-per-node 2 -m jdsearch ARGS`` workers, each killable whole; every one
    still alive at the end is killed."""

    def __init__(self) -> None:
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(
        self, work: Path, args: list[str], entry: tuple[str, ...] = ("-m", "jdsearch")
    ) -> subprocess.Popen[bytes]:
        log = work / f"torchrun-{len(self.started)}.log"
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*torchrun, "--nproc-per-node", "2", *entry, *args],
                cwd=work,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append((proc, log))
        return proc

    def output(self, proc: subprocess.Popen[bytes], tail: int = 4000) -> str:
        log = next(log for p, log in self.started if p is proc)
        return log.read_text(errors="replace")[-tail:]

    def finish(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun still running after {RUN_TIMEOUT_S:.0f} s:\n{self.output(proc)}")
        assert rc == 0, f"torchrun exited with {rc}:\n{self.output(proc)}"

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the agent and every rank at once, as when the machine goes."""
        for pid in [*_descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc, _ in self.started:
            if proc.poll() is None:
                self.kill(proc)


@pytest.fixture
def runs() -> Iterator[_Runs]:
    r = _Runs()
    try:
        yield r
    finally:
        r.close()


def _wait(
    what: str, ready: Callable[[], Any], runs: _Runs, proc: subprocess.Popen[bytes] | None = None
) -> Any:
    """``ready()`` once it is true; a failure when ``proc`` (still to get there) exits first."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        found = ready()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"torchrun exited waiting for {what}:\n{runs.output(proc)}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _workdir(root: Path, how: str, assets: SearchAssets, *, pool: bool) -> tuple[Path, str]:
    """A worker's folder: the study spec (its own SQLite storage; heartbeat 1 s, a trial's
    state saved every 2 of its 6 iterations), the session's base and, with ``pool``, its pool;
    without, ``prepare`` trains one, whose super-net phase takes 6 iterations."""
    work = root / how
    work.mkdir()
    url = f"sqlite:///{work / 'study.db'}"
    spec = tiny_study_dict(assets.data_dir, NAME)
    spec["base"]["checkpoint"] = str(assets.base)
    spec["fast_eval"]["epochs"] = 1
    spec["search"].update(
        {"n_trials": 1, "storage": url, "heartbeat_s": 1, "trial_checkpoint_every": 2}
    )
    if pool:
        assets.install_pool(work, NAME)
    else:
        spec["pool"]["phases"][0]["epochs"] = 1
    (work / f"{NAME}.yaml").write_text(yaml.safe_dump(spec))
    return work, url


def _trials(url: str) -> list[FrozenTrial]:
    storage = RDBStorage(url)
    try:
        return optuna.load_study(study_name=NAME, storage=storage).get_trials()
    except KeyError:  # the study is not created yet
        return []
    finally:
        storage.remove_session()
        storage.engine.dispose()


def _weights(url: str, trial: FrozenTrial) -> dict[str, torch.Tensor]:
    """The student a trial uploaded, as its state dict."""
    from jdsearch.search.record import TrialRecord
    from jdsearch.storage.artifacts import SQLArtifactStore
    from jdsearch.store.checkpoint import checkpoint_from_bytes

    checkpoint = TrialRecord.from_trial(trial).checkpoint
    assert checkpoint is not None
    with SQLArtifactStore(url).open_reader(checkpoint) as reader:
        detector = checkpoint_from_bytes(reader.read(), source=f"trial {trial.number}").detector
    return detector.state_dict()


def _stale(url: str) -> bool:
    probe = RDBStorage(url, heartbeat_interval=1, grace_period=2)
    try:
        return bool(probe._get_stale_trial_ids(probe.get_study_id_from_name(NAME)))
    finally:
        probe.remove_session()
        probe.engine.dispose()


@pytest.mark.slow
def test_a_killed_two_rank_worker_s_trial_resumes_to_the_uninterrupted_h(
    search_assets: SearchAssets, tmp_path: Path, runs: _Runs
) -> None:
    search = ["search", f"{NAME}.yaml", "--quiet", "--n-trials", "1"]
    whole, whole_url = _workdir(tmp_path, "whole", search_assets, pool=True)
    work, url = _workdir(tmp_path, "killed", search_assets, pool=True)
    uninterrupted = runs.start(whole, search)  # the same trial, run through, beside it
    first = runs.start(work, search)

    def saved() -> FrozenTrial | None:
        for t in _trials(url):
            if t.state == TrialState.RUNNING and (t.system_attrs.get(STATE_SYSATTR) or {}).get(
                "artifact"
            ):
                return t
        return None

    _wait("the trial to save a state", saved, runs, first)
    runs.kill(first)
    victim = saved()
    assert victim is not None, "the trial finished between the poll and the kill"
    state = victim.system_attrs[STATE_SYSATTR]
    assert 0 < state["iteration"] < 6
    _wait("the killed trial's heartbeat to go stale", lambda: _stale(url), runs)
    runs.finish(runs.start(work, search))
    runs.finish(uninterrupted)
    (reference,) = _trials(whole_url)
    assert reference.state == TrialState.COMPLETE

    killed, retry = _trials(url)
    assert killed.state == TrialState.FAIL
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == killed.number
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs[RESUMED_ATTR] == state["iteration"]
    # The resumed run is the uninterrupted one: every weight, and H.
    resumed, whole_weights = _weights(url, retry), _weights(whole_url, reference)
    assert resumed.keys() == whole_weights.keys()
    differ = [k for k in resumed if not torch.equal(resumed[k], whole_weights[k])]
    assert differ == [], f"{len(differ)} of {len(resumed)} tensors differ, e.g. {differ[:3]}"
    assert retry.value == reference.value


# A worker whose pool phases save their state every 2 iterations (1000 in jdsearch: past these
# phases), and which logs where a phase resumes.
_LAUNCHER = """
import logging
import sys

import jdsearch.methods.pool.store as store
from jdsearch.cli import main

store.PHASE_CHECKPOINT_EVERY = 2
logging.getLogger("jdsearch.methods.pool.training").setLevel(logging.INFO)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_two_rank_prepare_killed_in_a_pool_phase_resumes_it_to_the_uninterrupted_pool(
    search_assets: SearchAssets, tmp_path: Path, runs: _Runs
) -> None:
    from safetensors.torch import load_file

    from jdsearch.core.files import read_bytes
    from jdsearch.methods.pool import pool_from_bytes
    from jdsearch.store.trainstate import trainstate_from_bytes

    launcher = tmp_path / "launch.py"
    launcher.write_text(_LAUNCHER)
    entry = (str(launcher),)
    search = ["search", f"{NAME}.yaml", "--quiet", "--n-trials", "1"]
    whole, whole_url = _workdir(tmp_path, "whole", search_assets, pool=False)
    work, url = _workdir(tmp_path, "killed", search_assets, pool=False)
    uninterrupted = runs.start(whole, search, entry)
    first = runs.start(work, search, entry)
    phase_state = work / "runs" / NAME / "pool.safetensors.phase-state"
    _wait("a pool phase to save its state", phase_state.is_file, runs, first)
    runs.kill(first)
    saved = trainstate_from_bytes(phase_state.read_bytes(), str(phase_state))
    phase = saved.meta["pool"]["phase"]
    assert not (work / "runs" / NAME / "pool.safetensors").exists() or phase > 0
    second = runs.start(work, search, entry)
    runs.finish(second)
    assert f"IPS phase {phase}: resuming at iteration {saved.iteration}" in runs.output(
        second, tail=10**6
    )
    assert not phase_state.exists()  # spent
    runs.finish(uninterrupted)

    pools = [whole / "runs" / NAME / "pool.safetensors", work / "runs" / NAME / "pool.safetensors"]
    expected, resumed = (load_file(p) for p in pools)
    assert expected.keys() == resumed.keys()
    differ = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert differ == [], f"{len(differ)} of {len(expected)} tensors differ, e.g. {differ[:3]}"
    records = [pool_from_bytes(read_bytes(p, 10**9)).record for p in pools]
    assert [r.loss_history for r in records[0]] == [r.loss_history for r in records[1]]
    (reference,), (trial,) = _trials(whole_url), _trials(url)
    assert trial.state == reference.state == TrialState.COMPLETE
    assert trial.value == reference.value
