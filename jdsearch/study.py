"""Study specs: ``studies/*.yaml`` → one validated, immutable description of a search.

A study names the dataset, the base detector (and how to train it when no checkpoint is given),
the elastic teacher pool, the score H (α, β, resolutions), the fast evaluation of each trial, the
distillation weights and the search itself (top-k, student freeze, trials, storage). Unknown keys
and bad values raise :class:`SpecError` naming the file and the dotted field.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jdsearch.errors import SpecError
from jdsearch.resolution import Resolution, parse_resolutions
from jdsearch.spec import _Fields, read_yaml

STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"


@dataclass(frozen=True)
class SynthSpec:
    images: int = 640
    seed: int = 0
    size: int = 128


@dataclass(frozen=True)
class DataSpec:
    """``dir`` holds ``images/``, ``train.json``, ``val.json``; ``synth`` generates them if absent."""

    dir: Path
    synth: SynthSpec | None = None
    max_val_images: int | None = None  # evaluate each trial on the first N val images


@dataclass(frozen=True)
class TrainSpec:
    """A training budget (used for the base detector, the pool phases and each trial)."""

    epochs: float = 3.0
    lr: float = 0.01
    batch_size: int = 4
    warmup_iters: int = 50
    schedule: str = "cosine"
    grad_clip: float | None = 10.0
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class BaseSpec:
    detector: str  # preset name or YAML path
    checkpoint: Path | None = None  # trained with `train` when absent
    train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=12.0, lr=0.02))


@dataclass(frozen=True)
class ScoreSpec:
    """H(S, R) = mAP × [(C/C_base)·(R/R_base)^β]^−α (paper 3.1.4; α 0.4, β 0.8)."""

    alpha: float = 0.4
    beta: float = 0.8
    metric: str = "AP"  # which COCO metric is the "mAP" of H


@dataclass(frozen=True)
class SearchSpec:
    top_k: int = 5
    freeze_student: int = 5
    p_student: float = 0.5
    n_trials: int = 20
    seed: int = 0
    channel_fraction: float = 0.1
    bn_sparsity: float = 1e-5
    storage: str | None = None  # default: sqlite:///runs/<name>.db
    artifacts: str = "db"  # "db" (same database) or "file:DIR"
    heartbeat_s: int = 60
    max_retry: int = 3


@dataclass(frozen=True)
class StudySpec:
    name: str
    data: DataSpec
    base: BaseSpec
    pool: dict[str, Any]  # validated by jdsearch.pool.PoolSpec.from_dict
    resolutions: tuple[Resolution, ...]
    score: ScoreSpec = field(default_factory=ScoreSpec)
    fast_eval: TrainSpec = field(default_factory=TrainSpec)
    kd: dict[str, Any] = field(default_factory=dict)  # validated by jdsearch.distill.KDConfig
    search: SearchSpec = field(default_factory=SearchSpec)
    device: str = "cpu"
    amp: bool = False
    source: str = ""

    @property
    def storage_url(self) -> str:
        return self.search.storage or f"sqlite:///runs/{self.name}.db"

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, Path | Resolution):  # before the dataclass case: Resolution is one
                return str(v)
            if dataclasses.is_dataclass(v):  # unset optional fields are left out, as in a YAML file
                fields = ((f.name, getattr(v, f.name)) for f in dataclasses.fields(v))
                return {k: plain(x) for k, x in fields if x is not None}
            if isinstance(v, tuple | list):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        d = plain(self)
        d.pop("source", None)
        return d


def _dataclass_from(f: _Fields, cls: type, **overrides: Any) -> Any:
    """Fill dataclass ``cls`` from the fields in ``f`` (types from the defaults)."""
    base = cls(**overrides) if overrides else cls()
    kwargs: dict[str, Any] = {}
    for fd in dataclasses.fields(cls):
        default = getattr(base, fd.name)
        if not f.has(fd.name):
            continue
        if default is None:
            value = f.data.pop(fd.name)
            if value is not None and not isinstance(value, int | float | str):
                f.fail(fd.name, f"expected a number or a string, got {value!r}")
            kwargs[fd.name] = value
        else:
            kwargs[fd.name] = f.pop(fd.name, type(default))
        v = kwargs[fd.name]
        if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
            f.fail(fd.name, f"must not be negative, got {v!r}")
    f.done()
    return dataclasses.replace(base, **kwargs)


def study_from_dict(data: Any, source: str = "<study>") -> StudySpec:
    top = _Fields(source, "", data)
    name = top.pop("name", str)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        top.fail("name", f"use letters, digits, '-', '_' or '.', got {name!r}")
    # data
    df = top.sub("data")
    data_dir = Path(df.pop("dir", str, f"runs/{name}/data"))
    synth = None
    if df.has("synth"):
        synth = _dataclass_from(df.sub("synth"), SynthSpec)
    max_val = df.pop("max_val_images", int, None)
    df.done()
    # base detector
    bf = top.sub("base")
    detector = bf.pop("detector", str)
    ckpt = bf.pop("checkpoint", str, None)
    base_train = _dataclass_from(bf.sub("train"), TrainSpec, epochs=12.0, lr=0.02)
    bf.done()
    pool = top.data.pop("pool", None)
    if not isinstance(pool, dict):
        top.fail(
            "pool", "required mapping is missing (the elastic teacher pool's space and schedule)"
        )
    res_texts = top.pop_list("resolutions", str)
    try:
        resolutions = parse_resolutions(res_texts)
    except SpecError as e:
        top.fail("resolutions", str(e))
    score = _dataclass_from(top.sub("score"), ScoreSpec)
    if score.metric not in ("AP", "AP50", "AP75"):
        top.fail("score.metric", f"must be AP, AP50 or AP75, got {score.metric!r}")
    fast_eval = _dataclass_from(top.sub("fast_eval"), TrainSpec)
    kd = top.data.pop("kd", None) or {}
    if not isinstance(kd, dict):
        top.fail("kd", f"expected a mapping, got {kd!r}")
    search = _dataclass_from(top.sub("search"), SearchSpec)
    if not 0 <= search.p_student <= 1:
        top.fail("search.p_student", f"must lie in [0, 1], got {search.p_student}")
    if search.top_k < 1 or search.n_trials < 1:
        top.fail("search", "top_k and n_trials must be ≥ 1")
    device = top.pop("device", str, "cpu")
    amp = top.pop("amp", bool, False)
    top.done()
    return StudySpec(
        name=name,
        data=DataSpec(data_dir, synth, max_val),
        base=BaseSpec(detector, Path(ckpt) if ckpt else None, base_train),
        pool=pool,
        resolutions=resolutions,
        score=score,
        fast_eval=fast_eval,
        kd=kd,
        search=search,
        device=device,
        amp=amp,
        source=source,
    )


def load_study(path: str | Path) -> StudySpec:
    """Read a study spec YAML (or the name of one in ``studies/``)."""
    p = Path(path)
    if not p.exists() and not p.suffix and (STUDIES_DIR / f"{p.name}.yaml").exists():
        p = STUDIES_DIR / f"{p.name}.yaml"
    if not p.is_file():
        raise SpecError(f"{path}: no such study spec file")
    return study_from_dict(read_yaml(p), source=str(p))
