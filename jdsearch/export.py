"""The upgraded detector as a self-contained folder: weights, description, ONNX graph.

An export folder holds three files and needs nothing else — no study, no storage, no pool::

    detector.json       what the detector is: architecture (appendix-B encoding and the full
                        spec), class names and category ids, the chosen input size, FLOPs and
                        parameters at that size, the sha256 of the other two files, the result of
                        the ONNX check and where it came from (study, trial, lineage, scores)
    model.safetensors   a jdsearch checkpoint (:mod:`jdsearch.checkpoint`) whose spec's input size
                        is the chosen one, so the rebuilt detector resizes inputs to it
    model.onnx          the whole inference graph (resize + normalise, backbone, FPN, RPN, RoI
                        heads, box decoding and NMS) for one image ``float32 [3, H, W]`` in
                        ``[0, 1]`` of any size → ``boxes [N, 4]`` (xyxy, input pixels),
                        ``scores [N]``, ``labels [N]`` (``1..K``, index into ``class_names``)

:func:`load_detector` gives back a torchvision detector ready for inference (eval mode, input size
set); :func:`predict_images` writes COCO-style detections. The ONNX file is produced by torch's
TorchScript-based exporter (torchvision's detection models are written and tested for it, with
dynamic image sizes), and every export runs it with onnxruntime against PyTorch on real images;
an export whose graphs disagree fails instead of writing ``detector.json``.

Files are written one by one atomically and ``detector.json`` last, with the hashes of the
others: a folder whose ``detector.json`` is missing or does not match its files is not an export.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from jdsearch.checkpoint import checkpoint_from_bytes, checkpoint_to_bytes
from jdsearch.data import get_resolution, load_image, set_resolution
from jdsearch.errors import JDSearchError
from jdsearch.flops import count_flops
from jdsearch.models import Detector
from jdsearch.resolution import Resolution

__all__ = [
    "INFO_FILE",
    "ONNX_FILE",
    "WEIGHTS_FILE",
    "ExportError",
    "Exported",
    "OnnxCheck",
    "check_onnx",
    "export_detector",
    "export_onnx",
    "export_trial",
    "load_detector",
    "load_exported",
    "predict_images",
]

FORMAT_NAME = "jdsearch-detector"
FORMAT_VERSION = 1
INFO_FILE = "detector.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
ONNX_OPSET = 17
ONNX_INPUTS = ["image"]
ONNX_OUTPUTS = ["boxes", "scores", "labels"]

log = logging.getLogger(__name__)


class ExportError(JDSearchError):
    """An export could not be written, checked or read back."""


# ---------------------------------------------------------------------- small file helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` that replaces it when the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; an export is meant to be shared
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------------- ONNX
class InferenceGraph(nn.Module):
    """One image in, detections out: the detector's inference (torchvision's transform included,
    which torchvision writes to trace with dynamic image sizes) as a traceable module."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.detector([image])[0]
        return out["boxes"], out["scores"], out["labels"]


def _cpu_copy(detector: Detector) -> Detector:
    det = copy.deepcopy(detector).to("cpu").eval()
    return det


def export_onnx(detector: Detector, path: str | Path, *, opset: int = ONNX_OPSET) -> Path:
    """Write ``detector``'s inference graph (at its current input size) to ``path``."""
    p = Path(path)
    det = _cpu_copy(detector)
    h, w = get_resolution(det).hw
    example = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    graph = InferenceGraph(det).eval()
    with _atomic(p) as tmp, warnings.catch_warnings():
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
    det = _cpu_copy(detector)
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


def _verified(path: Path, det: Detector, images: Sequence[Tensor]) -> OnnxCheck:
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


# ---------------------------------------------------------------------- export / load
@dataclass(frozen=True)
class Exported:
    """A loaded (or just written) export folder."""

    path: Path
    detector: Detector  # eval mode, resizing inputs to input_size
    input_size: Resolution
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]  # COCO category id of label 1..K
    info: dict[str, Any]


def _with_input_size(detector: Detector, size: Resolution) -> Detector:
    """A detector whose spec (and so its transform) uses ``size`` as its input size, and whose
    spec records the live inference settings of its RoI heads (someone may have changed them)."""
    spec, heads = detector.spec, detector.roi_heads
    roi = dataclasses.replace(
        spec.roi,
        score_thresh=float(heads.score_thresh),
        nms_thresh=float(heads.nms_thresh),
        detections_per_img=int(heads.detections_per_img),
    )
    detector.spec = dataclasses.replace(
        spec, roi=roi, input=dataclasses.replace(spec.input, size=size)
    )
    set_resolution(detector, size)
    return detector


def _fg_names(class_names: Sequence[str] | None, num_classes: int) -> tuple[str, ...]:
    if class_names is None:
        return tuple(f"class{i}" for i in range(1, num_classes))
    names = tuple(str(c) for c in class_names)
    return names[1:] if len(names) == num_classes else names


def export_detector(
    detector: Detector,
    out_dir: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    category_ids: Sequence[int] | None = None,
    input_size: Resolution | str | None = None,
    check_images: Sequence[Tensor] | None = None,
    onnx: bool = True,
    source: Mapping[str, Any] | None = None,
    check_source: str = "given",
    categories_source: str = "given",
) -> Exported:
    """Write ``detector`` as an export folder (see the module doc) and return it.

    ``class_names`` are the foreground names (labels ``1..K``), ``category_ids`` their COCO ids
    (default ``1..K``), ``input_size`` the size inputs are resized to (default: the detector's
    current one). The ONNX graph is checked on ``check_images`` (default: two fixed-seed images,
    one of them not at the input size's aspect ratio, to exercise the dynamic axes).
    """
    out = Path(out_dir)
    det = _cpu_copy(detector)
    size = Resolution.parse(input_size) if input_size is not None else get_resolution(det)
    det = _with_input_size(det, size)
    num_classes = det.roi_heads.box_predictor.cls_score.out_features
    names = _fg_names(class_names, num_classes)
    ids = (
        tuple(int(i) for i in category_ids)
        if category_ids is not None
        else tuple(range(1, num_classes))
    )
    if len(names) != num_classes - 1 or len(ids) != num_classes - 1:
        raise ExportError(
            f"{out}: {len(names)} class names / {len(ids)} category ids for a detector with {num_classes - 1} classes"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"{out}: cannot create the export folder ({e.strerror or e})") from None
    (out / INFO_FILE).unlink(missing_ok=True)  # the folder is not a valid export until the end

    weights = out / WEIGHTS_FILE
    with _atomic(weights) as tmp:
        tmp.write_bytes(
            checkpoint_to_bytes(
                det, class_names=names, extra={"export": dict(source or {})}, source=str(weights)
            )
        )
    files: dict[str, Any] = {"weights": {"path": WEIGHTS_FILE, "sha256": _sha256(weights)}}
    check: OnnxCheck | None = None
    if onnx:
        export_onnx(det, out / ONNX_FILE)
        if check_images:
            image_source = check_source
        else:
            g = torch.Generator().manual_seed(0)
            h, w = size.hw
            check_images = [
                torch.rand(3, h, w, generator=g),
                torch.rand(3, max(h // 2, 32), w, generator=g),
            ]
            image_source = "noise (no images given)"
        check = _verified(out / ONNX_FILE, det, check_images)
        check = dataclasses.replace(check, image_source=image_source)
        files["onnx"] = {
            "path": ONNX_FILE,
            "sha256": _sha256(out / ONNX_FILE),
            "opset": ONNX_OPSET,
            "inputs": {"image": "float32 [3, height, width], RGB in [0, 1], any size"},
            "outputs": {
                "boxes": "float32 [N, 4] x1 y1 x2 y2 in input pixels",
                "scores": "float32 [N]",
                "labels": "int64 [N], 1..K",
            },
        }
    else:
        (out / ONNX_FILE).unlink(missing_ok=True)
    report = count_flops(det, size=size.hw)
    info = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": det.spec.name,
        "arch": det.arch.encode(),
        "input_size": str(size),
        "num_classes": num_classes - 1,
        "class_names": list(names),
        "categories": [{"id": i, "name": n} for i, n in zip(ids, names, strict=True)],
        "categories_source": categories_source
        if category_ids is not None
        else "assumed 1..K (no category ids given)",
        "flops": report.total,
        "backbone_flops": report.backbone,
        "params": report.params,
        "files": files,
        "onnx_check": None if check is None else check.to_dict(),
        "source": dict(source or {}),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {"jdsearch": _version(), "torch": torch.__version__},
        "spec": det.spec.to_dict(),
    }
    with _atomic(out / INFO_FILE) as tmp:
        tmp.write_text(json.dumps(info, indent=1) + "\n")
    return Exported(out, det, size, names, ids, info)


def _version() -> str:
    from jdsearch import __version__

    return __version__


def _info_path(path: Path) -> Path:
    return path if path.name == INFO_FILE else path / INFO_FILE


def load_exported(path: str | Path, *, device: str | torch.device = "cpu") -> Exported:
    """Read an export folder (or its ``detector.json``); verifies the weights' sha256."""
    info_path = _info_path(Path(path))
    folder = info_path.parent
    try:
        info = json.loads(info_path.read_text())
    except FileNotFoundError:
        raise ExportError(
            f"{folder}: not an export folder (no {INFO_FILE}; write one with `jdsearch export`)"
        ) from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{info_path}: unreadable ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise ExportError(
            f"{info_path}: not a jdsearch detector description (format {info.get('format') if isinstance(info, dict) else None!r})"
        )
    if info.get("version") != FORMAT_VERSION:
        raise ExportError(
            f"{info_path}: format version {info.get('version')!r}, this jdsearch reads {FORMAT_VERSION}"
        )
    try:
        entry = info["files"]["weights"]
        weights = folder / entry["path"]
        data = weights.read_bytes()
        size = Resolution.parse(info["input_size"])
        names = tuple(info["class_names"])
        ids = tuple(int(c["id"]) for c in info["categories"])
    except FileNotFoundError:
        raise ExportError(f"{folder}: the weights file named in {INFO_FILE} is missing") from None
    except (KeyError, TypeError, ValueError, JDSearchError) as e:
        raise ExportError(f"{info_path}: malformed field ({type(e).__name__}: {e})") from None
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise ExportError(f"{weights}: sha256 does not match {INFO_FILE} (replaced or damaged)")
    ckpt = checkpoint_from_bytes(data, source=str(weights), device=device)
    det = _with_input_size(ckpt.detector, size)
    det.eval()
    det.class_names = names  # type: ignore[attr-defined]  # plain attribute for users
    return Exported(folder, det, size, names, ids, info)


def load_detector(path: str | Path, *, device: str | torch.device = "cpu") -> Detector:
    """A ready torchvision detector from an export folder: eval mode, inputs resized to the
    chosen size, ``detector.class_names`` set. ``detector([image])`` → boxes, labels, scores."""
    return load_exported(path, device=device).detector


# ---------------------------------------------------------------------- from a study
def _categories(handle: Any, class_names: Sequence[str]) -> tuple[tuple[int, ...] | None, str]:
    """COCO category ids of labels ``1..K``: recorded in the study, else from its annotations."""
    recorded = handle.categories()
    if recorded is not None and [n for _, n in recorded] == list(class_names):
        return tuple(i for i, _ in recorded), "study"
    ann = handle.spec.data.dir / "train.json"
    try:
        cats = json.loads(ann.read_text()).get("categories", [])
        by_name = {str(c["name"]): int(c["id"]) for c in cats}
        return tuple(by_name[n] for n in class_names), str(ann)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning(
            "no category ids recorded in the study and %s is not readable here: labels 1..K are written as ids",
            ann,
        )
        return None, ""


def _check_images(handle: Any, count: int = 3) -> list[Tensor]:
    """A few validation images of the study's dataset, when they are here."""
    ann = handle.spec.data.dir / "val.json"
    try:
        records = json.loads(ann.read_text()).get("images", [])[:count]
        return [load_image(handle.spec.data.dir / "images" / r["file_name"]) for r in records]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, JDSearchError):
        log.warning(
            "the study's validation images (%s) are not readable here: the ONNX check uses noise images",
            ann,
        )
        return []


def export_trial(
    handle: Any,
    out_dir: str | Path,
    *,
    trial: int | None = None,
    input_size: Resolution | str | None = None,
    check_images: Sequence[Tensor] | None = None,
    onnx: bool = True,
) -> Exported:
    """Export trial ``trial`` (default: the best) of an opened study (:func:`jdsearch.search.open_study`)
    at the resolution where it scored best (or ``input_size``)."""
    from jdsearch.sampler import MOVE_PARAM
    from jdsearch.search import lineage, public_url

    t = handle.trial(trial)
    ckpt = handle.checkpoint(t)
    size = Resolution.parse(input_size or t.user_attrs["best_resolution"])
    names = _fg_names(ckpt.class_names, ckpt.num_classes)
    path = lineage(handle.study, t.number)
    source = {
        "study": handle.study.study_name,
        "storage": public_url(handle.url),
        "trial": t.number,
        "H": t.value,
        "metrics": t.user_attrs.get("metrics", {}).get(str(size)),
        "teacher": t.user_attrs.get("teacher"),
        "lineage": [
            {"trial": p.number, "move": p.params.get(MOVE_PARAM), "H": p.value} for p in path
        ],
        "base_resolution": handle.study.user_attrs.get("base_resolution"),
        "base_flops": handle.study.user_attrs.get("base_flops"),
    }
    if check_images:
        images, image_source = list(check_images), "given"
    else:
        images = _check_images(handle) if onnx else []
        image_source = f"study validation set ({handle.spec.data.dir / 'val.json'})"
    ids, ids_source = _categories(handle, names)
    return export_detector(
        ckpt.detector,
        out_dir,
        class_names=names,
        category_ids=ids,
        input_size=size,
        check_images=images or None,
        onnx=onnx,
        source=source,
        check_source=image_source,
        categories_source=ids_source,
    )


# ---------------------------------------------------------------------- predict
def predict_images(
    exported: Exported,
    images: Sequence[str | Path],
    *,
    image_ids: Mapping[str, int] | None = None,
    score_thresh: float | None = None,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """COCO-style detections (``image_id``, ``category_id``, ``bbox`` xywh, ``score``, plus
    ``file_name``) of ``images``. ``image_ids`` maps file names (or paths) to COCO image ids;
    without it images are numbered from 1 in the order given."""
    det = exported.detector.to(device).eval()
    paths = [Path(p) for p in images]
    rows: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        tensors = [load_image(p).to(device) for p in chunk]
        with torch.no_grad():
            outputs = det(tensors)
        for k, (p, out) in enumerate(zip(chunk, outputs, strict=True)):
            if image_ids is not None:
                key = p.name if p.name in image_ids else str(p)
                if key not in image_ids:
                    raise JDSearchError(f"{p}: no image with this file name in the annotation file")
                image_id = int(image_ids[key])
            else:
                image_id = start + k + 1
            for box, score, label in zip(
                out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist(), strict=True
            ):
                if score_thresh is not None and score < score_thresh:
                    continue
                x1, y1, x2, y2 = box
                rows.append(
                    {
                        "image_id": image_id,
                        "file_name": p.name,
                        "category_id": exported.category_ids[label - 1],
                        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                        "score": round(float(score), 5),
                    }
                )
    return rows
