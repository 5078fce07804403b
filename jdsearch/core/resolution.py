"""Input resolutions ``LONGxSHORT``: the resize bound of dynamic resolution and of the score H.

Torch-free, so the spec layer (detector and study specs) can use it without importing torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from jdsearch.core.errors import SpecError

__all__ = ["Resolution", "parse_resolutions"]

_RESOLUTION_RE = re.compile(r"^\s*(\d+)\s*[xX×*]\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Resolution:
    """A resize bound ``long x short``: keep the aspect ratio, long side ≤ ``long``, short ≤ ``short``.

    Raises:
        SpecError: a side that is not a positive integer, or ``long < short``.
    """

    long: int
    short: int

    def __post_init__(self) -> None:
        for name in ("long", "short"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"resolution {name} side must be a positive integer, got {value!r}")
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
        a, b = int(match.group(1)), int(match.group(2))
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
