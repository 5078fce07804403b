"""BN recalibration of extracted sub-networks (:func:`recalibrate_bn`).

A sub-network cut from the super-net inherits BN statistics that mix every sampled
sub-network's; re-estimating them is what the paper calls "essential for performance recovery".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from jdsearch.core.errors import JDSearchError, SpecError
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import make_loader, using_resolution
from jdsearch.models.torch_internals import BATCH_NORM_BASE

__all__ = ["recalibrate_bn"]


def _batches(data: Any, batch_size: int, seed: int) -> Iterator[Any]:
    """Endless batches: a Dataset is loaded shuffled epoch after epoch, an iterable re-iterated."""
    source = (
        make_loader(data, batch_size, shuffle=True, seed=seed)
        if isinstance(data, Dataset)
        else data
    )
    while True:
        empty = True
        for batch in source:
            empty = False
            yield batch
        if empty:
            raise JDSearchError("BN recalibration: the data is empty")


@torch.no_grad()
def recalibrate_bn(
    detector: nn.Module,
    data: Any,
    *,
    batches: int = 10,
    device: str | torch.device | None = None,
    batch_size: int = 2,
    resolutions: Sequence[Resolution | str] = (),
    seed: int = 0,
) -> int:
    """Re-estimate every BatchNorm's running statistics of ``detector`` from ``batches`` batches.

    ``data`` is a dataset of ``(image, target)`` (loaded shuffled with ``seed``) or an iterable of
    ``(images, targets)`` batches / lists of images. Statistics are reset, then each BN runs in
    training mode with ``momentum=None`` (a cumulative average of the batch statistics) while the
    rest of the detector stays in eval mode; nothing but the running statistics (and
    ``num_batches_tracked``) changes, and no gradient is computed. Only the transform and the
    backbone run (the BNs live there). Batch ``i`` is resized to ``resolutions[i % n]`` (default:
    the detector's current size). Modes and momenta are restored. Returns the batches used.
    """
    if batches < 1:
        raise SpecError(f"recalibrate_bn: batches must be ≥ 1, got {batches}")
    bns = [m for m in detector.modules() if isinstance(m, BATCH_NORM_BASE)]
    if not bns:
        return 0
    dev = torch.device(device) if device is not None else next(detector.parameters()).device
    detector.to(dev)
    sizes = [Resolution.parse(r) for r in resolutions]
    saved = [(m.momentum, m.training) for m in bns]
    was_training = detector.training
    detector.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        stream = _batches(data, batch_size, seed)
        for i in range(batches):
            batch = next(stream)
            images = (
                batch[0]
                if isinstance(batch, tuple | list)
                and len(batch) == 2
                and isinstance(batch[1], list | tuple)
                else batch
            )
            images = [im.to(dev) for im in images]
            size = sizes[i % len(sizes)] if sizes else None
            with using_resolution(detector, size) if size else contextlib.nullcontext():
                image_list, _ = detector.transform(images)
                detector.backbone(image_list.tensors)
    finally:
        for m, (momentum, training) in zip(bns, saved, strict=True):
            m.momentum = momentum
            m.train(training)
        detector.train(was_training)
    return batches
