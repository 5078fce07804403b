"""Input resolutions ``LONGxSHORT``: the resize bound of dynamic resolution and of the score H.

Torch-free, so the spec layer (detector and study specs) can use it without importing torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from jdsearch.core.errors import SpecError
from jdsearch.core.limits import MAX_INPUT_SIDE

__all__ = ["Resolution", "parse_resolutions"]

_RESOLUTION_RE = re.compile(r"^\s*(\d+)\s*[xX×*]\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Resolution:
    """A resize bound ``long x short``: keep the aspect ratio, long side ≤ ``long``, short ≤ ``short``.

    Raises:
        SpecError: a side that is not a positive integer, a side longer than
            :data:`~jdsearch.core.limits.MAX_INPUT_SIDE`, or ``long < short``.
    """

    long: int
    short: int

    def __post_init__(self) -> None:
        for name in ("long", "short"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"resolution {name} side must be a positive integer, got {value!r}")
            if value > MAX_INPUT_SIDE:
                side = value if value < 10**12 else "over 10^12"  # str() of 5000 digits fails
                raise SpecError(
                    f"resolution {name} side {side} is more than the {MAX_INPUT_SIDE} pixels an "
                    "input size may have"
                )
        if self.long < self.short:
            raise SpecError(
                f"resolution long side {self.long} is smaller than short side {self.short}"
            )

    @classmethod
    def parse(cls, text: str | Resolution) -> Resolution:
        """Parse ``"1333x800"``; the order of the two sides does not matter."""
        if isinstance(text, Resolution):
            return text
        match = _RESOLUTION_RE.match(text) if isinstance(text, str) else None
        if match is None:
            raise SpecError(f"resolution {text!r} is not of the form LONGxSHORT, e.g. '1333x800'")
        sides = match.group(1), match.group(2)
        if any(
            len(side) > 9 or int(side) > MAX_INPUT_SIDE for side in sides
        ):  # no int() of 5000 digits
            raise SpecError(
                f"resolution {text.strip()[:40]!r}: a side is more than the {MAX_INPUT_SIDE} pixels "
                "an input size may have"
            )
        a, b = int(sides[0]), int(sides[1])
        if a < 1 or b < 1:
            raise SpecError(f"resolution {text!r} has a zero side")
        return cls(long=max(a, b), short=min(a, b))

    def __str__(self) -> str:
        return f"{self.long}x{self.short}"

    @property
    def hw(self) -> tuple[int, int]:
        """The landscape image this bound describes, as ``(height, width)`` = ``(short, long)``:
        the input size FLOPs are counted at (``count_flops(det, size=res.hw)``)."""
        return (self.short, self.long)

    @property
    def pixels(self) -> int:
        """``long * short``: the bound's area, for complexity terms such as the paper's H(S, R)."""
        return self.long * self.short

    def scale_for(self, height: int, width: int) -> float:
        """The resize factor torchvision applies to an image of ``height x width``."""
        return min(self.short / min(height, width), self.long / max(height, width))

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` after torchvision's resize (before padding to a stride multiple)."""
        scale = self.scale_for(height, width)
        return math.floor(float(height) * scale), math.floor(float(width) * scale)


def parse_resolutions(items: Iterable[str | Resolution]) -> tuple[Resolution, ...]:
    """Parse a non-empty list of resolutions without repeats, keeping the given order."""
    out: list[Resolution] = []
    for item in items:
        res = Resolution.parse(item)
        if res in out:
            raise SpecError(f"resolution {res} is listed twice")
        out.append(res)
    if not out:
        raise SpecError("the resolution list is empty")
    return tuple(out)
