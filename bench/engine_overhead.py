"""How much of a trial's wall time the engine spends outside training and evaluation.

Usage::

    python bench/engine_overhead.py [--trials 4] [--pg-url URL] [--big r50-fpn] [--paper-trial-s 4436]

One run: a tiny study (synthetic data, tiny R18-FPN base, tiny elastic pool; trained once here in a
temporary directory) searches ``--trials`` trials on SQLite and on PostgreSQL (a throwaway schema;
skipped when the server is unreachable). Every phase of each trial is timed in-process, the
outermost phase owning nested calls:

* train, eval — ``jdsearch.search.objective.train`` / ``evaluate`` (the useful work);
* sampler — ``HillClimbingSampler.sample_relative`` (the decision, with its storage reads);
* storage — every other Optuna storage call of the worker's main thread (trial creation, params,
  user/system attrs, tell, stale-trial check; the heartbeat thread is not counted);
* ckpt download / upload — ``SearchContext.download`` / ``upload`` (artifact store read/write and
  safetensors (de)serialisation);
* teacher — ``ElasticPool.teacher`` (sub-net extraction + BN recalibration);
* other — the rest of the wall time (morphism, FLOPs counting, gc, bookkeeping).

The trial's wall time runs from the end of the previous trial (its callback) to the end of this
one, so it includes Optuna's ``ask``/``tell``. The objective's own user attrs (``load_s``,
``teacher_s``, ``train_s``, ``eval_s``, ``upload_s``) are printed as a cross-check.

Then a detector-sized checkpoint (``--big``, default the paper's R50-FPN, ~160 MB) is serialised,
written to and read back from each store, and deserialised, and that round trip is set against a
paper trial: 3 epochs of COCO train2017 (``--paper-trial-s``; the default 4436 s assumes
3 × 118,287 images at 80 img/s, i.e. mmdetection's R50-FPN speed on 8 V100s, teacher cost left out,
so the share it gives is an upper bound).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage

import jdsearch.search.objective
from jdsearch.models import build_detector
from jdsearch.search.objective import Objective
from jdsearch.search.run import optimize
from jdsearch.search.session import prepare
from jdsearch.spec.detector import load_spec
from jdsearch.spec.study import StudySpec
from jdsearch.storage.artifacts import make_artifact_store
from jdsearch.storage.optuna_internals import storage_of
from jdsearch.store.checkpoint import checkpoint_from_bytes, checkpoint_to_bytes
from jdsearch.testing import install_pool, pg_schema, quiet_optuna, tiny_study

PG_DEFAULT = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
PHASES = ("train", "eval", "sampler", "storage", "ckpt download", "ckpt upload", "teacher", "other")
ATTRS = ("load_s", "teacher_s", "train_s", "eval_s", "upload_s")


class Clock:
    """Per-phase seconds of the main thread; only the outermost timed call counts."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self._depth = 0
        self._main = threading.main_thread()

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not self._main or self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[phase] += time.perf_counter() - t0
                self._depth -= 1

        return timed

    def take(self) -> dict[str, float]:
        out, self.spent = dict(self.spent), defaultdict(float)
        return out


@contextlib.contextmanager
def instrumented(study: optuna.Study, ctx: Any, clock: Clock) -> Iterator[None]:
    """Wrap the phases of ``study``'s trials (see the module docstring); undone on exit."""
    storage = storage_of(study)
    names = [
        n
        for n in dir(BaseStorage)
        if not n.startswith("__") and callable(getattr(BaseStorage, n, None))
    ]
    names += ["_get_stale_trial_ids"]
    patches: list[tuple[Any, str, Any, bool]] = []

    def patch(obj: Any, name: str, phase: str) -> None:
        original = getattr(obj, name)
        patches.append((obj, name, original, name in vars(obj)))
        setattr(obj, name, clock.wrap(phase, original))

    for name in names:
        if hasattr(storage, name):
            patch(storage, name, "storage")
    patch(study.sampler, "sample_relative", "sampler")
    patch(ctx, "download", "ckpt download")
    patch(ctx, "upload", "ckpt upload")
    patch(ctx.pool, "teacher", "teacher")
    patch(jdsearch.search.objective, "train", "train")
    patch(jdsearch.search.objective, "evaluate", "eval")
    try:
        yield
    finally:
        for obj, name, original, own in reversed(patches):
            if own:
                setattr(obj, name, original)
            else:
                delattr(obj, name)


def search_phases(
    spec: StudySpec, n_trials: int
) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Per-trial phase seconds (with ``wall``) and the objective's timing attrs, root excluded."""
    study, ctx = prepare(spec, progress=False)
    clock = Clock()
    rows: list[dict[str, float]] = []
    last = [0.0]

    def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        now = time.perf_counter()
        row = clock.take()
        row["wall"] = now - last[0]
        row["other"] = row["wall"] - sum(v for k, v in row.items() if k != "wall")
        row["number"] = trial.number
        row["ok"] = float(trial.state == optuna.trial.TrialState.COMPLETE)
        rows.append(row)
        last[0] = time.perf_counter()

    with instrumented(study, ctx, clock):
        last[0] = time.perf_counter()
        optimize(study, Objective(ctx), n_trials, [on_trial])  # as `jdsearch search` does
    by_number = {t.number: t for t in study.get_trials()}
    kept = [
        r for r in rows if r["number"] != 0 and r["ok"]
    ]  # the root downloads the base, not a parent
    attrs = [{k: float(by_number[int(r["number"])].user_attrs[k]) for k in ATTRS} for r in kept]
    storage_of(study).remove_session()
    return kept, attrs


def mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(r.get(key, 0.0) for r in rows) / max(len(rows), 1)


def print_phase_table(
    results: dict[str, tuple[list[dict[str, float]], list[dict[str, float]]]],
) -> None:
    names = list(results)
    print("\nper trial (mean over non-root trials), seconds and share of the trial's wall time")
    print(f"{'phase':<16}" + "".join(f"{n:>24}" for n in names))
    for phase in ("wall", *PHASES):
        cells = []
        for n in names:
            rows = results[n][0]
            s, wall = mean(rows, phase), mean(rows, "wall")
            cells.append(
                f"{s:>10.3f} s" + ("" if phase == "wall" else f" {100 * s / wall:>8.1f} %")
            )
        print(f"{phase:<16}" + "".join(f"{c:>24}" for c in cells))
    print(
        f"{'outside train+eval':<16}"
        + "".join(
            f"{100 * (1 - (mean(results[n][0], 'train') + mean(results[n][0], 'eval')) / mean(results[n][0], 'wall')):>22.1f} %"
            for n in names
        )
    )
    print(
        f"{'  excl. teacher':<16}"
        + "".join(
            f"{100 * (1 - (mean(results[n][0], 'train') + mean(results[n][0], 'eval') + mean(results[n][0], 'teacher')) / mean(results[n][0], 'wall')):>22.1f} %"
            for n in names
        )
    )
    print("\nthe objective's own timing attrs (mean seconds), as a cross-check")
    print(f"{'attr':<16}" + "".join(f"{n:>24}" for n in names))
    for key in ATTRS:
        print(f"{key:<16}" + "".join(f"{mean(results[n][1], key):>22.3f} s" for n in names))
    print(f"{'trials kept':<16}" + "".join(f"{len(results[n][0]):>24d}" for n in names))


def big_checkpoint_round_trip(
    preset: str, urls: dict[str, str], paper_trial_s: float, fixed_s: dict[str, float]
) -> None:
    """``fixed_s``: per-trial sampler + storage seconds measured on the tiny study, per store."""
    detector = build_detector(load_spec(preset), 81)
    t0 = time.perf_counter()
    data = checkpoint_to_bytes(detector, class_names=[f"c{i}" for i in range(1, 81)])
    ser = time.perf_counter() - t0
    t0 = time.perf_counter()
    checkpoint_from_bytes(data)
    deser = time.perf_counter() - t0
    mb = len(data) / 1e6
    print(f"\n{preset} checkpoint: {mb:.1f} MB; serialise {ser:.2f} s, deserialise {deser:.2f} s")
    print(f"paper trial (3 COCO epochs) taken as {paper_trial_s:.0f} s")
    print(
        f"{'store':<12}{'upload s':>10}{'download s':>12}{'MB/s up':>10}{'MB/s down':>11}{'round trip s':>14}"
        f"{'share':>9}{'+ sampler/storage':>19}"
    )
    for name, url in urls.items():
        store = make_artifact_store("db", url)
        artifact_id = f"bench-{uuid.uuid4()}"
        try:
            t0 = time.perf_counter()
            store.write(artifact_id, io.BytesIO(data))
            up = time.perf_counter() - t0
            t0 = time.perf_counter()
            with store.open_reader(artifact_id) as r:
                back = r.read()
            down = time.perf_counter() - t0
            assert back == data
            store.remove(artifact_id)
        finally:
            store.close()
        total = ser + up + down + deser  # one trial uploads its child and downloads its parent
        engine = total + fixed_s.get(name, 0.0)
        print(
            f"{name:<12}{up:>10.2f}{down:>12.2f}{mb / up:>10.1f}{mb / down:>11.1f}{total:>14.2f}"
            f"{100 * total / paper_trial_s:>8.3f}%{100 * engine / paper_trial_s:>18.3f}%"
        )
    print(
        "(share: of the paper trial; the last column adds this run's per-trial sampler + storage seconds;"
    )
    print(
        " teacher extraction at paper scale is a BN-recalibration forward pass, not measured here)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--trials", type=int, default=4, help="trials per backend (the root included)"
    )
    parser.add_argument("--pg-url", default=PG_DEFAULT)
    parser.add_argument(
        "--big", default="r50-fpn", help="detector preset of the large-checkpoint round trip"
    )
    parser.add_argument("--paper-trial-s", type=float, default=3 * 118_287 / 80)
    parser.add_argument(
        "--scale",
        choices=["tiny", "quickstart"],
        default="tiny",
        help="the study: quickstart's, shrunk to seconds per trial (tiny), or as it is",
    )
    args = parser.parse_args()
    quiet_optuna()

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        stack.enter_context(contextlib.chdir(root))
        t0 = time.perf_counter()
        assets = tiny_study(root, "assets", f"sqlite:///{root / 'assets.db'}", None, 1, args.scale)
        prepare(assets, progress=False)
        base = root / "runs" / "assets" / "base.safetensors"
        print(f"{args.scale} base + pool trained in {time.perf_counter() - t0:.0f} s")

        urls = {"sqlite": f"sqlite:///{root / 'study.db'}"}
        pg = pg_schema(args.pg_url)
        if pg is not None:
            urls["postgresql"] = pg[0]
            stack.callback(pg[1])
        results = {}
        for name, url in urls.items():
            study_name = f"overhead-{name}"
            install_pool(root / "runs" / "assets" / "pool.safetensors", root, study_name)
            t0 = time.perf_counter()
            results[name] = search_phases(
                tiny_study(root, study_name, url, base, args.trials, args.scale), args.trials
            )
            print(f"{name}: {args.trials} trials in {time.perf_counter() - t0:.0f} s")
        print_phase_table(results)
        fixed = {n: mean(r[0], "sampler") + mean(r[0], "storage") for n, r in results.items()}
        big_checkpoint_round_trip(args.big, urls, args.paper_trial_s, fixed)


if __name__ == "__main__":
    main()
