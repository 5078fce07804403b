"""What jdsearch writes down: checkpoints (safetensors + sha256), the SQL artifact store of a
study, and self-contained export folders (weights, ``detector.json``, ONNX graph).

Imports the spec layer, ``data``, ``models`` and ``flops``; of Optuna only ``optuna.artifacts``;
never training, the pool, the search or the report. Nothing it reads can run code.
"""

from __future__ import annotations

from jdsearch.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(
        ["Checkpoint", "checkpoint_from_bytes", "checkpoint_to_bytes", "load_checkpoint"],
        "checkpoint",
    ),
    "save_checkpoint": "checkpoint",
    **dict.fromkeys(["SQLArtifactStore", "make_artifact_store"], "artifacts"),
    **dict.fromkeys(
        ["Exported", "export_detector", "load_detector", "load_exported", "predict_images"],
        "export",
    ),
    **dict.fromkeys(["OnnxCheck", "check_onnx", "export_onnx"], "onnx"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
