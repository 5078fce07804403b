"""Detector checkpoints: one safetensors file holding the weights and a JSON description of the
detector (spec, classes, extra), both hashed; loading never unpickles and every failure is one
:class:`~jdsearch.core.errors.CheckpointError` line. Layout: ``docs/storage.md``, "Checkpoints".
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from jdsearch.core.config import shown as _show
from jdsearch.core.errors import CheckpointError, JDSearchError
from jdsearch.core.files import read_bytes
from jdsearch.core.limits import MAX_CHECKPOINT_BYTES, MAX_NUM_CLASSES
from jdsearch.models.detector import Detector, build_detector, load_weights_exactly
from jdsearch.spec.detector import DetectorSpec, spec_from_dict

FORMAT_NAME = "jdsearch-checkpoint"
FORMAT_VERSION = 1
META_KEY = "jdsearch"
META_HASH_KEY = "jdsearch.sha256"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_INT64 = 2**63 - 1


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded checkpoint. ``detector`` is rebuilt from ``spec`` and is in eval mode."""

    detector: Detector
    spec: DetectorSpec
    num_classes: int
    class_names: tuple[str, ...] | None
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = "<bytes>"
    format_version: int = FORMAT_VERSION
    #: COCO category id of label ``1..K`` as recorded when it was saved; ``None`` when it was not.
    category_ids: tuple[int, ...] | None = None

    @property
    def foreground_names(self) -> tuple[str, ...] | None:
        """The ``K`` names of labels ``1..K`` (the background name dropped when one was stored)."""
        names = self.class_names
        if names is None:
            return None
        return names[1:] if len(names) == self.num_classes else names


# ---------------------------------------------------------------------- hashing
def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """Layout-independent sha256 over (name, dtype, shape, bytes) of every tensor, name-sorted."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(b"\0" + str(t.dtype).encode() + b"\0")
        h.update(",".join(str(d) for d in t.shape).encode() + b"\0")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------- saving
def checkpoint_to_bytes(
    detector: Detector,
    *,
    class_names: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    source: str = "<bytes>",
    category_ids: Sequence[int] | None = None,
) -> bytes:
    """Serialise ``detector`` (weights + spec + class names + their COCO category ids +
    ``extra``) to safetensors bytes."""
    spec = getattr(detector, "spec", None)
    if not isinstance(spec, DetectorSpec):
        raise CheckpointError(
            f"{source}: the model has no DetectorSpec (build it with build_detector)"
        )
    num_classes = detector.roi_heads.box_predictor.cls_score.out_features
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) not in (num_classes, num_classes - 1):
            raise CheckpointError(
                f"{source}: {len(class_names)} class names for a detector with {num_classes} classes "
                f"(give {num_classes - 1} foreground names, or {num_classes} with the background)"
            )
    ids = _category_ids_to_save(category_ids, num_classes, source)
    tensors = {k: v.detach().cpu().contiguous() for k, v in detector.state_dict().items()}
    doc = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "num_classes": num_classes,
        "class_names": class_names,
        **({"category_ids": ids} if ids is not None else {}),
        "extra": dict(extra or {}),
        "tensors_sha256": tensors_sha256(tensors),
    }
    try:
        text = json.dumps(doc, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: 'extra' is not JSON-serialisable: {e}") from None
    return st_save(tensors, metadata={META_KEY: text, META_HASH_KEY: _text_sha256(text)})


def _category_ids_to_save(
    category_ids: Sequence[int] | None, num_classes: int, source: str
) -> list[int] | None:
    if category_ids is None:
        return None
    ids = [int(i) for i in category_ids]
    if len(ids) != num_classes - 1 or len(set(ids)) != len(ids):
        raise CheckpointError(
            f"{source}: category ids {ids} are not {num_classes - 1} distinct ids (one per class)"
        )
    return ids


def save_checkpoint(
    path: str | Path,
    detector: Detector,
    *,
    class_names: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    category_ids: Sequence[int] | None = None,
) -> Path:
    """Write a checkpoint atomically (a temporary file in the same folder, then a rename).

    Args:
        path: the ``.safetensors`` file; its folder is created.
        detector: a jdsearch detector.
        class_names: the foreground class names, stored with it.
        extra: JSON-serialisable record (training, lineage…).
        category_ids: the COCO category id of each foreground class (labels ``1..K``), stored
            with it so that evaluation matches classes to a dataset's categories by id.

    Returns:
        ``path``.

    Raises:
        CheckpointError: the file cannot be written.
    """
    p = Path(path)
    data = checkpoint_to_bytes(
        detector, class_names=class_names, extra=extra, source=str(p), category_ids=category_ids
    )
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot write checkpoint: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"{p}: cannot write checkpoint: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


# ---------------------------------------------------------------------- loading
def _json(text: str | bytes, source: str, what: str) -> Any:
    """Parsed JSON; any failure (syntax, bad UTF-8, too deep, a too long integer) one line."""
    try:
        return json.loads(text)
    except RecursionError:
        raise CheckpointError(
            f"{source}: corrupt checkpoint ({what} is nested too deeply)"
        ) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int conversion limits
        reason = str(e).split(";")[0]
        raise CheckpointError(
            f"{source}: corrupt checkpoint ({what} is not valid JSON: {reason})"
        ) from None


def _metadata_text(data: bytes, source: str) -> str:
    """The jdsearch metadata string of a safetensors file, checked against its sha256."""
    if len(data) < 8:
        raise CheckpointError(f"{source}: not a checkpoint (file too short: {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise CheckpointError(f"{source}: corrupt or truncated checkpoint (bad header length {n})")
    header = _json(data[8 : 8 + n], source, "the header")
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or META_KEY not in meta:
        raise CheckpointError(f"{source}: not a jdsearch checkpoint (no '{META_KEY}' metadata)")
    text = meta[META_KEY]
    if not isinstance(text, str) or meta.get(META_HASH_KEY) != _text_sha256(text):
        raise CheckpointError(
            f"{source}: checkpoint metadata was modified or damaged (sha256 mismatch)"
        )
    return text


def _check_classes(doc: dict[str, Any], source: str) -> None:
    """``num_classes`` in range; ``class_names`` and ``category_ids``, when given, fit it."""
    k = doc["num_classes"]
    if isinstance(k, bool) or not 2 <= k <= MAX_NUM_CLASSES:
        raise CheckpointError(
            f"{source}: checkpoint metadata field 'num_classes' is {_show(k)}, expected 2..{MAX_NUM_CLASSES}"
            " (it counts the background)"
        )
    names = doc.get("class_names")
    if names is not None and not (
        isinstance(names, list)
        and all(isinstance(c, str) for c in names)
        and len(names) in (k, k - 1)
    ):
        raise CheckpointError(
            f"{source}: checkpoint metadata field 'class_names' is malformed ({_show(names)}; "
            f"expected {k - 1} names for {k - 1} classes)"
        )
    ids = doc.get("category_ids")
    if ids is not None and not (
        isinstance(ids, list)
        and all(isinstance(i, int) and not isinstance(i, bool) and abs(i) <= _INT64 for i in ids)
        and len(ids) == k - 1
        and len(set(ids)) == len(ids)
    ):
        raise CheckpointError(
            f"{source}: checkpoint metadata field 'category_ids' is malformed ({_show(ids)}; "
            f"expected {k - 1} distinct integer ids)"
        )


def _read_metadata(data: bytes, source: str) -> dict[str, Any]:
    """Parse the safetensors header ourselves (the bytes API of safetensors drops metadata)."""
    doc = _json(_metadata_text(data, source), source, "its metadata")
    if not isinstance(doc, dict):
        raise CheckpointError(
            f"{source}: not a jdsearch checkpoint (metadata is a JSON {type(doc).__name__}, "
            "expected an object)"
        )
    if doc.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{source}: not a jdsearch checkpoint (format {_show(doc.get('format'))})"
        )
    if doc.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: unsupported checkpoint version {_show(doc.get('version'))} (this jdsearch reads {FORMAT_VERSION})"
        )
    for key, kind in (
        ("spec", dict),
        ("num_classes", int),
        ("extra", dict),
        ("tensors_sha256", str),
    ):
        if not isinstance(doc.get(key), kind):
            raise CheckpointError(
                f"{source}: checkpoint metadata field '{key}' is missing or malformed"
            )
    _check_classes(doc, source)
    return doc


def checkpoint_from_bytes(
    data: bytes, source: str = "<bytes>", *, device: str | torch.device = "cpu"
) -> Checkpoint:
    """Rebuild a detector from checkpoint bytes; ``source`` names them in error messages."""
    doc = _read_metadata(data, source)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"{source}: corrupt or truncated checkpoint ({reason})") from None
    if tensors_sha256(tensors) != doc["tensors_sha256"]:
        raise CheckpointError(
            f"{source}: weights do not match their recorded sha256 (corrupt or modified)"
        )
    try:
        spec = spec_from_dict(doc["spec"], source=f"{source}: spec")
    except JDSearchError as e:
        raise CheckpointError(f"{source}: invalid detector spec in metadata: {e}") from None
    num_classes = doc["num_classes"]
    try:
        detector = build_detector(spec, num_classes)
    except (JDSearchError, ValueError, RuntimeError, OverflowError) as e:
        raise CheckpointError(
            f"{source}: cannot build the detector its spec describes: {e}"
        ) from None
    load_weights_exactly(detector, tensors, source=source, what="the checkpoint's architecture")
    detector.to(device)
    detector.eval()
    names, ids = doc["class_names"], doc.get("category_ids")
    return Checkpoint(
        detector=detector,
        spec=detector.spec,
        num_classes=num_classes,
        class_names=tuple(names) if names is not None else None,
        extra=doc["extra"],
        source=source,
        category_ids=tuple(ids) if ids is not None else None,
    )


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (safetensors only, never pickle).

    Args:
        path: the ``.safetensors`` file.
        device: where the rebuilt detector is put.

    Returns:
        The detector rebuilt from its spec, with its class names and extra record.

    Raises:
        CheckpointError: a missing, truncated, corrupt or edited file, a sha256 mismatch, or weights
            that do not fit the architecture the spec describes.
    """
    p = Path(path)
    try:
        data = read_bytes(p, MAX_CHECKPOINT_BYTES)
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no such checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read checkpoint: {e.strerror or e}") from None
    return checkpoint_from_bytes(data, str(p), device=device)


def read_checkpoint_metadata(
    path_or_bytes: str | Path | bytes, source: str | None = None
) -> dict[str, Any]:
    """The metadata document (spec, num_classes, class_names, extra), verified against its own
    sha256 but without reading or verifying the weights — cheap enough for listings."""
    if isinstance(path_or_bytes, bytes):
        return _read_metadata(path_or_bytes, source or "<bytes>")
    p = Path(path_or_bytes)
    try:
        with p.open("rb") as f:  # the header only: the weights are not read (nor verified)
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            data = head + f.read(min(n, _MAX_HEADER + 1))
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no such checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read checkpoint: {e.strerror or e}") from None
    return _read_metadata(data, source or str(p))


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Checkpoint",
    "checkpoint_from_bytes",
    "checkpoint_to_bytes",
    "load_checkpoint",
    "read_checkpoint_metadata",
    "save_checkpoint",
    "tensors_sha256",
]
