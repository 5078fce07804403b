"""How many threads torch uses in this process: one for a small detector, idle OpenMP threads
sleeping instead of spinning. Both were measured with ``bench/train_throughput.py --contend``.

Importing this module imports neither torch nor anything above the engine layer: the OpenMP
policy must be set before torch loads.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from jdsearch.core.errors import JDSearchError

# Measured with bench/train_throughput.py --contend (2 cores, 208x128, batch 2): tiny-r18-fpn
# (0.14 GFLOPs per image there) trains at 17.7 img/s on 1 thread and 15.7 on torch's default
# (2, idle threads sleeping) alone, 18.4 and 9.8 next to a busy process; r18-fpn (18 GFLOPs)
# at 0.60 and 0.75 alone, 0.65 and 0.65 busy. Below this size one thread is the faster choice.
SMALL_DETECTOR_GFLOPS = 1.0


def small_detector_threads(threads: int | None, gflops: float) -> None:
    """Train a small detector (under :data:`SMALL_DETECTOR_GFLOPS` multiply-adds per image at
    its largest training size) on one torch thread, unless the user chose a thread count
    (``threads``, the ``--threads`` option, or ``OMP_NUM_THREADS``); says so in one line."""
    if threads is not None or "OMP_NUM_THREADS" in os.environ:
        return
    if gflops < SMALL_DETECTOR_GFLOPS:
        import torch

        torch.set_num_threads(1)
        print(
            f"torch threads: 1 (a small detector, {gflops:.2f} GFLOPs per image, trains fastest "
            "on one; --threads N to change)"
        )


def study_gflops(spec: Any) -> float:
    """Multiply-adds (G) per image of the study's base detector at its largest resolution."""
    from jdsearch.models.flops import count_spec_flops
    from jdsearch.spec.detector import load_spec

    largest = max(spec.resolutions, key=lambda r: r.pixels)
    try:
        detector = load_spec(spec.base.detector)
    except JDSearchError:  # not here (a worker joining a study that holds its base): no rule
        return math.inf
    return count_spec_flops(detector, size=largest.hw).total / 1e9


def passive_openmp_threads() -> None:
    """Let idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) unless the
    user chose a policy; OpenMP reads it once, when torch loads, so only before that.

    Measured with ``bench/train_throughput.py --contend`` (2 cores, one competing busy process):
    with torch's default 2 threads, tiny-r18-fpn trains at 5.6 img/s spinning and 9.8 passive;
    r18-fpn at 0.52 and 0.65 (1 thread: 0.65). Alone, passive costs nothing (15.7 against
    13.2, 0.75 against 0.74).
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
