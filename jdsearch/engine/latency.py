"""Inference speed of a detector at batch size 1, the way table 4 of the paper reports FPS.

One timed call is the whole inference graph a user runs — torchvision's transform (normalise,
resize, pad), backbone, FPN, RPN, RoI heads and post-processing (box decoding, NMS) — on one image
of exactly the measured size, so the transform's resize is an identity and the figure belongs to
that size. Warm-up calls come first (allocator, cuDNN autotuning, lazy initialisation); then
``repeats`` calls are timed one by one and the *median* is reported, with the 10th and 90th
percentiles to show the spread. On CUDA every call is bracketed by ``torch.cuda.synchronize``.

Post-processing costs depend on how many boxes survive the score threshold, so the input should
be a real image (``images=``); without one a fixed-seed noise image is used, which is fine for
comparing detectors against each other but not as an absolute figure.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from jdsearch.core.errors import JDSearchError
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import using_resolution

__all__ = ["Latency", "check_device", "device_name", "measure_latencies", "measure_latency"]


@dataclass(frozen=True)
class Latency:
    """Batch-1 latency of one detector at one size on one device."""

    size: str  # LONGxSHORT
    device: str
    threads: int
    warmup: int
    repeats: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    amp: bool = False
    image: str = ""  # HxW of the timed input (after which the resize is an identity)

    @property
    def images_per_s(self) -> float:
        """``1000 / median_ms``; ``inf`` when the median is not positive."""
        return 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """Every field plus ``images_per_s``, as a plain dict."""
        return {**asdict(self), "images_per_s": self.images_per_s}

    def describe(self) -> str:
        """One line: images/s, median and p10/p90 latency, runs, image size, device, AMP and, on the
        CPU, the thread count."""
        amp = " AMP" if self.amp else ""
        return (
            f"{self.images_per_s:.1f} img/s: median {self.median_ms:.2f} ms (p10 {self.p10_ms:.2f}, "
            f"p90 {self.p90_ms:.2f}) over {self.repeats} runs on {self.image} images on {self.device}{amp}"
            + (
                f", {self.threads} thread{'s' if self.threads != 1 else ''}"
                if self.device == "cpu"
                else ""
            )
        )


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _inputs(
    hw: tuple[int, int], images: Sequence[Tensor] | None, device: torch.device
) -> list[Tensor]:
    h, w = hw
    if not images:
        g = torch.Generator().manual_seed(0)
        return [torch.rand(3, h, w, generator=g).to(device)]
    out = []
    for im in images:
        if im.dim() != 3 or im.shape[0] != 3:
            raise JDSearchError(
                f"latency: images must be 3×H×W float tensors, got shape {tuple(im.shape)}"
            )
        resized = torch.nn.functional.interpolate(
            im[None].float(), size=(h, w), mode="bilinear", align_corners=False
        )[0]
        out.append(resized.clamp(0, 1).to(device))
    return out


def check_device(device: str | torch.device, what: str = "device") -> torch.device:
    """``device`` as a torch device that exists here; a one-line error otherwise, starting with
    ``what`` (the command line's ``--device``)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise JDSearchError(f"{what} {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise JDSearchError(f"{what} {device!r}: torch sees no CUDA device here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise JDSearchError(
                f"{what} {device!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif dev.type != "cpu":
        raise JDSearchError(f"{what} {device!r}: expected cpu, cuda or cuda:N")
    return dev


def device_name(device: str | torch.device) -> str:
    """What a latency was measured on, to tell machines apart: the GPU's name
    (``cuda:0 NVIDIA H200``), or the CPU's model with torch's thread count
    (``cpu AMD EPYC 7B13, 1 thread``)."""
    dev = check_device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    threads = torch.get_num_threads()
    return f"cpu {_cpu_model()}, {threads} thread{'s' if threads != 1 else ''}"


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    with (
        contextlib.suppress(OSError),
        open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f,
    ):
        for line in f:
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def measure_latencies(
    detectors: Sequence[tuple[nn.Module, Resolution | str]],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 5,
    repeats: int = 30,
    images: Sequence[Tensor] | None = None,
    image_hw: tuple[int, int] | None = None,
    amp: bool = False,
) -> list[Latency]:
    """Batch-1 latency of several detectors, each at its size, timed *interleaved* (one call of
    each in turn, ``warmup + repeats`` rounds) so that a change in machine load hits all alike.

    Each detector's input is exactly its size (``LONG×SHORT`` as a landscape ``SHORT×LONG``
    image, or ``image_hw`` for all of them), so torchvision's resize is an identity. ``images``
    (float ``3×H×W`` in ``[0, 1]``, any size) are resized to that and used in turn. Modes and
    resize sizes are restored afterwards; the detectors stay on ``device``.
    """
    if repeats < 1 or warmup < 0:
        raise JDSearchError(
            f"latency: repeats must be ≥ 1 and warmup ≥ 0, got {repeats} and {warmup}"
        )
    dev = check_device(device)
    if amp and dev.type != "cuda":
        raise JDSearchError("latency: --amp (float16 autocast) needs a CUDA device")
    runs = []
    for detector, size in detectors:
        res = Resolution.parse(size) if image_hw is None else Resolution(*sorted(image_hw)[::-1])
        hw = image_hw or res.hw
        detector.to(dev)
        runs.append(_Timed(detector, res, hw, _inputs(hw, images, dev), detector.training))
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.enter_context(autocast)
        for run in runs:
            run.detector.eval()
            stack.enter_context(using_resolution(run.detector, run.res))
        try:
            _time_interleaved(runs, warmup + repeats, warmup, dev)
        finally:
            for run in runs:
                run.detector.train(run.was_training)
    return [run.latency(str(dev), warmup, repeats, amp) for run in runs]


@dataclass
class _Timed:
    """One detector being timed, its input size and its timings (ms)."""

    detector: nn.Module
    res: Resolution
    hw: tuple[int, int]
    inputs: list[Tensor]
    was_training: bool
    spent: list[float] = field(default_factory=list)

    def latency(self, device: str, warmup: int, repeats: int, amp: bool) -> Latency:
        spent = sorted(self.spent)
        return Latency(
            size=str(self.res),
            device=device,
            threads=torch.get_num_threads(),
            warmup=warmup,
            repeats=repeats,
            median_ms=statistics.median(spent),
            p10_ms=_quantile(spent, 0.1),
            p90_ms=_quantile(spent, 0.9),
            amp=amp,
            image=f"{self.hw[0]}x{self.hw[1]}",
        )


def _time_interleaved(runs: Sequence[_Timed], rounds: int, warmup: int, dev: torch.device) -> None:
    """``rounds`` rounds of one batch-1 call of each detector in turn; the first ``warmup``
    rounds are not recorded."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for i in range(rounds):
        for run in runs:
            x = run.inputs[i % len(run.inputs)]
            sync()
            start = time.perf_counter()
            run.detector([x])
            sync()
            if i >= warmup:
                run.spent.append((time.perf_counter() - start) * 1000.0)


def measure_latency(
    detector: nn.Module,
    size: Resolution | str,
    *,
    device: str | torch.device = "cpu",
    warmup: int = 5,
    repeats: int = 30,
    images: Sequence[Tensor] | None = None,
    image_hw: tuple[int, int] | None = None,
    amp: bool = False,
) -> Latency:
    """Median batch-1 latency of one detector at ``size`` (:func:`measure_latencies` of one).

    Args:
        detector: the detector (moved to ``device``; its mode and sizes are restored).
        size: ``LONGxSHORT``; the input is a landscape image of exactly that size.
        device: ``cpu`` or ``cuda[:i]``.
        warmup: untimed calls first.
        repeats: timed calls.
        images: real images (``3×H×W`` in [0, 1]) resized to the size, used in turn.
        image_hw: time at this ``(height, width)`` instead.
        amp: float16 autocast (CUDA only).

    Returns:
        Median, p10 and p90 in milliseconds, with the device and thread count.

    Raises:
        JDSearchError: bad repeats/warmup, an unavailable device, or AMP without CUDA.
    """
    return measure_latencies(
        [(detector, size)],
        device=device,
        warmup=warmup,
        repeats=repeats,
        images=images,
        image_hw=image_hw,
        amp=amp,
    )[0]
