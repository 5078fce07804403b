"""Testing helpers, shared by ``tests/`` and ``bench/``: not part of the search itself.

* :func:`shrunk_quickstart` — ``studies/quickstart.yaml`` cut down to seconds per trial on a CPU
  (as a dict), how far set by a :class:`Shrink`; its defaults are the test suite's;
* :func:`tiny_study` — the study of ``bench/engine_overhead.py`` and ``bench/faults.py``: that
  shrunk quickstart (or the quickstart as it is) as a :class:`~jdsearch.spec.study.StudySpec`;
* :func:`install_pool` — a trained pool put where ``prepare`` looks for a study's cached pool;
* :func:`measure_base`, :func:`measure_pool` — what a study's shipped base and pool record,
  measured now (``bench/ship_base.py``, ``bench/ship_pool.py``);
* :func:`pg_schema` — a throwaway schema on a PostgreSQL server, and its dropper;
* :class:`PrivatePostgres` — a PostgreSQL server of one's own, in a temporary folder, to stop and
  start (an outage) without touching the server that other tests and benches share;
* :func:`quiet_optuna` — Optuna's logging and experimental-feature warnings silenced.

Importing this module imports nothing heavy (PyYAML and the torch-free config reader); torch,
Optuna, SQLAlchemy and psycopg2 are imported by the helpers that need them. It sits in the top
layer (``app``, see ``docs/architecture.md``): it may use any part of jdsearch.

The benches import it like any other jdsearch module: run them from the repository root with
the package installed (``pip install -e .``), e.g. ``python bench/faults.py --help``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from jdsearch.core.config import preset_dir
from jdsearch.core.files import read_bytes, read_text
from jdsearch.core.limits import MAX_CHECKPOINT_BYTES

if TYPE_CHECKING:
    from jdsearch.spec.study import StudySpec


@dataclass(frozen=True)
class Shrink:
    """How far :func:`shrunk_quickstart` cuts the quickstart study down. The defaults are the test
    suite's (``tests/conftest.py``); a bench passes its own."""

    images: int = 32  # data.synth: images, seed, size
    seed: int = 1
    size: int = 96
    max_val_images: int = 8
    base_epochs: float = 1  # base.train: these, lr 0.02 and batch size 4
    base_warmup_iters: int = 1
    pool_epochs: float = 0.25  # every phase of pool.phases
    recalibration_batches: int = 2
    resolutions: tuple[str, ...] = ("64x64", "96x96")
    eval_epochs: float = 0.25  # fast_eval: these, lr 0.01 and batch size 4
    eval_warmup_iters: int = 2
    freeze_student: int = 1
    # Seconds of training leave pool and base near 0 AP: the teacher check (kd.when: stronger)
    # would turn distillation off. None keeps the quickstart's kd.when.
    kd_when: str | None = "always"


def quickstart_path() -> Path:
    """The bundled ``studies/quickstart.yaml`` (a checkout's own, or the installed wheel's)."""
    return preset_dir("studies") / "quickstart.yaml"


def shrunk_quickstart(
    name: str,
    data_dir: str | Path,
    shrink: Shrink | None = None,
    *,
    quickstart: Path | None = None,
    **search: Any,
) -> dict[str, Any]:
    """``studies/quickstart.yaml`` shrunk to seconds per trial on a CPU, as a study dict.

    Args:
        name: the study's name.
        data_dir: ``data.dir``, where the synthetic data is generated (relative to where the
            study runs, or absolute).
        shrink: how far (default :class:`Shrink`'s defaults, the test suite's sizes).
        quickstart: the quickstart file to read (default :func:`quickstart_path`).
        **search: ``search.*`` fields to set besides ``freeze_student`` (``n_trials``,
            ``storage``, ...).

    Returns:
        The spec as a dict (``base.checkpoint`` and ``pool.checkpoint`` unset: ``prepare``
        trains the base and the pool on the shrunk data, which the quickstart's shipped ones were
        not trained on).
    """
    shrink = shrink or Shrink()
    spec = yaml.safe_load(read_text(quickstart or quickstart_path()))
    spec["name"] = name
    spec["base"].pop("checkpoint", None)
    spec["pool"].pop("checkpoint", None)  # a shipped pool is trained on the quickstart's data
    spec["data"] = {
        "dir": str(data_dir),
        "synth": {"images": shrink.images, "seed": shrink.seed, "size": shrink.size},
        "max_val_images": shrink.max_val_images,
    }
    spec["base"]["train"] = {
        "epochs": shrink.base_epochs,
        "lr": 0.02,
        "batch_size": 4,
        "warmup_iters": shrink.base_warmup_iters,
    }
    for phase in spec["pool"]["phases"]:
        phase["epochs"] = shrink.pool_epochs
    spec["pool"]["recalibration_batches"] = shrink.recalibration_batches
    spec["resolutions"] = list(shrink.resolutions)
    spec["fast_eval"] = {
        "epochs": shrink.eval_epochs,
        "lr": 0.01,
        "batch_size": 4,
        "warmup_iters": shrink.eval_warmup_iters,
    }
    spec["search"].update({"freeze_student": shrink.freeze_student, **search})
    if shrink.kd_when is not None:
        spec["kd"]["when"] = shrink.kd_when
    return spec


#: The sizes of :func:`tiny_study` (bench/engine_overhead.py, bench/faults.py).
BENCH_SHRINK = Shrink(images=48, max_val_images=12, base_warmup_iters=2, eval_epochs=0.5)


def tiny_study(
    root: Path, name: str, storage: str, base: Path | None, n_trials: int, scale: str = "tiny"
) -> StudySpec:
    """The quickstart study, as it is (``scale`` quickstart) or shrunk to seconds per trial
    (:data:`BENCH_SHRINK`, distilling anyway so that the teacher's share of a trial, and in
    bench/faults.py a fault during distillation, is measured). Its data is ``root/data``; ``base``
    is its base checkpoint (None: ``prepare`` trains one)."""
    from jdsearch.spec.study import study_from_dict

    if scale == "quickstart":
        from jdsearch.spec.study import load_study

        spec = yaml.safe_load(read_text(quickstart_path()))
        spec["name"] = name
        spec["data"]["dir"] = str(root / "data")
        quickstart = load_study(quickstart_path())
        shipped = quickstart.base_checkpoint  # read beside the spec file
        if base is not None or shipped is not None:
            spec["base"]["checkpoint"] = str(base or shipped)
        if quickstart.pool_checkpoint is not None:  # used when the base and data are its own
            spec["pool"]["checkpoint"] = str(quickstart.pool_checkpoint)
        spec["search"].update({"n_trials": n_trials, "storage": storage})
        return study_from_dict(spec, source=f"bench:{name}")
    spec = shrunk_quickstart(name, root / "data", BENCH_SHRINK, n_trials=n_trials, storage=storage)
    spec["search"]["recovery_iters"] = 0  # every trial trains: the benches time and cut trainings
    if base is not None:
        spec["base"]["checkpoint"] = str(base)
    return study_from_dict(spec, source=f"bench:{name}")


def install_pool(pool: Path, workdir: Path, name: str) -> None:
    """Copy the trained ``pool`` where ``prepare`` looks for study ``name``'s cached pool
    (``runs/<name>/pool.safetensors`` under ``workdir``), so that it is not trained again."""
    cache = workdir / "runs" / name / "pool.safetensors"
    cache.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pool, cache)


def pg_schema(url: str, prefix: str = "bench_overhead") -> tuple[str, Callable[[], None]] | None:
    """A throwaway schema on the server of ``url`` (its URL and a dropper), or None (and a line
    saying why) when the server is unreachable. The dropper connects anew: no connection is held
    open while the bench runs. The server is shared, never stopped: a bench that stops or
    restarts PostgreSQL runs a :class:`PrivatePostgres`."""
    try:
        import psycopg2
        import sqlalchemy as sa

        u = sa.make_url(url)

        def connect() -> Any:
            conn = psycopg2.connect(
                host=u.host,
                port=u.port or 5432,
                user=u.username,
                password=u.password,
                dbname=u.database,
                connect_timeout=5,
            )
            conn.autocommit = True
            return conn

        conn = connect()
    except Exception as e:
        print(f"PostgreSQL skipped: {' '.join(str(e).split())}")
        return None
    schema = f"{prefix}_{uuid.uuid4().hex[:8]}"
    conn.cursor().execute(f"CREATE SCHEMA {schema}")
    conn.close()

    def drop() -> None:
        c = connect()
        c.cursor().execute("SET lock_timeout = '20s'")
        c.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
        c.close()

    return f"{url}?options=-csearch_path%3D{schema}", drop


class PrivatePostgres:
    """A PostgreSQL server of one's own: a fresh cluster in a temporary folder, listening on a
    free port of the loopback (trust authentication, database ``postgres``), which a test or a
    bench may stop and start to cut every connection off; the server that others share is never
    touched. ``initdb`` refuses root: as root, the cluster is made and run as the ``postgres``
    user. :meth:`close` stops it and removes the folder.

    Raises:
        RuntimeError: no PostgreSQL programs (``initdb``, ``pg_ctl``), or the server does not
            start; one line, with the end of the server's log.
    """

    def __init__(self) -> None:
        bin_dir = _pg_bin_dir()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL programs (initdb, pg_ctl) on PATH")
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="jdsearch-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            import pwd

            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as s:  # a free port (another process may take it first: rare)
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"
        try:
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
            self.start()
        except Exception:
            self.close()
            raise

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run(
            [*self._as, str(self.bin_dir / program), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            log = read_bytes(self.log).decode(errors="replace") if self.log.exists() else ""
            tail = " ".join((done.stderr + log).split())[-300:]
            raise RuntimeError(f"{program} {args[0] if args else ''} failed: {tail}")

    def start(self) -> None:
        """Start the server, and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "start", "-w", "-D", str(self.data), "-l", str(self.log), "-o", options)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``pg_ctl stop -m MODE``): every connection is cut."""
        self._run("pg_ctl", "stop", "-w", "-D", str(self.data), "-m", mode)

    def close(self) -> None:
        """Stop the server if it runs, and remove its folder."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):  # already down
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def _pg_bin_dir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: on PATH, else Debian's ``/usr/lib/postgresql/N/bin``."""
    found = shutil.which("initdb")
    if found is not None and shutil.which("pg_ctl") is not None:
        return Path(found).resolve().parent
    for bin_dir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file():
            return bin_dir
    return None


def quiet_optuna() -> None:
    """Optuna logs warnings only, and its experimental-feature warnings are ignored."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def tree_digest(root: Path, names: tuple[str, ...] | None = None) -> str:
    """sha256 over every file under ``root`` (or under its entries ``names`` only): its relative
    path and its own sha256, sorted."""
    import hashlib

    tops = [root / n for n in names] if names is not None else [root]
    files = [q for top in tops for q in ([top] if top.is_file() else top.rglob("*"))]
    h = hashlib.sha256()
    for p in sorted(files):
        if p.is_file():
            digest = hashlib.sha256(read_bytes(p, MAX_CHECKPOINT_BYTES)).hexdigest()
            h.update(f"{p.relative_to(root).as_posix()}\n{digest}\n".encode())
    return h.hexdigest()


#: How far a shipped base's AP may drift from its record (AP points, 0-100) before its test
#: fails: evaluation is deterministic on one machine; other BLAS builds move a few detections.
SHIPPED_BASE_TOLERANCE = 0.5


def shipped_base_record(spec: StudySpec) -> Path:
    """The record beside a study's shipped base (``studies/quickstart-base.json``)."""
    path = spec.base_checkpoint
    if path is None:
        raise ValueError(f"{spec.source}: no base.checkpoint")
    return path.with_suffix(".json")


def measure_base(spec: StudySpec, sizes: tuple[str, ...] | None = None) -> dict[str, Any]:
    """What a study's shipped base records, measured now: its weights' sha256, the digest of the
    study's data (generated from ``data.synth`` when missing) and its AP (0-100) on the selection
    and held-out splits at each of ``sizes`` (default: the study's resolutions)."""
    from safetensors.torch import load_file

    from jdsearch.engine.evaluate import evaluate
    from jdsearch.search.assets import ensure_data
    from jdsearch.search.splits import heldout_split, selection_split
    from jdsearch.store.checkpoint import load_checkpoint, tensors_sha256

    ensure_data(spec)
    checkpoint = load_checkpoint(spec.base_checkpoint)
    selection = selection_split(spec)
    heldout = heldout_split(spec, selection)
    sizes = sizes or tuple(str(r) for r in spec.resolutions)
    ap: dict[str, dict[str, float]] = {}
    for name, split in (("selection", selection), ("heldout", heldout)):
        if split is None:
            continue
        metrics = evaluate(checkpoint.detector, split, sizes)
        ap[name] = {size: round(100 * m.AP, 2) for size, m in metrics.items()}
    return {
        "weights_sha256": tensors_sha256(load_file(spec.base_checkpoint)),
        # What the generator wrote (not the cache record beside it): as tests/test_synth.py pins.
        "data_sha256": tree_digest(spec.data.dir, ("train.json", "val.json", "images")),
        "ap": ap,
    }


def shipped_pool_record(spec: StudySpec) -> Path:
    """The record beside a study's shipped pool (``studies/quickstart-pool.json``): beside the
    spec file for a bare file name, even before the pool is there."""
    given = spec.pool.checkpoint
    if given is None:
        raise ValueError(f"{spec.source}: no pool.checkpoint")
    path = Path(spec.source).parent / given if given.name == str(given) else given
    return path.with_suffix(".json")


def measure_pool(spec: StudySpec) -> dict[str, Any]:
    """What a study's shipped pool records, measured now: the pool cache key its file records and
    the one the study's spec, base and data give now, its weights' sha256, the base's and the
    data's digests (the data generated from ``data.synth`` when missing), and the teacher check
    the search makes of it (the largest sub-network's AP against the base's, 0-100, on the
    selection split at the base resolution)."""
    from jdsearch.core.config import cache_key
    from jdsearch.methods.pool import load_pool
    from jdsearch.search.assets import StudyAssets, ensure_data
    from jdsearch.search.caches import base_sha256, pool_fields
    from jdsearch.search.teacher_check import measure_teacher
    from jdsearch.store.checkpoint import load_checkpoint, read_checkpoint_metadata

    train_set, val_set = ensure_data(spec)
    path = spec.existing_pool_checkpoint()
    made_by = read_checkpoint_metadata(path).get("extra", {}).get("pool", {}).get("made_by")
    base = load_checkpoint(spec.existing_base_checkpoint())
    resolution = spec.base.resolution or base.spec.input.size  # as the search's assets have it
    pool = load_pool(path, device=spec.device)
    assets = StudyAssets(spec, train_set, val_set, pool, "", resolution, 0)
    check = measure_teacher(assets, base.detector)
    return {
        "pool_key": (made_by or {}).get("key"),
        "key_now": cache_key(pool_fields(spec)),
        "weights_sha256": read_checkpoint_metadata(path).get("tensors_sha256"),
        "base_sha256": base_sha256(spec),
        "data_sha256": tree_digest(spec.data.dir, ("train.json", "val.json", "images")),
        "teacher_check": {
            "resolution": check.resolution,
            "teacher": check.teacher,
            "teacher_ap": round(100 * check.teacher_ap, 2),
            "base_ap": round(100 * check.base_ap, 2),
        },
    }
