"""The per-phase training record of a pool (:class:`PhaseRecord`), kept in the pool file."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["PhaseRecord"]


@dataclass(frozen=True)
class PhaseRecord:
    """What one IPS phase did (JSON-friendly; stored in the pool file)."""

    phase: int
    name: str
    space: str
    epochs: float
    lr: float
    iterations: int
    seconds: float
    images_per_s: float
    final_losses: dict[str, float]
    loss_history: tuple[float, ...]
    history_stride: int
    subnets_sampled: int  # distinct sub-networks trained in this phase
    reordered: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of every field (``loss_history`` as a list)."""
        d = dataclasses.asdict(self)
        d["loss_history"] = list(self.loss_history)
        return d

    @classmethod
    def from_dict(cls, data: Any) -> PhaseRecord:
        """Read the :meth:`to_dict` form (extra keys ignored). Raises ``TypeError`` for a
        non-mapping and ``KeyError`` for a missing field."""
        if not isinstance(data, Mapping):
            raise TypeError("a phase record is a mapping")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data)
        if missing:
            raise KeyError(f"phase record lacks {sorted(missing)}")
        d = {k: data[k] for k in names}
        d["loss_history"] = tuple(float(x) for x in d["loss_history"])
        d["final_losses"] = {str(k): float(v) for k, v in dict(d["final_losses"]).items()}
        return cls(**d)
