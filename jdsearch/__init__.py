"""jdsearch: upgrade a Faster R-CNN FPN detector with joint NAS, pruning and dynamic distillation.

The public API is re-exported here lazily (PEP 562): importing one submodule — say
``jdsearch.spec.study`` — imports neither torch nor every other module. The layers and what each
may import are in ``docs/architecture.md``; the CLI is in the README.

Stability: the names in ``__all__`` are the public API; their signatures and behaviour change
only with a note in the release, and a removal is deprecated for a minor version first. Module
paths inside the package (``jdsearch.search.session``…) are not part of it: they may move, as
they did when the package took one folder per layer. The README's "From Python" section uses
only the stable names.
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
    **dict.fromkeys(
        [
            "HillClimbingSampler",
            "SearchRun",
            "run_search",
            "open_run",
            "open_study",
            "export_trial",
        ],
        "search",
    ),
}
__all__ = sorted([*_EXPORTS, "__version__"])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
