"""A training run's resumable state as bytes: safetensors for the tensors, JSON for the rest.

What a state holds is :func:`jdsearch.engine.train.train`'s business (weights, optimizer, RNG states,
data position…); this module only stores it, and reads it back without ever unpickling: the
tensors are a safetensors file, everything else is one JSON document in its header, and both are
hashed together so a damaged state is refused (:class:`CheckpointError`) rather than half-used.

Nested state that mixes tensors and plain values (an optimizer's ``state_dict``, whose state is
keyed by parameter index) goes through :func:`flatten` / :func:`unflatten`: every tensor becomes
a named safetensors entry and the structure a JSON index that names it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from jdsearch.core.errors import CheckpointError
from jdsearch.store.checkpoint import tensors_sha256

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "TrainState",
    "flatten",
    "trainstate_from_bytes",
    "trainstate_to_bytes",
    "unflatten",
]

FORMAT_NAME = "jdsearch-trainstate"
FORMAT_VERSION = 1
_META_KEY = "jdsearch"
_HASH_KEY = "jdsearch.sha256"
_TENSOR, _DICT = "$t", "$d"  # JSON markers: a tensor by name; a dict as [key, value] pairs


@dataclass(frozen=True, eq=False)
class TrainState:
    """A training run after ``iteration`` iterations: named CPU tensors and JSON-able ``meta``."""

    iteration: int
    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def flatten(value: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """``value`` (dicts, lists, tuples, tensors and JSON scalars) as JSON: each tensor is stored
    in ``tensors`` under ``prefix.N`` and replaced by a reference; dicts keep non-string keys."""
    if isinstance(value, Tensor):
        name = f"{prefix}.{len(tensors)}"
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: name}
    if isinstance(value, Mapping):
        return {_DICT: [[k, flatten(v, prefix, tensors)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [flatten(v, prefix, tensors) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise CheckpointError(f"training state: cannot store a {type(value).__name__} ({prefix})")


def unflatten(doc: Any, tensors: Mapping[str, Tensor]) -> Any:
    """The value :func:`flatten` stored (lists come back as lists)."""
    if isinstance(doc, dict):
        if set(doc) == {_TENSOR}:
            name = doc[_TENSOR]
            if not isinstance(name, str) or name not in tensors:
                raise CheckpointError(f"training state: the index names a missing tensor {name!r}")
            return tensors[name]
        pairs = doc.get(_DICT)
        if set(doc) != {_DICT} or not isinstance(pairs, list):
            raise CheckpointError("training state: malformed index")
        out = {}
        for pair in pairs:
            if not isinstance(pair, list) or len(pair) != 2 or isinstance(pair[0], list | dict):
                raise CheckpointError("training state: malformed index entry")
            out[pair[0]] = unflatten(pair[1], tensors)
        return out
    if isinstance(doc, list):
        return [unflatten(v, tensors) for v in doc]
    return doc


def _digest(tensors: Mapping[str, Tensor], text: str) -> str:
    return hashlib.sha256((tensors_sha256(tensors) + text).encode()).hexdigest()


def trainstate_to_bytes(state: TrainState) -> bytes:
    """The safetensors bytes of ``state`` (its meta and iteration in the header, hashed)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.tensors.items()}
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "iteration": int(state.iteration),
        "meta": state.meta,
    }
    text = json.dumps(doc, sort_keys=True)
    return st_save(tensors, metadata={_META_KEY: text, _HASH_KEY: _digest(tensors, text)})


def _header(data: bytes, source: str) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` of ``data``, read without the tensors."""
    if len(data) < 8:
        raise CheckpointError(f"{source}: not a training state (truncated)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise CheckpointError(f"{source}: not a training state (bad header length)")
    try:
        head = json.loads(data[8 : 8 + n])
    except ValueError as e:
        raise CheckpointError(f"{source}: not a training state ({e})") from None
    meta = head.get("__metadata__") if isinstance(head, dict) else None
    if not isinstance(meta, dict) or _META_KEY not in meta or _HASH_KEY not in meta:
        raise CheckpointError(f"{source}: not a training state (no jdsearch header)")
    return meta


def trainstate_from_bytes(data: bytes, source: str = "<bytes>") -> TrainState:
    """Read :func:`trainstate_to_bytes`'s output back; :class:`CheckpointError` naming
    ``source`` if it is not one, is damaged (sha256) or of another format version."""
    meta = _header(data, source)
    try:
        tensors = dict(st_load(data))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{source}: unreadable training state ({e})") from None
    text = meta[_META_KEY]
    if _digest(tensors, text) != meta[_HASH_KEY]:
        raise CheckpointError(f"{source}: training state fails its sha256 check (damaged)")
    doc = json.loads(text)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{source}: not a training state")
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: training state format {doc.get('format_version')!r}, "
            f"this jdsearch reads {FORMAT_VERSION}"
        )
    iteration = doc.get("iteration")
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise CheckpointError(f"{source}: training state has a bad iteration {iteration!r}")
    meta_doc = doc.get("meta")
    if not isinstance(meta_doc, dict):
        raise CheckpointError(f"{source}: training state has no meta")
    return TrainState(iteration, tensors, meta_doc)
