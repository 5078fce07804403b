"""The ONNX inference graph of a detector and its check against PyTorch in onnxruntime."""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from jdsearch.core.errors import ExportError
from jdsearch.data.coco import get_resolution
from jdsearch.models import Detector
from jdsearch.store.files import atomic_path

ONNX_OPSET = 17
ONNX_INPUTS = ["image"]
ONNX_OUTPUTS = ["boxes", "scores", "labels"]


# ---------------------------------------------------------------------- ONNX
class InferenceGraph(nn.Module):
    """One image in, detections out: the detector's inference (torchvision's transform included,
    which torchvision writes to trace with dynamic image sizes) as a traceable module."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Boxes, scores and labels of the detector on one image."""
        out = self.detector([image])[0]
        return out["boxes"], out["scores"], out["labels"]


def cpu_copy(detector: Detector) -> Detector:
    """A deep copy of ``detector`` on the CPU, in eval mode."""
    det = copy.deepcopy(detector).to("cpu").eval()
    return det


def export_onnx(detector: Detector, path: str | Path, *, opset: int = ONNX_OPSET) -> Path:
    """Write ``detector``'s inference graph (at its current input size) to ``path``."""
    p = Path(path)
    det = cpu_copy(detector)
    h, w = get_resolution(det).hw
    example = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    graph = InferenceGraph(det).eval()
    with atomic_path(p) as tmp, warnings.catch_warnings():
        # The tracer warns about every Python scalar in torchvision's resize/clip code; the
        # exported graph is checked against PyTorch instead (check_onnx).
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                graph,
                (example,),
                str(tmp),
                opset_version=opset,
                dynamo=False,
                input_names=ONNX_INPUTS,
                output_names=ONNX_OUTPUTS,
                dynamic_axes={
                    "image": {1: "height", 2: "width"},
                    **{name: {0: "detections"} for name in ONNX_OUTPUTS},
                },
            )
        except Exception as e:  # the exporter raises many types; the message is what helps
            raise ExportError(
                f"{p}: ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from None
    return p


@dataclass(frozen=True)
class OnnxCheck:
    """onnxruntime vs PyTorch on the same images."""

    images: int
    detections: int  # matched detections, all images
    max_box_diff: float  # pixels
    max_score_diff: float
    box_atol: float
    score_atol: float
    onnxruntime: str
    seconds: float
    score_thresh: float = 0.05  # the score threshold of the graph that was compared
    image_source: str = "given"  # where the check images came from

    def to_dict(self) -> dict[str, Any]:
        """Every field, as a plain dict."""
        return dataclasses.asdict(self)


def _match(
    ref: tuple[np.ndarray, np.ndarray, np.ndarray],
    got: tuple[np.ndarray, np.ndarray, np.ndarray],
    score_thresh: float,
    score_atol: float,
) -> tuple[int, float, float, str | None]:
    """Pair every PyTorch detection with an ONNX one of the same label (closest box).

    Detections within ``score_atol`` of the score threshold may legitimately appear on one side
    only; any other unpaired detection is a disagreement.
    """
    rb, rs, rl = ref
    gb, gs, gl = got
    used = np.zeros(len(gs), dtype=bool)
    box_diff = score_diff = 0.0
    matched = 0
    for i in np.argsort(-rs, kind="stable"):
        candidates = np.flatnonzero((gl == rl[i]) & ~used)
        if len(candidates) == 0:
            if rs[i] > score_thresh + score_atol:
                return (
                    matched,
                    box_diff,
                    score_diff,
                    f"PyTorch detection (label {rl[i]}, score {rs[i]:.4f}) missing from ONNX",
                )
            continue
        diffs = np.abs(gb[candidates] - rb[i]).max(axis=1)
        j = candidates[int(np.argmin(diffs))]
        used[j] = True
        matched += 1
        box_diff = max(box_diff, float(diffs.min()))
        score_diff = max(score_diff, float(abs(gs[j] - rs[i])))
    extra = gs[~used]
    if len(extra) and extra.max() > score_thresh + score_atol:
        return (
            matched,
            box_diff,
            score_diff,
            f"ONNX has a detection (score {extra.max():.4f}) PyTorch does not",
        )
    return matched, box_diff, score_diff, None


def check_onnx(
    path: str | Path,
    detector: Detector,
    images: Sequence[Tensor],
    *,
    score_atol: float = 1e-3,
    box_rtol: float = 1e-4,
) -> OnnxCheck:
    """Run ``path`` with onnxruntime and ``detector`` with PyTorch on ``images``; raise
    :class:`ExportError` unless every detection agrees (same label, box within
    ``0.01 + box_rtol × longest side`` pixels, score within ``score_atol``)."""
    import onnxruntime as ort

    if not images:
        raise ExportError(f"{path}: check_onnx needs at least one image")
    det = cpu_copy(detector)
    start = time.perf_counter()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(
            f"{path}: onnxruntime cannot load the model ({str(e).splitlines()[0]})"
        ) from None
    matched, box_diff, score_diff = 0, 0.0, 0.0
    box_atol = 0.0
    for k, image in enumerate(images):
        image = image.detach().cpu().float()
        with torch.no_grad():
            out = det([image])[0]
        ref = (out["boxes"].numpy(), out["scores"].numpy(), out["labels"].numpy())
        got = tuple(session.run(ONNX_OUTPUTS, {"image": image.numpy()}))
        tol = 0.01 + box_rtol * max(image.shape[1:])
        box_atol = max(box_atol, tol)
        m, bd, sd, problem = _match(ref, got, det.roi_heads.score_thresh, score_atol)
        if problem is None and (bd > tol or sd > score_atol):
            problem = f"boxes differ by up to {bd:.4g} px (tolerance {tol:.3g}), scores by {sd:.3g}"
        if problem is not None:
            raise ExportError(f"{path}: ONNX and PyTorch disagree on check image {k}: {problem}")
        matched += m
        box_diff, score_diff = max(box_diff, bd), max(score_diff, sd)
    return OnnxCheck(
        images=len(images),
        detections=matched,
        max_box_diff=box_diff,
        max_score_diff=score_diff,
        box_atol=box_atol,
        score_atol=score_atol,
        onnxruntime=ort.__version__,
        seconds=round(time.perf_counter() - start, 3),
        score_thresh=float(det.roi_heads.score_thresh),
    )


def verified_onnx(path: Path, det: Detector, images: Sequence[Tensor]) -> OnnxCheck:
    """:func:`check_onnx`, made to compare something: when no check image yields a detection
    above the score threshold, the same weights are exported once more with threshold 0 (a
    constant of the graph) and that graph is compared — every box the heads produce."""
    check = check_onnx(path, det, images)
    if check.detections:
        return check
    probe = copy.deepcopy(det)
    probe.roi_heads.score_thresh = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        check = check_onnx(export_onnx(probe, Path(tmp) / "probe.onnx"), probe, images)
    if not check.detections:
        raise ExportError(
            f"{path}: the ONNX check compared nothing: no detection on any check image, even at score 0"
        )
    return check
