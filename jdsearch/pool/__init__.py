"""The elastic teacher pool (paper 3.1.3, 4, A.1.3): one super-net, every teacher a sub-network.

Owns the pool's spec and space (torch-free: ``space``, ``spec``) and its runtime (``elastic``,
``bn``, ``supernet``, ``training``, ``store``); imports the spec layer, models, data, the
trainer, distillation and the checkpoint store, never the search. The design notes are in
``docs/pool.md``.

* :mod:`~jdsearch.pool.space` — :class:`SubnetConfig` (one sub-network, string form
  ``d3-4-12-3_w1.25-1.5-1.5-1.25_f320``) and :class:`SubnetSpace` (allowed choices, sampling,
  teacher mutations).
* :mod:`~jdsearch.pool.spec` — :class:`PoolSpec` (the ``pool:`` section of a study spec) and
  :class:`PhaseSpec`.
* :mod:`~jdsearch.pool.record` — :class:`PhaseRecord`, what one training phase did.
* :mod:`~jdsearch.pool.bn` — :func:`recalibrate_bn`.
* :mod:`~jdsearch.pool.supernet` — :class:`ElasticPool`: activate, extract, teach sub-networks.
* :mod:`~jdsearch.pool.training` — :func:`train_pool`, integrated progressive shrinking (IPS).
* :mod:`~jdsearch.pool.store` — pool files: :func:`save_pool`, :func:`load_pool`, the byte forms
  and :func:`train_and_save_pool` (``jdsearch pool train``).

Everything public is importable from :mod:`jdsearch.pool`; the runtime parts load on first use,
so reading a study spec (which holds a :class:`PoolSpec`) never imports torch.
"""

from __future__ import annotations

from jdsearch.lazy import lazy_exports

_EXPORTS = {
    "PhaseRecord": "record",
    "SubnetConfig": "space",
    "SubnetSpace": "space",
    "PhaseSpec": "spec",
    "PoolSpec": "spec",
    "recalibrate_bn": "bn",
    "ElasticPool": "supernet",
    "train_pool": "training",
    "POOL_FORMAT": "store",
    "load_pool": "store",
    "pool_from_bytes": "store",
    "pool_to_bytes": "store",
    "save_pool": "store",
    "train_and_save_pool": "store",
    "train_pool_along": "store",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
