"""What jdsearch writes down as files: checkpoints (safetensors + sha256), mid-trial training
states, self-contained export folders (weights, ``detector.json``, ONNX graph) and detectron2
exports.

Imports the core and spec layers, ``data`` and ``models``; never Optuna, SQLAlchemy, training,
the pool, the search or the report. Nothing it reads can run code.
"""

from __future__ import annotations

from jdsearch.core.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(
        ["Checkpoint", "checkpoint_from_bytes", "checkpoint_to_bytes", "load_checkpoint"],
        "checkpoint",
    ),
    "save_checkpoint": "checkpoint",
    **dict.fromkeys(
        ["Exported", "export_detector", "load_detector", "load_exported", "predict_images"],
        "export",
    ),
    **dict.fromkeys(["OnnxCheck", "check_onnx", "export_onnx"], "onnx"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
