"""Student morphism (paper 3.1.1): the four weight-inheriting actions and BN-sparsity pruning.

Owns ``actions`` (evolve, feasible actions) and ``pruning`` (BN slimming, layer importance);
imports the spec layer and ``models``, never training, the pool or the search.
"""

from __future__ import annotations

from jdsearch.core.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(
        [
            "ACTION_KINDS",
            "Action",
            "MorphConfig",
            "MorphError",
            "MorphReport",
            "all_actions",
            "describe",
            "evolve",
            "evolve_with_report",
            "feasible_actions",
            "infeasibility",
            "init_identity_block",
        ],
        "actions",
    ),
    **dict.fromkeys(["BNSparsity", "bn_l1", "layer_importance", "plan_channel_prune"], "pruning"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
