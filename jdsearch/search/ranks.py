"""The ranks of one worker under ``torchrun``: rank 0 runs the search, the others follow it.

Rank 0 alone talks to Optuna and to the study's storage: it prepares the study, asks for each
trial (the sampler decides there), evaluates, uploads and tells. Before every training it
*announces* what is to be trained, and the other ranks, in :func:`jdsearch.search.follower.follow`,
build the same models and train their share of each batch with it
(:mod:`jdsearch.engine.distributed`). The commands:

``base``   the base detector is trained (nothing cached or given).
``pool``   the elastic teacher pool is trained (its phases still to do).
``ready``  the study holds its base and pool: the followers read them from the storage.
``trial``  a trial's pair is trained: its number, move, parent and seed (the sampler's decision).
``stop``   rank 0 is done (or failed): the followers return.

With one process every announcement is a no-op.
"""

from __future__ import annotations

from typing import Any

from jdsearch.engine import distributed

__all__ = ["BASE", "POOL", "READY", "STOP", "TRIAL", "announce", "receive"]

BASE, POOL, READY, TRIAL, STOP = "base", "pool", "ready", "trial", "stop"


def announce(command: str, **payload: Any) -> None:
    """Rank 0: tell the other ranks what comes next (nothing with one process)."""
    if distributed.is_distributed():
        assert distributed.is_main(), "only rank 0 announces"
        distributed.broadcast_object((command, payload))


def receive() -> tuple[str, dict[str, Any]]:
    """A rank other than 0: the next command from rank 0 and its payload."""
    command, payload = distributed.broadcast_object(None)
    return str(command), dict(payload)
