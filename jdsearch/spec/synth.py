"""The synthetic data set's spec: the study spec's ``data.synth`` section, what
:func:`jdsearch.data.synth.generate` is asked to write, and the limits of what it can draw,
checked here for the spec, the generator and the command line alike. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from jdsearch.core.config import check

__all__ = ["MAX_SIDE", "MIN_SIDE", "SynthSpec"]

#: Smallest and largest image side, so that every size class of object fits.
MIN_SIDE = 32
MAX_SIDE = 4096


@dataclass(frozen=True)
class SynthSpec:
    """A synthetic dataset to generate when ``data.dir`` has none (:func:`jdsearch.data.synth.generate`)."""

    images: int = 640
    seed: int = 0
    size: int = 128

    def __post_init__(self) -> None:
        check(self.images >= 2, self, "images", "must be ≥ 2 (an image in each split at least)")
        check(self.seed >= 0, self, "seed", "must not be negative")
        check(MIN_SIDE <= self.size <= MAX_SIDE, self, "size", f"must be {MIN_SIDE} to {MAX_SIDE}")
