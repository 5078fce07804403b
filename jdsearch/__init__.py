"""jdsearch: upgrade a Faster R-CNN FPN detector with joint NAS, pruning and dynamic distillation.

The public API is re-exported here lazily (PEP 562), so that importing one submodule — say
``jdsearch.errors`` — does not import torch and every other module; see the README for the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BackboneArch": "jdsearch.arch",
    "Block": "jdsearch.arch",
    "Stage": "jdsearch.arch",
    "JDSearchError": "jdsearch.errors",
    "SpecError": "jdsearch.errors",
    "DataError": "jdsearch.errors",
    "CheckpointError": "jdsearch.errors",
    "Detector": "jdsearch.models",
    "build_detector": "jdsearch.models",
    "DetectorSpec": "jdsearch.spec",
    "load_spec": "jdsearch.spec",
    "count_flops": "jdsearch.flops",
    "count_spec_flops": "jdsearch.flops",
    "FlopsReport": "jdsearch.flops",
    "load_detector": "jdsearch.export",
    "load_exported": "jdsearch.export",
    "export_detector": "jdsearch.export",
    "measure_latency": "jdsearch.latency",
    "open_study": "jdsearch.search",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jdsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
