"""The search on Optuna: the hill-climbing sampler, the objective (one evolve–train–evaluate
step), preparing and running a study, the trial record, queries over a study and its export.

Imports every layer below (spec, data, models, store, training, morphism, distillation, pool)
and Optuna, whose internals only ``optuna_internals`` touches; never the report or the CLI.
"""

from __future__ import annotations

from jdsearch.core.lazy import lazy_exports

_EXPORTS = {
    "HillClimbingSampler": "sampler",
    "Objective": "objective",
    "score_h": "objective",
    "prepare": "session",
    "open_run": "session",
    "SearchRun": "session",
    "run_search": "run",
    **dict.fromkeys(
        ["StudyHandle", "best_of", "completed_trials", "lineage", "open_study", "root_of"],
        "queries",
    ),
    "summary": "summary",
    "export_trial": "export",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
