"""Elastic layers: one super-net whose weights every sub-network shares (prefix slices of channels,
blocks and FPN width), its conversion (:func:`make_elastic`), slicing (:func:`sliced_state_dict`)
and function-preserving channel re-ordering (:func:`reorder_channels`). Notes: ``docs/pool.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jdsearch.core.errors import SpecError
from jdsearch.models.torch_internals import check_input_dim, conv_forward
from jdsearch.spec.arch import BackboneArch

__all__ = [
    "ElasticBatchNorm2d",
    "ElasticConv2d",
    "ElasticLinear",
    "ElasticStage",
    "check_fits",
    "make_elastic",
    "reorder_channels",
    "set_active_arch",
    "sliced_state_dict",
]


# ---------------------------------------------------------------------- elastic modules
class ElasticConv2d(nn.Conv2d):
    """``nn.Conv2d`` that uses its first ``active_out`` filters and the input's channel count."""

    active_out: int | None = None

    @classmethod
    def from_module(cls, conv: nn.Conv2d) -> ElasticConv2d:
        """An elastic conv that *shares* ``conv``'s parameters."""
        assert conv.groups == 1, "elastic width needs ungrouped convs"
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        new.weight = conv.weight
        if conv.bias is not None:
            new.bias = conv.bias
        new.train(conv.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        """The conv over the input's channels (a prefix of ``in_channels``) with the first
        ``active_out`` filters (all when ``None``)."""
        in_ch = int(x.shape[1])
        out = self.out_channels if self.active_out is None else self.active_out
        if in_ch == self.in_channels and out == self.out_channels:
            return super().forward(x)
        assert in_ch <= self.in_channels and out <= self.out_channels, (in_ch, out, self)
        bias = self.bias[:out] if self.bias is not None else None
        return conv_forward(self, x, self.weight[:out, :in_ch], bias)

    def extra_repr(self) -> str:
        """``Conv2d``'s repr, plus ``active_out`` when it is set."""
        return super().extra_repr() + (f", active_out={self.active_out}" if self.active_out else "")


class ElasticLinear(nn.Linear):
    """``nn.Linear`` that reads only as many input features as it receives (a prefix)."""

    @classmethod
    def from_module(cls, fc: nn.Linear) -> ElasticLinear:
        """An elastic linear layer that *shares* ``fc``'s parameters."""
        new = cls(fc.in_features, fc.out_features, bias=fc.bias is not None, device="meta")
        new.weight = fc.weight
        if fc.bias is not None:
            new.bias = fc.bias
        new.train(fc.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        """The linear map of the input's ``n`` features through the first ``n`` input columns of the
        weight."""
        n = int(x.shape[-1])
        if n == self.in_features:
            return super().forward(x)
        assert n <= self.in_features, (n, self)
        return F.linear(x, self.weight[:, :n], self.bias)


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` over the first ``C`` channels (``C`` = the input's channel count)."""

    @classmethod
    def from_module(cls, bn: nn.BatchNorm2d) -> ElasticBatchNorm2d:
        """An elastic BN that *shares* ``bn``'s parameters and running statistics."""
        new = cls(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            device="meta",
        )
        if bn.affine:
            new.weight, new.bias = bn.weight, bn.bias
        if bn.track_running_stats:
            new.running_mean, new.running_var = bn.running_mean, bn.running_var
            new.num_batches_tracked = bn.num_batches_tracked
        new.train(bn.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        """Batch norm of the input's ``C`` channels with the first ``C`` entries of the affine
        parameters and running statistics (``BatchNorm2d``'s forward at full width)."""
        c = int(x.shape[1])
        if c == self.num_features:
            return super().forward(x)
        assert c <= self.num_features, (c, self)
        check_input_dim(self, x)
        # The same bookkeeping as torch's _BatchNorm.forward, on prefixes of the parameters.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_stats = not self.training or self.track_running_stats
        mean = self.running_mean[:c] if self.running_mean is not None and keep_stats else None
        var = self.running_var[:c] if self.running_var is not None and keep_stats else None
        weight = self.weight[:c] if self.weight is not None else None
        bias = self.bias[:c] if self.bias is not None else None
        return F.batch_norm(x, mean, var, weight, bias, use_batch_stats, factor, self.eps)


class ElasticStage(nn.Sequential):
    """A stage (``nn.Sequential`` of blocks) that runs only its first ``active_depth`` blocks."""

    active_depth: int | None = None
    # A depth below the full one leaves blocks unused (DistributedDataParallel must know).
    may_skip_parameters = True

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """The output of the first ``active_depth`` blocks on ``x`` (all blocks when ``None``)."""
        depth = len(self) if self.active_depth is None else self.active_depth
        for i, block in enumerate(self):
            if i >= depth:
                break
            x = block(x)
        return x

    def extra_repr(self) -> str:
        """``active_depth=…`` when it is set, else empty."""
        return f"active_depth={self.active_depth}" if self.active_depth is not None else ""


# ---------------------------------------------------------------------- structure helpers
def _block_convs(block: nn.Module) -> list[nn.Conv2d]:
    return [getattr(block, n) for n in ("conv1", "conv2", "conv3") if hasattr(block, n)]


def _block_bns(block: nn.Module) -> list[nn.BatchNorm2d]:
    return [getattr(block, n) for n in ("bn1", "bn2", "bn3") if hasattr(block, n)]


def _stages(detector: nn.Module) -> nn.ModuleList:
    return detector.backbone.body.stages


def _fpn_convs(detector: nn.Module) -> tuple[list[nn.Conv2d], list[nn.Conv2d]]:
    fpn = detector.backbone.fpn
    return [b[0] for b in fpn.inner_blocks], [b[0] for b in fpn.layer_blocks]


def _rpn_conv(detector: nn.Module) -> nn.Conv2d:
    convs = detector.rpn.head.conv
    assert len(convs) == 1, "one RPN conv expected"
    return convs[0][0]


# ---------------------------------------------------------------------- conversion
def make_elastic(detector: nn.Module) -> nn.Module:
    """Turn a plain Faster R-CNN FPN from :func:`build_detector` into an elastic one, in place.

    Parameters and buffers are shared (not copied), names are unchanged, and with nothing
    activated the detector computes exactly what it computed before. The stem stays plain.
    Converting an already elastic detector is a no-op. Returns ``detector``.
    """
    body = detector.backbone.body
    for si, stage in enumerate(list(body.stages)):
        if not isinstance(stage, ElasticStage):
            stage = ElasticStage(*list(stage))
            body.stages[si] = stage
        for block in stage:
            for name in ("conv1", "conv2", "conv3"):
                _swap(block, name, ElasticConv2d)
            for name in ("bn1", "bn2", "bn3"):
                _swap(block, name, ElasticBatchNorm2d)
            if block.shortcut is not None:
                _swap(block.shortcut, "conv", ElasticConv2d)
                _swap(block.shortcut, "bn", ElasticBatchNorm2d)
    fpn = detector.backbone.fpn
    for blocks in (fpn.inner_blocks, fpn.layer_blocks):
        for seq in blocks:
            _swap(seq, "0", ElasticConv2d)
    head = detector.rpn.head
    _swap(head.conv[0], "0", ElasticConv2d)
    _swap(head, "cls_logits", ElasticConv2d)
    _swap(head, "bbox_pred", ElasticConv2d)
    _swap(detector.roi_heads.box_head, "fc6", ElasticLinear)
    return detector


def _swap(parent: nn.Module, name: str, cls: Any) -> None:
    module = getattr(parent, name, None)
    if module is None or isinstance(module, cls):
        return
    setattr(parent, name, cls.from_module(module))


def check_fits(full: BackboneArch, sub: BackboneArch) -> None:
    """Raise :class:`SpecError` unless ``sub`` is a prefix-sub-network of ``full``."""
    where = f"sub-network {sub.encode()} (FPN {sub.fpn})"
    if sub.stem != full.stem or sub.strides != full.strides or sub.kind != full.kind:
        raise SpecError(f"{where}: stem, strides and block kind must be the super-net's")
    if sub.fpn > full.fpn:
        raise SpecError(f"{where}: FPN width {sub.fpn} exceeds the super-net's {full.fpn}")
    for slot in sub.slots():
        if slot.index >= full.stages[slot.stage].depth:
            raise SpecError(f"{where}: stage {slot.stage + 1} is deeper than the super-net's")
        big = full.slot(slot.stage, slot.index)
        if slot.block.groups != 1 or big.block.groups != 1:
            raise SpecError(f"{where}: grouped convolutions are not elastic")
        if any(c > b for c, b in zip(slot.block.channels, big.block.channels, strict=True)):
            raise SpecError(
                f"{where}: {slot.name} is wider than the super-net's {big.block.encode()}"
            )
        if slot.has_projection != big.has_projection:
            raise SpecError(
                f"{where}: {slot.name} {'has' if slot.has_projection else 'lacks'} a projection "
                "shortcut where the super-net's does not (its width equals the stem width?)"
            )


def set_active_arch(detector: nn.Module, full: BackboneArch, sub: BackboneArch) -> None:
    """Make the elastic ``detector`` (super-net arch ``full``) compute the sub-network ``sub``."""
    check_fits(full, sub)
    for si, stage in enumerate(_stages(detector)):
        assert isinstance(stage, ElasticStage), "call make_elastic first"
        stage.active_depth = sub.stages[si].depth
    for slot in sub.slots():
        block = _stages(detector)[slot.stage][slot.index]
        for conv, width in zip(_block_convs(block), slot.block.channels, strict=True):
            conv.active_out = width
        if block.shortcut is not None:
            block.shortcut.conv.active_out = slot.block.out_channels
    inner, layer = _fpn_convs(detector)
    for conv in (*inner, *layer, _rpn_conv(detector)):
        conv.active_out = sub.fpn


def sliced_state_dict(
    full_state: Mapping[str, Tensor], target: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Each tensor of ``target``'s keys and shapes, cut as a prefix from ``full_state`` (copies)."""
    out: dict[str, Tensor] = {}
    for key, t in target.items():
        src = full_state.get(key)
        assert src is not None, f"the super-net has no {key}"
        assert src.dim() == t.dim() and all(
            a >= b for a, b in zip(src.shape, t.shape, strict=True)
        ), (
            key,
            tuple(src.shape),
            tuple(t.shape),
        )
        out[key] = src[tuple(slice(0, n) for n in t.shape)].detach().clone()
    return out


# ---------------------------------------------------------------------- importance re-ordering
@dataclass(frozen=True)
class _Axis:
    """One tensor dimension indexed by a channel (``group`` consecutive entries per channel)."""

    tensor: Tensor
    dim: int
    group: int = 1


def _out_axes(conv: nn.Conv2d) -> list[_Axis]:
    axes = [_Axis(conv.weight, 0)]
    if conv.bias is not None:
        axes.append(_Axis(conv.bias, 0))
    return axes


def _in_axes(module: nn.Module) -> list[_Axis]:
    return [_Axis(module.weight, 1)]


def _bn_axes(bn: nn.BatchNorm2d) -> list[_Axis]:
    tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    return [_Axis(t, 0) for t in tensors if t is not None]


def _filter_l1(conv: nn.Conv2d) -> Tensor:
    return conv.weight.detach().abs().flatten(1).sum(1)


def _gamma(bn: nn.BatchNorm2d) -> Tensor:
    assert bn.weight is not None, "importance needs affine BN"
    return bn.weight.detach().abs()


def _permute(perm: Tensor, axes: Iterable[_Axis]) -> None:
    for axis in axes:
        t = axis.tensor
        n = int(perm.numel())
        if axis.group == 1:
            assert t.shape[axis.dim] == n, (tuple(t.shape), axis.dim, n)
            new = t.index_select(axis.dim, perm.to(t.device))
        else:
            shape = list(t.shape)
            assert shape[axis.dim] == n * axis.group, (shape, axis.dim, n, axis.group)
            grouped = t.reshape(*shape[: axis.dim], n, axis.group, *shape[axis.dim + 1 :])
            new = grouped.index_select(axis.dim, perm.to(t.device)).reshape(shape)
        t.copy_(new)


def _order(importance: Tensor) -> Tensor:
    return torch.argsort(importance.float().cpu(), descending=True, stable=True)


@torch.no_grad()
def reorder_channels(detector: nn.Module) -> dict[str, Tensor]:
    """Sort every elastic channel dimension by importance, most important first, in place.

    Channel groups (each permuted as a whole, wherever it is read or written):

    * each block's inner widths (bottleneck ``c1`` and ``c2``; basic ``c1``), by BN ``|γ|``;
    * each stage's residual stream — the output of every block of the stage, the projection
      shortcut, the next stage's first block and the FPN lateral conv that read it — by the sum
      of ``|γ|`` over the stage's last BNs and shortcut BN; a stage whose first block has no
      projection (its width is the stem's) keeps its order, the stem's;
    * the FPN lateral stream (summed top-down across levels) by the L1 norm of the lateral conv
      filters summed over levels; the FPN output stream (read by the RPN conv and ``fc6``) by the
      summed L1 norm of the output conv filters; the RPN conv's output by its filter L1 norm.

    Works on plain and elastic detectors alike; the full network's function is unchanged. Returns
    the permutation applied to each group (name → indices), for logging and tests.
    """
    perms: dict[str, Tensor] = {}
    stages = _stages(detector)
    inner, layer = _fpn_convs(detector)
    for si, stage in enumerate(stages):
        blocks = list(stage)
        for bi, block in enumerate(blocks):
            convs, bns = _block_convs(block), _block_bns(block)
            for k in range(len(convs) - 1):  # every conv output but the last is an inner width
                perm = _order(_gamma(bns[k]))
                _permute(perm, [*_out_axes(convs[k]), *_bn_axes(bns[k]), *_in_axes(convs[k + 1])])
                perms[f"stage{si + 1}.block{bi + 1}.c{k + 1}"] = perm
        if blocks[0].shortcut is None:
            # Its first block adds its input (the stem's channels, in their order) to its
            # output: the stream keeps the input's order, which nothing here permutes.
            continue
        following = stages[si + 1][0] if si + 1 < len(stages) else None
        perms[f"stage{si + 1}.out"] = _reorder_stream(blocks, following, inner[si])
    perms.update(_reorder_fpn_and_rpn(detector, inner, layer))
    return perms


def _reorder_stream(
    blocks: list[nn.Module], following: nn.Module | None, lateral: nn.Module
) -> Tensor:
    """Permute a stage's residual stream (its blocks' outputs and shortcuts, and what reads it:
    its later blocks, the next stage's first block, the FPN lateral conv) by summed BN |γ|."""
    importance = sum(_gamma(_block_bns(b)[-1]) for b in blocks)
    axes: list[_Axis] = []
    for bi, block in enumerate(blocks):
        axes += _out_axes(_block_convs(block)[-1]) + _bn_axes(_block_bns(block)[-1])
        if block.shortcut is not None:
            importance = importance + _gamma(block.shortcut.bn)
            axes += _out_axes(block.shortcut.conv) + _bn_axes(block.shortcut.bn)
        if bi > 0:
            axes += _in_axes(block.conv1)
            if block.shortcut is not None:
                axes += _in_axes(block.shortcut.conv)
    if following is not None:
        axes += _in_axes(following.conv1)
        if following.shortcut is not None:
            axes += _in_axes(following.shortcut.conv)
    axes += _in_axes(lateral)
    perm = _order(importance)
    _permute(perm, axes)
    return perm


def _reorder_fpn_and_rpn(
    detector: nn.Module, inner: list[nn.Module], layer: list[nn.Module]
) -> dict[str, Tensor]:
    """Permute the FPN lateral and output streams and the RPN conv output by filter L1 norm."""
    perms: dict[str, Tensor] = {}
    rpn_conv = _rpn_conv(detector)
    fc6 = detector.roi_heads.box_head.fc6
    # FPN lateral stream: every level's lateral output is summed into one channel space.
    perm = _order(sum(_filter_l1(c) for c in inner))
    _permute(
        perm, [a for c in inner for a in _out_axes(c)] + [a for c in layer for a in _in_axes(c)]
    )
    perms["fpn.lateral"] = perm
    # FPN output stream: read by the RPN conv (every level) and by fc6 (channel-major columns).
    fpn_width = layer[0].out_channels
    assert fc6.in_features % fpn_width == 0, (fc6.in_features, fpn_width)
    perm = _order(sum(_filter_l1(c) for c in layer))
    axes = [a for c in layer for a in _out_axes(c)] + _in_axes(rpn_conv)
    axes.append(_Axis(fc6.weight, 1, fc6.in_features // fpn_width))
    _permute(perm, axes)
    perms["fpn.out"] = perm
    # RPN conv output, read by the objectness and box-delta convs.
    head = detector.rpn.head
    perm = _order(_filter_l1(rpn_conv))
    _permute(perm, [*_out_axes(rpn_conv), *_in_axes(head.cls_logits), *_in_axes(head.bbox_pred)])
    perms["rpn.conv"] = perm
    return perms
