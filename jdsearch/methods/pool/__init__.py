"""The elastic teacher pool's runtime (paper 3.1.3, 4, A.1.3): one super-net, every teacher a
sub-network. Its spec and space are in the spec layer (:mod:`jdsearch.spec.pool`,
:mod:`jdsearch.spec.pool_space`); this package imports the spec layer, models, data, the
trainer, distillation and the checkpoint store, never the search. The design notes are in
``docs/pool.md``.

* :mod:`~jdsearch.methods.pool.record` — :class:`PhaseRecord`, what one training phase did.
* :mod:`~jdsearch.methods.pool.bn` — :func:`recalibrate_bn`.
* :mod:`~jdsearch.methods.pool.elastic` — the elastic layers a sub-network is cut from.
* :mod:`~jdsearch.methods.pool.supernet` — :class:`ElasticPool`: activate, extract, teach
  sub-networks.
* :mod:`~jdsearch.methods.pool.training` — :func:`train_pool`, integrated progressive shrinking
  (IPS).
* :mod:`~jdsearch.methods.pool.store` — pool files: :func:`save_pool`, :func:`load_pool`, the
  byte forms and :func:`train_and_save_pool` (``jdsearch pool train``).

Everything public is importable from :mod:`jdsearch.methods.pool`, loaded on first use.
"""

from __future__ import annotations

from jdsearch.core.lazy import lazy_exports

_EXPORTS = {
    "PhaseRecord": "record",
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
