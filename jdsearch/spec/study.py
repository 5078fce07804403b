"""Study specs: ``studies/*.yaml`` → one validated, immutable description of a search.

A study names the dataset, the base detector (and how to train it when no checkpoint is given),
the elastic teacher pool, the score H (α, β, resolutions), the fast evaluation of each trial, the
distillation weights and the search itself (top-k, student freeze, trials, storage). Everything
is validated when the file loads (:mod:`jdsearch.core.config`): an unknown key or a bad value anywhere,
the pool and the training settings included, is one :class:`SpecError` naming the file and the
dotted field. Torch-free.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jdsearch.core.config import (
    FieldError,
    Fields,
    check,
    is_number,
    plain,
    preset_dir,
    read_dataclass,
    read_yaml,
)
from jdsearch.core.errors import SpecError
from jdsearch.core.resolution import Resolution
from jdsearch.spec.pool import PoolSpec
from jdsearch.spec.pool_space import SubnetConfig
from jdsearch.spec.settings import KDConfig, TrainConfig, is_device
from jdsearch.spec.synth import SynthSpec

__all__ = [
    "BASE_TRAIN",
    "COSTS",
    "FAST_EVAL",
    "NAME_RULE",
    "SCORE_MODES",
    "SPLITS",
    "STUDIES_DIR",
    "TRIAL_CHECKPOINT_EVERY",
    "BaseSpec",
    "DataSpec",
    "ScoreSpec",
    "SearchSpec",
    "StudySpec",
    "SynthSpec",
    "artifact_dir",
    "check_storage_url",
    "is_study_name",
    "load_study",
    "pool_base",
    "study_from_dict",
    "study_from_stored",
]

STUDIES_DIR = preset_dir("studies")  # the presets (top-level studies/, or the wheel's copy)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: Why a study name is refused (:func:`is_study_name`).
NAME_RULE = "use letters, digits, '-', '_' or '.'"
METRICS = ("AP", "AP50", "AP75")
#: The largest α and β of the score H (:class:`ScoreSpec`).
MAX_EXPONENT = 10.0
#: How a trial is scored (``score.mode``): one score H (algorithm 1), or a Pareto search over the
#: accuracy and the cost (a multi-objective study: maximise AP, minimise the cost).
SCORE_MODES = ("h", "pareto")
#: What C of the score is (``score.cost``): multiply-adds at the base resolution, parameters, or
#: the median batch-1 latency on the worker's own device, timed against the base detector.
COSTS = ("flops", "params", "latency")
#: How the search picks each trial's parent: algorithm 1 (rank-weighted from the top-k), always
#: the best pair, a random walk over every completed trial, or hill climbing whose students are
#: sub-networks of the elastic teacher pool (the paper's "ETP search", appendix F).
STRATEGIES = ("hill_climb", "greedy", "random", "pool")
# search.channel_importance: what channel_prune ranks channels by (docs/morphism.md)
CHANNEL_IMPORTANCE = ("bn_scale", "taylor", "taylor_flops")
# search.recovery_moves: the student moves a local recovery may follow (docs/morphism.md)
RECOVERY_MOVES = ("channel_prune", "layer_prune", "rearrange")
# search.after_recovery: what a recovered child gets next, the fast evaluation or nothing
AFTER_RECOVERY = ("train", "score")
#: Default ``search.trial_checkpoint_every``: a trial saves its training state (student and
#: adapter weights, momentum, RNGs: about twice the student's size) every 1000 iterations. At the
#: paper's scale (COCO, batch 4: ~29k iterations an epoch, ~0.3 s each on a GPU) that is a save
#: every ~5 minutes, ~1 % of the trial's time, and a killed worker loses ≤ 5 minutes instead of
#: the whole trial; a quickstart trial (~110 iterations) never saves: it costs more than it saves.
TRIAL_CHECKPOINT_EVERY = 1000

#: The fast evaluation of a trial (paper A.1.4: 3 epochs, cosine, lr 0.01, batch 4).
FAST_EVAL = TrainConfig(epochs=3.0, lr=0.01, batch_size=4, warmup_iters=50, grad_clip=10.0)
#: Training of a base detector that the study trains itself.
BASE_TRAIN = dataclasses.replace(FAST_EVAL, epochs=12.0, lr=0.02)
#: Training settings the study sets for every training it runs (top-level ``device`` and ``amp``,
#: ``search.seed``, ``resolutions``); a training section may not set them.
STUDY_SET = {"exclude": ("device", "amp", "seed", "resolutions")}


#: The splits of a study: each has an annotation file and an image folder (``data.test``: only
#: when the study names one).
SPLITS = ("train", "val", "test")
#: The files of a split that ``data.synth`` writes into ``data.dir`` (its defaults).
SYNTH_WRITES = ("train", "val", "train_images", "val_images")


@dataclass(frozen=True)
class DataSpec:
    """``dir`` holds ``images/``, ``train.json``, ``val.json``; ``synth`` generates them if absent.

    ``dir`` unset: ``runs/<study name>/data``. ``max_val_images``: score each trial on the first
    N validation images (the selection split). ``test``: an annotation file of a held-out split
    the search never sees; unset, the validation images beyond ``max_val_images`` are held out.

    Each split may name its own files instead (a dataset as it ships, e.g. COCO 2017's
    ``annotations/instances_train2017.json`` over ``train2017/``): ``train`` and ``val`` its
    annotation files (default ``dir/train.json``, ``dir/val.json``), ``train_images``,
    ``val_images`` and ``test_images`` the folders its ``file_name`` paths start in (default
    ``dir/images``). Unset, they are not stored with the study (:meth:`StudySpec.to_dict`), so a
    spec without them is the spec it was before they existed.
    """

    dir: Path | None = None
    synth: SynthSpec | None = None
    max_val_images: int | None = None
    test: Path | None = None
    train: Path | None = None
    val: Path | None = None
    train_images: Path | None = None
    val_images: Path | None = None
    test_images: Path | None = None

    def __post_init__(self) -> None:
        n = self.max_val_images
        check(n is None or n >= 1, self, "max_val_images", "must be ≥ 1")
        for split in SPLITS:
            folder = f"{split}_images"
            given = getattr(self, folder)
            ok = given is None or given.suffix.lower() != ".json"
            check(ok, self, folder, f"names the folder of the {split} images, not a .json file")
        why = "names the images of data.test, which is unset"
        check(self.test_images is None or self.test is not None, self, "test_images", why)
        if self.synth is not None:
            for name in SYNTH_WRITES:
                why = "data.synth writes the data into data.dir; not with data.synth"
                check(getattr(self, name) is None, self, name, why)

    def annotations(self, split: str) -> Path | None:
        """The annotation file of ``split`` (``train``, ``val`` or ``test``; ``None``: no
        ``data.test``)."""
        given = getattr(self, split)
        if given is not None or split == "test":
            return given
        return self._dir / f"{split}.json"

    def images(self, split: str) -> Path:
        """The folder ``split``'s ``file_name`` paths start in: ``data.SPLIT_images``, else
        ``dir/images``."""
        given = getattr(self, f"{split}_images")
        return given if given is not None else self._dir / "images"

    @property
    def _dir(self) -> Path:
        return self.dir if self.dir is not None else Path()


@dataclass(frozen=True)
class BaseSpec:
    """The base detector: a preset name or YAML path, and its checkpoint (trained when absent).

    ``resolution``: the size the base is deployed at, R_base of the score H; unset, the base
    detector's own input size. ``backbone_weights``: a torchvision classification ``state_dict``
    (ImageNet ResNet/ResNeXt) that initialises the body of a base the study trains itself.
    """

    detector: str
    checkpoint: Path | None = None
    resolution: Resolution | None = None
    backbone_weights: Path | None = None
    train: TrainConfig = field(default=BASE_TRAIN, metadata=STUDY_SET)

    def __post_init__(self) -> None:
        ok = self.checkpoint is None or self.backbone_weights is None
        why = "initialises a base the study trains; not with base.checkpoint (already trained)"
        check(ok, self, "backbone_weights", why)


@dataclass(frozen=True)
class ScoreSpec:
    """H(S, R) = mAP × [(C/C_base)·(R/R_base)^β]^−α (paper 3.1.4; α 0.4, β 0.8).

    ``mode``: ``h`` (the study maximises H) or ``pareto`` (it maximises AP and minimises the
    cost ``(C/C_base)·(R/R_base)^β``, both at the resolution where H is best; H is recorded too).
    ``cost``: what C is: ``flops`` (multiply-adds at the base resolution), ``params`` or
    ``latency`` (median batch-1 latency on the study's ``device``, timed interleaved with the base
    detector at the same resolution, ``latency_warmup`` untimed and ``latency_repeats`` timed
    calls each).
    """

    alpha: float = 0.4
    beta: float = 0.8
    metric: str = "AP"  # which COCO metric is the "mAP" of H
    mode: str = "h"
    cost: str = "flops"
    latency_repeats: int = 20
    latency_warmup: int = 3

    def __post_init__(self) -> None:
        check(self.mode in SCORE_MODES, self, "mode", f"must be one of {', '.join(SCORE_MODES)}")
        check(self.cost in COSTS, self, "cost", f"must be one of {', '.join(COSTS)}")
        check(self.latency_repeats >= 1, self, "latency_repeats", "must be ≥ 1")
        check(self.latency_warmup >= 0, self, "latency_warmup", "must not be negative")
        # H raises the FLOPs and pixel ratios to these powers: beyond MAX_EXPONENT a ratio
        # overflows a float (or underflows to 0, then divides by it), failing every trial.
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            check(is_number(value) and value >= 0, self, name, "must be ≥ 0")
            why = f"must be ≤ {MAX_EXPONENT:g}, an exponent of H (the paper uses 0.4 and 0.8)"
            check(value <= MAX_EXPONENT, self, name, why)
        check(self.metric in METRICS, self, "metric", f"must be one of {', '.join(METRICS)}")


def artifact_dir(value: str) -> str | None:
    """Where ``search.artifacts`` keeps artifacts: ``None`` for ``db`` (or empty: the study's
    own database), else the directory of ``file:DIR``.

    Raises:
        ValueError: any other value, saying what is expected.
    """
    text = value.strip()
    if text in ("", "db"):
        return None
    if not text.startswith("file:"):
        raise ValueError("expected 'db' or 'file:DIR'")
    directory = text.removeprefix("file:")
    if not directory:
        raise ValueError("'file:' needs a directory, e.g. file:./ckpt")
    return directory


def check_storage_url(url: str) -> None:
    """Check, from its text alone, that ``url`` is a database URL whose study outlives the
    process: a study in an in-memory SQLite database (``sqlite://``, ``sqlite:///``,
    ``:memory:``) is lost at exit. Whether SQLAlchemy knows its dialect and driver
    (:func:`jdsearch.storage.rdb.check_dialect`), the driver is installed and the server
    answers is checked when the search starts, before anything is trained.

    Raises:
        ValueError: the text is not a database URL, or names an in-memory database; saying
            what is expected.
    """
    shape = re.fullmatch(r"([A-Za-z][A-Za-z0-9_]*)(\+[A-Za-z0-9_]+)?://(.*)", url, re.DOTALL)
    if shape is None:
        raise ValueError("expected a database URL such as sqlite:///runs/NAME.db")
    if shape.group(1).lower() == "sqlite" and _in_memory(shape.group(3)):
        raise ValueError(
            "an in-memory SQLite database is lost when the search exits; "
            "name a file, e.g. sqlite:///runs/NAME.db"
        )


def _in_memory(rest: str) -> bool:
    """Whether what follows ``sqlite://`` names an in-memory database."""
    path, _, query = rest.partition("?")
    database = path[1:] if path.startswith("/") else path
    memory = database in ("", ":memory:") or database.startswith("file::memory:")
    return memory or "mode=memory" in query.split("&")


@dataclass(frozen=True)
class SearchSpec:
    """The search: its strategy, hill climbing (top-k, student freeze, student/teacher odds),
    trials, seed and storage.

    ``storage`` unset: ``sqlite:///runs/<study name>.db``. ``artifacts``: ``db`` (the study's
    own database) or ``file:DIR``. ``trial_checkpoint_every``: a trial saves its resumable
    training state every this many iterations (0: never), so that a retry after a killed worker
    resumes there (:data:`TRIAL_CHECKPOINT_EVERY`, ``docs/search.md``). ``channel_importance``
    (one of :data:`CHANNEL_IMPORTANCE`): what ``channel_prune`` ranks channels by, their BN scale
    |γ|, their Taylor importance on a few training batches, or that importance per multiply-add
    the channel costs (``docs/morphism.md``). ``recovery_iters``: after a move named in
    ``recovery_moves`` (of :data:`RECOVERY_MOVES`), the child's changed stages and FPN regress the
    parent's FPN outputs for this many steps before the fast evaluation (0: never;
    :func:`~jdsearch.methods.morph.recovery.local_recovery`); ``after_recovery: score`` scores
    a recovered child as the recovery left it, with no fast evaluation (no KD, no BN sparsity).
    """

    strategy: str = "hill_climb"
    top_k: int = 5
    freeze_student: int = 5
    p_student: float = 0.5
    n_trials: int = 20
    seed: int = 0
    channel_fraction: float = 0.1
    channel_importance: str = "bn_scale"
    bn_sparsity: float = 1e-5
    storage: str | None = None
    artifacts: str = "db"
    heartbeat_s: int = 60
    max_retry: int = 3
    trial_checkpoint_every: int = TRIAL_CHECKPOINT_EVERY
    recovery_iters: int = 0
    recovery_moves: tuple[str, ...] = ("rearrange",)
    after_recovery: str = "train"

    def __post_init__(self) -> None:
        moves = self.recovery_moves
        ok = isinstance(moves, (list, tuple)) and all(m in RECOVERY_MOVES for m in moves)
        check(ok, self, "recovery_moves", f"must be a list of {', '.join(RECOVERY_MOVES)}")
        object.__setattr__(self, "recovery_moves", tuple(moves))
        ok = self.after_recovery in AFTER_RECOVERY
        check(ok, self, "after_recovery", f"must be one of {', '.join(AFTER_RECOVERY)}")
        for name in ("top_k", "n_trials", "heartbeat_s"):
            check(getattr(self, name) >= 1, self, name, "must be ≥ 1")
        for name in (
            "freeze_student",
            "seed",
            "max_retry",
            "bn_sparsity",
            "trial_checkpoint_every",
            "recovery_iters",
        ):
            check(getattr(self, name) >= 0, self, name, "must not be negative")
        check(0 <= self.p_student <= 1, self, "p_student", "must lie in [0, 1]")
        ok = 0 < self.channel_fraction < 1
        check(ok, self, "channel_fraction", "must lie in (0, 1)")
        ok = self.channel_importance in CHANNEL_IMPORTANCE
        check(ok, self, "channel_importance", f"must be one of {', '.join(CHANNEL_IMPORTANCE)}")
        ok = self.strategy in STRATEGIES
        check(ok, self, "strategy", f"must be one of {', '.join(STRATEGIES)}")
        try:
            artifact_dir(self.artifacts)
        except ValueError as e:
            check(False, self, "artifacts", str(e))
        if self.storage is not None:
            try:
                check_storage_url(self.storage)
            except ValueError as e:
                check(False, self, "storage", str(e))


@dataclass(frozen=True)
class StudySpec:
    """One search: data, base detector, teacher pool, score, fast evaluation, KD and search.

    Read one with :func:`load_study`; it is validated whole when it loads.

    Raises:
        FieldError: a bad name, an empty or repeated resolution, or a device that is not one.
    """

    name: str
    data: DataSpec
    base: BaseSpec
    pool: PoolSpec
    resolutions: tuple[Resolution, ...]
    score: ScoreSpec = field(default_factory=ScoreSpec)
    fast_eval: TrainConfig = field(default=FAST_EVAL, metadata=STUDY_SET)
    kd: KDConfig = field(default_factory=KDConfig)
    search: SearchSpec = field(default_factory=SearchSpec)
    device: str = "cpu"
    amp: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        check(is_study_name(self.name), self, "name", NAME_RULE)
        check(bool(self.resolutions), self, "resolutions", "expected a non-empty list")
        repeated = sorted({str(r) for r in self.resolutions if self.resolutions.count(r) > 1})
        check(not repeated, self, "resolutions", f"{', '.join(repeated)} listed twice")
        check(is_device(self.device), self, "device", "expected a device such as cpu or cuda:0")
        if self.score.mode == "pareto" and self.search.strategy == "greedy":
            why = "follows the single best pair, which a Pareto search (score.mode: pareto) lacks"
            raise FieldError(type(self).__name__, "search.strategy", why, self.search.strategy)
        if self.data.dir is None:
            data = dataclasses.replace(self.data, dir=Path("runs") / self.name / "data")
            object.__setattr__(self, "data", data)

    @property
    def base_checkpoint(self) -> Path | None:
        """``base.checkpoint`` as the file to read, or ``None`` when the study trains its base.

        A path is read as written (relative to the working directory). A bare file name that is
        not there is read beside the spec file, which is how a shipped study such as the
        quickstart names its trained base (``studies/quickstart-base.safetensors``). The stored
        spec keeps the name as written, so a study reads the same on every machine.
        """
        return self._beside(self.base.checkpoint)

    @property
    def pool_checkpoint(self) -> Path | None:
        """``pool.checkpoint``, the trained pool the study names, read as
        :attr:`base_checkpoint` is (a bare file name not in the working directory: beside the
        spec file); ``None`` when it names none."""
        return self._beside(self.pool.checkpoint)

    def _beside(self, path: Path | None) -> Path | None:
        if path is None or path.is_file() or path.name != str(path) or not self.source:
            return path
        beside = Path(self.source).parent / path
        return beside if beside.is_file() else path

    def existing_base_checkpoint(self) -> Path:
        """:attr:`base_checkpoint`, which must be set and exist.

        Raises:
            SpecError: naming the spec file, the field, and where the file was looked for.
        """
        return self._existing("base.checkpoint", self.base.checkpoint, self.base_checkpoint)

    def existing_pool_checkpoint(self) -> Path:
        """:attr:`pool_checkpoint`, which must be set and exist.

        Raises:
            SpecError: naming the spec file, the field, and where the file was looked for.
        """
        return self._existing("pool.checkpoint", self.pool.checkpoint, self.pool_checkpoint)

    def _existing(self, name: str, given: Path | None, path: Path | None) -> Path:
        if path is None or not path.is_file():
            where = f" (nor beside {self.source})" if given and given.name == str(given) else ""
            raise SpecError(f"{self.source}: {name} {given} does not exist{where}")
        return path

    @property
    def storage_url(self) -> str:
        """The search's storage URL: ``search.storage``, else ``sqlite:///runs/NAME.db``."""
        return self.search.storage or f"sqlite:///runs/{self.name}.db"

    def train_config(self, train: TrainConfig, seed: int) -> TrainConfig:
        """``train`` with what the study sets for every training: device, AMP, seed, sizes."""
        return dataclasses.replace(
            train, device=self.device, amp=self.amp, seed=seed, resolutions=self.resolutions
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as stored in the study (reads back through :func:`study_from_dict`)."""
        d = plain(self)
        d.pop("source", None)
        for key in (*SPLITS[:2], *(f"{split}_images" for split in SPLITS)):
            if d["data"][key] is None:  # unset: stored as before these fields existed
                d["data"].pop(key)
        for train in (d["fast_eval"], d["base"]["train"]):
            for key in STUDY_SET["exclude"]:
                train.pop(key)
        d["pool"] = self.pool.to_dict()
        return d


def study_from_dict(data: Any, source: str = "<study>") -> StudySpec:
    """Validate a parsed study mapping (a YAML file, or a study's stored spec).

    Raises:
        SpecError: one line naming ``source``, the dotted field and the value.
    """
    return read_dataclass(Fields(data, source), StudySpec, {"source": source}, exclude=["source"])


def study_from_stored(stored: Any, source: str) -> StudySpec:
    """Read the spec a study stored (``jdsearch:spec``), of this or an earlier jdsearch.

    jdsearch 0.1.0 stored resolutions as ``{"long": L, "short": S}`` mappings; 0.1 kept the pool's
    ``reorder`` and ``recalibration_batches`` under ``pool.train`` (still read there).

    Raises:
        SpecError: the stored spec is not a valid study spec.
    """
    return study_from_dict(_upgrade_resolutions(stored), source=source)


def _upgrade_resolutions(stored: Any) -> Any:
    if isinstance(stored, dict):
        return {k: _upgrade_resolutions(v) for k, v in stored.items()}
    if isinstance(stored, list):
        return [
            f"{v['long']}x{v['short']}"
            if isinstance(v, dict) and set(v) == {"long", "short"}
            else _upgrade_resolutions(v)
            for v in stored
        ]
    return stored


def is_study_name(name: Any) -> bool:
    """Whether ``name`` may name a study (:data:`NAME_RULE`): it names files and the storage's
    study."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def load_study(path: str | Path) -> StudySpec:
    """Read a study spec YAML, or one in ``studies/`` by name.

    Args:
        path: a YAML file, or the name of a study in ``studies/`` (``quickstart``).

    Returns:
        The validated study, its pool, training and distillation settings included.

    Raises:
        SpecError: no such file, invalid YAML, or an invalid field anywhere in the study, named with
            its dotted path and value.
    """
    p = Path(path)
    if not p.exists() and not p.suffix and (STUDIES_DIR / f"{p.name}.yaml").exists():
        p = STUDIES_DIR / f"{p.name}.yaml"
    if not p.exists():  # a folder or /dev/zero: read_yaml says why it is not read
        known = ", ".join(sorted(q.stem for q in STUDIES_DIR.glob("*.yaml")))
        raise SpecError(f"{path}: no such study spec file (presets: {known})")
    spec = study_from_dict(read_yaml(p), source=str(p))
    _check_detectors(spec)
    if spec.pool.init == "base":
        pool_base(spec)  # explicit: refused here when the base is not one of the pool's shapes
    return spec


def pool_base(spec: StudySpec) -> SubnetConfig | None:
    """The sub-network of the pool that the base detector is, when the super-net starts from the
    base (``pool.init: base``, or unset and the base is one of the pool's shapes); ``None`` when
    it starts from random weights.

    Raises:
        SpecError: ``pool.init: base`` for a base that is not one of the pool's sub-networks
            (another block kind, stem, strides, heads, or a shape outside the space), naming why.
    """
    from jdsearch.spec.detector import load_spec

    if spec.pool.init == "random":
        return None
    try:
        base, template = load_spec(spec.base.detector), load_spec(spec.pool.detector)
    except SpecError:
        if spec.pool.init is None:
            return None
        raise
    found = spec.pool.base_config(template, base)
    if isinstance(found, SubnetConfig):
        return found
    if spec.pool.init is None:
        return None
    raise SpecError(
        f"{spec.source}: pool.init: base: the base {base.name} is not one of the pool's "
        f"sub-networks ({found}); set pool.init: random or match the pool to the base"
    )


def _is_path(value: str) -> bool:
    """Whether a detector reference names a file (rather than a preset)."""
    return "/" in value or "\\" in value or value.endswith((".yaml", ".yml"))


def _check_detectors(spec: StudySpec) -> None:
    """``base.detector`` and ``pool.detector`` name detector specs that load (a preset, or a file
    relative to the working directory, where the search reads them). Checked for a spec file only:
    a study's stored spec is read where those files may not be (export, report).

    Raises:
        SpecError: naming the study file, the field and the detector spec's own error.
    """
    from jdsearch.spec.detector import load_spec

    for name, value in (
        ("base.detector", spec.base.detector),
        ("pool.detector", spec.pool.detector),
    ):
        if _is_path(value) and not Path(value).expanduser().exists():
            # A YAML file of the user's: a worker joining a study that already holds its base and
            # pool never reads it; a search that must train one says so before training.
            continue
        try:
            load_spec(value)
        except SpecError as e:
            raise SpecError(f"{spec.source}: {name}: {e}") from None
