"""The elastic teacher pool (paper 3.1.3, 4, A.1.3): one super-net, every teacher a sub-network.

A pool is one elastic Faster R-CNN FPN super-net; every teacher the search may pick is one of its
sub-networks (per-stage depth and width multiplier, plus the FPN width), trained together by
integrated progressive shrinking with distillation from the super-net, and BN-recalibrated when
extracted. The package, one module per concept (each lower one imports only those above it):

* :mod:`~jdsearch.pool.reader` — the key-popping mapping reader behind every ``from_dict``.
* :mod:`~jdsearch.pool.space` — :class:`SubnetConfig` (one sub-network, string form
  ``d3-4-12-3_w1.25-1.5-1.5-1.25_f320``) and :class:`SubnetSpace` (allowed choices, sampling,
  teacher mutations; the space's arithmetic against the paper's "roughly 765 000").
* :mod:`~jdsearch.pool.spec` — :class:`PoolSpec` (the ``pool:`` section of a study spec),
  :class:`PhaseSpec`, :class:`PoolTrainSpec`.
* :mod:`~jdsearch.pool.record` — :class:`PhaseRecord`, what one training phase did.
* :mod:`~jdsearch.pool.bn` — :func:`recalibrate_bn`.
* :mod:`~jdsearch.pool.supernet` — :class:`ElasticPool`: activate, extract, teach sub-networks.
* :mod:`~jdsearch.pool.training` — :func:`train_pool`, integrated progressive shrinking (IPS).
* :mod:`~jdsearch.pool.store` — pool files: :func:`save_pool`, :func:`load_pool`, the byte forms
  and :func:`train_and_save_pool` (``jdsearch pool train``).

Everything public is re-exported here: import from :mod:`jdsearch.pool`.
"""

from jdsearch.pool.bn import recalibrate_bn
from jdsearch.pool.record import PhaseRecord
from jdsearch.pool.space import SubnetConfig, SubnetSpace
from jdsearch.pool.spec import PhaseSpec, PoolSpec, PoolTrainSpec
from jdsearch.pool.store import (
    POOL_FORMAT,
    load_pool,
    pool_from_bytes,
    pool_to_bytes,
    save_pool,
    train_and_save_pool,
)
from jdsearch.pool.supernet import ElasticPool
from jdsearch.pool.training import train_pool

__all__ = [
    "POOL_FORMAT",
    "ElasticPool",
    "PhaseRecord",
    "PhaseSpec",
    "PoolSpec",
    "PoolTrainSpec",
    "SubnetConfig",
    "SubnetSpace",
    "load_pool",
    "pool_from_bytes",
    "pool_to_bytes",
    "recalibrate_bn",
    "save_pool",
    "train_and_save_pool",
    "train_pool",
]
