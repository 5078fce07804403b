"""Reading the pool's YAML mappings: a key-popping reader whose errors name the dotted field.

Shared by :meth:`SubnetSpace.from_dict <jdsearch.pool.space.SubnetSpace.from_dict>` and the pool
spec (:mod:`jdsearch.pool.spec`); internal to :mod:`jdsearch.pool`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from jdsearch.errors import SpecError


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class _Reader:
    """Pops keys from one mapping of a spec; leftovers are reported as unknown keys."""

    def __init__(self, source: str, data: Any) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise SpecError(f"{source}: expected a mapping, got {type(data).__name__}")
        self.source, self.data, self.known = source, dict(data), set(data)

    def where(self, key: str) -> str:
        return f"{self.source}.{key}"

    def fail(self, key: str, why: str) -> None:
        raise SpecError(f"{self.where(key)}: {why}")

    def has(self, key: str) -> bool:
        return key in self.data

    def require(self, key: str) -> None:
        if key not in self.data:
            self.fail(key, "required field is missing")

    def pop(self, key: str, default: Any = None) -> Any:
        return self.data.pop(key, default)

    def number(
        self,
        key: str,
        default: Any,
        *,
        integer: bool = False,
        positive: bool = True,
        allow_zero: bool = False,
        nullable: bool = False,
    ) -> Any:
        if key not in self.data:
            return default
        value = self.data.pop(key)
        if value is None and nullable:
            return None
        ok = _is_int(value) if integer else _is_number(value)
        if not ok or not math.isfinite(value):
            self.fail(key, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
        if positive and not (value > 0 or (allow_zero and value == 0)):
            self.fail(key, f"must be {'≥ 0' if allow_zero else 'positive'}, got {value!r}")
        return int(value) if integer else float(value)

    def done(self, known: Iterable[str] = ()) -> None:
        if self.data:
            key = sorted(self.data)[0]
            listed = sorted(set(known)) or sorted(self.known - set(self.data))
            hint = f" (known: {', '.join(listed)})" if listed else ""
            self.fail(key, f"unknown key{hint}")
