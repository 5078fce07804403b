"""Many workers on one study, a worker killed mid-trial, and a trial whose training diverges.

The worker tests start real ``jdsearch search SPEC --storage URL --n-trials N`` processes against
a study prepared once in-process (base detector and teacher pool already in its storage), so the
workers only search. Every process is bounded in time and killed at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard import get_note
from torch import nn

import jdsearch.search.objective
from jdsearch.engine.train import TrainingDiverged
from jdsearch.search.objective import worker_id
from jdsearch.search.queries import lineage
from jdsearch.search.record import (
    BASE_MOVE,
    FAIL_REASON_ATTR,
    MOVE_PARAM,
    PARENT_ATTR,
    RETRY_OF_ATTR,
    RETRY_REASON_ATTR,
    WORKER_SYSATTR,
    TrialRecord,
)
from jdsearch.search.run import run_search
from jdsearch.search.session import prepare
from jdsearch.spec.study import StudySpec, load_study
from jdsearch.storage.optuna_internals import trial_of
from jdsearch.store.checkpoint import checkpoint_from_bytes

from .conftest import SearchAssets

optuna.logging.set_verbosity(optuna.logging.WARNING)

WORKER_TIMEOUT_S = 240.0  # one worker process, start to finish (2 shared CPU cores)


# --------------------------------------------------------------------------- helpers
def cli() -> list[str]:
    """The installed ``jdsearch`` console script of this interpreter (or its module)."""
    script = Path(sys.executable).with_name("jdsearch")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "jdsearch.cli"]


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def marker(self) -> str:
        """The worker id its trials record (``hostname:pid``; same host as the test)."""
        return worker_id().rsplit(":", 1)[0] + f":{self.proc.pid}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def finish(self, timeout: float = WORKER_TIMEOUT_S) -> None:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker {self.name} still running after {timeout:.0f} s:\n{self.output()}")
        assert rc == 0, f"worker {self.name} exited with {rc}:\n{self.output()}"


@contextlib.contextmanager
def workers(tmp: Path) -> Iterator[Callable[[str, list[str]], Worker]]:
    """``spawn(name, args)`` starts ``jdsearch ARGS``; all still alive at exit are killed."""
    started: list[Worker] = []
    # One intra-op thread per worker: several workers share the cores without oversubscribing them.
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }

    def spawn(name: str, args: list[str]) -> Worker:
        log = tmp / f"worker-{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*cli(), *args],
                cwd=tmp,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(name, proc, log)
        started.append(worker)
        return worker

    try:
        yield spawn
    finally:
        for w in started:
            if w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(w.proc.pid, signal.SIGKILL)
                w.proc.wait(timeout=30)


def write_spec(
    tmp: Path, assets: SearchAssets, name: str, storage: str, **search: Any
) -> tuple[Path, StudySpec]:
    assets.install_pool(tmp, name)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(assets.study(name, storage, **search)))
    return path, load_study(path)


def fresh_trials(spec: StudySpec, url: str) -> list[FrozenTrial]:
    """The study's trials read through a new storage object (no cache of this process)."""
    storage = RDBStorage(url)
    try:
        return optuna.load_study(study_name=spec.name, storage=storage).get_trials()
    finally:
        storage.remove_session()
        storage.engine.dispose()


def check_lineage(trials: list[FrozenTrial]) -> None:
    """Exactly one root (the lowest trial), and every parent exists and finished before its child."""
    by_number = {t.number: t for t in trials}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    roots = [t for t in complete if t.params[MOVE_PARAM] == BASE_MOVE]
    assert [r.number for r in roots] == [min(by_number)], [(t.number, t.params) for t in trials]
    for t in complete:
        if t.params[MOVE_PARAM] == BASE_MOVE:
            assert t.user_attrs[PARENT_ATTR] is None
            continue
        parent = by_number[t.user_attrs[PARENT_ATTR]]
        assert parent.state == TrialState.COMPLETE, (t.number, parent.number, parent.state)
        assert parent.datetime_complete is not None and t.datetime_complete is not None
        assert parent.datetime_complete < t.datetime_complete


def check_checkpoints(ctx: Any, trials: list[FrozenTrial]) -> None:
    """Every COMPLETE trial's checkpoint reads back whole, with the stored sha256."""
    for t in trials:
        if t.state != TrialState.COMPLETE:
            continue
        artifact_id = TrialRecord.from_trial(t).checkpoint
        with ctx.store.open_reader(artifact_id) as r:
            data = r.read()
        assert hashlib.sha256(data).hexdigest() == ctx.store.stat(artifact_id).sha256
        assert (
            checkpoint_from_bytes(data).detector.arch.encode() == TrialRecord.from_trial(t).student
        )


def wait_for(
    what: str, condition: Callable[[], Any], timeout: float, *, alive: Worker | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if alive is not None and alive.proc.poll() is not None:
            pytest.fail(
                f"worker {alive.name} exited ({alive.proc.returncode}) before {what}:\n{alive.output()}"
            )
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


# ------------------------------------------------------------------ root assignment
def test_the_lowest_of_simultaneous_first_trials_takes_the_root() -> None:
    """Two workers asking at once: the later trial waits instead of taking a second root."""
    from jdsearch.search.sampler import HillClimbingSampler

    sampler = HillClimbingSampler(
        [BASE_MOVE, "a"],
        lambda t: (["a"], []),
        freeze_student=0,
        root_wait=(0.01, 0.3),
    )
    study = optuna.create_study(direction="maximize", sampler=sampler)
    storage = study._storage
    first = storage.create_new_trial(study._study_id)  # both created, neither has chosen its move
    second = storage.create_new_trial(study._study_id)
    low, high = storage.get_trial(first), storage.get_trial(second)
    assert sampler.decide(study, low).move == BASE_MOVE
    with pytest.raises(RuntimeError, match="timed out waiting for the root"):
        sampler.decide(study, high)


# ---------------------------------------------------------------------- many workers
def status(capsys: pytest.CaptureFixture[str], url: str, name: str, *, as_json: bool = True) -> Any:
    """``jdsearch status --storage URL --study NAME [--json]``, run here: its output (parsed)."""
    from jdsearch.cli import main as cli

    capsys.readouterr()
    assert cli(["status", "--storage", url, "--study", name, *(["--json"] if as_json else [])]) == 0
    out = capsys.readouterr().out
    return json.loads(out) if as_json else out


def both_running(
    capsys: pytest.CaptureFixture[str], url: str, name: str, a: Worker, b: Worker
) -> dict[str, Any]:
    """``jdsearch status``, polled until it shows both workers running a trial past its choice
    of move (the second waits for the root trial first) and its first heartbeat (a trial is
    RUNNING a moment before Optuna's heartbeat thread records one)."""
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while time.monotonic() < deadline:
        s = status(capsys, url, name)
        running = s["running"]
        if {r["worker"] for r in running} == {a.marker, b.marker} and all(
            r["move"] and r["heartbeat_age_s"] is not None for r in running
        ):
            return dict(s)
        for w in (a, b):
            if w.proc.poll() is not None:
                pytest.fail(f"worker {w.name} exited ({w.proc.returncode}):\n{w.output()}")
        time.sleep(1.0)
    pytest.fail("status never showed both workers running a trial")


@pytest.mark.slow
def test_two_cli_workers_share_one_postgresql_study(
    pg_url: str,
    search_assets: SearchAssets,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    # 8 trials each: with 3, an idle machine let one worker finish (4 s) before status saw both.
    n = 8
    spec_file, spec = write_spec(tmp_path, search_assets, "two-workers", pg_url, n_trials=n)
    _, ctx = prepare(spec, progress=False)  # base + pool into PostgreSQL; no trial yet
    with workers(tmp_path) as spawn:
        a, b = (
            spawn(
                name,
                ["search", str(spec_file), "--storage", pg_url, "--n-trials", str(n), "--quiet"],
            )
            for name in ("a", "b")
        )
        # `jdsearch status` while they run: both live, each on its trial, beating its heartbeat.
        live = both_running(capsys, pg_url, spec.name, a, b)
        a.finish()
        b.finish()
    assert live["live_workers"] == 2 and live["counts"]["RUNNING"] == 2
    assert live["grace_s"] == 2 * spec.search.heartbeat_s and live["n_trials"] == n
    for r in live["running"]:
        assert r["move"] is not None and not r["stale"] and r["running_s"] >= 0
        assert r["heartbeat_age_s"] is not None and 0 <= r["heartbeat_age_s"] <= live["grace_s"]
    # Two workers' trials run only once the root is done: a best, its lineage, a mean duration.
    assert live["counts"]["COMPLETE"] >= 1 and live["best"]["lineage"].startswith("base (#0)")
    assert live["mean_trial_s"] > 0 and 0 < live["left_s"] <= 2 * n * live["mean_trial_s"]
    done = status(capsys, pg_url, spec.name, as_json=False)
    assert f"trials      {2 * n} COMPLETE, 0 FAIL, 0 RUNNING, 0 WAITING" in done
    assert "workers     0 live" in done and done.endswith("time left   none: no live worker\n")

    trials = fresh_trials(spec, pg_url)
    assert sorted(t.number for t in trials) == list(range(2 * n))
    assert all(t.state == TrialState.COMPLETE for t in trials), [
        (t.number, t.state) for t in trials
    ]
    # Both workers ran their n trials; each trial records who ran it.
    assert Counter(t.system_attrs[WORKER_SYSATTR] for t in trials) == {a.marker: n, b.marker: n}
    check_lineage(trials)
    best = max(trials, key=lambda t: float(t.value))  # type: ignore[arg-type]
    study = optuna.load_study(study_name=spec.name, storage=pg_url)
    assert lineage(study, best.number)[0].number == 0
    check_checkpoints(ctx, trials)

    # The finished PostgreSQL study exports and reports from any machine that reaches it.
    from jdsearch.cli import main as cli

    assert (
        cli(
            [
                "export",
                "--storage",
                pg_url,
                "--study",
                spec.name,
                "--out",
                str(tmp_path / "best"),
                "--no-onnx",
            ]
        )
        == 0
    )
    info = json.loads((tmp_path / "best" / "detector.json").read_text())
    assert info["source"]["trial"] == best.number and info["source"]["storage"].startswith(
        "postgresql"
    )
    assert (
        cli(
            [
                "report",
                "--storage",
                pg_url,
                "--study",
                spec.name,
                "--out",
                str(tmp_path / "rep"),
                "--no-fps",
                "--no-png",
            ]
        )
        == 0
    )
    assert (tmp_path / "rep" / "report.html").is_file()


# ------------------------------------------------------------------------ killed worker
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_killed_worker_trial_is_failed_and_retried_by_another_worker(
    backend: str,
    search_assets: SearchAssets,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    monkeypatch.chdir(tmp_path)
    url = (
        f"sqlite:///{tmp_path / 'study.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    hb = 2
    spec_file, spec = write_spec(tmp_path, search_assets, f"killed-{backend}", url, heartbeat_s=hb)
    # Trials long enough (seconds) that the kill lands inside one, even on a quiet machine.
    doc = yaml.safe_load(spec_file.read_text())
    doc["fast_eval"]["epochs"] = 2
    spec_file.write_text(yaml.safe_dump(doc))
    spec = load_study(spec_file)
    study = run_search(spec, n_trials=1, progress=False)  # prepare + the root, in-process
    ctx = prepare(spec, progress=False)[1]
    command = ["search", str(spec_file), "--storage", url, "--quiet", "--n-trials"]

    with workers(tmp_path) as spawn:
        first = spawn("first", [*command, "3"])

        def first_running() -> FrozenTrial | None:
            for t in study.get_trials(states=(TrialState.RUNNING,)):
                if t.system_attrs.get(WORKER_SYSATTR) == first.marker and MOVE_PARAM in t.params:
                    return t
            return None

        wait_for("the first worker's trial to run", first_running, WORKER_TIMEOUT_S, alive=first)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=30)
        # The dead worker's trial is whichever of its trials is still RUNNING (normally the one
        # seen above; the next one if that finished between the poll and the kill).
        victim = first_running()
        assert victim is not None, "the first worker was killed between two trials"
        killed = study._storage.get_trial(victim._trial_id)
        assert killed.state == TrialState.RUNNING

        # Its heartbeat goes stale after the grace period (2 × heartbeat_s) …
        probe = RDBStorage(url, heartbeat_interval=hb, grace_period=2 * hb)
        sid = probe.get_study_id_from_name(spec.name)
        wait_for(
            "the killed trial's heartbeat to go stale",
            lambda: victim._trial_id in probe._get_stale_trial_ids(sid),
            10 * hb,
        )
        probe.remove_session()
        probe.engine.dispose()
        # … and a worker started now fails it, re-queues it and runs the retry first.
        second = spawn("second", [*command, "2"])
        second.finish()

    trials = fresh_trials(spec, url)
    by_number = {t.number: t for t in trials}
    assert by_number[victim.number].state == TrialState.FAIL
    retries = [
        t
        for t in trials
        if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == victim.number
    ]
    assert len(retries) == 1, [(t.number, t.state, t.system_attrs) for t in trials]
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE
    assert retry.params[MOVE_PARAM] == victim.params[MOVE_PARAM]
    assert retry.user_attrs[PARENT_ATTR] == victim.user_attrs[PARENT_ATTR]
    assert retry.system_attrs[WORKER_SYSATTR] == second.marker
    # Why the killed trial failed is on its retry (Optuna refuses attributes on a failed trial).
    assert retry.user_attrs[RETRY_OF_ATTR] == victim.number
    reason = retry.user_attrs[RETRY_REASON_ATTR]
    assert reason.startswith(f"its worker `{first.marker}` stopped beating its heartbeat at ")
    # The first worker finished some trials before the kill; the second ran the retry + one more.
    done_by_first = [
        t
        for t in trials
        if t.system_attrs.get(WORKER_SYSATTR) == first.marker and t.state == TrialState.COMPLETE
    ]
    assert Counter(t.system_attrs.get(WORKER_SYSATTR) for t in trials)[second.marker] == 2
    assert len(trials) == 1 + len(done_by_first) + 1 + 2
    assert [t.state for t in trials].count(TrialState.FAIL) == 1
    assert all(t.state == TrialState.COMPLETE for t in trials if t.number != victim.number)
    check_lineage(trials)
    check_checkpoints(ctx, trials)
    # The dashboard note of the killed trial says its worker was lost and which trial retries it.
    note = get_note(trial_of(study, by_number[victim.number]))
    assert note.startswith(f"### Trial {victim.number}: FAIL, its worker was lost\n")
    assert f"**Why**: {reason} (killed, or cut off" in note
    assert f"retried as trial {retry.number}, same move and parent" in note


# ------------------------------------------------------------------------ diverged trial
class NaNLoss(nn.Module):
    """A loss term that makes the total loss NaN (what a diverging run produces)."""

    def forward(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {"loss_nan": torch.tensor(float("nan"))}


@pytest.mark.slow
def test_a_diverged_trial_fails_alone_and_the_search_goes_on(
    search_assets: SearchAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    name = "diverged"
    _, spec = write_spec(tmp_path, search_assets, name, f"sqlite:///{tmp_path / 'study.db'}")
    real_train = jdsearch.search.objective.train
    calls: list[int] = []
    diverged: list[str] = []

    def train(*args: Any, loss_terms: Any = (), **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # the second trial of this worker: its loss goes NaN at iteration 1
            try:
                return real_train(*args, loss_terms=[*loss_terms, NaNLoss()], **kwargs)
            except TrainingDiverged as e:
                diverged.append(str(e))
                raise
        return real_train(*args, loss_terms=loss_terms, **kwargs)

    monkeypatch.setattr(jdsearch.search.objective, "train", train)
    study = run_search(spec, n_trials=4, progress=False)

    assert len(diverged) == 1 and "loss_nan" in diverged[0]
    trials = study.get_trials()
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    failed = trials[1]
    assert TrialRecord.from_trial(failed).checkpoint is None  # nothing was uploaded for it
    note = get_note(trial_of(study, failed))  # the dashboard note says why, as the attr does
    assert note.startswith(f"### Trial {failed.number}: FAIL\n")
    assert f"**Why**: {failed.user_attrs[FAIL_REASON_ATTR]}" in note and "loss_nan" in note
    # Not retried (a failure, not a stale heartbeat), and never a parent.
    assert all(RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is None for t in trials)
    assert all(t.user_attrs.get(PARENT_ATTR) != failed.number for t in trials)
    check_lineage(trials)
