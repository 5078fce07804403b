"""Data-driven channel importance for ``channel_prune``: the first-order Taylor estimate of how
much the detection loss changes when a channel is removed (:func:`taylor_scores`).

Network slimming ranks channels by their BN scale |γ|, which says something only where BN
sparsity has driven the unneeded γ near zero. A detector trained with the paper's λ = 1e-5 for a
short schedule keeps every |γ| between 0.5 and 1.1 (the quickstart's shipped base), and the |γ|
ranking then removes channels the detector needs. The Taylor criterion (Molchanov et al. 2019)
weighs each channel by the loss gradient through its BN's affine parameters instead: removing a
channel sets its BN output to zero, and to first order the loss changes by
``γ·∂L/∂γ + β·∂L/∂β``, squared per batch and summed over batches. Design notes and the
measurement that chose it: ``docs/morphism.md``, "What to prune".
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from jdsearch.core.errors import SpecError
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import cycled_batches, using_resolution
from jdsearch.models.torch_internals import BATCH_NORM_BASE

__all__ = ["ChannelScores", "restored", "taylor_scores"]

# BN path inside the backbone's body → one score per channel.
ChannelScores = dict[str, tuple[float, ...]]


def taylor_scores(
    detector: nn.Module,
    data: Any,
    *,
    batches: int = 16,
    batch_size: int = 4,
    resolutions: Sequence[Resolution | str] = (),
    seed: int = 0,
) -> ChannelScores:
    """The Taylor importance of every BN channel of ``detector``'s backbone body, from
    ``batches`` shuffled batches of ``data`` (a dataset of ``(image, target)``, loaded with
    ``seed``), batch ``i`` at ``resolutions[i % n]`` (default: the detector's size).

    The detector comes back as it was: weights, BN statistics, gradients, train/eval mode and the
    process's random state (the detector's own sampling runs under ``seed``).
    """
    if batches < 1:
        raise SpecError(f"taylor_scores: batches must be ≥ 1, got {batches}")
    body = detector.backbone.body
    bns = {n: m for n, m in body.named_modules() if isinstance(m, BATCH_NORM_BASE)}
    sizes = [Resolution.parse(r) for r in resolutions]
    acc = {n: torch.zeros_like(m.weight, dtype=torch.float64) for n, m in bns.items()}
    with restored(detector), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        detector.train()
        device = next(detector.parameters()).device
        stream = cycled_batches(data, batch_size, batches, seed=seed)
        for i, (images, targets) in enumerate(stream):
            images = [im.to(device) for im in images]
            targets = [{k: _to(v, device) for k, v in t.items()} for t in targets]
            detector.zero_grad(set_to_none=True)
            size = sizes[i % len(sizes)] if sizes else None
            with using_resolution(detector, size) if size else contextlib.nullcontext():
                losses = detector(images, targets)
            sum(losses.values()).backward()
            for name, m in bns.items():
                if m.weight.grad is None or m.bias.grad is None:
                    continue
                t = m.weight * m.weight.grad + m.bias * m.bias.grad
                acc[name] += t.detach().double() ** 2
    return {n: tuple(float(v) for v in a.tolist()) for n, a in acc.items()}


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


@contextlib.contextmanager
def restored(module: nn.Module, *, buffers: bool = True, grads: bool = True) -> Any:
    """Put back ``module``'s train/eval mode (each submodule's) afterwards, and its buffers (BN
    statistics) and gradients unless told not to. It does not put back the parameters: for work
    that steps no optimizer over them, or that means to change them."""
    saved_buffers = {n: b.detach().clone() for n, b in module.named_buffers()} if buffers else {}
    saved_grads = {n: p.grad for n, p in module.named_parameters()} if grads else {}
    modes = {n: m.training for n, m in module.named_modules()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in module.named_buffers():
                if n in saved_buffers:
                    b.copy_(saved_buffers[n])
        for n, p in module.named_parameters():
            if n in saved_grads:
                p.grad = saved_grads[n]
        for n, m in module.named_modules():
            m.training = modes[n]
