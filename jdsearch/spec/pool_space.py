"""The pool's sub-network space (paper 3.1.3): :class:`SubnetConfig` (one teacher, string form
``d3-4-12-3_w1.25-1.5-1.5-1.25_f320``), :class:`SubnetSpace` (allowed choices, sampling, and the
search's teacher mutations). Torch-free. Notes: ``docs/pool.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jdsearch.core.config import Fields, is_int, is_number
from jdsearch.core.errors import SpecError
from jdsearch.spec.arch import NUM_STAGES

__all__ = ["SubnetConfig", "SubnetSpace", "singleton"]

_MOVE_PREFIX = "teacher."


# ---------------------------------------------------------------------- sub-network configs
def _fmt_width(w: float) -> str:
    return repr(float(w))  # shortest round-trip text: 1.0, 1.25, 1.5


_CONFIG_RE = re.compile(r"d(\d+(?:-\d+)*)_w(\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)*)_f(\d+)")


@dataclass(frozen=True)
class SubnetConfig:
    """One sub-network: blocks per stage, width multiplier per stage, FPN width (channels)."""

    depths: tuple[int, ...]
    widths: tuple[float, ...]
    fpn: int

    def __post_init__(self) -> None:
        depths, widths = tuple(self.depths), tuple(self.widths)
        if len(depths) != NUM_STAGES or len(widths) != NUM_STAGES:
            raise SpecError(
                f"sub-network: expected {NUM_STAGES} depths and widths, got {depths} {widths}"
            )
        if any(isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 1 for d in depths):
            raise SpecError(f"sub-network: depths must be positive integers, got {list(depths)}")
        if any(
            isinstance(w, bool)
            or not isinstance(w, int | float)
            or not (math.isfinite(w) and w > 0)
            for w in widths
        ):
            raise SpecError(
                f"sub-network: width multipliers must be positive numbers, got {list(widths)}"
            )
        if isinstance(self.fpn, bool) or not isinstance(self.fpn, int | np.integer) or self.fpn < 1:
            raise SpecError(f"sub-network: FPN width must be a positive integer, got {self.fpn!r}")
        object.__setattr__(self, "depths", tuple(int(d) for d in depths))
        object.__setattr__(self, "widths", tuple(float(w) for w in widths))
        object.__setattr__(self, "fpn", int(self.fpn))

    def __str__(self) -> str:
        d = "-".join(str(x) for x in self.depths)
        w = "-".join(_fmt_width(x) for x in self.widths)
        return f"d{d}_w{w}_f{self.fpn}"

    @classmethod
    def parse(cls, text: str) -> SubnetConfig:
        """Read the string form ``d3-4-12-3_w1.25-1.5-1.5-1.25_f320``."""
        m = _CONFIG_RE.fullmatch(text.strip()) if isinstance(text, str) else None
        if m is None:
            raise SpecError(
                f"sub-network {text!r}: expected the form 'd3-4-23-3_w1.5-1.5-1.5-1.5_f384'"
            )
        depths = tuple(int(x) for x in m.group(1).split("-"))
        widths = tuple(float(x) for x in m.group(2).split("-"))
        return cls(depths, widths, int(m.group(3)))


# ---------------------------------------------------------------------- the space
def _fmt_choices(values: Sequence[float]) -> str:
    if (
        all(isinstance(v, int) for v in values)
        and len(values) > 2
        and list(values) == list(range(int(values[0]), int(values[-1]) + 1))
    ):
        return f"{values[0]}..{values[-1]}"
    return "|".join(_fmt_width(v) if isinstance(v, float) else str(v) for v in values)


def _depth_entry(values: tuple[int, ...]) -> int | str | list[int]:
    """The spec form of a stage's depth choices: ``3``, ``"2-23"`` or ``[1, 3]``."""
    if len(values) == 1:
        return values[0]
    if len(values) > 2 and list(values) == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return list(values)


def _step(choices: tuple[Any, ...], value: Any, delta: int) -> Any | None:
    i = choices.index(value) + delta
    return choices[i] if 0 <= i < len(choices) else None


@dataclass(frozen=True)
class SubnetSpace:
    """Allowed depths and width multipliers per stage, and allowed FPN widths (sorted, unique)."""

    depths: tuple[tuple[int, ...], ...]
    widths: tuple[tuple[float, ...], ...]
    fpn: tuple[int, ...]

    def __post_init__(self) -> None:
        try:
            depths = tuple(tuple(sorted({int(d) for d in stage})) for stage in self.depths)
            widths = tuple(tuple(sorted({float(w) for w in stage})) for stage in self.widths)
            fpn = tuple(sorted({int(f) for f in self.fpn}))
        except (TypeError, ValueError) as e:
            raise SpecError(f"subnet space: malformed choices ({e})") from None
        if len(depths) != NUM_STAGES or len(widths) != NUM_STAGES:
            raise SpecError(f"subnet space: needs {NUM_STAGES} stages of depth and width choices")
        for si, (ds, ws) in enumerate(zip(depths, widths, strict=True)):
            if not ds or ds[0] < 1:
                raise SpecError(f"subnet space: stage {si + 1} depths must be ≥ 1, got {list(ds)}")
            if not ws or not all(math.isfinite(w) and w > 0 for w in ws):
                raise SpecError(
                    f"subnet space: stage {si + 1} widths must be positive, got {list(ws)}"
                )
        if not fpn or fpn[0] < 1:
            raise SpecError(f"subnet space: FPN widths must be ≥ 1, got {list(fpn)}")
        object.__setattr__(self, "depths", depths)
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "fpn", fpn)

    # -- members
    def size(self, resolutions: int = 1) -> int:
        """Number of sub-networks (``× resolutions``: number of (sub-network, resolution) pairs)."""
        n = math.prod(len(d) for d in self.depths) * math.prod(len(w) for w in self.widths)
        return n * len(self.fpn) * resolutions

    def largest(self) -> SubnetConfig:
        """The sub-network with every stage's largest depth and width and the largest FPN width."""
        return SubnetConfig(
            tuple(d[-1] for d in self.depths), tuple(w[-1] for w in self.widths), self.fpn[-1]
        )

    def smallest(self) -> SubnetConfig:
        """The sub-network with every stage's smallest depth and width and the smallest FPN
        width."""
        return SubnetConfig(
            tuple(d[0] for d in self.depths), tuple(w[0] for w in self.widths), self.fpn[0]
        )

    def contains(self, cfg: SubnetConfig) -> bool:
        """Whether each of ``cfg``'s depths, widths and FPN width is among the space's choices."""
        return (
            all(d in ds for d, ds in zip(cfg.depths, self.depths, strict=True))
            and all(w in ws for w, ws in zip(cfg.widths, self.widths, strict=True))
            and cfg.fpn in self.fpn
        )

    def __contains__(self, cfg: object) -> bool:
        return isinstance(cfg, SubnetConfig) and self.contains(cfg)

    def issubset(self, other: SubnetSpace) -> bool:
        """Whether every choice of this space, stage by stage and for the FPN, is one of
        ``other``'s."""
        return (
            all(set(a) <= set(b) for a, b in zip(self.depths, other.depths, strict=True))
            and all(set(a) <= set(b) for a, b in zip(self.widths, other.widths, strict=True))
            and set(self.fpn) <= set(other.fpn)
        )

    def sample(self, rng: np.random.Generator) -> SubnetConfig:
        """Uniform in each dimension independently (one draw per stage depth, width, and FPN)."""
        depths = tuple(int(ds[rng.integers(len(ds))]) for ds in self.depths)
        widths = tuple(float(ws[rng.integers(len(ws))]) for ws in self.widths)
        return SubnetConfig(depths, widths, int(self.fpn[rng.integers(len(self.fpn))]))

    def __iter__(self) -> Iterator[SubnetConfig]:
        for depths in itertools.product(*self.depths):
            for widths in itertools.product(*self.widths):
                for fpn in self.fpn:
                    yield SubnetConfig(depths, widths, fpn)

    # -- teacher mutation (paper algorithm 1, line 11)
    @staticmethod
    def move_names() -> tuple[str, ...]:
        """The fixed vocabulary of teacher mutations: one stage's depth or width, or the FPN
        width, one step up or down its list of choices (``teacher.depth3+``, ``teacher.fpn-``)."""
        names = [
            f"{_MOVE_PREFIX}{what}{s + 1}{sign}"
            for what in ("depth", "width")
            for s in range(NUM_STAGES)
            for sign in "+-"
        ]
        return (*names, f"{_MOVE_PREFIX}fpn+", f"{_MOVE_PREFIX}fpn-")

    def apply_move(self, cfg: SubnetConfig, move: str) -> SubnetConfig | None:
        """``cfg`` mutated by ``move``, or ``None`` where the move leaves the space.

        Raises :class:`SpecError` for an unknown move or a ``cfg`` outside the space.
        """
        if not self.contains(cfg):
            raise SpecError(f"sub-network {cfg} is not in the pool's space {self.describe()}")
        m = re.fullmatch(
            re.escape(_MOVE_PREFIX)
            + r"(depth|width)([1-4])([+-])|"
            + re.escape(_MOVE_PREFIX)
            + r"fpn([+-])",
            move,
        )
        if m is None:
            raise SpecError(
                f"teacher move {move!r}: unknown (known: {', '.join(self.move_names())})"
            )
        if m.group(4):
            fpn = _step(self.fpn, cfg.fpn, 1 if m.group(4) == "+" else -1)
            return None if fpn is None else dataclasses.replace(cfg, fpn=fpn)
        what, s, delta = m.group(1), int(m.group(2)) - 1, 1 if m.group(3) == "+" else -1
        if what == "depth":
            d = _step(self.depths[s], cfg.depths[s], delta)
            return None if d is None else dataclasses.replace(cfg, depths=_set(cfg.depths, s, d))
        w = _step(self.widths[s], cfg.widths[s], delta)
        return None if w is None else dataclasses.replace(cfg, widths=_set(cfg.widths, s, w))

    def neighbours(self, cfg: SubnetConfig) -> dict[str, SubnetConfig]:
        """Every feasible teacher mutation of ``cfg``: move name → mutated config."""
        out = {}
        for move in self.move_names():
            new = self.apply_move(cfg, move)
            if new is not None:
                out[move] = new
        return out

    def mutate(self, cfg: SubnetConfig, rng: np.random.Generator) -> tuple[str, SubnetConfig]:
        """One feasible teacher mutation of ``cfg``, uniformly: ``(move name, new config)``."""
        options = sorted(self.neighbours(cfg).items())
        if not options:
            raise SpecError(f"sub-network {cfg}: the space {self.describe()} has a single member")
        return options[int(rng.integers(len(options)))]

    # -- text and dict forms
    def describe(self) -> str:
        """Compact text of the choices, ``d[...] w[...] f[...]`` (one width list ``×4`` when every
        stage has the same)."""
        d = ", ".join(_fmt_choices(ds) for ds in self.depths)
        if len(set(self.widths)) == 1:
            w = f"{_fmt_choices(self.widths[0])} ×{NUM_STAGES}"
        else:
            w = ", ".join(_fmt_choices(ws) for ws in self.widths)
        return f"d[{d}] w[{w}] f[{_fmt_choices(self.fpn)}]"

    def to_dict(self) -> dict[str, Any]:
        """The spec form ``{depths, widths, fpn}`` read by :meth:`from_dict` (one widths list when
        every stage has the same)."""
        widths: Any = (
            list(self.widths[0]) if len(set(self.widths)) == 1 else [list(ws) for ws in self.widths]
        )
        return {
            "depths": [_depth_entry(ds) for ds in self.depths],
            "widths": widths,
            "fpn": list(self.fpn),
        }

    @classmethod
    def from_dict(
        cls, data: Any, source: str = "", path: str = "space", default: SubnetSpace | None = None
    ) -> SubnetSpace:
        """Read ``{depths, widths, fpn}`` (see :meth:`from_fields`).

        Raises:
            SpecError: one line naming ``SOURCE: PATH.KEY`` and the value.
        """
        return cls.from_fields(Fields(data, source, path), default)

    @classmethod
    def from_fields(cls, f: Fields, default: SubnetSpace | None = None) -> SubnetSpace:
        """Read ``{depths, widths, fpn}``; keys missing here come from ``default`` (if given).

        * ``depths``: one entry per stage — an integer, an inclusive range ``"2-23"``, or a list of
          allowed depths ``[1, 3]``.
        * ``widths``: a list of multipliers for every stage (``[1.0, 1.25, 1.5]``), or one such
          list per stage.
        * ``fpn``: FPN widths in channels (``[256, 320, 384]``) or a single width.
        """
        keys = ("depths", "widths", "fpn")
        if default is None:
            f.require(*keys)
            depths: Any = ()
            widths: Any = ()
            fpn: Any = ()
        else:
            depths, widths, fpn = default.depths, default.widths, default.fpn
        if f.has("depths"):
            raw = f.raw("depths")
            if not isinstance(raw, list | tuple) or len(raw) != NUM_STAGES:
                f.fail("depths", f"expected {NUM_STAGES} entries (one per stage), got {raw!r}")
            depths = tuple(_depth_choices(f, f"depths[{i}]", v) for i, v in enumerate(raw))
        if f.has("widths"):
            widths = _width_choices(f, "widths", f.raw("widths"))
        if f.has("fpn"):
            fpn = _int_choices(f, "fpn", f.raw("fpn"))
        f.done(keys)
        try:
            return cls(depths, widths, fpn)
        except SpecError as e:
            f.fail("", str(e))


def _set(values: tuple[Any, ...], i: int, v: Any) -> tuple[Any, ...]:
    return (*values[:i], v, *values[i + 1 :])


def _depth_choices(f: Fields, key: str, value: Any) -> tuple[int, ...]:
    if is_int(value):
        choices: tuple[int, ...] = (value,)
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)):
        lo, hi = int(m.group(1)), int(m.group(2))
        if lo > hi:
            f.fail(key, f"range {value!r} is empty (low end above high end)")
        choices = tuple(range(lo, hi + 1))
    elif isinstance(value, list | tuple) and value and all(is_int(v) for v in value):
        choices = tuple(value)
    else:
        f.fail(key, f"expected a depth, a range like '2-23' or a list of depths, got {value!r}")
    if min(choices) < 1:
        f.fail(key, f"depths must be ≥ 1, got {value!r}")
    return choices


def _number_list(f: Fields, key: str, value: Any) -> tuple[float, ...]:
    if not isinstance(value, list | tuple) or not value or not all(is_number(v) for v in value):
        f.fail(key, f"expected a non-empty list of numbers, got {value!r}")
    if not all(v > 0 for v in value):
        f.fail(key, f"width multipliers must be positive, got {value!r}")
    return tuple(float(v) for v in value)


def _width_choices(f: Fields, key: str, value: Any) -> tuple[tuple[float, ...], ...]:
    per_stage = isinstance(value, list | tuple) and value
    if per_stage and all(isinstance(v, list | tuple) for v in value):
        if len(value) != NUM_STAGES:
            f.fail(key, f"expected {NUM_STAGES} per-stage lists, got {len(value)}")
        return tuple(_number_list(f, f"{key}[{i}]", v) for i, v in enumerate(value))
    return (_number_list(f, key, value),) * NUM_STAGES


def _int_choices(f: Fields, key: str, value: Any) -> tuple[int, ...]:
    values = [value] if is_int(value) else value
    if (
        not isinstance(values, list | tuple)
        or not values
        or not all(is_int(v) and v > 0 for v in values)
    ):
        f.fail(key, f"expected a positive integer or a list of them, got {value!r}")
    return tuple(values)


def singleton(cfg: SubnetConfig) -> SubnetSpace:
    """The space whose only member is ``cfg``."""
    return SubnetSpace(tuple((d,) for d in cfg.depths), tuple((w,) for w in cfg.widths), (cfg.fpn,))
