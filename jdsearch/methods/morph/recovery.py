"""A short, local recovery after a move: the child's changed stages learn to give the FPN what the
parent's gave it (:func:`local_recovery`).

``rearrange`` keeps every block and its weights but moves a stage boundary, so a block runs at
another stride and the FPN reads other feature maps; ``channel_prune`` removes channels the next
layers expected. The fast evaluation then has to repair that through the detection loss, a weak
and noisy signal over half an epoch. The parent is at hand and computes the features the child's
heads were trained on: regressing the child's FPN outputs onto the parent's, with every other
weight frozen, is a dense target that a few dozen steps fit (feature distillation confined to
what the move touched). ``bench/move_cost.py``'s ``recover`` levers measure what it buys.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from jdsearch.core.errors import SpecError
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import cycled_batches, using_resolution
from jdsearch.methods.morph.importance import restored

__all__ = ["RecoveryReport", "changed_stages", "local_recovery"]


@dataclasses.dataclass(frozen=True)
class RecoveryReport:
    """What :func:`local_recovery` did: its steps, the feature loss on its first and last batch,
    and the modules it trained."""

    iters: int
    loss_before: float
    loss_after: float
    trained: tuple[str, ...]


def changed_stages(parent: nn.Module, child: nn.Module) -> tuple[int, ...]:
    """The body stages (0-based) whose blocks differ between ``parent`` and ``child``."""
    a, b = parent.arch.stages, child.arch.stages
    return tuple(i for i, (s, t) in enumerate(zip(a, b, strict=True)) if s != t)


def _features(detector: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    return list(detector.backbone(images).values())


def _loss(child: list[torch.Tensor], parent: list[torch.Tensor]) -> torch.Tensor:
    """Mean over FPN levels of the squared error relative to the parent's mean square."""
    terms = [
        (c - p).pow(2).mean() / p.pow(2).mean().clamp_min(1e-12)
        for c, p in zip(child, parent, strict=True)
    ]
    return torch.stack(terms).mean()


def _fit(
    child: nn.Module,
    parent: nn.Module,
    params: list[nn.Parameter],
    batches: Iterator[Any],
    sizes: Sequence[Resolution],
    lr: float,
) -> list[float]:
    """SGD on ``params`` towards the parent's FPN outputs, one step per batch (batch ``i`` at
    ``sizes[i % n]``, or the child's size); the loss of each step."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    device = next(child.parameters()).device
    losses = []
    for i, (images, _) in enumerate(batches):
        images = [im.to(device) for im in images]
        size = sizes[i % len(sizes)] if sizes else None
        with using_resolution(child, size) if size else contextlib.nullcontext():
            batch = child.transform(images)[0].tensors
        with torch.no_grad():
            target = _features(parent, batch)
        loss = _loss(_features(child, batch), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def local_recovery(
    child: nn.Module,
    parent: nn.Module,
    data: Any,
    *,
    iters: int = 50,
    lr: float = 0.01,
    batch_size: int = 4,
    resolutions: Sequence[Resolution | str] = (),
    seed: int = 0,
) -> RecoveryReport:
    """Train ``child``'s changed body stages (:func:`changed_stages`) and its FPN for ``iters``
    SGD steps (momentum 0.9, ``lr``, gradient norm clipped at 10) so that its FPN outputs match
    ``parent``'s on shuffled batches of ``data`` (loaded with ``seed``), batch ``i`` at
    ``resolutions[i % n]`` (default: the child's size). Every other weight is frozen and the
    parent is not changed. Both run in eval mode, so what is fitted is the function the child is
    scored by: BN statistics stay as they are (with batch statistics instead, the fit on a batch
    of 4 moved the eval-mode outputs away from the parent's on a tiny detector). The child comes
    back in its train/eval mode (each submodule's, the parent's too) with its ``requires_grad``
    flags and gradients, and the process's random state is untouched.

    Raises:
        SpecError: ``iters`` below 1 or ``lr`` not a positive number.
    """
    if iters < 1:
        raise SpecError(f"local_recovery: iters must be ≥ 1, got {iters}")
    if not lr > 0 or lr == float("inf"):
        raise SpecError(f"local_recovery: lr must be a positive number, got {lr}")
    body = child.backbone.body
    modules = {f"backbone.body.stages.{i}": body.stages[i] for i in changed_stages(parent, child)}
    modules["backbone.fpn"] = child.backbone.fpn
    params = [p for m in modules.values() for p in m.parameters()]
    flags = {n: p.requires_grad for n, p in child.named_parameters()}
    # eval mode: the function the child is scored by, BN statistics as they are
    with restored(child, buffers=False), restored(parent, buffers=False, grads=False):
        try:
            for p in child.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            child.eval()
            parent.eval()
            batches = cycled_batches(data, batch_size, iters, seed=seed)
            sizes = [Resolution.parse(r) for r in resolutions]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                losses = _fit(child, parent, params, batches, sizes, lr)
        finally:
            for n, p in child.named_parameters():
                p.requires_grad_(flags[n])
    return RecoveryReport(iters, losses[0], losses[-1], tuple(modules))
