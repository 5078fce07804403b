"""The upgraded detector as a self-contained folder: ``detector.json`` (what it is, written last
with the hashes of the others), ``model.safetensors`` and ``model.onnx`` (the whole inference
graph, checked with onnxruntime against PyTorch). :func:`load_detector` gives back a torchvision
detector; :func:`predict_images` writes COCO detections. Layout: ``docs/storage.md``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from jdsearch.core.config import INT_LIMIT, is_int, shown
from jdsearch.core.errors import ExportError, JDSearchError
from jdsearch.core.files import read_text
from jdsearch.core.limits import MAX_CHECKPOINT_BYTES, MAX_TEXT_BYTES
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import get_resolution, load_image, set_resolution
from jdsearch.models import Detector
from jdsearch.models.flops import count_flops
from jdsearch.store.checkpoint import checkpoint_from_bytes, checkpoint_to_bytes
from jdsearch.store.files import atomic_path, sha256_file
from jdsearch.store.onnx import ONNX_OPSET, OnnxCheck, cpu_copy, export_onnx, verified_onnx

__all__ = [
    "ASSUMED_IDS",
    "INFO_FILE",
    "ONNX_FILE",
    "WEIGHTS_FILE",
    "Exported",
    "Origin",
    "export_detector",
    "foreground_names",
    "load_detector",
    "load_exported",
    "predict_images",
]

FORMAT_NAME = "jdsearch-detector"
FORMAT_VERSION = 1
INFO_FILE = "detector.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"

log = logging.getLogger(__name__)


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


def foreground_names(class_names: Sequence[str] | None, num_classes: int) -> tuple[str, ...]:
    """The foreground class names: ``class_names`` without its first (background) entry when it has
    ``num_classes`` entries, else as given; ``class1``, ``class2``… when ``None``."""
    if class_names is None:
        return tuple(f"class{i}" for i in range(1, num_classes))
    names = tuple(str(c) for c in class_names)
    return names[1:] if len(names) == num_classes else names


@dataclass(frozen=True)
class Origin:
    """Where an export came from, as written into ``detector.json``: ``source`` (study, trial,
    lineage, scores), and where the ONNX check images and the category ids came from."""

    source: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    check_images: str = "given"
    categories: str = "given"


def export_detector(
    detector: Detector,
    out_dir: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    category_ids: Sequence[int] | None = None,
    input_size: Resolution | str | None = None,
    check_images: Sequence[Tensor] | None = None,
    onnx: bool = True,
    origin: Origin | None = None,
) -> Exported:
    """Write ``detector`` as an export folder (see the module doc) and return it.

    Args:
        detector: the detector (copied to the CPU; the original is left alone).
        out_dir: the folder; an earlier export there is replaced.
        class_names: the foreground names (labels ``1..K``).
        category_ids: their COCO ids (default ``1..K``).
        input_size: ``LONGxSHORT`` inputs are resized to (default: the detector's current one).
        check_images: the ONNX check's images (default: two fixed-seed noise images, one not at
            the input size's aspect ratio, to exercise the dynamic axes).
        onnx: write and check ``model.onnx``.
        origin: where the export came from (:class:`Origin`).

    Returns:
        The export, as :func:`load_exported` would read it.

    Raises:
        ExportError: names or ids that do not match the classes, an unwritable folder, or an ONNX
            graph that disagrees with PyTorch.
    """
    origin = origin or Origin()
    out = Path(out_dir)
    det = cpu_copy(detector)
    size = Resolution.parse(input_size) if input_size is not None else get_resolution(det)
    det = _with_input_size(det, size)
    num_classes = det.roi_heads.box_predictor.cls_score.out_features
    names = foreground_names(class_names, num_classes)
    ids = tuple(int(i) for i in (range(1, num_classes) if category_ids is None else category_ids))
    if len(names) != num_classes - 1 or len(ids) != num_classes - 1:
        raise ExportError(
            f"{out}: {len(names)} class names / {len(ids)} category ids for a detector with "
            f"{num_classes - 1} classes"
        )
    files: dict[str, Any] = {"weights": _write_weights(out, det, names, origin.source)}
    check = None
    if onnx:
        check, files["onnx"] = _write_onnx(out, det, size, check_images, origin.check_images)
    else:
        (out / ONNX_FILE).unlink(missing_ok=True)
    categories = origin.categories if category_ids is not None else ASSUMED_IDS
    info = _info(det, size, names, ids, files, check, origin.source, categories)
    with atomic_path(out / INFO_FILE) as tmp:
        tmp.write_text(json.dumps(info, indent=1) + "\n")
    return Exported(out, det, size, names, ids, info)


ASSUMED_IDS = "assumed 1..K (no category ids given)"


def _write_weights(
    out: Path, det: Detector, names: Sequence[str], source: Mapping[str, Any]
) -> dict[str, Any]:
    """Start the folder (no ``detector.json`` until the end) with ``model.safetensors``; its
    entry in ``files``."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"{out}: cannot create the export folder ({e.strerror or e})") from None
    (out / INFO_FILE).unlink(missing_ok=True)  # the folder is not a valid export until the end
    weights = out / WEIGHTS_FILE
    with atomic_path(weights) as tmp:
        extra = {"export": dict(source)}
        tmp.write_bytes(
            checkpoint_to_bytes(det, class_names=names, extra=extra, source=str(weights))
        )
    return {"path": WEIGHTS_FILE, "sha256": sha256_file(weights)}


def _write_onnx(
    out: Path,
    det: Detector,
    size: Resolution,
    images: Sequence[Tensor] | None,
    image_source: str,
) -> tuple[OnnxCheck, dict[str, Any]]:
    """``model.onnx``, checked against ``det``: the check and the file's entry in ``files``."""
    export_onnx(det, out / ONNX_FILE)
    if not images:
        g = torch.Generator().manual_seed(0)
        h, w = size.hw
        images = [torch.rand(3, h, w, generator=g), torch.rand(3, max(h // 2, 32), w, generator=g)]
        image_source = "noise (no images given)"
    check = verified_onnx(out / ONNX_FILE, det, images)
    entry = {
        "path": ONNX_FILE,
        "sha256": sha256_file(out / ONNX_FILE),
        "opset": ONNX_OPSET,
        "inputs": {"image": "float32 [3, height, width], RGB in [0, 1], any size"},
        "outputs": {
            "boxes": "float32 [N, 4] x1 y1 x2 y2 in input pixels",
            "scores": "float32 [N]",
            "labels": "int64 [N], 1..K",
        },
    }
    return dataclasses.replace(check, image_source=image_source), entry


def _info(
    det: Detector,
    size: Resolution,
    names: Sequence[str],
    ids: Sequence[int],
    files: Mapping[str, Any],
    check: OnnxCheck | None,
    source: Mapping[str, Any],
    categories_source: str,
) -> dict[str, Any]:
    """The content of ``detector.json``."""
    report = count_flops(det, size=size.hw)
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": det.spec.name,
        "arch": det.arch.encode(),
        "input_size": str(size),
        "num_classes": len(names),
        "class_names": list(names),
        "categories": [{"id": i, "name": n} for i, n in zip(ids, names, strict=True)],
        "categories_source": categories_source,
        "flops": report.total,
        "backbone_flops": report.backbone,
        "params": report.params,
        "files": dict(files),
        "onnx_check": None if check is None else check.to_dict(),
        "source": dict(source),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {"jdsearch": _version(), "torch": torch.__version__},
        "spec": det.spec.to_dict(),
    }


def _version() -> str:
    from jdsearch import __version__

    return __version__


def _info_path(path: Path) -> Path:
    return path if path.name == INFO_FILE else path / INFO_FILE


def load_exported(path: str | Path, *, device: str | torch.device = "cpu") -> Exported:
    """Read an export folder (or its ``detector.json``), verifying the weights' sha256.

    ``detector.json`` is not trusted: the weights must be a plain file named inside the folder, of
    at most :data:`MAX_WEIGHTS_BYTES`, hashed as they are read; ``class_names`` and
    ``categories`` must name each of the detector's classes once.

    Args:
        path: the export folder or its ``detector.json``.
        device: where the detector is put.

    Returns:
        The detector, its input size, class names, category ids and ``detector.json``.

    Raises:
        ExportError: not an export folder, an unreadable or foreign ``detector.json``, a weights
            path outside the folder, files that do not match their hashes, or classes that do not
            match the detector's.
    """
    info_path = _info_path(Path(path))
    folder = info_path.parent
    info = _read_info(info_path)
    try:
        entry = info["files"]["weights"]
        raw_size = info["input_size"]
        expected = entry["sha256"]
    except (KeyError, TypeError) as e:
        raise ExportError(f"{info_path}: malformed field ({type(e).__name__}: {e})") from None
    try:
        size = Resolution.parse(raw_size)  # bounded: before anything is allocated for it
    except JDSearchError as e:
        raise ExportError(f"{info_path}: input_size: {e}") from None
    weights = _weights_path(folder, entry, info_path)
    data = _read_weights(weights, expected)
    ckpt = checkpoint_from_bytes(data, source=str(weights), device=device)
    names, ids = _classes(info, info_path, ckpt.num_classes - 1)
    det = _with_input_size(ckpt.detector, size)
    det.eval()
    det.class_names = names  # type: ignore[attr-defined]  # plain attribute for users
    return Exported(folder, det, size, names, ids, info)


#: The largest weights file an export may name (``docs/limits.md``).
MAX_WEIGHTS_BYTES = MAX_CHECKPOINT_BYTES
#: The largest ``detector.json`` read (``docs/limits.md``).
MAX_INFO_BYTES = MAX_TEXT_BYTES


def _read_info(info_path: Path) -> dict[str, Any]:
    """``detector.json``, checked to be this format and version."""
    folder = info_path.parent
    try:
        info = json.loads(read_text(info_path, MAX_INFO_BYTES))
    except FileNotFoundError:
        raise ExportError(
            f"{folder}: not an export folder (no {INFO_FILE}; write one with `jdsearch export`)"
        ) from None
    except RecursionError:
        raise ExportError(f"{info_path}: unreadable (nested too deeply)") from None
    except OSError as e:
        raise ExportError(f"{info_path}: unreadable ({e.strerror or e})") from None
    except ValueError as e:
        reason = str(e).split(";")[0]
        raise ExportError(f"{info_path}: unreadable ({reason})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        fmt = info.get("format") if isinstance(info, dict) else None
        raise ExportError(f"{info_path}: not a jdsearch detector description (format {shown(fmt)})")
    if info.get("version") != FORMAT_VERSION:
        raise ExportError(
            f"{info_path}: format version {shown(info.get('version'))}, this jdsearch reads {FORMAT_VERSION}"
        )
    return info


def _weights_path(folder: Path, entry: Any, info_path: Path) -> Path:
    """The weights file ``entry["path"]`` names: a plain file name inside ``folder`` (no folder
    part, no ``..``, not a link out of the folder) of a regular file."""
    name = entry.get("path") if isinstance(entry, dict) else None
    plain = isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name
    if not plain or "\\" in name or "\0" in name:
        raise ExportError(
            f"{info_path}: files.weights.path {shown(name)} must be a file name inside the export "
            f"folder (like {WEIGHTS_FILE!r})"
        )
    weights = folder / name
    if not weights.exists():
        raise ExportError(f"{folder}: the weights file named in {INFO_FILE} is missing ({name})")
    if not weights.is_file() or weights.resolve().parent != folder.resolve():
        raise ExportError(
            f"{weights}: files.weights.path in {INFO_FILE} must name a regular file inside the "
            "export folder"
        )
    return weights


def _read_weights(weights: Path, expected: Any) -> bytes:
    """The file's bytes, read in chunks while hashing, at most :data:`MAX_WEIGHTS_BYTES`; an
    :class:`ExportError` when it is larger or its sha256 is not ``expected``."""
    too_big = ExportError(
        f"{weights}: more than {MAX_WEIGHTS_BYTES} bytes, too large for detector weights"
    )
    digest = hashlib.sha256()
    data = bytearray()
    try:
        if weights.stat().st_size > MAX_WEIGHTS_BYTES:
            raise too_big
        with weights.open("rb") as f:
            while chunk := f.read(1 << 22):
                data += chunk
                digest.update(chunk)
                if len(data) > MAX_WEIGHTS_BYTES:
                    raise too_big
    except OSError as e:
        raise ExportError(f"{weights}: cannot read ({e.strerror or e})") from None
    if digest.hexdigest() != expected:
        raise ExportError(f"{weights}: sha256 does not match {INFO_FILE} (replaced or damaged)")
    return bytes(data)


def _classes(
    info: Mapping[str, Any], info_path: Path, k: int
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``class_names`` and the ids of ``categories``, checked: ``k`` names, and ``k``
    categories with distinct integer ids whose names are the class names, in order."""
    names = info.get("class_names")
    if not isinstance(names, list) or len(names) != k or not all(isinstance(n, str) for n in names):
        raise ExportError(
            f"{info_path}: class_names {shown(names)} must be a list of {k} names (the detector has "
            f"{k} classes)"
        )
    cats = info.get("categories")
    if not isinstance(cats, list) or len(cats) != k:
        raise ExportError(
            f"{info_path}: categories {shown(cats)} must be a list of {k} categories (the detector "
            f"has {k} classes)"
        )
    ids: list[int] = []
    for i, (cat, name) in enumerate(zip(cats, names, strict=True)):
        cid = cat.get("id") if isinstance(cat, dict) else None
        if not is_int(cid) or abs(cid) > INT_LIMIT or cid in ids:
            what = "repeats an earlier id" if cid in ids else "is not an integer"
            raise ExportError(f"{info_path}: categories[{i}].id {shown(cid)} {what}")
        if cat.get("name", name) != name:
            raise ExportError(
                f"{info_path}: categories[{i}].name {shown(cat.get('name'))} is not "
                f"class_names[{i}] {name!r}"
            )
        ids.append(cid)
    return tuple(names), tuple(ids)


def load_detector(path: str | Path, *, device: str | torch.device = "cpu") -> Detector:
    """A ready torchvision detector from an export folder.

    Args:
        path: the export folder or its ``detector.json``.
        device: where the detector is put.

    Returns:
        The detector in eval mode, inputs resized to the chosen size, ``class_names`` set:
        ``detector([image])[0]`` holds ``boxes``, ``labels`` (``1..K``) and ``scores``.

    Raises:
        ExportError: not an export folder, or its files do not match their hashes.
    """
    return load_exported(path, device=device).detector


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
