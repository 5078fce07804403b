"""The four weight-inheriting actions of student morphism (paper 3.1.2): ``channel_prune``,
``layer_prune``, ``add_layer:S`` and ``rearrange:S->T``. :func:`evolve` plans the child
architecture and copies every inherited tensor by name. Design notes: ``docs/morphism.md``.
"""

from __future__ import annotations

import logging
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from jdsearch.core.config import check, is_int
from jdsearch.core.errors import JDSearchError
from jdsearch.methods.morph.pruning import (
    ChannelPlan,
    block_prefix,
    chains,
    inner_bn_names,
    last_bn_name,
    least_important_block,
    plan_channel_prune,
    removable_blocks,
    single_unit_plans,
)
from jdsearch.models.detector import Detector, build_detector
from jdsearch.models.resnet import BasicBlock, ResNet, Shortcut
from jdsearch.spec.arch import BASIC, BOTTLENECK, BackboneArch, Block, BlockSlot, Stage
from jdsearch.spec.detector import DetectorSpec

__all__ = [
    "ACTION_KINDS",
    "ADD_LAYER",
    "CHANNEL_PRUNE",
    "LAYER_PRUNE",
    "REARRANGE",
    "Action",
    "MorphConfig",
    "MorphError",
    "MorphReport",
    "all_actions",
    "channel_costs",
    "describe",
    "evolve",
    "evolve_with_report",
    "feasible_actions",
    "infeasibility",
    "init_identity_block",
]

logger = logging.getLogger(__name__)

CHANNEL_PRUNE = "channel_prune"
LAYER_PRUNE = "layer_prune"
ADD_LAYER = "add_layer"
REARRANGE = "rearrange"
ACTION_KINDS = (CHANNEL_PRUNE, LAYER_PRUNE, ADD_LAYER, REARRANGE)
_NUM_STAGES = 4
_SYNTAX = (
    "channel_prune, layer_prune, add_layer:<stage 1-4>, "
    "rearrange:<from>-><to> (neighbouring stages 1-4)"
)


class MorphError(JDSearchError):
    """An unknown action, or one that is not feasible for the given student."""


# ---------------------------------------------------------------------- actions and config
@dataclass(frozen=True)
class Action:
    """A parsed action; ``str(action)`` is its canonical string. Stages are 1-based."""

    kind: str
    stage: int = 0  # add_layer
    src: int = 0  # rearrange
    dst: int = 0

    def __str__(self) -> str:
        if self.kind == ADD_LAYER:
            return f"{ADD_LAYER}:{self.stage}"
        if self.kind == REARRANGE:
            return f"{REARRANGE}:{self.src}->{self.dst}"
        return self.kind

    @classmethod
    def parse(cls, text: str | Action) -> Action:
        """The action written as ``text`` (an :class:`Action` passes through). Raises
        :class:`MorphError` for an unknown action, a stage outside 1..4, or a rearrange between
        stages that are not neighbours."""
        if isinstance(text, Action):
            return text
        if not isinstance(text, str):
            raise MorphError(f"action {text!r}: expected a string such as {_SYNTAX}")
        t = text.strip()
        if t in (CHANNEL_PRUNE, LAYER_PRUNE):
            return cls(t)
        if m := re.fullmatch(rf"{ADD_LAYER}:(\d+)", t):
            stage = int(m.group(1))
            if not 1 <= stage <= _NUM_STAGES:
                raise MorphError(f"action {text!r}: stage must be 1..{_NUM_STAGES}, got {stage}")
            return cls(ADD_LAYER, stage=stage)
        if m := re.fullmatch(rf"{REARRANGE}:(\d+)->(\d+)", t):
            src, dst = int(m.group(1)), int(m.group(2))
            if not (1 <= src <= _NUM_STAGES and 1 <= dst <= _NUM_STAGES and abs(src - dst) == 1):
                raise MorphError(
                    f"action {text!r}: rearrange moves a block between neighbouring stages 1..{_NUM_STAGES}"
                )
            return cls(REARRANGE, src=src, dst=dst)
        raise MorphError(f"action {text!r}: unknown; actions are {_SYNTAX}")


def all_actions() -> list[str]:
    """Every action string, in a stable order (feasible or not)."""
    out = [CHANNEL_PRUNE, LAYER_PRUNE]
    out += [f"{ADD_LAYER}:{s}" for s in range(1, _NUM_STAGES + 1)]
    for s in range(1, _NUM_STAGES):
        out += [f"{REARRANGE}:{s}->{s + 1}", f"{REARRANGE}:{s + 1}->{s}"]
    return out


@dataclass(frozen=True)
class MorphConfig:
    """Parameters of the actions.

    * ``channel_fraction`` — share of the prunable channels one ``channel_prune`` removes
      (paper: "a small pruning percentage"; default 10 %).
    * ``min_channels`` — every conv keeps at least this many channels (grouped convs: whole
      groups, at least two of them, and enough for ``min_channels``).
    * ``max_stage_depth`` — ``add_layer`` is infeasible on a stage already this deep (``None``:
      no limit).
    * ``channel_scores`` — what ``channel_prune`` ranks channels by: ``None``, their BN scale |γ|
      (network slimming); else one importance per channel for every BN of the parent's body
      (:func:`jdsearch.methods.morph.importance.taylor_scores` of that parent).
    * ``channel_costs`` — with ``channel_scores``, what removing one unit of each channel space
      saves (:func:`channel_costs` of the parent): a unit then ranks by its score per multiply-add
      saved, so that a prune removes the cheapest accuracy per FLOP; ``None``: by its score.
    """

    channel_fraction: float = 0.1
    min_channels: int = 1
    max_stage_depth: int | None = None
    channel_scores: Mapping[str, Sequence[float]] | None = field(
        default=None, compare=False, repr=False
    )
    channel_costs: Mapping[str, float] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check(0 < self.channel_fraction < 1, self, "channel_fraction", "must lie in (0, 1)")
        ok = is_int(self.min_channels) and self.min_channels >= 1
        check(ok, self, "min_channels", "must be an integer ≥ 1")
        ok = self.max_stage_depth is None or self.max_stage_depth >= 1
        check(ok, self, "max_stage_depth", "must be ≥ 1 or None")


@dataclass(frozen=True)
class MorphReport:
    """What an action did. Parameter counts are numbers of scalars (``numel``).

    ``new_params`` could not be inherited (fresh or identity-initialised);
    ``params_after == inherited_params + new_params``. ``removed_channels`` maps a parent BN
    (path inside the backbone body; chain widths under the head's ``shortcut.bn``) to the removed
    channel indices.
    """

    action: str
    parent_encoding: str
    child_encoding: str
    params_before: int
    params_after: int
    inherited_params: int
    new_params: int
    new_tensors: tuple[str, ...] = ()
    removed_channels: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    removed_blocks: tuple[str, ...] = ()
    added_blocks: tuple[str, ...] = ()
    moved_blocks: tuple[str, ...] = ()

    @property
    def dropped_params(self) -> int:
        """Parent parameters the child does not use (removed channels, blocks, shortcuts…)."""
        return self.params_before - self.inherited_params

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form: every field (tuples as lists) plus ``dropped_params``."""
        return {
            "action": self.action,
            "parent_encoding": self.parent_encoding,
            "child_encoding": self.child_encoding,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "inherited_params": self.inherited_params,
            "new_params": self.new_params,
            "dropped_params": self.dropped_params,
            "new_tensors": list(self.new_tensors),
            "removed_channels": {k: list(v) for k, v in self.removed_channels.items()},
            "removed_blocks": list(self.removed_blocks),
            "added_blocks": list(self.added_blocks),
            "moved_blocks": list(self.moved_blocks),
        }


# ---------------------------------------------------------------------- plans
Idx = tuple[int, ...] | None  # parent indices kept along one channel dimension; None: all


@dataclass(frozen=True)
class _Source:
    """Where a child block's weights come from: a parent block (flat index) and, per channel
    dimension ("in", "m0", "m1", "out"), the parent channels it keeps (missing: all)."""

    parent: int
    index: Mapping[str, Idx] = field(default_factory=dict)


@dataclass(frozen=True)
class _Plan:
    arch: BackboneArch
    blocks: tuple[_Source | None, ...]  # per child block in flat order; None: a new block
    laterals: tuple[Idx, ...]  # per stage: parent channels kept in the FPN lateral's input
    new_laterals: frozenset[int] = frozenset()  # stages whose lateral conv cannot be inherited
    removed_channels: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    removed_blocks: tuple[str, ...] = ()
    added_blocks: tuple[str, ...] = ()
    moved_blocks: tuple[str, ...] = ()


def _restage(arch: BackboneArch, blocks: Sequence[Sequence[Block]]) -> BackboneArch:
    return arch.with_stages(
        [Stage(tuple(b), st.stride) for b, st in zip(blocks, arch.stages, strict=True)]
    )


def _body(detector: Detector) -> ResNet:
    body = detector.backbone.body
    assert isinstance(body, ResNet) and body.arch.stages == detector.arch.stages, (
        "detector/arch mismatch"
    )
    return body


def _plan_channel_prune(detector: Detector, action: Action, config: MorphConfig) -> _Plan:
    cp = plan_channel_prune(
        _body(detector),
        config.channel_fraction,
        config.min_channels,
        config.channel_scores,
        config.channel_costs,
    )
    return _channels_plan(detector.arch, cp)


def _channels_plan(arch: BackboneArch, cp: ChannelPlan) -> _Plan:
    """The child of ``arch`` that keeps ``cp``'s channels."""
    chain_key = {m: (c.key if c.prunable else None) for c in chains(arch) for m in c.members}
    sources: list[_Source] = []
    stages: list[list[Block]] = [[] for _ in arch.stages]
    prev_out: Idx = None
    last_out: list[Idx] = [None] * len(arch.stages)
    for k, slot in enumerate(arch.slots()):
        bid = (slot.stage, slot.index)
        key = chain_key[bid]
        out = cp.keep.get(key) if key is not None else None
        mids = [cp.keep.get(f"{block_prefix(bid)}.{n}") for n in inner_bn_names(slot.block.kind)]
        dims = [*mids, out]
        widths = tuple(
            len(i) if i is not None else w for i, w in zip(dims, slot.block.channels, strict=True)
        )
        groups = slot.block.groups
        if groups > 1:
            groups = groups * widths[0] // slot.block.channels[0]
        stages[slot.stage].append(Block(widths, groups))
        sources.append(
            _Source(k, {"in": prev_out, "out": out, **{f"m{i}": m for i, m in enumerate(mids)}})
        )
        prev_out = last_out[slot.stage] = out
    return _Plan(
        arch=_restage(arch, stages),
        blocks=tuple(sources),
        laterals=tuple(last_out),
        removed_channels=dict(cp.removed),
    )


def channel_costs(detector: Detector, size: tuple[int, int] | None = None) -> dict[str, float]:
    """The multiply-adds (at ``size``, default the detector's base size) that removing one unit
    of each of ``detector``'s channel spaces saves: the detector against its child without that
    unit, both counted on the ``meta`` device (no weights). Keys as ``ChannelPlan``'s."""
    from jdsearch.models.flops import count_flops

    arch, classes = detector.arch, _num_classes(detector)

    def flops(a: BackboneArch) -> int:
        with torch.device("meta"):
            child = build_detector(detector.spec.with_arch(a), classes)
        return count_flops(child, size).total

    whole = flops(arch)
    plans = single_unit_plans(_body(detector))
    return {key: float(whole - flops(_channels_plan(arch, p).arch)) for key, p in plans.items()}


def _plan_layer_prune(detector: Detector, action: Action, config: MorphConfig) -> _Plan:
    arch = detector.arch
    victim = least_important_block(_body(detector))
    assert victim is not None
    stages = [list(s.blocks) for s in arch.stages]
    del stages[victim.stage][victim.index]
    flat = _flat_index(arch, victim.stage, victim.index)
    return _Plan(
        arch=_restage(arch, stages),
        blocks=tuple(_Source(k) for k in range(arch.num_blocks()) if k != flat),
        laterals=(None,) * len(arch.stages),
        removed_blocks=(victim.name,),
    )


def _plan_add_layer(detector: Detector, action: Action, config: MorphConfig) -> _Plan:
    arch = detector.arch
    s = action.stage - 1
    last = arch.stages[s].blocks[-1]
    stages = [list(st.blocks) for st in arch.stages]
    stages[s].append(Block(last.channels, last.groups))
    at = _flat_index(arch, s, len(arch.stages[s].blocks) - 1) + 1
    blocks: list[_Source | None] = [_Source(k) for k in range(arch.num_blocks())]
    blocks.insert(at, None)
    return _Plan(
        arch=_restage(arch, stages),
        blocks=tuple(blocks),
        laterals=(None,) * len(arch.stages),
        added_blocks=(f"stage {s + 1} block {len(stages[s])}",),
    )


def _plan_rearrange(detector: Detector, action: Action, config: MorphConfig) -> _Plan:
    arch = detector.arch
    src, dst = action.src - 1, action.dst - 1
    stages = [list(st.blocks) for st in arch.stages]
    if dst == src + 1:
        moved_from = (src, len(stages[src]) - 1)
        stages[dst].insert(0, stages[src].pop())
        moved_to = (dst, 0)
    else:
        moved_from = (src, 0)
        stages[dst].append(stages[src].pop(0))
        moved_to = (dst, len(stages[dst]) - 1)
    child = _restage(arch, stages)
    new_laterals = frozenset(
        i
        for i, (a, b) in enumerate(
            zip(arch.stage_out_channels, child.stage_out_channels, strict=True)
        )
        if a != b
    )
    return _Plan(
        arch=child,
        blocks=tuple(
            _Source(k) for k in range(arch.num_blocks())
        ),  # the block sequence is unchanged
        laterals=(None,) * len(arch.stages),
        new_laterals=new_laterals,
        moved_blocks=(f"{arch.slot(*moved_from).name} -> {child.slot(*moved_to).name}",),
    )


_PLANNERS = {
    CHANNEL_PRUNE: _plan_channel_prune,
    LAYER_PRUNE: _plan_layer_prune,
    ADD_LAYER: _plan_add_layer,
    REARRANGE: _plan_rearrange,
}


def _flat_index(arch: BackboneArch, stage: int, index: int) -> int:
    return sum(st.depth for st in arch.stages[:stage]) + index


# ---------------------------------------------------------------------- feasibility
def infeasibility(
    detector: Detector, action: str | Action, *, config: MorphConfig | None = None
) -> str | None:
    """Why ``action`` cannot be applied to ``detector`` (``None`` when it can).

    Raises :class:`MorphError` for a malformed action string.
    """
    cfg = config or MorphConfig()
    act = Action.parse(action)
    arch = detector.arch
    if act.kind == CHANNEL_PRUNE:
        if plan_channel_prune(_body(detector), cfg.channel_fraction, cfg.min_channels).empty:
            return f"every prunable conv is at its minimum width ({cfg.min_channels} channel(s) or one group)"
    elif act.kind == LAYER_PRUNE:
        if not removable_blocks(arch):
            return "no identity-shortcut block outside a stage's first position is left to remove"
    elif act.kind == ADD_LAYER:
        depth = arch.stages[act.stage - 1].depth
        if cfg.max_stage_depth is not None and depth >= cfg.max_stage_depth:
            return f"stage {act.stage} already has {depth} blocks (max_stage_depth {cfg.max_stage_depth})"
    elif act.kind == REARRANGE and arch.stages[act.src - 1].depth < 2:
        return f"stage {act.src} has a single block and a stage is never emptied"
    return None


def feasible_actions(detector: Detector, *, config: MorphConfig | None = None) -> list[str]:
    """The actions legal for this student, in the stable order of :func:`all_actions`.

    Args:
        detector: the student.
        config: as in :func:`evolve`.

    Returns:
        The action strings :func:`evolve` accepts for ``detector``.
    """
    return [a for a in all_actions() if infeasibility(detector, a, config=config) is None]


# ---------------------------------------------------------------------- inheritance
_BLOCK_DIMS: dict[str, dict[str, tuple[str, ...]]] = {
    BASIC: {"conv1": ("m0", "in"), "bn1": ("m0",), "conv2": ("out", "m0"), "bn2": ("out",)},
    BOTTLENECK: {
        "conv1": ("m0", "in"),
        "bn1": ("m0",),
        "conv2": ("m1", "m0"),
        "bn2": ("m1",),
        "conv3": ("out", "m1"),
        "bn3": ("out",),
    },
}
_SHORTCUT_DIMS = {"shortcut.conv": ("out", "in"), "shortcut.bn": ("out",)}
_BLOCK_KEY = re.compile(r"backbone\.body\.stages\.(\d+)\.(\d+)\.(.+)\.(\w+)")
_LATERAL_KEY = re.compile(r"backbone\.fpn\.inner_blocks\.(\d+)\.0\.(weight|bias)")


def _source_entry(
    name: str,
    plan: _Plan,
    child_at: Mapping[tuple[int, int], int],
    parent_slots: Sequence[BlockSlot],
) -> tuple[str, tuple[Idx, ...]] | None:
    """The parent entry a child state-dict entry copies, and its slicing; ``None``: new."""
    if m := _BLOCK_KEY.fullmatch(name):
        src = plan.blocks[child_at[int(m.group(1)), int(m.group(2))]]
        if src is None:
            return None
        module, leaf = m.group(3), m.group(4)
        pslot = parent_slots[src.parent]
        pname = f"backbone.body.{block_prefix((pslot.stage, pslot.index))}.{module}.{leaf}"
        if leaf == "num_batches_tracked":
            return pname, ()
        dims = {**_BLOCK_DIMS[pslot.block.kind], **_SHORTCUT_DIMS}[module]
        index = [src.index.get(d) for d in dims]
        if module == "conv2" and pslot.block.groups > 1:
            index[1] = None  # whole groups go: a grouped conv's per-group input width is unchanged
        return pname, tuple(index)
    if m := _LATERAL_KEY.fullmatch(name):
        stage = int(m.group(1))
        if stage in plan.new_laterals:
            return None
        return name, ((None, plan.laterals[stage]) if m.group(2) == "weight" else ())
    return name, ()


@torch.no_grad()
def _identity_bn(bn: nn.BatchNorm2d, gamma: float) -> None:
    bn.reset_running_stats()
    nn.init.constant_(bn.weight, gamma)
    nn.init.zeros_(bn.bias)


@torch.no_grad()
def init_identity_block(block: BasicBlock) -> None:
    """Dirac convs, neutral BNs and a zeroed last BN: the residual branch outputs exactly 0, so
    the block is the identity on its (non-negative) input. How ``add_layer`` makes a block, and
    how a teacher pool started from the base makes the blocks the base lacks."""
    assert block.shortcut is None, "an added block has an identity shortcut"
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.dirac_(m.weight, groups=m.groups)
        elif isinstance(m, nn.BatchNorm2d):
            _identity_bn(m, 1.0)
    kind = BASIC if not hasattr(block, "conv3") else BOTTLENECK
    _identity_bn(block.get_submodule(last_bn_name(kind)), 0.0)


@torch.no_grad()
def _init_identity_shortcut(shortcut: Shortcut) -> None:
    """A strided projection that is the identity on the kept pixels (eval mode): Dirac 1×1 conv,
    BN with running stats (0, 1) and γ = √(1 + eps), β = 0."""
    w = shortcut.conv.weight
    assert w.shape[0] == w.shape[1], (
        "a new projection only appears where input and output widths match"
    )
    nn.init.dirac_(w)
    _identity_bn(shortcut.bn, math.sqrt(1.0 + shortcut.bn.eps))


def _inherit(parent: Detector, child: Detector, plan: _Plan) -> set[str]:
    """Fill ``child``'s state from ``parent`` per ``plan``; initialise the rest. Returns new names."""
    parent_sd = parent.state_dict()
    parent_slots = list(parent.arch.slots())
    child_at = {(s.stage, s.index): k for k, s in enumerate(child.arch.slots())}
    state: dict[str, Tensor] = {}
    new: set[str] = set()
    for name, value in child.state_dict().items():
        entry = _source_entry(name, plan, child_at, parent_slots)
        if entry is None or entry[0] not in parent_sd:
            new.add(name)
            state[name] = value
            continue
        pname, index = entry
        t = parent_sd[pname]
        for dim, idx in enumerate(index):
            if idx is not None:
                t = t.index_select(dim, torch.as_tensor(idx, dtype=torch.long, device=t.device))
        assert t.shape == value.shape, (
            f"{name}: inherited {tuple(t.shape)} from {pname}, child needs {tuple(value.shape)}"
        )
        state[name] = t
    child.load_state_dict(state, strict=True)
    body = _body(child)
    for slot, src in zip(child.arch.slots(), plan.blocks, strict=True):
        block = body.stages[slot.stage][slot.index]
        prefix = f"backbone.body.{block_prefix((slot.stage, slot.index))}"
        if src is None:
            init_identity_block(block)
        elif f"{prefix}.shortcut.conv.weight" in new:
            _init_identity_shortcut(block.shortcut)
    return new


def _num_classes(detector: Detector) -> int:
    return int(detector.roi_heads.box_predictor.cls_score.out_features)


def _count(model: nn.Module, names: set[str] | None = None) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if names is None or n in names)


# ---------------------------------------------------------------------- public entry points
def evolve_with_report(
    detector: Detector, action: str | Action, *, config: MorphConfig | None = None
) -> tuple[Detector, MorphReport]:
    """Apply ``action`` to a copy of ``detector``; the parent is left untouched.

    The child is built with ``build_detector(spec.with_arch(new_arch), num_classes)``, inherits
    the parent's weights, and is placed on the parent's device, in its train/eval mode and with its
    transform's current sizes. Raises :class:`MorphError` for an unknown or infeasible action.
    """
    if not isinstance(getattr(detector, "spec", None), DetectorSpec):
        raise MorphError(
            f"evolve: expected a detector built by build_detector, got {type(detector).__name__}"
        )
    cfg = config or MorphConfig()
    act = Action.parse(action)
    reason = infeasibility(detector, act, config=cfg)
    if reason is not None:
        raise MorphError(
            f"action '{act}' is not feasible for {detector.spec.name} {list(detector.arch.depths)}: {reason}"
        )
    plan = _PLANNERS[act.kind](detector, act, cfg)
    # What the child cannot inherit (a rearrange's new FPN lateral) starts from a seed of the
    # parent's architecture and the action: the same move of the same parent makes the same
    # child in any process, whatever ran before it (a retried trial on another worker).
    seed = zlib.crc32(f"{detector.arch.encode()}|{act}".encode())
    child = build_detector(detector.spec.with_arch(plan.arch), _num_classes(detector), seed=seed)
    new = _inherit(detector, child, plan)
    try:
        device = next(detector.parameters()).device
    except StopIteration:  # pragma: no cover - a detector always has parameters
        device = torch.device("cpu")
    child.to(device)
    child.train(detector.training)
    child.transform.min_size = detector.transform.min_size
    child.transform.max_size = detector.transform.max_size
    new_params = _count(child, new)
    report = MorphReport(
        action=str(act),
        parent_encoding=detector.arch.encode(),
        child_encoding=plan.arch.encode(),
        params_before=_count(detector),
        params_after=_count(child),
        inherited_params=_count(child) - new_params,
        new_params=new_params,
        new_tensors=tuple(sorted(new)),
        removed_channels=plan.removed_channels,
        removed_blocks=plan.removed_blocks,
        added_blocks=plan.added_blocks,
        moved_blocks=plan.moved_blocks,
    )
    logger.info(
        "%s: %d → %d params (%d new)",
        report.action,
        report.params_before,
        report.params_after,
        new_params,
    )
    return child, report


def evolve(
    detector: Detector, action: str | Action, *, config: MorphConfig | None = None
) -> Detector:
    """``f_evolve``: the child detector of ``action``, with the weights it inherits.

    Args:
        detector: the parent (left unchanged).
        action: ``channel_prune``, ``layer_prune``, ``add_layer:S`` or ``rearrange:S->T``
            (stages 1-based), or an :class:`Action`.
        config: the action's parameters (the pruned channel fraction…); default
            :class:`MorphConfig()`.

    Returns:
        A new detector on the parent's device; ``add_layer`` gives the same outputs exactly.

    Raises:
        MorphError: the action is malformed or not legal for this detector (see
            :func:`feasible_actions`).
    """
    return evolve_with_report(detector, action, config=config)[0]


def _flops(detector: Detector) -> dict[str, Any] | None:
    try:
        from jdsearch.models import flops
    except ImportError:  # pragma: no cover - flops.py is part of the package
        return None
    count = getattr(flops, "count_flops", None)
    if count is None:
        return None
    report = count(detector)  # at the spec's base size
    return {
        "flops": int(report.total),
        "backbone_flops": int(report.backbone),
        "flops_size": list(report.size),
    }


def describe(detector: Detector, *, config: MorphConfig | None = None) -> dict[str, Any]:
    """A JSON-friendly summary for the CLI: encoding, widths, parameters, feasible actions and
    (when :mod:`jdsearch.models.flops` provides ``count_flops``) FLOPs at the spec's base size."""
    arch = detector.arch
    out: dict[str, Any] = {
        "name": detector.spec.name,
        "encoding": arch.encode(),
        "depths": list(arch.depths),
        "stage_out_channels": list(arch.stage_out_channels),
        "params": _count(detector),
        "backbone_body_params": _count(_body(detector)),
        "feasible_actions": feasible_actions(detector, config=config),
    }
    out.update(_flops(detector) or {})
    return out
