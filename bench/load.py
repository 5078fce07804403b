"""How many workers one study serves: N worker processes on one PostgreSQL study, stand-in trials.

Usage::

    python bench/load.py [--workers 1,2,4,8,16,32] [--trial-s 1.0] [--trials 8] [--pg-url URL]

For each N, in one run: a fresh study in a throwaway schema (dropped at the end), whose root trial
one worker runs first, alone (every other worker would wait for it); then N worker processes,
started together, add ``--trials`` trials each. A worker is the real one but for training and
evaluation: the quickstart study's settings, the study's ``ResilientStorage`` with heartbeats
and its stale-trial callbacks (``storage_for``), the ``HillClimbingSampler`` with its strategy,
KD mode and pool space (a parent's feasible moves are read from its trial record, as
``SearchContext.feasible`` does), ``study.optimize`` with the dashboard notes' callback. Its
trial sets the worker attribute, asks the sampler for its parent and move, reads the parent's
record and downloads its checkpoint, sleeps ``--trial-s`` (the stand-in for training and
evaluation), checks that the trial is still its own (``lost_trial(trial, read=True)``: one
read), uploads a safetensors checkpoint of ``--checkpoint-kb`` KB to the study's artifact
store, writes a full ``TrialRecord`` and is told. Its H is the parent's plus a step fixed by
(parent, move), so the hill climb has a lineage to climb. Left out: the resumable training's
bookkeeping (no storage call: it keeps the trial Optuna read as it began, and a trial that saved
no state removes none) and the one-line summary printed per trial. Workers import no torch (a
real worker does; 32 of them would not fit in this machine's memory).

Reported against N, per trial of the N workers (the main thread's wall time, from the end of the
previous trial to the end of this one: ask, tell and the note included):

* trials/s, and against N / trial-s (every worker busy all the time);
* sampler — ``HillClimbingSampler.sample_relative``, its storage calls included; storage — every
  other call of the worker's main thread to the storage (create, attributes, the record,
  tell, the stale-trial check, the note); artifacts — the parent's download and the upload (their
  storage calls included); engine — all of the trial but the stand-in's sleep;
* cpu_ms, db_ms — CPU milliseconds per trial of the workers (all their threads) and of the
  PostgreSQL server (when it runs on this machine: ``/proc``);
* conns — the database's connections opened by the study's workers (``pg_stat_activity``, by
  ``application_name``; sampled every 0.2 s): the peak, and per worker;
* dup — a (parent, move) decided by two trials although it was untried in the view of the later
  decision (two workers that chose at once); repeats — a (parent, move) decided again when the
  sampler knew every move of its top-k had been tried (by design: a new seed); failed — FAIL
  trials; lost — trials not COMPLETE or FAIL after every worker exited, trials missing, and
  trials a worker completed that the study does not hold COMPLETE.

Then the storage calls of a trial, counted and timed, for the first and the last N.

A worker is ``python bench/load.py --worker ...``: it prints ``ready`` when its study is open,
starts on a line on its stdin and prints its figures as one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PG_DEFAULT = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
APP_PREFIX = "jdsearch-load"
PHASES = ("sampler", "storage", "artifacts")


# ---------------------------------------------------------------------------- the worker
class Clock:
    """Seconds per phase of the main thread; the outermost timed call owns nested ones."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()  # every call of the main thread, nested ones too
        self.by_name: dict[str, float] = defaultdict(float)
        self._depth = 0
        self._main = threading.main_thread()

    def wrap(self, phase: str, fn: Callable[..., Any], name: str = "") -> Callable[..., Any]:
        """``fn``, its calls timed as ``phase`` (and counted under ``name`` as well)."""
        name = name or phase

        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not self._main:
                return fn(*args, **kwargs)
            outer = self._depth == 0
            self._depth += 1
            self.calls[name] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t0
                self.by_name[name] += spent
                if outer:
                    self.spent[phase] += spent
                self._depth -= 1

        return timed

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a block of the main thread as ``name`` (unless a timed call holds it)."""
        outer = self._depth == 0
        self._depth += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if outer:
                self.spent[name] += time.perf_counter() - t0

    def take(self) -> dict[str, float]:
        out, self.spent = dict(self.spent), defaultdict(float)
        return out


def step_of(parent: int, move: str) -> float:
    """The stand-in's change of H from ``parent`` by ``move``: fixed per (parent, move), in
    [-0.02, 0.03), so some moves climb and some do not."""
    return (zlib.crc32(f"{parent}:{move}".encode()) % 1000) / 1000 * 0.05 - 0.02


class StandIn:
    """A trial as ``Objective`` runs it, with a sleep instead of training and evaluation."""

    def __init__(self, ctx: dict[str, Any], clock: Clock) -> None:
        self.__dict__.update(ctx)
        self.clock = clock

    def __call__(self, trial: Any) -> float:
        from jdsearch.core.errors import JDSearchError
        from jdsearch.search.record import (
            BASE_MOVE,
            MOVE_PARAM,
            PARENT_ATTR,
            WORKER_SYSATTR,
            TrialRecord,
        )
        from jdsearch.spec.pool_space import SubnetSpace
        from jdsearch.storage.artifacts import check_artifact_id
        from jdsearch.storage.optuna_internals import (
            HeldAttrs,
            lost_trial,
            set_trial_system_attr,
            stored_trial,
            trial_by_number,
        )

        worker = f"{socket.gethostname()}:{os.getpid()}"
        if stored_trial(trial).system_attrs.get(WORKER_SYSATTR) != worker:  # as Objective
            set_trial_system_attr(trial, WORKER_SYSATTR, worker)
        move = trial.suggest_categorical(MOVE_PARAM, self.vocabulary)
        parent_no = trial.user_attrs.get(PARENT_ATTR)
        if move == BASE_MOVE:
            teacher, h = self.kd.root_teacher(self.space), 0.5
        else:
            parent = TrialRecord.from_trial(trial_by_number(trial.study, int(parent_no)))
            with self.clock.phase("artifacts"):
                aid = check_artifact_id(parent.checkpoint, f"trial {parent_no}")
                with self.store.open_reader(aid) as reader:
                    reader.read()
            teacher = self.kd.teacher_of(parent.teacher)
            if move in SubnetSpace.move_names():
                teacher = self.space.apply_move(teacher, move)
            h = float(parent.value) + step_of(int(parent_no), move)
        time.sleep(self.trial_s)  # training and evaluation
        if lost_trial(trial, read=True):  # as Objective, before its upload
            raise JDSearchError(f"trial {trial.number}: another worker failed it as stale")
        with self.clock.phase("artifacts"), tempfile.TemporaryDirectory() as tmp:
            from optuna.artifacts import upload_artifact

            path = Path(tmp) / f"trial-{trial.number}.safetensors"
            path.write_bytes(self.checkpoint)
            held: dict[str, Any] = {}  # as Objective.record: written with the record
            artifact = upload_artifact(
                study_or_trial=trial,
                file_path=str(path),
                artifact_store=self.store,
                storage=HeldAttrs(held),
            )
        self.record(trial, artifact, "" if teacher is None else str(teacher), h, held)
        return h

    def record(self, trial: Any, artifact: str, teacher: str, h: float, held: dict) -> None:
        """The trial's :class:`TrialRecord`, as large as a real one (four resolutions)."""
        from jdsearch.search.record import TrialRecord
        from jdsearch.storage.optuna_internals import set_trial_attrs

        sizes = ("80x80", "128x96", "176x112", "208x128")
        metrics = {k: {"AP": h, "AP50": h, "AP75": h, "APs": h, "APm": h, "APl": h} for k in sizes}
        record = TrialRecord(
            student=self.arch.encode(),
            teacher=teacher,
            checkpoint=artifact,
            teacher_params=1_000_000,
            flops=50_000_000,
            flops_at=dict.fromkeys(sizes, 50_000_000),
            backbone_flops=40_000_000,
            stage_flops=(1, 2, 3, 4, 5),
            params=1_000_000,
            metrics=metrics,
            ap=dict.fromkeys(sizes, h),
            h=dict.fromkeys(sizes, h),
            h_value=h,
            cost=dict.fromkeys(sizes, 1.0),
            arch_key="stand-in",
            best_resolution=sizes[-1],
            train_images=600,
            timings={"train_s": self.trial_s, "eval_s": 0.0, "load_s": 0.0, "upload_s": 0.0},
            arch=self.arch.to_dict(),
            student_moves=tuple(self.student_moves),
        )
        user, system = record.to_attrs()
        set_trial_attrs(trial, user, {**held, **system})  # as Objective.record writes them


def run_worker(args: argparse.Namespace) -> None:
    """One worker: open the study, say ``ready``, wait for a line, run, print its figures."""
    import optuna
    from optuna.storages import BaseStorage

    from jdsearch.core.errors import JDSearchError
    from jdsearch.core.files import read_bytes, read_text
    from jdsearch.search.notes import NoteWriter, note_lost_worker, retry_attrs
    from jdsearch.search.record import WORKER_SYSATTR, TrialRecord
    from jdsearch.search.sampler import HillClimbingSampler
    from jdsearch.search.strategies import kd_mode_named, strategy_named, tried_moves
    from jdsearch.spec.detector import load_spec
    from jdsearch.spec.study import load_study
    from jdsearch.storage.artifacts import make_artifact_store
    from jdsearch.storage.rdb import storage_for
    from jdsearch.testing import quickstart_path, quiet_optuna

    quiet_optuna()
    spec = load_study(quickstart_path())
    moves = json.loads(read_text(Path(args.moves)))
    started = {WORKER_SYSATTR: f"{socket.gethostname()}:{os.getpid()}"}  # as open_storage
    storage = storage_for(
        spec, args.url, on_stale=note_lost_worker, retry_attrs=retry_attrs, started=started
    )
    store = make_artifact_store(spec.search.artifacts, args.url)
    kd, strategy, space = kd_mode_named(spec.kd.mode), strategy_named(spec.search.strategy), None
    space = spec.pool.space

    def feasible(parent: Any) -> tuple[list[str], list[str]]:  # SearchContext.feasible's
        record = TrialRecord.from_trial(parent)
        students = strategy.student_moves(record, lambda: [])
        return students, kd.teacher_moves(space, record.teacher)

    s = spec.search
    sampler = HillClimbingSampler(
        moves["vocabulary"],
        feasible,
        top_k=s.top_k,
        freeze_student=s.freeze_student if kd.moves_teacher else 0,
        p_student=s.p_student,
        seed=s.seed,
        strategy=strategy,
    )
    clock = Clock()
    fresh: dict[int, bool] = {}
    choose = sampler.choose

    def choose_and_note(trials: Any, number: int, aside: Any = frozenset(), **kw: Any) -> Any:
        decision = choose(trials, number, aside, **kw)
        fresh[number] = decision.move not in tried_moves(trials, decision.parent)
        return decision

    sampler.choose = choose_and_note  # type: ignore[method-assign]
    sampler.sample_relative = clock.wrap("sampler", sampler.sample_relative)  # type: ignore[method-assign]
    for name in [n for n in dir(BaseStorage) if not n.startswith("_")] + [
        "stale_trial_ids",
        "is_lost",
        "set_trial_attrs",
        "save_trial_note",
        "study_system_attrs_with",
        "trial_sketches",
    ]:
        if callable(getattr(storage, name, None)):
            setattr(storage, name, clock.wrap("storage", getattr(storage, name), name))
    study = optuna.load_study(study_name=args.study, storage=storage, sampler=sampler)
    ctx = {
        "vocabulary": moves["vocabulary"],
        "student_moves": moves["student_moves"],
        "kd": kd,
        "space": space,
        "store": store,
        "trial_s": args.trial_s,
        "checkpoint": read_bytes(Path(args.checkpoint), 1 << 24),
        "arch": load_spec(spec.base.detector).arch,
    }
    rows: list[dict[str, Any]] = []
    last = [0.0]

    def on_trial(study: Any, trial: Any) -> None:
        now = time.perf_counter()
        row: dict[str, Any] = clock.take()
        row.update(wall=now - last[0], number=trial.number, state=trial.state.name)
        rows.append(row)
        last[0] = time.perf_counter()

    print("ready", flush=True)
    sys.stdin.readline()
    cpu0 = time.process_time()
    last[0] = time.perf_counter()
    errors = []
    gc.collect()  # as jdsearch.search.run.optimize: what was built so far is not walked again
    gc.freeze()
    try:
        study.optimize(
            StandIn(ctx, clock),
            n_trials=args.trials,
            catch=(JDSearchError,),
            callbacks=[NoteWriter(spec.score.metric), on_trial],  # as `jdsearch search`
            gc_after_trial=True,
        )
    except Exception as e:  # counted as lost by the parent: the worker stopped
        errors.append(f"{type(e).__name__}: {e}")
    store.close()
    storage.remove_session()
    cpu = time.process_time() - cpu0  # every thread of the worker: heartbeats too
    detail = {k: [clock.by_name[k], clock.calls[k]] for k in clock.calls}
    out = {"rows": rows, "fresh": fresh, "errors": errors, "detail": detail, "cpu": cpu}
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------------- the parent
def write_inputs(root: Path, kb: int) -> tuple[Path, Path]:
    """The move vocabulary and the base detector's feasible student moves (JSON), and a
    safetensors file of ``kb`` KB: what every worker reads instead of importing torch."""
    import numpy as np
    from safetensors.numpy import save

    from jdsearch.methods.morph.actions import feasible_actions
    from jdsearch.models import build_detector
    from jdsearch.search.objective import move_vocabulary
    from jdsearch.spec.detector import load_spec
    from jdsearch.spec.study import load_study
    from jdsearch.testing import quickstart_path

    spec = load_study(quickstart_path())
    student = build_detector(load_spec(spec.base.detector), 7)
    moves = {"vocabulary": move_vocabulary(), "student_moves": feasible_actions(student)}
    moves_path = root / "moves.json"
    moves_path.write_text(json.dumps(moves))
    weights = np.random.default_rng(0).standard_normal(kb * 256).astype(np.float32)
    ckpt = root / "checkpoint.safetensors"
    ckpt.write_bytes(save({"weights": weights}, metadata={"jdsearch-load": "stand-in"}))
    return moves_path, ckpt


def server_cpu_s() -> float | None:
    """CPU seconds the local PostgreSQL server has used: its live processes' own and what the
    postmaster collected from the exited ones (``/proc``); None when no server runs here."""
    ticks = os.sysconf("SC_CLK_TCK")
    procs = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :]
            if comm == "postgres":
                f = rest.split()  # from the state on: ppid f[1], utime f[11] ... cstime f[14]
                procs[int(stat.parent.name)] = (int(f[1]), [int(x) for x in f[11:15]])
    roots = [pid for pid, (ppid, _) in procs.items() if ppid not in procs]
    if not roots:
        return None
    total = sum(t[0] + t[1] for _, t in procs.values())
    total += sum(procs[r][1][2] + procs[r][1][3] for r in roots)  # exited backends, collected
    return total / ticks


class Connections:
    """Samples the server's connections with a given ``application_name`` every 0.2 s."""

    def __init__(self, pg_url: str, app: str) -> None:
        import psycopg2
        import sqlalchemy as sa

        u = sa.make_url(pg_url)
        self.conn = psycopg2.connect(
            host=u.host,
            port=u.port or 5432,
            user=u.username,
            password=u.password,
            dbname=u.database,
        )
        self.conn.autocommit = True
        self.app, self.samples = app, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            with self.conn.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (self.app,)
                )
                self.samples.append(int(cur.fetchone()[0]))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.conn.close()
        return max(self.samples, default=0)


def start_workers(
    n: int, url: str, study: str, args: argparse.Namespace, inputs: tuple[Path, Path], trials: int
) -> list[subprocess.Popen[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", "--url", url, "--study", study]
    cmd += ["--trials", str(trials), "--trial-s", str(args.trial_s)]
    cmd += ["--moves", str(inputs[0]), "--checkpoint", str(inputs[1])]
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(n)
    ]
    for p in procs:
        line = p.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "ready":
            raise SystemExit(f"a worker did not start (exit {p.wait()}): {line.strip()!r}")
    return procs


def finish(procs: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=600)
        lines = [x for x in text.splitlines() if x.startswith("{")]
        out.append(
            json.loads(lines[-1]) if lines else {"rows": [], "fresh": {}, "errors": ["died"]}
        )
    return out


def one_n(n: int, args: argparse.Namespace, inputs: tuple[Path, Path]) -> dict[str, Any]:
    """Run N workers on a fresh study in a throwaway schema; their figures."""
    import optuna

    from jdsearch.search.queries import create_or_load
    from jdsearch.spec.study import load_study
    from jdsearch.storage.rdb import storage_for
    from jdsearch.testing import pg_schema, quickstart_path

    made = pg_schema(args.pg_url, prefix="bench_load")
    if made is None:
        raise SystemExit("PostgreSQL is unreachable: nothing measured")
    schema_url, drop = made
    app = f"{APP_PREFIX}-{uuid.uuid4().hex[:8]}"
    url = f"{schema_url}&application_name={app}"
    name = f"load-{n}-{uuid.uuid4().hex[:6]}"
    try:
        spec = dataclasses.replace(load_study(quickstart_path()), name=name)
        storage = storage_for(spec, url)
        create_or_load(spec, storage, optuna.samplers.RandomSampler())
        storage.remove_session()
        storage.engine.dispose()
        root = start_workers(1, url, name, args, inputs, 1)
        root[0].stdin.write("go\n")  # type: ignore[union-attr]
        root[0].stdin.flush()  # type: ignore[union-attr]
        finish(root)
        procs = start_workers(n, url, name, args, inputs, args.trials)
        conns = Connections(args.pg_url, app)
        db0 = server_cpu_s()
        t0 = time.perf_counter()
        for p in procs:
            p.stdin.write("go\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        results = finish(procs)
        wall = time.perf_counter() - t0
        db1 = server_cpu_s()
        peak = conns.stop()
        trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
        optuna.storages.RDBStorage(url).engine.dispose()
    finally:
        drop()
    db_cpu = None if db0 is None or db1 is None else db1 - db0
    return tally(n, args, results, trials, wall, peak, db_cpu)


def tally(
    n: int,
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    trials: list[Any],
    wall: float,
    peak: int,
    db_cpu: float | None,
) -> dict[str, Any]:
    from jdsearch.search.record import MOVE_PARAM, PARENT_ATTR

    rows = [r for res in results for r in res["rows"]]
    detail: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for res in results:
        for k, (secs, calls) in res.get("detail", {}).items():
            detail[k][0] += secs / max(len(rows), 1)
            detail[k][1] += calls / max(len(rows), 1)
    fresh = {int(k): v for res in results for k, v in res["fresh"].items()}
    states = Counter(t.state.name for t in trials)
    complete = {t.number for t in trials if t.state.name == "COMPLETE"}
    told = {r["number"] for r in rows if r["state"] == "COMPLETE"}
    decided = defaultdict(list)
    for t in sorted(trials, key=lambda t: t.number):
        if t.user_attrs.get(PARENT_ATTR) is not None and MOVE_PARAM in t.params:
            decided[(t.user_attrs[PARENT_ATTR], t.params[MOVE_PARAM])].append(t.number)
    dup = repeats = 0
    for numbers in decided.values():
        for number in numbers[1:]:
            if fresh.get(number, False):
                dup += 1
            else:
                repeats += 1
    expected = 1 + n * args.trials
    unfinished = sum(states[s] for s in ("RUNNING", "WAITING"))
    lost = unfinished + max(0, expected - len(trials)) + len(told - complete)
    mean = {k: sum(r.get(k, 0.0) for r in rows) / max(len(rows), 1) for k in (*PHASES, "wall")}
    return {
        "n": n,
        "trials": len(complete) - 1,
        "run_s": wall,
        "rate": (len(complete) - 1) / wall,
        **mean,
        "peak": peak,
        "dup": dup,
        "repeats": repeats,
        "failed": states["FAIL"],
        "lost": lost,
        "errors": [e for res in results for e in res["errors"]],
        "detail": dict(detail),
        "cpu": sum(res.get("cpu", 0.0) for res in results) / max(len(rows), 1),
        "db_cpu": None if db_cpu is None else db_cpu / max(len(rows), 1),
    }


def print_table(results: list[dict[str, Any]], trial_s: float) -> None:
    print(
        f"\nstand-in trial {trial_s:g} s. run_s: the N workers' run; of_N/t: trials/s against "
        "N / stand-in; trial_s: a trial's mean wall time;\nsampler, storage, artifacts, engine: "
        "their share of it (engine: all but the stand-in's sleep);\ncpu_ms, db_ms: CPU "
        "milliseconds per trial of the workers and of the PostgreSQL server; conns: peak "
        "connections"
    )
    head = (
        f"{'N':>3}{'trials':>7}{'run_s':>7}{'trials/s':>9}{'of_N/t':>8}{'trial_s':>8}"
        f"{'sampler':>8}{'storage':>8}{'artifacts':>10}{'engine':>7}"
        f"{'cpu_ms':>7}{'db_ms':>6}{'conns':>6}{'conns/N':>8}"
        f"{'dup':>4}{'repeats':>8}{'failed':>7}{'lost':>5}"
    )
    print(head)
    for r in results:
        wall = r["wall"] or 1.0
        engine = max(r["wall"] - trial_s, 0.0)

        db = "n/a" if r["db_cpu"] is None else f"{1000 * r['db_cpu']:.0f}"

        def pct(x: float, wall: float = wall) -> str:
            return f"{100 * x / wall:.1f}%"

        print(
            f"{r['n']:>3}{r['trials']:>7}{r['run_s']:>7.1f}{r['rate']:>9.2f}"
            f"{pct(r['rate'] * trial_s, r['n']):>8}{r['wall']:>8.3f}"
            f"{pct(r['sampler']):>8}{pct(r['storage']):>8}{pct(r['artifacts']):>10}"
            f"{pct(engine):>7}{1000 * r['cpu']:>7.0f}{db:>6}{r['peak']:>6}{r['peak'] / r['n']:>8.1f}"
            f"{r['dup']:>4}{r['repeats']:>8}{r['failed']:>7}{r['lost']:>5}"
        )
    for r in results:
        for e in r["errors"]:
            print(f"N={r['n']}: a worker stopped: {e}")
    shown = [results[0], results[-1]] if len(results) > 1 else results
    print(
        "\nstorage calls of a trial's main thread (mean per trial; the sampler's reads are nested)"
    )
    print(f"{'call':<42}" + "".join(f"{'N=' + str(r['n']):>20}" for r in shown))
    names = sorted(shown[-1]["detail"], key=lambda k: -shown[-1]["detail"][k][0])
    for name in names:
        cells = []
        for r in shown:
            secs, calls = r["detail"].get(name, (0.0, 0.0))
            cells.append(f"{calls:>6.1f} x {1000 * secs:>7.1f} ms")
        print(f"{name:<42}" + "".join(f"{c:>20}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,2,4,8,16,32", help="the values of N, in order")
    parser.add_argument("--trial-s", type=float, default=1.0, help="the stand-in trial's sleep")
    parser.add_argument("--trials", type=int, default=8, help="trials per worker")
    parser.add_argument("--checkpoint-kb", type=int, default=100)
    parser.add_argument("--pg-url", default=PG_DEFAULT)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--url", "--study", "--moves", "--checkpoint"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    from jdsearch.testing import quiet_optuna

    quiet_optuna()
    ns = [int(x) for x in args.workers.split(",")]
    if args.trials < 1 or args.trial_s < 0 or not ns or min(ns) < 1:
        raise SystemExit("--trials, --trial-s and every --workers value must be positive")
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = write_inputs(Path(tmp), args.checkpoint_kb)
        for n in ns:
            results.append(one_n(n, args, inputs))
            r = results[-1]
            print(
                f"N={n}: {r['trials']} trials in {r['run_s']:.1f} s, "
                f"{r['dup']} dup, {r['failed']} failed, {r['lost']} lost",
                flush=True,
            )
    print_table(results, args.trial_s)
    print(f"\nwall time of the whole run: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
