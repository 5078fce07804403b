"""The local caches of a study under ``runs/<name>/``: the synthetic data, the base detector and
the teacher pool, each reused only when the spec parts that made it are the spec's now.

Imports the spec, data and store layers; never Optuna.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jdsearch.core.config import cache_key, plain
from jdsearch.core.errors import JDSearchError, SpecError
from jdsearch.core.files import read_text
from jdsearch.spec.detector import load_spec
from jdsearch.spec.study import STUDY_SET, StudySpec, pool_base
from jdsearch.spec.synth import SynthSpec
from jdsearch.store.checkpoint import read_checkpoint_metadata


def run_dir(spec: StudySpec) -> Path:
    """The study's local folder, ``runs/<name>``."""
    return Path("runs") / spec.name


# Each cache (the synthetic data, the base, the pool) is reused only if the spec parts that made
# it are the spec's now: they are recorded, as dotted study fields, with their hash (the cache's
# key) in a JSON file next to it, written when jdsearch makes it. A mismatch is one SpecError
# naming the field, both values and what to delete. A cache without a record (an earlier
# jdsearch, `jdsearch pool train`, a copy) is checked on what its own file records.
MADE_BY = ".made-by.json"
_NOT_MAKING = ("num_workers", "log_every", "history_points")  # train settings that change nothing


@dataclass(frozen=True)
class Cache:
    """A cached artifact, what it is called in messages and what deleting it leads to."""

    path: Path
    made: str  # "the base trained earlier, PATH, started from"
    remedy: str  # "train a new base"

    @property
    def record(self) -> Path:
        """The JSON file that records the spec parts that made it."""
        if self.path.is_dir():
            return self.path / MADE_BY.lstrip(".")
        return self.path.with_name(self.path.name + MADE_BY)

    def stamp(self) -> list[int]:
        """What identifies this very file (size, mtime): a record of another file is stale."""
        target = self.path / "train.json" if self.path.is_dir() else self.path
        st = target.stat()
        return [st.st_size, st.st_mtime_ns]


def write_made_by(cache: Cache, fields: dict[str, Any]) -> None:
    """Record ``fields`` (and their key) as what made ``cache``; atomically."""
    doc = {"key": cache_key(fields), "stamp": cache.stamp(), "fields": fields}
    tmp = cache.record.with_name(cache.record.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, default=str))
    tmp.replace(cache.record)


def read_made_by(cache: Cache) -> dict[str, Any] | None:
    """The recorded fields that made ``cache``; ``None`` when unrecorded, unreadable or stale."""
    try:
        doc = json.loads(read_text(cache.record))
        fresh = doc["stamp"] == cache.stamp()
        return doc["fields"] if fresh and isinstance(doc["fields"], dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_cache(
    spec: StudySpec, cache: Cache, wanted: dict[str, Any], made: dict[str, Any]
) -> None:
    """Refuse ``cache`` unless the fields that ``made`` it are the ones ``wanted`` now (only the
    fields ``made`` knows are compared: an unrecorded cache tells only some)."""
    if cache_key(made) == cache_key({k: wanted.get(k) for k in made}):
        return
    field, now, then = _first_difference({k: wanted.get(k) for k in made}, made)
    if then is None and field == "base.backbone_weights":
        then = "random weights"
    raise SpecError(
        f"{spec.source}: {field} is {'unset' if now is None else now}, but {cache.made} "
        f"{'unset' if then is None else then}: delete it to {cache.remedy}"
    )


def _first_difference(wanted: dict[str, Any], made: dict[str, Any]) -> tuple[str, Any, Any]:
    """The first field (in sorted order) whose value ``made`` a cache and is not ``wanted`` now:
    its name, its value now and then (compared as the cache key compares them)."""
    differs = [k for k in sorted({*wanted, *made}) if _plain(wanted.get(k)) != _plain(made.get(k))]
    field = differs[0]
    return field, wanted.get(field), made.get(field)


def _plain(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    """A nested mapping as dotted fields (``base.train`` → ``base.train.lr``, ``pool.phases`` →
    ``pool.phases[1].lr``…); lists of plain values stay one field."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = {f"[{i}]": v for i, v in enumerate(value)}
    elif isinstance(value, dict):
        items = {f".{k}": v for k, v in value.items()}
    else:
        return {prefix: value}
    return {k: v for key, sub in items.items() for k, v in _flat(prefix + key, sub).items()}


def train_data_hash(spec: StudySpec) -> str:
    """The hash of the training annotation file: which data a base or a pool was trained on."""
    path = spec.data.annotations("train").resolve()
    st = path.stat()
    return _file_hash(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_hash(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file, computed once per version of it (a COCO train.json is 0.5 GB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


#: What a record made before ``data.train_images`` existed (or with it unset) trained on: the
#: images of ``data.dir/images``.
_TRAIN_IMAGES_UNSET = {"data.train_images": None}


def train_images_fields(spec: StudySpec) -> dict[str, Any]:
    """``data.train_images``, the folder a base or a pool is trained from, when the study names
    one other than ``data.dir/images``; unset, nothing, so that such a spec makes the same cache
    key as before the field existed."""
    folder = spec.data.train_images
    if folder is None or folder.resolve() == (spec.data.dir / "images").resolve():
        return {}
    return {"data.train_images": str(folder)}


def data_cache(spec: StudySpec) -> Cache:
    """The data folder as a cache of ``data.synth``."""
    return Cache(
        spec.data.dir, f"the data generated earlier in {spec.data.dir} had", "regenerate it"
    )


def data_fields(spec: StudySpec) -> dict[str, Any]:
    """What makes the synthetic data: ``data.synth``."""
    return _flat("data.synth", plain(spec.data.synth))


def check_cached_data(spec: StudySpec) -> None:
    """Synthetic data generated earlier is reused only if ``data.synth`` made it (data not
    generated by jdsearch, or generated by an earlier one, is the user's: taken as it is). A
    field its record lacks did not exist yet: that data was drawn with the field's default."""
    cache = data_cache(spec)
    made = read_made_by(cache) if spec.data.synth is not None else None
    if made is not None:
        defaults = _flat("data.synth", plain(SynthSpec()))
        check_cache(spec, cache, data_fields(spec), {**defaults, **made})


def base_cache(spec: StudySpec) -> Cache:
    """``runs/<name>/base.safetensors``, the base detector a study trains itself."""
    path = run_dir(spec) / "base.safetensors"
    return Cache(path, f"the base trained earlier, {path}, started from", "train a new base")


def base_fields(spec: StudySpec) -> dict[str, Any]:
    """The spec parts that make a base the study trains: the detector (its name and its spec),
    the initial weights, the training settings, the seed, BN sparsity and the training data."""
    train = {k: v for k, v in plain(spec.base.train).items() if k not in _NOT_MAKING}
    for key in STUDY_SET["exclude"]:
        train.pop(key)
    weights = spec.base.backbone_weights
    return {
        "base.detector": spec.base.detector,
        "base.detector's spec": cache_key(load_spec(spec.base.detector).to_dict()),
        "base.backbone_weights": None if weights is None else str(weights),
        **_flat("base.train", train),
        "search.seed": spec.search.seed,
        "search.bn_sparsity": spec.search.bn_sparsity,
        "amp": spec.amp,
        "resolutions": [str(r) for r in spec.resolutions],
        "data (train.json's hash)": train_data_hash(spec),
        **train_images_fields(spec),
    }


def _base_made_by_metadata(path: Path) -> dict[str, Any]:
    """What a base without a record tells of what made it: its initial weights and detector."""
    meta = read_checkpoint_metadata(path)
    stored = meta.get("spec") or {}
    return {
        "base.backbone_weights": meta.get("extra", {}).get("backbone_weights"),
        "base.detector's name": stored.get("name"),
    }


def check_cached_base(spec: StudySpec) -> None:
    """A base trained earlier is reused only if this spec's parts made it (:func:`base_fields`).

    Raises:
        SpecError: naming the first field that differs, both values, and the file to delete.
    """
    cache = base_cache(spec)
    wanted = base_fields(spec)
    made = read_made_by(cache)
    if made is None:
        wanted["base.detector's name"] = load_spec(spec.base.detector).name
        made = _base_made_by_metadata(cache.path)
    else:
        made = {**_TRAIN_IMAGES_UNSET, **made}
    check_cache(spec, cache, wanted, made)


def pool_cache(spec: StudySpec) -> Cache:
    """``runs/<name>/pool.safetensors``, the elastic teacher pool."""
    path = run_dir(spec) / "pool.safetensors"
    return Cache(path, f"the pool trained earlier, {path}, was trained with", "train a new pool")


def _pool_doc_fields(pool: Any) -> dict[str, Any]:
    """A pool spec's to_dict form as dotted fields, less what changes nothing in its weights
    (the BN recalibration of extracted teachers, logging) and ``pool.checkpoint`` (which names a
    trained pool, made by the other fields)."""
    making = {k: v for k, v in pool.items() if k not in ("recalibration_batches", "checkpoint")}
    fields = _flat("pool", making)
    return {k: v for k, v in fields.items() if k.rsplit(".", 1)[-1] not in _NOT_MAKING}


#: What a pool made before ``pool.init`` existed started from.
_POOL_INIT_UNSET = {"pool.init": "random"}
POOL_BASE_FIELD = "pool.init's base (weights sha256)"


def base_file(spec: StudySpec) -> Path:
    """The base detector's checkpoint: ``base.checkpoint``, or the one the study trains."""
    given = spec.base_checkpoint
    return given if given is not None else base_cache(spec).path


def base_sha256(spec: StudySpec) -> str | None:
    """The digest of the base detector's weights as its checkpoint records it; ``None`` while
    there is no base yet (or none that reads: loading it says why)."""
    path = base_file(spec)
    try:
        digest = read_checkpoint_metadata(path).get("tensors_sha256") if path.is_file() else None
    except JDSearchError:
        return None
    return digest if isinstance(digest, str) else None


def pool_init_fields(spec: StudySpec) -> dict[str, Any]:
    """Where the pool's weights start (``pool.init``, resolved) and, from the base, which base
    (its weights' digest): a pool started from another base is another pool."""
    if pool_base(spec) is None:
        return {"pool.init": "random"}
    return {"pool.init": "base", POOL_BASE_FIELD: base_sha256(spec)}


def pool_fields(spec: StudySpec) -> dict[str, Any]:
    """The spec parts that make the pool: the ``pool`` section, where its weights start and the
    training data."""
    return {
        **_pool_doc_fields(spec.pool.to_dict()),
        **pool_init_fields(spec),
        "data (train.json's hash)": train_data_hash(spec),
        **train_images_fields(spec),
    }


def _pool_metadata(path: Path) -> dict[str, Any]:
    try:
        doc = read_checkpoint_metadata(path).get("extra", {}).get("pool")
    except JDSearchError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict):
        raise SpecError(f"{path}: not a teacher pool: delete it to train the pool")
    return doc


def cached_pool_done(spec: StudySpec) -> bool:
    """Whether the pool trained earlier can serve: it is refused (:class:`SpecError`) unless this
    spec's parts made it; ``False`` when phases are left to train (resumed by the search)."""
    cache = pool_cache(spec)
    doc = _pool_metadata(cache.path)
    recorded = read_made_by(cache)
    if recorded:
        made = {**_TRAIN_IMAGES_UNSET, **_POOL_INIT_UNSET, **recorded}
    else:  # what the file itself records
        digest = doc.get("base_sha256")
        made = _pool_doc_fields(doc["spec"])
        made.update({"pool.init": "base", POOL_BASE_FIELD: digest} if digest else _POOL_INIT_UNSET)
    check_cache(spec, cache, pool_fields(spec), made)
    return len(doc.get("record") or []) >= len(spec.pool.phases)


def named_pool_unfit(spec: StudySpec) -> str | None:
    """Why the trained pool that ``pool.checkpoint`` names cannot serve this study, in words;
    ``None`` when it can: the pool cache key its file records (:func:`pool_fields`, written when
    it was trained) is this spec's, and every phase is trained.

    Raises:
        SpecError: the file does not exist, or is not a teacher pool.
        CheckpointError: the file is not a readable checkpoint.
    """
    path = spec.existing_pool_checkpoint()
    doc = read_checkpoint_metadata(path).get("extra", {}).get("pool")
    if not isinstance(doc, dict):
        raise SpecError(f"{spec.source}: pool.checkpoint {path}: not a teacher pool")
    made_by = doc.get("made_by")
    made = made_by.get("fields") if isinstance(made_by, dict) else None
    if not isinstance(made, dict) or made_by.get("key") != cache_key(made):
        return "it records no pool cache key (not trained by jdsearch search or pool train)"
    wanted = pool_fields(spec)
    if cache_key(made) != cache_key(wanted):
        field, now, then = _first_difference(wanted, made)
        return f"{field} is {now} here, {then} where it was trained"
    done = len(doc.get("record") or [])
    if done < len(spec.pool.phases):
        return f"it holds {done} of the {len(spec.pool.phases)} phases trained"
    return None
