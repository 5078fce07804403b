"""Fault injection: a real multi-worker search under repeated faults, and what survives.

Usage::

    python bench/faults.py [--workers 3] [--trials 20] [--kills 3] [--pg-restart]
                           [--long-outage [--outage-s S]] [--heartbeat 2] [--checkpoint-every N]
                           [--storage URL] [--seed 0] [--keep DIR]

One run: a tiny study (synthetic data, tiny R18-FPN base and tiny pool, trained here first) is
searched by ``--workers`` worker processes on PostgreSQL (a throwaway schema on the local server;
``--storage sqlite:///FILE`` for SQLite; with ``--pg-restart`` or ``--long-outage``, a server of
the bench's own) until ``--trials`` trials are COMPLETE, with heartbeats every ``--heartbeat``
seconds; with ``--checkpoint-every N``, each trial saves its training state every N iterations,
and a retry resumes it (``search.trial_checkpoint_every``; by default 1000, past the bench's
trials). Meanwhile:

* ``--kills`` times, a worker that is inside a trial is SIGKILLed, and restarted after 1–5 s;
* with ``--pg-restart``, the PostgreSQL server is restarted once, halfway (stopped and started
  at once); the bench runs a PostgreSQL server of its own for it
  (``jdsearch.testing.PrivatePostgres``, in a temporary folder: no ``--storage``), never the
  shared one;
* with ``--long-outage``, the PostgreSQL server is stopped once, a third of the way and while at
  least two workers are inside a trial, for ``--outage-s`` seconds (default 3 × the grace period
  of 2 × ``--heartbeat``, but less than the retry window, ``JDSEARCH_DB_RETRY_S``), then started:
  when it is back, the trials running through it have stale heartbeats, and the bench at once
  fails and re-queues them, as a worker that starts a trial at that moment does, while their
  workers go on. It stops the bench's own server, as ``--pg-restart`` does;
* one trial's checkpoint upload breaks halfway (a store wrapper that raises after half the bytes);
* one trial's loss becomes NaN;
* one trial raises a CUDA-style out-of-memory ``RuntimeError``.

The three in-trial faults are planned by trial number and injected, once each, by whichever worker
first gets there in a trial numbered at least that (a worker process of this script: jdsearch's
search with the injections patched in).
Then the bench checks the study and prints one table:

* faults injected, by kind (those that happened: a planned trial may be run by a killed worker);
* trials completed, failed, retried (a killed trial re-queued by the heartbeat callback) and lost
  (a COMPLETE trial that later disappeared, or whose checkpoint is missing or fails its sha256);
* after a long outage: the trials failed as stale whose worker was alive, how many of them their
  worker stopped with its one line, and how many it told all the same (a line of its own for the
  trial, as for a finished one: none may be);
* whether every killed trial was retried with its parent and move, and completed;
* orphaned artifacts left (before and after ``jdsearch gc --older-than 0``);
* the longest time a worker sat idle between two of its trials (work is always available);
* the time from each fault to the next COMPLETE trial.

The exit status is 1 when a trial was lost, a checkpoint was unreadable, a killed trial was not
retried, a worker died on its own or told a trial that had been failed as stale and retried.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import optuna
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from jdsearch.testing import PrivatePostgres, pg_schema, quiet_optuna, tiny_study

STOP_FILE, PLAN_FILE, EVENTS_FILE = "stop", "plan.json", "events.jsonl"
PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


# ============================================================================ the worker side
def claim(workdir: Path, kind: str, number: int, plan: dict[str, int]) -> bool:
    """Whether trial ``number`` injects fault ``kind``: the first trial numbered at least the
    planned one to get there, in any worker (a planned trial may have been killed first)."""
    if number < plan[kind]:
        return False
    try:
        os.close(os.open(workdir / f"{kind}.claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def log_event(workdir: Path, kind: str, **info: Any) -> None:
    """Append one fault to the run's event log (shared by the workers and the orchestrator)."""
    line = json.dumps({"kind": kind, "t": time.time(), **info})
    with (workdir / EVENTS_FILE).open("a") as f:
        f.write(line + "\n")


class BreaksAfter(io.RawIOBase):
    """``limit`` bytes of ``inner``, then an I/O error (a disk or network failing mid-upload)."""

    def __init__(self, inner: BinaryIO, limit: int) -> None:
        self.inner, self.left = inner, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.left <= 0:
            raise OSError(5, "Input/output error (injected halfway through the upload)")
        data = self.inner.read(min(len(buffer), self.left))
        buffer[: len(data)] = data
        self.left -= len(data)
        return len(data)


class BreakingStore:
    """The study's artifact store, except that the upload of ``trial-<N>.safetensors`` breaks
    after half its bytes."""

    def __init__(self, inner: Any, plan: dict[str, int], workdir: Path) -> None:
        self.inner, self.plan, self.workdir = inner, plan, workdir

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def write(self, artifact_id: str, body: BinaryIO) -> None:
        name = Path(str(getattr(body, "name", ""))).name
        number = name.removeprefix("trial-").removesuffix(".safetensors")
        if number.isdigit() and claim(self.workdir, "upload", int(number), self.plan):
            size = os.fstat(body.fileno()).st_size
            log_event(self.workdir, "upload", trial=int(number), artifact=artifact_id)
            body = io.BufferedReader(BreaksAfter(body, size // 2), buffer_size=4096)  # type: ignore[assignment]
        self.inner.write(artifact_id, body)


def install_faults(workdir: Path, plan: dict[str, int]) -> None:
    """Patch this worker process: NaN loss, out of memory and a broken upload at the planned
    trial numbers, and a stop once the orchestrator asks for it (after the current trial)."""
    import torch

    import jdsearch.search.objective as objective
    import jdsearch.search.run as run
    import jdsearch.search.session as session
    from jdsearch.search.objective import Objective

    current: dict[str, int] = {}
    real_run, real_train, real_store = Objective._run, objective.train, session.make_artifact_store

    def run_trial(self: Objective, trial: optuna.Trial, move: str, parent: int | None) -> float:
        current["trial"] = trial.number
        return real_run(self, trial, move, parent)

    def train(*args: Any, loss_terms: Any = (), **kwargs: Any) -> Any:
        n = current["trial"]
        if claim(workdir, "oom", n, plan):
            log_event(workdir, "oom", trial=n)
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (injected)"
            )
        if claim(workdir, "nan", n, plan):
            log_event(workdir, "nan", trial=n)
            loss_terms = [*loss_terms, NaNLoss()]
        return real_train(*args, loss_terms=loss_terms, **kwargs)

    def store(spec: str, url: str) -> Any:
        return BreakingStore(real_store(spec, url), plan, workdir)

    real_print = run.print_trial

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        real_print(study, trial)
        if (workdir / STOP_FILE).exists():
            study.stop()

    Objective._run = run_trial  # type: ignore[method-assign]
    objective.train = train
    session.make_artifact_store = store
    run.print_trial = after_trial


class NaNLoss(__import__("torch").nn.Module):
    """A loss term that makes the total loss NaN (what a diverging run produces)."""

    def forward(self, model: Any) -> dict[str, Any]:
        import torch

        return {"loss_nan": torch.tensor(float("nan"))}


def worker_main(spec_file: Path, storage: str, workdir: Path) -> int:
    """One worker: the search with the planned faults, until the stop file appears."""
    import torch

    from jdsearch.search.run import run_search
    from jdsearch.spec.study import load_study

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    install_faults(workdir, json.loads((workdir / PLAN_FILE).read_text()))
    run_search(load_study(spec_file), storage, n_trials=10_000, progress=False)
    return 0


# ============================================================================ the orchestrator
@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    started: float

    @property
    def marker(self) -> str:
        """What its trials record as their worker (``hostname:pid``)."""
        import socket

        return f"{socket.gethostname()}:{self.proc.pid}"


@dataclass
class Run:
    """The orchestrator's state: workers, faults it caused, trials it saw complete."""

    workdir: Path
    spec_file: Path
    storage: str
    server: PrivatePostgres | None = None  # the bench's own server (--pg-restart, --long-outage)
    workers: list[Worker] = field(default_factory=list)
    restarts: list[tuple[float, str]] = field(default_factory=list)  # (when, worker name)
    seen_complete: dict[int, str] = field(default_factory=dict)  # number -> checkpoint id
    spawned: int = 0

    def spawn(self) -> Worker:
        self.spawned += 1
        name = f"w{self.spawned}"
        log = (self.workdir / f"{name}.log").open("wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        env.setdefault("JDSEARCH_DB_RETRY_S", "300")
        argv = [sys.executable, __file__, "--worker", str(self.spec_file), "--storage"]
        proc = subprocess.Popen(
            [*argv, self.storage, "--workdir", str(self.workdir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        worker = Worker(name, proc, time.time())
        self.workers.append(worker)
        return worker

    def alive(self) -> list[Worker]:
        return [w for w in self.workers if w.proc.poll() is None]


def trials_now(storage: str, name: str) -> list[FrozenTrial] | None:
    """The study's trials, or None while the database is unreachable."""
    from optuna.storages import RDBStorage

    try:
        s = RDBStorage(storage, skip_table_creation=True)
        try:
            return optuna.load_study(study_name=name, storage=s).get_trials(deepcopy=False)
        finally:
            s.remove_session()
            s.engine.dispose()
    except Exception:
        return None


def running_marker(trials: list[FrozenTrial]) -> set[str]:
    """Workers inside a trial (whose move is chosen)."""
    return {
        str(t.system_attrs.get("jdsearch:worker"))
        for t in trials
        if t.state == TrialState.RUNNING and "move" in t.params
    }


def plan_faults(rng: random.Random, n: int, kills: int) -> tuple[dict[str, int], list[int]]:
    """Trial numbers of the in-trial faults, and the COMPLETE counts at which to kill."""
    numbers = rng.sample(range(2, max(n, 5)), 3)
    plan = {"upload": numbers[0], "nan": numbers[1], "oom": numbers[2]}
    thresholds = sorted(rng.sample(range(1, max(n - 2, kills + 1)), kills))
    return plan, thresholds


def orchestrate(run: Run, args: argparse.Namespace, name: str, rng: random.Random) -> None:
    """Start the workers, cause kills (and a PostgreSQL restart) as trials complete, and ask the
    workers to stop once ``--trials`` are COMPLETE and no killed trial awaits its retry."""
    plan, kill_at = plan_faults(rng, args.trials, args.kills)
    (run.workdir / PLAN_FILE).write_text(json.dumps(plan))
    print(
        f"planned: upload breaks in trial {plan['upload']}, NaN in {plan['nan']}, "
        f"OOM in {plan['oom']}; kills at {kill_at} complete trials",
        flush=True,
    )
    pg_at = args.trials // 2 if args.pg_restart else None
    outage_at = max(1, args.trials // 3) if args.long_outage else None
    for _ in range(args.workers):
        run.spawn()
    pending_restarts: list[float] = []
    deadline = time.time() + args.timeout
    while time.time() < deadline:
        time.sleep(0.5)
        trials = trials_now(run.storage, name)
        if trials is None:
            continue
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        for t in done:
            run.seen_complete.setdefault(t.number, str(t.user_attrs.get("checkpoint")))
        if kill_at and len(done) >= kill_at[0] and kill_one(run, trials, rng):
            kill_at.pop(0)
            pending_restarts.append(time.time() + rng.uniform(1.0, 5.0))
        if pg_at is not None and len(done) >= pg_at:
            restart_postgresql(run)
            pg_at = None
        if outage_at is not None and len(done) >= outage_at and len(running_marker(trials)) >= 2:
            long_outage(run, args.outage_s)
            outage_at = None
        for when in [w for w in pending_restarts if w <= time.time()]:
            pending_restarts.remove(when)
            worker = run.spawn()
            run.restarts.append((time.time(), worker.name))
        if not run.alive() and not pending_restarts:
            print("every worker has died: the search cannot go on", flush=True)
            break
        waiting = kill_at or pending_restarts or pg_at is not None or outage_at is not None
        if finished(trials, args.trials) and not waiting:
            (run.workdir / STOP_FILE).touch()
            break
    else:
        print(f"timed out after {args.timeout:.0f} s", flush=True)
    for w in run.workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(timeout=max(1.0, deadline - time.time()))
        if w.proc.poll() is None:
            os.killpg(w.proc.pid, signal.SIGKILL)
            w.proc.wait()


def kill_one(run: Run, trials: list[FrozenTrial], rng: random.Random) -> bool:
    """SIGKILL a worker that is inside a trial; False when none is (try again later)."""
    busy = running_marker(trials)
    candidates = [w for w in run.alive() if w.marker in busy]
    if not candidates:
        return False
    victim = rng.choice(candidates)
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    inside = [
        t.number
        for t in trials
        if t.state == TrialState.RUNNING and t.system_attrs.get("jdsearch:worker") == victim.marker
    ]
    trial = max(inside, default=-1)
    log_event(run.workdir, "kill", worker=victim.name, marker=victim.marker, trial=trial)
    print(f"killed {victim.name} ({victim.marker}) inside a trial", flush=True)
    return True


def restart_postgresql(run: Run) -> None:
    """Restart the bench's own PostgreSQL server: stop it (every connection is cut) and start it
    again at once."""
    assert run.server is not None
    log_event(run.workdir, "pg_restart")
    started = time.time()
    run.server.stop()
    run.server.start()
    print(f"restarted PostgreSQL ({time.time() - started:.1f} s)", flush=True)


def long_outage(run: Run, seconds: float) -> None:
    """Stop the bench's own PostgreSQL server for ``seconds``, start it again, and at once fail
    the stale trials as a worker that starts a trial at that moment does (the worst case: else
    the first to get through, a heartbeat or such a worker, decides whether any trial is stale)."""
    from optuna.storages import fail_stale_trials

    from jdsearch.search.session import open_storage
    from jdsearch.spec.study import load_study

    assert run.server is not None
    log_event(run.workdir, "outage", seconds=seconds)
    run.server.stop()
    time.sleep(seconds)
    run.server.start()
    spec = load_study(run.spec_file)
    storage, _ = open_storage(spec, run.storage)
    study = optuna.load_study(study_name=spec.name, storage=storage)
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    fail_stale_trials(study)
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    storage.remove_session()
    print(
        f"PostgreSQL was down for {seconds:.0f} s; failed as stale when it was back: trials "
        f"{sorted(t.number for t in failed if t.number in running)}",
        flush=True,
    )


def finished(trials: list[FrozenTrial], n: int) -> bool:
    """``n`` COMPLETE, nothing WAITING (a re-queued retry) and every failed killed trial has a
    retry that is finished."""
    if sum(t.state == TrialState.COMPLETE for t in trials) < n:
        return False
    if any(t.state == TrialState.WAITING for t in trials):
        return False
    retry_of = retries(trials)
    killed = [t for t in trials if t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs]
    return all(t.number in retry_of and retry_of[t.number].state.is_finished() for t in killed)


def retries(trials: list[FrozenTrial]) -> dict[int, FrozenTrial]:
    """Trial number → the trial that retried it. Optuna's ``retried_trial_number`` names the
    first attempt only; ``retry_history`` lists every earlier attempt, the last one retried."""
    out = {}
    for t in trials:
        history = RetryHeartbeatStaleTrialCallback.retry_history(t)
        if history:
            out[history[-1]] = t
    return out


# ============================================================================ the verdict
def check_study(run: Run, name: str) -> dict[str, Any]:
    """Counts over the finished study (see the module docstring)."""
    from jdsearch.search.queries import open_study

    handle = open_study(run.storage, name)
    trials = handle.study.get_trials()
    by_number = {t.number: t for t in trials}
    unreadable = []
    for t in trials:
        if t.state == TrialState.COMPLETE:
            try:
                with handle.store.open_reader(t.user_attrs["checkpoint"]) as r:
                    r.read()
            except Exception as e:
                unreadable.append((t.number, str(e)[:120]))
    lost = [
        n
        for n in run.seen_complete
        if n not in by_number or by_number[n].state != TrialState.COMPLETE
    ]
    return {
        "trials": trials,
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "retried": sum(
            RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is not None for t in trials
        ),
        "lost": lost,
        "unreadable": unreadable,
        "killed_ok": killed_trials_retried(trials),
        "reasons": {
            t.number: t.user_attrs.get("fail_reason", "(killed)")
            for t in trials
            if t.state == TrialState.FAIL
        },
    }


def killed_trials_retried(trials: list[FrozenTrial]) -> tuple[int, int, int]:
    """``(killed trials, those retried with the same parent and move, those whose retry ended
    COMPLETE)``; a retry that was itself killed counts through its own retry, and one that
    failed for another reason (one of the bench's own faults) is retried but not COMPLETE."""
    retry_of = retries(trials)
    killed = [t for t in trials if t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs]
    same = done = 0
    for t in killed:
        retry = retry_of.get(t.number)
        while retry is not None and retry.state == TrialState.FAIL and retry.number in retry_of:
            retry = retry_of[retry.number]
        if (
            retry is not None
            and retry.params.get("move") == t.params.get("move")
            and retry.user_attrs.get("parent") == t.user_attrs.get("parent")
        ):
            same += 1
            done += retry.state == TrialState.COMPLETE
    return len(killed), same, done


def orphans(storage: str, dry_run: bool) -> int:
    from jdsearch.search.queries import open_storage
    from jdsearch.search.record import artifact_holders
    from jdsearch.storage.gc import collect

    rdb, _ = open_storage(storage)
    return len(collect(rdb, storage, artifact_holders(), older_than_s=0.0, dry_run=dry_run))


def idle_gaps(trials: list[FrozenTrial]) -> tuple[float, str]:
    """The longest time one worker process spent between the end of a trial and the start of its
    next one (it had work: the search never runs dry), and whose."""
    by_worker: dict[str, list[FrozenTrial]] = {}
    for t in trials:
        if t.datetime_start is not None and t.datetime_complete is not None:
            by_worker.setdefault(str(t.system_attrs.get("jdsearch:worker")), []).append(t)
    worst, who = 0.0, "-"
    for marker, ts in by_worker.items():
        ts.sort(key=lambda t: t.datetime_start)
        for a, b in itertools.pairwise(ts):
            gap = (b.datetime_start - a.datetime_complete).total_seconds()
            if gap > worst:
                worst, who = gap, f"{marker} after trial {a.number}"
    return worst, who


def recovery_times(workdir: Path, trials: list[FrozenTrial]) -> list[tuple[str, float, str]]:
    """Each fault (kind, with its trial), the seconds until the next trial COMPLETE, and for a
    kill the seconds until the killed trial's retry was COMPLETE."""
    ends = sorted(
        t.datetime_complete.timestamp()
        for t in trials
        if t.state == TrialState.COMPLETE and t.datetime_complete is not None
    )
    retry_of = retries(trials)
    out = []
    for line in (workdir / EVENTS_FILE).read_text().splitlines():
        e = json.loads(line)
        nxt = next((x for x in ends if x > e["t"]), None)
        label = e["kind"] + (f" (trial {e['trial']})" if "trial" in e else "")
        redone = ""
        retry = retry_of.get(e.get("trial")) if e["kind"] == "kill" else None
        while retry is not None and retry.number in retry_of:  # killed again: its retry
            retry = retry_of[retry.number]
        if retry is not None and retry.datetime_complete is not None:
            end = retry.datetime_complete.timestamp() - e["t"]
            redone = f"retried as trial {retry.number}, {retry.state.name} after {end:.1f} s"
        out.append((label, float("nan") if nxt is None else nxt - e["t"], redone))
    return out


def crashed(run: Run) -> int:
    """Workers that exited non-zero without being killed by the bench."""
    killed = {
        json.loads(x).get("worker") for x in (run.workdir / EVENTS_FILE).read_text().splitlines()
    }
    return sum(w.proc.returncode not in (0, None) and w.name not in killed for w in run.workers)


def outage_trials(run: Run, trials: list[FrozenTrial]) -> tuple[int, int, int, int]:
    """``(trials failed as stale whose worker the bench did not kill, those their worker stopped
    with its one line, those their worker told all the same, those whose retry resumed a saved
    training state)``. A worker's line on a trial starts ``trial   N  ``; the line of a stopped
    one says ``STOPPED:``, every other line (a finished trial's) is a tell."""
    events = [json.loads(x) for x in (run.workdir / EVENTS_FILE).read_text().splitlines()]
    killed = {e.get("marker") for e in events if e["kind"] == "kill"}
    logs = {w.marker: run.workdir / f"{w.name}.log" for w in run.workers}
    retry_of = retries(trials)
    stale = [
        t
        for t in trials
        if t.state == TrialState.FAIL
        and "fail_reason" not in t.user_attrs
        and t.system_attrs.get("jdsearch:worker") not in killed
    ]
    stopped = told = resumed = 0
    for t in stale:
        log = logs.get(str(t.system_attrs.get("jdsearch:worker")))
        text = log.read_text(errors="replace") if log is not None else ""
        lines = [x for x in text.splitlines() if x.startswith(f"trial {t.number:3d}  ")]
        stopped += any("STOPPED:" in x for x in lines)
        told += any("STOPPED:" not in x for x in lines)
        retry = retry_of.get(t.number)
        resumed += retry is not None and bool(retry.user_attrs.get("resumed_from"))
    return len(stale), stopped, told, resumed


def waits(workdir: Path) -> int:
    """Storage or artifact calls that met an unreachable database and were retried."""
    return sum(
        p.read_text(errors="replace").count("the database is unreachable")
        for p in workdir.glob("w*.log")
    )


def report(run: Run, name: str, args: argparse.Namespace) -> int:
    verdict = check_study(run, name)
    before = orphans(run.storage, dry_run=True)
    after_gc = orphans(run.storage, dry_run=False)
    left = orphans(run.storage, dry_run=True)
    events = [json.loads(x) for x in (run.workdir / EVENTS_FILE).read_text().splitlines()]
    kinds = {
        k: sum(e["kind"] == k for e in events)
        for k in ("kill", "pg_restart", "outage", "upload", "nan", "oom")
    }
    down = sum(e.get("seconds", 0.0) for e in events if e["kind"] == "outage")
    stale, stopped, told, resumed = outage_trials(run, verdict["trials"])
    gap, who = idle_gaps(verdict["trials"])
    killed, killed_ok, killed_done = verdict["killed_ok"]
    rows = [
        ("storage", "PostgreSQL" if run.storage.startswith("postgresql") else "SQLite"),
        ("workers / target trials", f"{args.workers} / {args.trials}"),
        ("faults: SIGKILL of a worker in a trial", kinds["kill"]),
        ("faults: PostgreSQL restart", kinds["pg_restart"]),
        ("faults: PostgreSQL down past the grace period", f"{kinds['outage']} ({down:.0f} s)"),
        ("faults: upload broken halfway", kinds["upload"]),
        ("faults: NaN loss", kinds["nan"]),
        ("faults: out of memory", kinds["oom"]),
        ("trials COMPLETE", verdict["complete"]),
        ("trials FAIL", verdict["failed"]),
        ("trials retried (re-queued after a kill)", verdict["retried"]),
        ("killed trials retried with the same parent+move", f"{killed_ok} of {killed}"),
        ("  ... whose retry is COMPLETE (else: another fault)", f"{killed_done} of {killed}"),
        ("trials failed as stale, their worker alive (outage)", stale),
        ("  ... stopped by their worker, with one line", f"{stopped} of {stale}"),
        ("  ... told by their worker all the same", f"{told} of {stale}"),
        ("  ... whose retry resumed a saved training state", f"{resumed} of {stale}"),
        ("trials lost", len(verdict["lost"])),
        ("unreadable checkpoints of COMPLETE trials", len(verdict["unreadable"])),
        ("orphaned artifacts before gc", before),
        ("removed by jdsearch gc", after_gc),
        ("orphaned artifacts left after gc", left),
        ("longest idle gap of a worker (s)", f"{gap:.1f} ({who})"),
        ("worker restarts (after the bench's kills)", len(run.restarts)),
        ("workers that died on their own (crashed)", crashed(run)),
        ("calls that waited for the database (worker logs)", waits(run.workdir)),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("\nfault → next COMPLETE trial of any worker (s):")
    for label, s, redone in recovery_times(run.workdir, verdict["trials"]):
        print(f"  {label:<24} {s:6.1f}  {redone}")
    print("\nfailed trials:")
    for n, why in sorted(verdict["reasons"].items()):
        print(f"  {n:3d}  {why[:150]}")
    bad = verdict["lost"] or verdict["unreadable"] or killed_ok != killed or left or crashed(run)
    bad = bad or told
    return 1 if bad else 0


# ============================================================================ main
def prepare_study(workdir: Path, storage: str, args: argparse.Namespace) -> tuple[Path, str]:
    """The tiny study's spec file, its base and pool trained and uploaded (in this process)."""
    from jdsearch.search.session import prepare

    name = "faults"
    spec = tiny_study(workdir, name, storage, None, args.trials)
    doc = spec.to_dict()
    doc["search"].update({"heartbeat_s": args.heartbeat, "max_retry": 5, "seed": args.seed})
    if args.checkpoint_every is not None:
        doc["search"]["trial_checkpoint_every"] = args.checkpoint_every
    spec_file = workdir / "faults.yaml"
    spec_file.write_text(yaml.safe_dump(doc))
    from jdsearch.spec.study import load_study

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        prepare(load_study(spec_file), storage, progress=False)
    finally:
        os.chdir(cwd)
    return spec_file, name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--trials", type=int, default=20, help="COMPLETE trials to reach")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument(
        "--pg-restart",
        action="store_true",
        help="restart PostgreSQL (a server of the bench's own) once, halfway",
    )
    p.add_argument(
        "--long-outage",
        action="store_true",
        help="stop PostgreSQL (a server of the bench's own) past the grace period, once",
    )
    p.add_argument("--outage-s", type=float, default=None, help="default 3 × 2 × --heartbeat")
    p.add_argument("--storage", default=None, help="default: a throwaway local PostgreSQL schema")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heartbeat", type=int, default=2, help="search.heartbeat_s")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="search.trial_checkpoint_every: a retry resumes the state saved this often",
    )
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: temp)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        os.chdir(args.workdir)
        return worker_main(args.worker, args.storage, args.workdir)
    for flag, given in (("--pg-restart", args.pg_restart), ("--long-outage", args.long_outage)):
        if given and args.storage is not None:
            p.error(f"{flag} uses a PostgreSQL server of the bench's own: leave --storage out")
    if args.outage_s is None:
        args.outage_s = 6.0 * args.heartbeat
    quiet_optuna()
    drop: Callable[[], None] | None = None
    storage, server = args.storage, None
    if args.pg_restart or args.long_outage:
        server = PrivatePostgres()
        storage, drop = server.url, server.close
    elif storage is None:
        pg = pg_schema(PG, prefix="bench_faults")
        if pg is None:
            return 2
        storage, drop = pg
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="jdsearch-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        started = time.time()
        spec_file, name = prepare_study(workdir, storage, args)
        print(f"prepared in {time.time() - started:.0f} s; searching in {workdir}", flush=True)
        run = Run(workdir, spec_file, storage, server)
        orchestrate(run, args, name, random.Random(args.seed))
        print(f"search under faults: {time.time() - started:.0f} s", flush=True)
        return report(run, name, args)
    finally:
        if drop is not None:
            drop()
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
