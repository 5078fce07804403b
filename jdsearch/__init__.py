"""jdsearch: upgrade a Faster R-CNN FPN detector with joint NAS, pruning and dynamic distillation.

The public API is re-exported here lazily (PEP 562): importing one submodule — say
``jdsearch.spec.study`` — imports neither torch nor every other module. The layers and what each may
import are in ``docs/architecture.md``; the CLI is in the README.
"""

from __future__ import annotations

from jdsearch.core.lazy import lazy_exports

__version__ = "0.3.0"

_EXPORTS = {
    **dict.fromkeys(["BackboneArch", "Block", "Stage"], "spec.arch"),
    **dict.fromkeys(
        ["JDSearchError", "SpecError", "DataError", "CheckpointError", "ExportError"], "core.errors"
    ),
    "Resolution": "core.resolution",
    **dict.fromkeys(["DetectorSpec", "load_spec"], "spec.detector"),
    **dict.fromkeys(["TrainConfig", "KDConfig"], "spec.settings"),
    **dict.fromkeys(["StudySpec", "load_study"], "spec.study"),
    **dict.fromkeys(["Detector", "build_detector"], "models"),
    **dict.fromkeys(["count_flops", "count_spec_flops", "FlopsReport"], "models.flops"),
    "measure_latency": "engine.latency",
    **dict.fromkeys(["evolve", "feasible_actions"], "methods.morph"),
    "PoolSpec": "spec.pool",
    "ElasticPool": "methods.pool",
    **dict.fromkeys(["load_checkpoint", "save_checkpoint"], "store"),
    **dict.fromkeys(["load_detector", "load_exported", "export_detector"], "store"),
    **dict.fromkeys(["HillClimbingSampler", "run_search", "open_study", "export_trial"], "search"),
}
__all__ = sorted([*_EXPORTS, "__version__"])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
