"""What to prune: network-slimming channel spaces and their global |γ| ranking, layer importance,
and the BN-sparsity loss term (paper 3.3, A.3). :mod:`jdsearch.methods.morph.actions` builds the smaller
detector. Design notes: ``docs/morphism.md``, "What to prune".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from jdsearch.models.resnet import ResNet
from jdsearch.spec.arch import BASIC, BackboneArch, BlockSlot

BlockId = tuple[int, int]  # (stage, index), 0-based

__all__ = [
    "BNSparsity",
    "Chain",
    "ChannelPlan",
    "block_prefix",
    "bn_l1",
    "chains",
    "find_body",
    "inner_bn_names",
    "last_bn_name",
    "layer_importance",
    "least_important_block",
    "plan_channel_prune",
    "prunable_bn_names",
    "removable_blocks",
    "single_unit_plans",
]


def block_prefix(block: BlockId) -> str:
    """Module path of a block inside the ResNet body: ``stages.{s}.{b}``."""
    return f"stages.{block[0]}.{block[1]}"


def inner_bn_names(kind: str) -> tuple[str, ...]:
    """The middle BNs of a block kind (they rank the block's inner widths)."""
    return ("bn1",) if kind == BASIC else ("bn1", "bn2")


def last_bn_name(kind: str) -> str:
    """The BN that ends a block's residual branch (it produces the chain's channels)."""
    return "bn2" if kind == BASIC else "bn3"


@dataclass(frozen=True)
class Chain:
    """Blocks sharing one output width: ``head`` has the projection (``None``: the stem)."""

    head: BlockId | None
    members: tuple[BlockId, ...]  # in order; the head first when there is one
    width: int

    @property
    def prunable(self) -> bool:
        """Whether the chain is headed by a projection block (the stem-headed chain is not)."""
        return self.head is not None

    @property
    def key(self) -> str:
        """The BN that ranks the chain's width (its channel-space key)."""
        assert self.head is not None, "the stem-headed chain has no ranking BN"
        return f"{block_prefix(self.head)}.shortcut.bn"


def chains(arch: BackboneArch) -> list[Chain]:
    """Split the backbone's blocks into residual chains, in order."""
    out: list[Chain] = []
    head: BlockId | None = None
    members: list[BlockId] = []
    width = arch.stem
    for slot in arch.slots():
        if slot.has_projection:
            if members:
                out.append(Chain(head, tuple(members), width))
            head, members, width = (slot.stage, slot.index), [], slot.block.out_channels
        members.append((slot.stage, slot.index))
    if members:
        out.append(Chain(head, tuple(members), width))
    return out


def _chain_producers(arch: BackboneArch, chain: Chain) -> list[str]:
    names = [chain.key]
    for m in chain.members:
        names.append(f"{block_prefix(m)}.{last_bn_name(arch.slot(*m).block.kind)}")
    return names


def prunable_bn_names(arch: BackboneArch) -> tuple[str, ...]:
    """BN modules (paths inside the body) whose channels channel pruning may remove."""
    names: list[str] = []
    for slot in arch.slots():
        names += [
            f"{block_prefix((slot.stage, slot.index))}.{n}" for n in inner_bn_names(slot.block.kind)
        ]
    for chain in chains(arch):
        if chain.prunable:
            names += _chain_producers(arch, chain)
    return tuple(names)


def find_body(model: nn.Module) -> ResNet | None:
    """The jdsearch ResNet body of a detector, a ``ResNetFPN``, a wrapper (``.module``) or itself."""
    for candidate in (model, getattr(model, "module", None)):
        if isinstance(candidate, ResNet):
            return candidate
        backbone = getattr(candidate, "backbone", candidate)
        body = getattr(backbone, "body", None)
        if isinstance(body, ResNet):
            return body
    return None


def bn_l1(model: nn.Module) -> Tensor:
    """``Σ|γ|`` over the prunable BNs of ``model``'s jdsearch backbone (differentiable).

    A model without a jdsearch ResNet body (e.g. a foreign backbone) is penalised over all its
    ``BatchNorm2d`` layers, which is plain network slimming.
    """
    body = find_body(model)
    if body is None:
        gammas = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
    else:
        gammas = [body.get_submodule(n).weight for n in prunable_bn_names(body.arch)]
    if not gammas:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack([g.abs().sum() for g in gammas]).sum()


class BNSparsity(nn.Module):
    """Loss term ``{"loss_bn_sparsity": λ Σ|γ|}`` for :func:`jdsearch.engine.train.train` (paper 3.3)."""

    def __init__(self, lam: float = 1e-5) -> None:
        super().__init__()
        if not (lam >= 0 and math.isfinite(lam)):
            from jdsearch.core.errors import SpecError

            raise SpecError(f"BNSparsity: lam must be a finite number ≥ 0, got {lam!r}")
        self.lam = float(lam)

    def forward(self, model: nn.Module) -> dict[str, Tensor]:
        """``{"loss_bn_sparsity": λ Σ|γ|}`` over ``model``'s prunable BNs (:func:`bn_l1`)."""
        return {"loss_bn_sparsity": self.lam * bn_l1(model)}

    def extra_repr(self) -> str:
        """``lam=λ``, for ``repr``."""
        return f"lam={self.lam:g}"


# ---------------------------------------------------------------------- channel pruning
@dataclass(frozen=True)
class ChannelPlan:
    """Which channels survive: BN key (path in the body) → sorted kept indices, per pruned space.

    Spaces absent from ``keep`` are untouched. Chain spaces are keyed by the head's projection BN,
    inner spaces by the middle BN (``...bn1``/``...bn2``).
    """

    keep: Mapping[str, tuple[int, ...]]
    removed: Mapping[str, tuple[int, ...]]
    removed_channels: int  # ranked channels removed (a group counts its bn1 + bn2 channels)
    prunable_channels: int  # all ranked channels

    @property
    def empty(self) -> bool:
        """Whether the plan removes no channel."""
        return not self.removed


@dataclass(frozen=True)
class _Unit:
    importance: float
    space: str  # counter that enforces the minimum
    cost: int  # ranked channels it removes
    channels: tuple[tuple[str, tuple[int, ...]], ...]  # (BN key, channel indices)


def _abs_gamma(body: ResNet, name: str) -> list[float]:
    return body.get_submodule(name).weight.detach().abs().float().cpu().tolist()


def _scores(
    body: ResNet, names: list[str], scores: Mapping[str, Sequence[float]] | None
) -> list[float]:
    """Channel importance of a space whose channels the BNs ``names`` produce: the first one's
    |γ| (network slimming), or with ``scores`` (one list per BN, :mod:`.importance`) their sum:
    removing a channel of a residual stream zeroes it in every BN that writes to it."""
    if scores is None:
        return _abs_gamma(body, names[0])
    missing = [n for n in names if n not in scores]
    if missing:
        raise KeyError(f"channel scores: no score for BN {missing[0]!r}")
    return [float(sum(v)) for v in zip(*(scores[n] for n in names), strict=True)]


def _units(
    body: ResNet,
    min_channels: int,
    scores: Mapping[str, Sequence[float]] | None = None,
    costs: Mapping[str, float] | None = None,
) -> tuple[list[_Unit], dict[str, tuple[int, int]], dict[str, int]]:
    """Every removable unit, each space's (size, minimum), and each BN key's width. With
    ``costs`` (what one unit of each space saves), a unit's importance is per unit of cost."""
    units, spaces, widths = _ranked_units(body, min_channels, scores)
    if costs is not None:
        missing = sorted(set(spaces) - set(costs))
        if missing:
            raise KeyError(f"channel costs: no cost for channel space {missing[0]!r}")
        units = [
            dataclasses.replace(u, importance=u.importance / max(costs[u.space], 1e-12))
            for u in units
        ]
    return units, spaces, widths


def single_unit_plans(body: ResNet, min_channels: int = 1) -> dict[str, ChannelPlan]:
    """For every channel space that can lose a unit, the plan that removes one unit of it only
    (what that unit costs: :func:`jdsearch.methods.morph.actions.channel_costs`)."""
    units, spaces, widths = _ranked_units(body, min_channels, None)
    total = sum(u.cost for u in units)
    plans: dict[str, ChannelPlan] = {}
    for u in units:
        size, minimum = spaces[u.space]
        if u.space in plans or size - 1 < minimum:
            continue
        removed = dict(u.channels)
        keep = {
            k: tuple(c for c in range(widths[k]) if c not in gone) for k, gone in removed.items()
        }
        plans[u.space] = ChannelPlan(keep, removed, u.cost, total)
    return plans


def _ranked_units(
    body: ResNet, min_channels: int, scores: Mapping[str, Sequence[float]] | None
) -> tuple[list[_Unit], dict[str, tuple[int, int]], dict[str, int]]:
    arch = body.arch
    units: list[_Unit] = []
    spaces: dict[str, tuple[int, int]] = {}
    widths: dict[str, int] = {}
    for chain in chains(arch):
        if not chain.prunable:
            continue
        key = chain.key
        spaces[key] = (chain.width, min(min_channels, chain.width))
        widths[key] = chain.width
        importance = _scores(body, _chain_producers(arch, chain), scores)
        units += [_Unit(g, key, 1, ((key, (c,)),)) for c, g in enumerate(importance)]
    for slot in arch.slots():
        prefix = block_prefix((slot.stage, slot.index))
        names = [f"{prefix}.{n}" for n in inner_bn_names(slot.block.kind)]
        for name, width in zip(names, slot.block.channels, strict=False):
            widths[name] = width
        groups = slot.block.groups
        if groups == 1:
            for name, width in zip(names, slot.block.channels, strict=False):
                spaces[name] = (width, min(min_channels, width))
                units += [
                    _Unit(g, name, 1, ((name, (c,)),))
                    for c, g in enumerate(_scores(body, [name], scores))
                ]
            continue
        per = [w // groups for w in slot.block.channels[:2]]
        space = f"{prefix}.conv2.groups"
        # At least two groups: a single group is a dense conv, and the arch could no longer tell
        # that the block's width must stay a multiple of its group width.
        spaces[space] = (groups, min(groups, max(2, math.ceil(min_channels / min(per)))))
        g1, g2 = _scores(body, [names[0]], scores), _scores(body, [names[1]], scores)
        for k in range(groups):
            idx1 = tuple(range(k * per[0], (k + 1) * per[0]))
            idx2 = tuple(range(k * per[1], (k + 1) * per[1]))
            vals = [g1[i] for i in idx1] + [g2[i] for i in idx2]
            units.append(
                _Unit(sum(vals) / len(vals), space, len(vals), ((names[0], idx1), (names[1], idx2)))
            )
    return units, spaces, widths


def plan_channel_prune(
    body: ResNet,
    fraction: float,
    min_channels: int = 1,
    scores: Mapping[str, Sequence[float]] | None = None,
    costs: Mapping[str, float] | None = None,
) -> ChannelPlan:
    """Rank all prunable channels of ``body`` globally by |γ| (or by ``scores``: one importance
    per channel for every BN of the body, e.g. :func:`.importance.taylor_scores`; with ``costs``,
    per multiply-add one unit of its space saves) and remove ``fraction`` of them.

    At least one unit is removed when any can be (``plan.empty`` tells when none can).
    """
    assert 0 < fraction < 1 and min_channels >= 1
    units, spaces, widths = _units(body, min_channels, scores, costs)
    total = sum(u.cost for u in units)
    target = max(1, round(fraction * total))
    left = {k: size for k, (size, _) in spaces.items()}
    removed: dict[str, list[int]] = {}
    count = 0
    # Ties (e.g. the γ = 1 of a fresh BN) are broken by each unit's relative position inside its
    # space, so tied spaces shrink in proportion instead of the first one being emptied.
    seen: dict[str, int] = {}
    position = []
    for u in units:
        position.append(seen.get(u.space, 0) / spaces[u.space][0])
        seen[u.space] = seen.get(u.space, 0) + 1
    order = sorted(range(len(units)), key=lambda i: (units[i].importance, position[i], i))
    for i in order:
        if count >= target:
            break
        u = units[i]
        if left[u.space] - 1 < spaces[u.space][1]:
            continue
        left[u.space] -= 1
        count += u.cost
        for key, idx in u.channels:
            removed.setdefault(key, []).extend(idx)
    keep = {
        key: tuple(sorted(set(range(widths[key])) - set(gone))) for key, gone in removed.items()
    }
    return ChannelPlan(
        keep=keep,
        removed={k: tuple(sorted(v)) for k, v in removed.items()},
        removed_channels=count,
        prunable_channels=total,
    )


# ---------------------------------------------------------------------- layer pruning
def removable_blocks(arch: BackboneArch) -> list[BlockId]:
    """Blocks layer pruning may remove: identity-shortcut blocks that do not start a stage.

    Removing such a block leaves its neighbours' widths and every shortcut unchanged.
    """
    return [(s.stage, s.index) for s in arch.slots() if s.index > 0 and not s.has_projection]


def _block_params(body: ResNet, block: BlockId) -> Iterator[Tensor]:
    return body.stages[block[0]][block[1]].parameters()


def layer_importance(body: ResNet, block: BlockId) -> float:
    """Mean |θ| over the block's learnable parameters (conv weights, BN γ and β).

    The paper ranks layers by the L1 norm of their parameters, globally. The sum is normalised
    by the parameter count: a raw sum grows with width² (a stage-4 block of an R50 has ~64× the
    parameters of a stage-1 block), so it would always remove the narrowest stage's blocks
    whatever their weights; the mean compares magnitudes across stages of different widths.
    """
    total, count = 0.0, 0
    for p in _block_params(body, block):
        total += float(p.detach().abs().sum())
        count += p.numel()
    assert count > 0
    return total / count


def least_important_block(body: ResNet) -> BlockSlot | None:
    """The removable block with the least :func:`layer_importance` (``None`` if there is none)."""
    candidates = removable_blocks(body.arch)
    if not candidates:
        return None
    best = min(candidates, key=lambda b: (layer_importance(body, b), b))
    return body.arch.slot(*best)
