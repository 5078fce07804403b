"""The synthetic data set's spec: the study spec's ``data.synth`` section, what
:func:`jdsearch.data.synth.generate` is asked to write. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from jdsearch.core.config import check

__all__ = ["SynthSpec"]


@dataclass(frozen=True)
class SynthSpec:
    """A synthetic dataset to generate when ``data.dir`` has none (:func:`jdsearch.data.synth.generate`)."""

    images: int = 640
    seed: int = 0
    size: int = 128

    def __post_init__(self) -> None:
        check(self.images >= 1, self, "images", "must be ≥ 1")
        check(self.seed >= 0, self, "seed", "must not be negative")
        check(self.size >= 1, self, "size", "must be ≥ 1")
