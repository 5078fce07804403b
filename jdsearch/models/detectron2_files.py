"""detectron2's files, read without running anything in them: configs (YAML with ``_BASE_``),
weights (a ``.pth`` state dict, or a model-zoo ``.pkl`` of numpy arrays) and the map between
detectron2's tensor names and torchvision's.

* A config is read with ``yaml.safe_load`` (detectron2's own reader falls back to an unsafe
  loader), its ``_BASE_`` files first, and merged into detectron2's defaults
  (:func:`detectron2_config`), so that every setting has detectron2's meaning and value.
* A ``.pkl`` is read by :class:`WeightsUnpickler`, which admits numpy arrays, their dtypes and
  plain containers, and refuses every other global before anything is built: a ``__reduce__``
  payload never runs. Anything else is read with ``torch.load(weights_only=True)``.
* :func:`torchvision_name` and :func:`detectron2_name` translate one name each way
  (``backbone.bottom_up.res2.0.conv1.norm.weight`` ↔ ``backbone.body.layer1.0.bn1.weight``…).

detectron2 itself is imported only where a config is built (:func:`require_detectron2`).
"""

from __future__ import annotations

import copy
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from jdsearch.core.config import shown
from jdsearch.core.errors import CheckpointError, SpecError
from jdsearch.core.files import read_text
from jdsearch.models.torchvision_body import check_weights_file, read_weights_file

__all__ = [
    "INSTALL_HINT",
    "WeightsUnpickler",
    "detectron2_config",
    "detectron2_name",
    "read_config_dict",
    "read_detectron2_weights",
    "require_detectron2",
    "torchvision_name",
]

INSTALL_HINT = (
    "pip install --no-build-isolation 'jdsearch[detectron2]' installs it (README, "
    "'From and back to detectron2')"
)
_MAX_BASES = 8  # _BASE_ chain length: more is a loop


def require_detectron2(why: str) -> Any:
    """The ``detectron2`` package; :class:`CheckpointError` saying how to install it when it is
    missing (``why``: what needs it)."""
    try:
        import detectron2
        import detectron2.modeling  # registers the architectures
    except ImportError as e:
        raise CheckpointError(
            f"{why} needs detectron2, which is not installed ({e}); {INSTALL_HINT}"
        ) from None
    return detectron2


# ---------------------------------------------------------------------- configs
def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_config_dict(path: str | Path, depth: int = 0) -> dict[str, Any]:
    """A detectron2 YAML config as a mapping, its ``_BASE_`` files (relative to it) merged under
    it, with ``yaml.safe_load`` only.

    Raises:
        SpecError: a missing or unreadable file, one that is not a regular file or is larger
            than :data:`~jdsearch.core.limits.MAX_TEXT_BYTES` (``_BASE_: /dev/zero``), YAML that
            is not a mapping, a Python (LazyConfig) config, or a ``_BASE_`` chain deeper than 8
            files.
    """
    p = Path(path)
    if p.suffix == ".py":
        raise SpecError(f"{p}: a LazyConfig (.py) config runs code; give the YAML config")
    if depth > _MAX_BASES:
        raise SpecError(f"{p}: _BASE_ chain deeper than {_MAX_BASES} files (a loop?)")
    try:
        data = yaml.safe_load(read_text(p))
    except FileNotFoundError:
        raise SpecError(f"{p}: no such detectron2 config file") from None
    except OSError as e:
        raise SpecError(f"{p}: not a readable YAML config ({e.strerror or e})") from None
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())[:200]
        raise SpecError(f"{p}: not a readable YAML config ({reason})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{p}: a detectron2 config is a mapping, got {type(data).__name__}")
    base = data.pop("_BASE_", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise SpecError(f"{p}: _BASE_ {shown(base)} must be a file path")
    try:
        under = read_config_dict(p.parent / base, depth + 1)
    except SpecError as e:
        if depth > 0:
            raise
        raise SpecError(f"{p}: _BASE_ chain: {e}") from None  # the file the user named, first
    return _merge(under, data)


def detectron2_config(path: str | Path, extend: Callable[[Any], None] | None = None) -> Any:
    """detectron2's ``CfgNode``: its defaults (``get_cfg()``, given more keys by ``extend``) with
    the config at ``path`` merged in (read by :func:`read_config_dict`); the device set to the CPU.

    Raises:
        SpecError: a file :func:`read_config_dict` refuses, a key detectron2 does not have or a
            value of the wrong type (one line: the file, the key and the value).
        CheckpointError: detectron2 is not installed.
    """
    require_detectron2("reading a detectron2 config")
    from detectron2.config import CfgNode, get_cfg

    data = read_config_dict(path)
    version = data.pop("VERSION", 2)
    if version != 2:
        raise SpecError(f"{path}: VERSION {shown(version)}: only version-2 configs are read")
    cfg = get_cfg()
    if extend is not None:
        extend(cfg)
    try:
        cfg.merge_from_other_cfg(CfgNode(data))
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        reason = " ".join(str(e).strip("'\"").split())[:200]
        raise SpecError(f"{path}: {reason}") from None
    cfg.MODEL.DEVICE = "cpu"
    return cfg


# ---------------------------------------------------------------------- weights
class WeightsUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays (and their dtypes and scalars) in plain containers, and nothing
    else: any other global raises :class:`pickle.UnpicklingError` before it is looked up."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("collections", "OrderedDict"),
            ("_codecs", "encode"),  # protocol-2 pickles spell bytes so
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        """The allowed global ``module.name``; refuses every other."""
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _read_pkl(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            return WeightsUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: {e} (a detectron2 .pkl holds numpy arrays only)"
        ) from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        reason = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        raise CheckpointError(f"{path}: not a readable pickle ({reason})") from None


def _tensors(obj: Any, source: str) -> dict[str, Tensor]:
    """The tensors of a model-zoo pickle: ``{"model": {name: array}}`` or ``{name: array}``."""
    inner = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if isinstance(obj, Mapping) and "blobs" in obj:
        raise CheckpointError(
            f"{source}: a Caffe2 (Detectron 1) blob file; give a detectron2 model's weights"
        )
    if not isinstance(inner, Mapping):
        raise CheckpointError(f"{source}: not a detectron2 weights pickle (no 'model' mapping)")
    out = {}
    for name, value in inner.items():
        if not isinstance(name, str) or not isinstance(value, np.ndarray | Tensor):
            raise CheckpointError(
                f"{source}: model[{shown(name)}] is a {type(value).__name__}, not an array"
            )
        out[name] = torch.as_tensor(np.array(value)) if isinstance(value, np.ndarray) else value
    return out


def read_detectron2_weights(path: str | Path) -> dict[str, Tensor]:
    """A detectron2 model's tensors by name.

    Args:
        path: a ``.pkl`` (detectron2's model zoo: ``{"model": {name: numpy array}}``), read with
            :class:`WeightsUnpickler`; anything else is a ``torch.save`` file (a state dict or a
            training checkpoint ``{"model": state_dict, ...}``) read with ``weights_only=True``.

    Raises:
        CheckpointError: a missing or unreadable file, or a pickle naming any other global
            (the global named; nothing of the file runs).
    """
    p = check_weights_file(path)
    if p.suffix == ".pkl":
        return _tensors(_read_pkl(p), str(p))
    return dict(read_weights_file(p).tensors)


# ---------------------------------------------------------------------- names
# (detectron2, torchvision) name templates. {r}: detectron2's stage/level number 2..5; {l} = r - 1
# (torchvision's layer), {i} = r - 2 (its FPN block); {b} block, {k} conv, {p} leaf, {h} layer.
_PAIRS = (
    ("backbone.bottom_up.stem.conv1.weight", "backbone.body.conv1.weight"),
    ("backbone.bottom_up.stem.conv1.norm.{p}", "backbone.body.bn1.{p}"),
    ("backbone.bottom_up.res{r}.{b}.conv{k}.weight", "backbone.body.layer{l}.{b}.conv{k}.weight"),
    ("backbone.bottom_up.res{r}.{b}.conv{k}.norm.{p}", "backbone.body.layer{l}.{b}.bn{k}.{p}"),
    (
        "backbone.bottom_up.res{r}.{b}.shortcut.weight",
        "backbone.body.layer{l}.{b}.downsample.0.weight",
    ),
    (
        "backbone.bottom_up.res{r}.{b}.shortcut.norm.{p}",
        "backbone.body.layer{l}.{b}.downsample.1.{p}",
    ),
    ("backbone.fpn_lateral{r}.{p}", "backbone.fpn.inner_blocks.{i}.0.{p}"),
    ("backbone.fpn_output{r}.{p}", "backbone.fpn.layer_blocks.{i}.0.{p}"),
    ("proposal_generator.rpn_head.conv.{p}", "rpn.head.conv.0.0.{p}"),
    ("proposal_generator.rpn_head.objectness_logits.{p}", "rpn.head.cls_logits.{p}"),
    ("proposal_generator.rpn_head.anchor_deltas.{p}", "rpn.head.bbox_pred.{p}"),
    ("roi_heads.box_head.fc1.{p}", "roi_heads.box_head.fc6.{p}"),
    ("roi_heads.box_head.fc2.{p}", "roi_heads.box_head.fc7.{p}"),
    ("roi_heads.box_predictor.{h}.{p}", "roi_heads.box_predictor.{h}.{p}"),
)
_FIELDS = {
    "r": r"[2-5]",
    "l": r"[1-4]",
    "i": r"[0-3]",
    "b": r"\d+",
    "k": r"[1-3]",
    "p": r"weight|bias|running_mean|running_var|num_batches_tracked",
    "h": r"cls_score|bbox_pred",
}
_OFFSET = {"r": 0, "l": 1, "i": 2}  # r = l + 1 = i + 2


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w)\}", template)
    text = "".join(
        re.escape(part) if n % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})"
        for n, part in enumerate(parts)
    )
    return re.compile(text)


_COMPILED = tuple((_pattern(d2), d2, _pattern(tv), tv) for d2, tv in _PAIRS)


def _translate(match: re.Match[str], template: str) -> str:
    values = dict(match.groupdict())
    for key in ("r", "l", "i"):
        if key in values:
            r = int(values.pop(key)) + _OFFSET[key]
            values.update({k: str(r - off) for k, off in _OFFSET.items()})
    return template.format(**values)


def torchvision_name(name: str) -> str | None:
    """The torchvision Faster R-CNN name of detectron2 tensor ``name`` (``None``: no such
    tensor in a torchvision Faster R-CNN)."""
    for d2, _, _, tv in _COMPILED:
        m = d2.fullmatch(name)
        if m:
            return _translate(m, tv)
    return None


def detectron2_name(name: str) -> str | None:
    """The detectron2 name of torchvision Faster R-CNN tensor ``name``; the inverse of
    :func:`torchvision_name`."""
    for _, d2, tv, _ in _COMPILED:
        m = tv.fullmatch(name)
        if m:
            return _translate(m, d2)
    return None
