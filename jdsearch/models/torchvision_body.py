"""torchvision weight files → jdsearch bodies: reading a ``torch.save`` file safely, the
ResNet/ResNeXt name map, the body architecture a state dict describes, and ImageNet backbones.

Files are read with ``torch.load(weights_only=True)`` only. A pickled *model* (``torch.save(model)``)
loads when every class it names is one of torch's and torchvision's ResNet / Faster R-CNN v1
modules (:data:`SAFE_MODULE_CLASSES`): those are rebuilt from their saved attributes, no code of
the file runs. Anything else is refused with a line that says to save ``model.state_dict()``.

Name map, torchvision → jdsearch: ``conv1``/``bn1`` → ``stem.conv``/``stem.bn``,
``layer{s+1}.{b}.conv{k}``/``bn{k}`` → ``stages.{s}.{b}.conv{k}``/``bn{k}`` and
``layer{s+1}.{b}.downsample.0/1`` → ``stages.{s}.{b}.shortcut.conv/bn``. ``FrozenBatchNorm2d``
has no ``num_batches_tracked``; the trainable ``BatchNorm2d`` it becomes starts that count at 0.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection import (
    anchor_utils,
    backbone_utils,
    faster_rcnn,
    roi_heads,
    rpn,
    transform,
)
from torchvision.ops import feature_pyramid_network as tv_fpn
from torchvision.ops import misc as tv_misc
from torchvision.ops import poolers

from jdsearch.core.errors import CheckpointError, SpecError
from jdsearch.core.files import check_file
from jdsearch.core.limits import MAX_CHECKPOINT_BYTES
from jdsearch.models import torch_internals
from jdsearch.spec.arch import BackboneArch, Block, Stage

__all__ = [
    "BODY",
    "SAFE_MODULE_CLASSES",
    "BackboneWeights",
    "WeightsFile",
    "body_arch",
    "body_tensors",
    "check_weights_file",
    "jdsearch_body_name",
    "load_backbone_weights",
    "map_body",
    "read_weights_file",
    "torchvision_body_name",
]

# Every global a pickled torchvision ResNet or Faster R-CNN (v1, and v2 so that it is refused by
# name rather than by class) names, and nothing else: these are rebuilt from saved attributes.
SAFE_MODULE_CLASSES: tuple[Any, ...] = (
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Linear,
    nn.Sequential,
    nn.ModuleList,
    nn.ModuleDict,
    nn.Identity,
    nn.Flatten,
    tv_resnet.ResNet,
    tv_resnet.BasicBlock,
    tv_resnet.Bottleneck,
    tv_misc.FrozenBatchNorm2d,
    tv_misc.Conv2dNormActivation,
    torch_internals.IntermediateLayerGetter,
    backbone_utils.BackboneWithFPN,
    tv_fpn.FeaturePyramidNetwork,
    tv_fpn.LastLevelMaxPool,
    anchor_utils.AnchorGenerator,
    rpn.RPNHead,
    rpn.RegionProposalNetwork,
    roi_heads.RoIHeads,
    poolers.MultiScaleRoIAlign,
    poolers.LevelMapper,
    faster_rcnn.FasterRCNN,
    faster_rcnn.TwoMLPHead,
    faster_rcnn.FastRCNNPredictor,
    faster_rcnn.FastRCNNConvFCHead,
    transform.GeneralizedRCNNTransform,
    torch_internals.BoxCoder,
    torch_internals.Matcher,
    torch_internals.BalancedPositiveNegativeSampler,
    torchvision.ops.boxes.box_iou,
)
_SAFE_NAMES = {f"{c.__module__}.{c.__qualname__}" for c in SAFE_MODULE_CLASSES}
_MAX_LISTED = 3
_SAVE_HINT = "save model.state_dict() with torch.save and import that file"


@dataclass(frozen=True)
class WeightsFile:
    """A weights file as read: its tensors by name and, for a pickled model, the model."""

    tensors: dict[str, Tensor]
    model: nn.Module | None
    source: str


def _unsafe_globals(path: Path) -> list[str]:
    lister = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch ≥ 2.5
    try:
        names = lister(path) if lister is not None else []
    except Exception:  # a legacy or damaged file: torch.load says why
        return []
    return sorted(set(names) - _SAFE_NAMES)


def _load(path: Path, source: str) -> Any:
    unsafe = _unsafe_globals(path)
    if unsafe:
        shown = ", ".join(unsafe[:_MAX_LISTED]) + (" ..." if len(unsafe) > _MAX_LISTED else "")
        raise CheckpointError(
            f"{source}: a pickled model that names {shown}, not one of the torchvision modules "
            f"rebuilt under weights_only=True; {_SAVE_HINT}"
        )
    try:
        allow = getattr(torch.serialization, "safe_globals", None)  # torch ≥ 2.5: models too
        with allow(list(SAFE_MODULE_CLASSES)) if allow else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{source}: no such file") from None
    except pickle.UnpicklingError as e:  # a global outside the allow-list, or a damaged pickle
        raise CheckpointError(
            f"{source}: cannot be read with weights_only=True ({torch_reason(e)}); {_SAVE_HINT}"
        ) from None
    except Exception as e:  # torch.load fails on a foreign or truncated file in many ways
        reason = f"{type(e).__name__}: {torch_reason(e)}"
        raise CheckpointError(f"{source}: not a readable torch.save file ({reason})") from None


def torch_reason(e: BaseException) -> str:
    """What ``torch.load`` found wrong, in at most 200 characters, without its advice: torch's
    message suggests re-running with ``weights_only=False``, which would run the file's pickle
    (code of whoever wrote the file). Only the lines that say what is wrong are kept."""
    lines = [" ".join(line.split()) for line in str(e).splitlines()]
    kept = [
        line
        for line in lines
        if line
        and "weights_only" not in line
        and "trusted source" not in line
        and not line.startswith(("Check the documentation", "Please file an issue"))
    ]
    return " ".join(kept)[:200] or "not a file torch reads safely"


def _unwrap(obj: Any, source: str) -> tuple[dict[str, Tensor], nn.Module | None]:
    """The tensors of a state dict, a ``{"model": state_dict}`` training checkpoint or a model."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict()), obj
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            inner = obj.get(key)
            if isinstance(inner, nn.Module | Mapping):
                return _unwrap(inner, f"{source}[{key!r}]")
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
        if tensors and len(tensors) == len(obj):
            prefix = "module."  # saved from a DistributedDataParallel wrapper
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
            return tensors, None
    raise CheckpointError(
        f"{source}: not a state_dict (a {type(obj).__name__} that is not a mapping of names to "
        f"tensors); {_SAVE_HINT}"
    )


def check_weights_file(path: str | Path) -> Path:
    """``path`` of a weights file, refused in one line before it is opened unless it is a regular
    file (not ``/dev/zero``, a FIFO, a folder) of at most
    :data:`~jdsearch.core.limits.MAX_CHECKPOINT_BYTES`.

    Raises:
        CheckpointError: no such file, or one that is not read (why, as the OS or the check says).
    """
    try:
        return check_file(path, MAX_CHECKPOINT_BYTES)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such weights file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read weights file ({e.strerror or e})") from None


def read_weights_file(path: str | Path) -> WeightsFile:
    """Read a ``torch.save`` file with ``weights_only=True``.

    Args:
        path: a ``state_dict`` (or ``{"model": state_dict}``) file, or a pickled torchvision
            ResNet / Faster R-CNN whose classes are all in :data:`SAFE_MODULE_CLASSES`.

    Returns:
        Its tensors by name (a model's ``state_dict()``) and, for a pickled model, the model.

    Raises:
        CheckpointError: a missing or unreadable file, a pickle naming any other class, or an
            object that holds no tensors; one line that says to save ``model.state_dict()``.
    """
    p = check_weights_file(path)
    tensors, model = _unwrap(_load(p, str(p)), str(p))
    if model is not None:
        model.eval()
    return WeightsFile(tensors, model, str(p))


# ---------------------------------------------------------------------- names and architecture
BODY = "backbone.body."  # where a torchvision Faster R-CNN keeps its ResNet body


def body_tensors(detector_tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ``backbone.body.*`` tensors of a torchvision detector state dict, named as the
    ResNet's own (``layer1.0.conv1.weight``…); empty when it has none."""
    return {k.removeprefix(BODY): v for k, v in detector_tensors.items() if k.startswith(BODY)}


_STEM = re.compile(r"(conv1|bn1)\.(.+)")
_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(.+)")
_DOWNSAMPLE = {"downsample.0": "shortcut.conv", "downsample.1": "shortcut.bn"}


def jdsearch_body_name(name: str) -> str | None:
    """The jdsearch body name of torchvision ResNet tensor ``name`` (``layer2.0.downsample.1.bias``
    → ``stages.1.0.shortcut.bn.bias``); ``None`` for what a body has not (``fc.*``)."""
    m = _STEM.fullmatch(name)
    if m:
        return f"stem.{'conv' if m.group(1) == 'conv1' else 'bn'}.{m.group(2)}"
    m = _BLOCK.fullmatch(name)
    if m:
        stage, block, module, leaf = m.groups()
        return f"stages.{int(stage) - 1}.{block}.{_DOWNSAMPLE.get(module, module)}.{leaf}"
    return None


_JD_STEM = re.compile(r"stem\.(conv|bn)\.(.+)")
_JD_BLOCK = re.compile(r"stages\.([0-3])\.(\d+)\.(conv\d|bn\d|shortcut\.conv|shortcut\.bn)\.(.+)")
_SHORTCUT = {v: k for k, v in _DOWNSAMPLE.items()}


def torchvision_body_name(name: str) -> str | None:
    """The torchvision ResNet name of jdsearch body tensor ``name``, the inverse of
    :func:`jdsearch_body_name` (``stages.1.0.shortcut.bn.bias`` → ``layer2.0.downsample.1.bias``);
    ``None`` for a name no jdsearch body has."""
    m = _JD_STEM.fullmatch(name)
    if m:
        return f"{'conv1' if m.group(1) == 'conv' else 'bn1'}.{m.group(2)}"
    m = _JD_BLOCK.fullmatch(name)
    if m:
        stage, block, module, leaf = m.groups()
        return f"layer{int(stage) + 1}.{block}.{_SHORTCUT.get(module, module)}.{leaf}"
    return None


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _block(body: Mapping[str, Tensor], stage: int, index: int) -> Block:
    pre = f"layer{stage}.{index}."
    convs = [body[f"{pre}conv{k}.weight"] for k in (1, 2, 3) if f"{pre}conv{k}.weight" in body]
    channels = tuple(int(w.shape[0]) for w in convs)
    groups = int(convs[0].shape[0] // convs[1].shape[1]) if len(convs) == 3 else 1
    return Block(channels, groups)


def body_arch(
    body: Mapping[str, Tensor], *, fpn: int = 256, source: str = "<weights>"
) -> BackboneArch:
    """The jdsearch architecture of a torchvision ResNet/ResNeXt body ``state_dict`` (keys
    ``conv1.weight``, ``layer1.0.conv1.weight``…), read from the tensor shapes; the standard
    stage strides (1, 2, 2, 2).

    Raises:
        CheckpointError: no ResNet stem or four ``layer*`` stages, or blocks jdsearch cannot
            build (mixed kinds, a ``downsample`` where jdsearch has none or the reverse).
    """
    if "conv1.weight" not in body or _shape(body["conv1.weight"])[1:] != (3, 7, 7):
        raise CheckpointError(f"{source}: not a torchvision ResNet body (no 7×7 conv1 stem)")
    stages = []
    for s in range(1, 5):
        ids = sorted({int(k.split(".")[1]) for k in body if k.startswith(f"layer{s}.")})
        if not ids or ids != list(range(len(ids))):
            raise CheckpointError(f"{source}: not a torchvision ResNet body (layer{s} is missing)")
        stages.append(Stage(tuple(_block(body, s, i) for i in ids), 1 if s == 1 else 2))
    try:
        arch = BackboneArch(tuple(stages), stem=int(body["conv1.weight"].shape[0]), fpn=fpn)
    except SpecError as e:
        raise CheckpointError(f"{source}: unsupported ResNet layout: {e}") from None
    for slot in arch.slots():
        has = f"layer{slot.stage + 1}.{slot.index}.downsample.0.weight" in body
        if has != slot.has_projection:
            raise CheckpointError(
                f"{source}: unsupported ResNet layout: layer{slot.stage + 1}.{slot.index} "
                f"{'has' if has else 'lacks'} a downsample shortcut where jdsearch's block "
                f"{'has none' if has else 'needs one'}"
            )
    return arch


def map_body(
    tv_body: Mapping[str, Tensor], target: Mapping[str, Tensor], *, source: str, spec_name: str
) -> tuple[dict[str, Tensor], list[str]]:
    """torchvision body tensors renamed for a jdsearch body whose ``state_dict()`` is ``target``.

    Returns:
        A complete state dict for the body (``num_batches_tracked`` 0 where the file has none,
        a ``FrozenBatchNorm2d``'s) and the file's names that map to nothing (``fc.*``), sorted.

    Raises:
        CheckpointError: a tensor whose shape does not fit (both names and shapes in the
            message), or a body tensor the file does not have.
    """
    mapped: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for name, tensor in tv_body.items():
        jd = jdsearch_body_name(name)
        if jd is None or jd not in target:
            unmapped.append(name)
            continue
        if tensor.shape != target[jd].shape:
            raise CheckpointError(
                f"{source}: {name} {_shape(tensor)} does not fit {jd} {_shape(target[jd])} of "
                f"{spec_name}"
            )
        mapped[jd] = tensor.detach().to(target[jd].dtype)
    for jd, t in target.items():
        if jd not in mapped and jd.endswith("num_batches_tracked"):
            mapped[jd] = torch.zeros_like(t)
    missing = [jd for jd in target if jd not in mapped]
    if missing:
        raise CheckpointError(
            f"{source}: has no tensor for {missing[0]} {_shape(target[missing[0]])} of "
            f"{spec_name} ({len(missing)} body tensors missing)"
        )
    return mapped, sorted(unmapped)


@dataclass(frozen=True)
class BackboneWeights:
    """What :func:`load_backbone_weights` did: tensors set and the file's tensors left over."""

    source: str
    loaded: int
    unmapped: tuple[str, ...]

    def line(self) -> str:
        """One line for the user: how many tensors were set and which were not used."""
        left = ", ".join(self.unmapped) if self.unmapped else "none"
        return f"backbone weights {self.source}: {self.loaded} body tensors set; unmapped: {left}"


def load_backbone_weights(detector: nn.Module, path: str | Path) -> BackboneWeights:
    """Initialise ``detector.backbone.body`` from a torchvision classification ``state_dict``
    (resnet18/34/50/101, resnext50_32x4d…; ``fc`` is left out and reported).

    Args:
        detector: a jdsearch detector (``build_detector``).
        path: the ``torch.save`` file, read with ``weights_only=True``; a Faster R-CNN's
            ``backbone.body.*`` tensors are taken too.

    Returns:
        How many body tensors were set and the file's tensors that map to none.

    Raises:
        CheckpointError: an unreadable file, or a body the detector's spec does not have (the
            tensor and both shapes in one line).
    """
    weights = read_weights_file(path)
    tensors = body_tensors(weights.tensors) or weights.tensors  # a detector's, or a classifier's
    body = detector.backbone.body
    spec_name = getattr(getattr(detector, "spec", None), "name", "the detector")
    state, unmapped = map_body(
        tensors, body.state_dict(), source=weights.source, spec_name=f"spec {spec_name}"
    )
    body.load_state_dict(state, strict=True)
    return BackboneWeights(weights.source, len(state), tuple(unmapped))
