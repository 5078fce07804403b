"""Backbone architectures: stages → blocks → conv output widths (:class:`BackboneArch`), with the
paper's appendix-B text encoding ``[(64, 64, 256)-(64, 64, 256)], [...], [...], [...]`` and a
dict form that carries everything (stem, groups, strides, FPN). Torch-free. Notes:
``docs/morphism.md``, "The architecture encoding".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from jdsearch.core.config import shown as _shown
from jdsearch.core.errors import SpecError
from jdsearch.core.limits import MAX_BLOCKS, MAX_WIDTH

BASIC = "basic"
BOTTLENECK = "bottleneck"
NUM_STAGES = 4
DEFAULT_STRIDES = (1, 2, 2, 2)


@dataclass(frozen=True)
class Block:
    """One residual block: the output width of each of its convs, and the 3×3 conv's groups."""

    channels: tuple[int, ...]
    groups: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))

    @property
    def kind(self) -> str:
        """``"basic"`` for a block of two convs, else ``"bottleneck"``."""
        return BASIC if len(self.channels) == 2 else BOTTLENECK

    @property
    def out_channels(self) -> int:
        """The width of the block's last conv: its output width."""
        return self.channels[-1]

    def encode(self) -> str:
        """The paper's encoding of the block's conv widths, e.g. ``(64, 64, 256)`` (groups are not
        written)."""
        return "(" + ", ".join(str(c) for c in self.channels) + ")"


@dataclass(frozen=True)
class Stage:
    """An ordered list of blocks; the first block carries the stage's stride."""

    blocks: tuple[Block, ...]
    stride: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))

    @property
    def depth(self) -> int:
        """Number of blocks in the stage."""
        return len(self.blocks)

    @property
    def out_channels(self) -> int:
        """Output width of the stage's last block."""
        return self.blocks[-1].out_channels

    def encode(self) -> str:
        """The paper's encoding of the stage: its blocks' encodings joined by ``-`` in ``[...]``."""
        return "[" + "-".join(b.encode() for b in self.blocks) + "]"


@dataclass(frozen=True)
class BlockSlot:
    """A block seen in context: where it is, what it receives, and whether it projects."""

    stage: int  # 0-based stage index
    index: int  # 0-based block index inside the stage
    block: Block
    in_channels: int
    stride: int

    @property
    def has_projection(self) -> bool:
        """Whether the block needs a projection shortcut (its width changes or it is strided)."""
        return self.in_channels != self.block.out_channels or self.stride != 1

    @property
    def name(self) -> str:
        """Human name used in messages: ``stage 2 block 3`` (1-based, like the paper's stages)."""
        return f"stage {self.stage + 1} block {self.index + 1}"


@dataclass(frozen=True)
class BackboneArch:
    """A ResNet/ResNeXt backbone for an FPN detector.

    ``stem`` is the width of the 7×7 stem conv; ``fpn`` the FPN (neck) width.
    ``stride_in_1x1`` puts a strided bottleneck's stride on its first 1×1 conv instead of its 3×3
    conv (detectron2's MSRA ResNets, ``RESNETS.STRIDE_IN_1X1``; basic blocks have no 1×1 conv).
    Construct from the
    paper's encoding with :meth:`parse`, a uniform recipe with :meth:`resnet`, or a dict with
    :meth:`from_dict`. Instances are validated on construction and immutable; actions return new
    instances.

    Raises:
        SpecError: not four stages, a stride other than 1 or 2, an empty stage, a block that is
            neither basic nor bottleneck, mixed kinds, or groups that do not divide a width; the
            message names the stage and block.
    """

    stages: tuple[Stage, ...]
    stem: int = 64
    fpn: int = 256
    stride_in_1x1: bool = False
    _slots: tuple[BlockSlot, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not isinstance(self.stride_in_1x1, bool):
            raise SpecError(
                f"backbone arch: stride_in_1x1 must be true or false, got {_shown(self.stride_in_1x1)}"
            )
        object.__setattr__(self, "_slots", tuple(self._validate()))

    # ------------------------------------------------------------------ structure
    @property
    def kind(self) -> str:
        """The block kind of the backbone, ``"basic"`` or ``"bottleneck"`` (read from its first
        block)."""
        return self.stages[0].blocks[0].kind

    @property
    def depths(self) -> tuple[int, ...]:
        """Number of blocks in each stage."""
        return tuple(s.depth for s in self.stages)

    @property
    def stage_out_channels(self) -> tuple[int, ...]:
        """Output width of each stage: the inputs of the FPN's lateral convs."""
        return tuple(s.out_channels for s in self.stages)

    @property
    def strides(self) -> tuple[int, ...]:
        """Stride of each stage (carried by its first block)."""
        return tuple(s.stride for s in self.stages)

    def slots(self) -> Iterator[BlockSlot]:
        """Every block with its stage/index, input width, stride and shortcut type, in order."""
        return iter(self._slots)

    def slot(self, stage: int, index: int) -> BlockSlot:
        """The :class:`BlockSlot` of block ``index`` of stage ``stage`` (both 0-based);
        ``IndexError`` when there is no such block."""
        for s in self._slots:
            if s.stage == stage and s.index == index:
                return s
        raise IndexError(f"no block {index} in stage {stage}")

    def num_blocks(self) -> int:
        """Total number of blocks over all stages."""
        return len(self._slots)

    def _validate(self) -> list[BlockSlot]:
        if len(self.stages) != NUM_STAGES:
            raise SpecError(f"backbone arch: expected {NUM_STAGES} stages, got {len(self.stages)}")
        for name, value in (("stem", self.stem), ("fpn", self.fpn)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_WIDTH:
                raise SpecError(
                    f"backbone arch: {name} width must be an integer in 1..{MAX_WIDTH}, got {_shown(value)}"
                )
        slots: list[BlockSlot] = []
        kind: str | None = None
        in_ch = self.stem
        for si, stage in enumerate(self.stages):
            if stage.stride not in (1, 2):
                raise SpecError(
                    f"backbone arch: stage {si + 1} stride must be 1 or 2, got {stage.stride}"
                )
            if not stage.blocks:
                raise SpecError(f"backbone arch: stage {si + 1} has no blocks")
            if len(stage.blocks) > MAX_BLOCKS:
                raise SpecError(
                    f"backbone arch: stage {si + 1} has {len(stage.blocks)} blocks, at most {MAX_BLOCKS}"
                )
            for bi, block in enumerate(stage.blocks):
                kind = _check_block(block, f"stage {si + 1} block {bi + 1}", kind)
                stride = stage.stride if bi == 0 else 1
                slots.append(BlockSlot(si, bi, block, in_ch, stride))
                in_ch = block.out_channels
        return slots

    # ------------------------------------------------------------------ encoding
    def encode(self) -> str:
        """The paper's appendix-B encoding: block widths only."""
        return ", ".join(s.encode() for s in self.stages)

    @classmethod
    def parse(
        cls,
        text: str,
        *,
        stem: int = 64,
        fpn: int = 256,
        strides: Sequence[int] = DEFAULT_STRIDES,
        group_width: Sequence[int] | int | None = None,
    ) -> BackboneArch:
        """Parse the paper's encoding.

        The stage brackets are optional at the two ends (the paper's own R18 and R50 strings drop
        one of them). ``group_width`` (ResNeXt) gives the channels per group of each stage's
        grouped 3×3 conv — e.g. ``(4, 8, 16, 32)`` for X101-32x4d — so a block's groups are its
        middle width divided by it; ``None`` means plain ResNet (groups 1).
        """
        body = text.strip()
        if not body:
            raise SpecError("arch encoding: empty text")
        body = body.removeprefix("[").removesuffix("]")
        stage_texts = re.split(r"\]\s*,\s*\[", body)
        if len(stage_texts) != NUM_STAGES:
            raise SpecError(
                f"arch encoding: expected {NUM_STAGES} stages separated by '], [', got {len(stage_texts)}"
            )
        if len(strides) != NUM_STAGES:
            raise SpecError(
                f"arch encoding: strides needs {NUM_STAGES} values, got {list(strides)}"
            )
        if group_width is None or isinstance(group_width, int):
            gws: list[int | None] = [group_width] * NUM_STAGES
        else:
            gws = list(group_width)
            if len(gws) != NUM_STAGES:
                raise SpecError(f"arch encoding: group_width needs {NUM_STAGES} values, got {gws}")
        stages = []
        for si, stage_text in enumerate(stage_texts):
            block_texts = stage_text.strip().split("-")
            blocks = []
            for bi, bt in enumerate(block_texts):
                m = re.fullmatch(r"\s*\(\s*(\d{1,9}(?:\s*,\s*\d{1,9})*)\s*\)\s*", bt)
                if m is None:
                    raise SpecError(
                        f"arch encoding: stage {si + 1} block {bi + 1}: cannot read {_shown(bt.strip())}"
                        " (expected '(c1, c_out)' or '(c1, c2, c_out)', widths up to 9 digits)"
                    )
                chans = tuple(int(x) for x in m.group(1).split(","))
                groups = 1
                gw = gws[si]
                if gw:
                    if len(chans) != 3 or chans[1] % gw:
                        raise SpecError(
                            f"arch encoding: stage {si + 1} block {bi + 1} {bt.strip()}: middle width "
                            f"must be a multiple of group width {gw}"
                        )
                    groups = chans[1] // gw
                blocks.append(Block(chans, groups))
            stages.append(Stage(tuple(blocks), int(strides[si])))
        return cls(tuple(stages), stem=stem, fpn=fpn)

    # ------------------------------------------------------------------ dict / JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form: ``stem``, ``fpn`` and each stage's stride and blocks (``groups`` only
        where not 1, ``stride_in_1x1`` only when set); read back by :meth:`from_dict`."""
        out: dict[str, Any] = {
            "stem": self.stem,
            "fpn": self.fpn,
            "stages": [
                {
                    "stride": s.stride,
                    "blocks": [
                        {
                            "channels": list(b.channels),
                            **({"groups": b.groups} if b.groups != 1 else {}),
                        }
                        for b in s.blocks
                    ],
                }
                for s in self.stages
            ],
        }
        if self.stride_in_1x1:
            out["stride_in_1x1"] = True
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BackboneArch:
        """Read the :meth:`to_dict` form (defaults: stem 64, FPN 256, the standard stage strides).
        Raises :class:`SpecError` for a non-mapping, an unknown or missing key, a malformed stage or
        an invalid arch."""
        if not isinstance(d, Mapping):
            raise SpecError(f"backbone arch: expected a mapping, got {type(d).__name__}")
        unknown = set(d) - {"stem", "fpn", "stages", "stride_in_1x1"}
        if unknown:
            raise SpecError(f"backbone arch: unknown key(s) {sorted(unknown)}")
        if "stages" not in d:
            raise SpecError("backbone arch: missing key 'stages'")
        stages = []
        for si, sd in enumerate(d["stages"]):
            try:
                blocks = tuple(
                    Block(tuple(bd["channels"]), int(bd.get("groups", 1))) for bd in sd["blocks"]
                )
                stages.append(Stage(blocks, int(sd.get("stride", DEFAULT_STRIDES[min(si, 3)]))))
            except (KeyError, TypeError, ValueError) as e:
                raise SpecError(f"backbone arch: stage {si + 1} is malformed ({e!r})") from None
        return cls(
            tuple(stages),
            stem=int(d.get("stem", 64)),
            fpn=int(d.get("fpn", 256)),
            stride_in_1x1=d.get("stride_in_1x1", False),
        )

    def to_json(self) -> str:
        """Compact JSON of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> BackboneArch:
        """Read the :meth:`to_json` form; :class:`SpecError` for invalid JSON or an invalid arch."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"backbone arch: invalid JSON ({e})") from None
        return cls.from_dict(d)

    # ------------------------------------------------------------------ builders
    @classmethod
    def resnet(
        cls,
        depths: Sequence[int],
        *,
        kind: str = BOTTLENECK,
        widths: Sequence[int] = (64, 128, 256, 512),
        expansion: int | None = None,
        stem: int = 64,
        fpn: int = 256,
        groups: int = 1,
        width_per_group: int | None = None,
    ) -> BackboneArch:
        """A uniform ResNet/ResNeXt: ``depths`` blocks per stage, ``widths`` inner widths, the
        standard strides (other strides: :meth:`with_strides`).

        For bottlenecks the output width is ``expansion × width`` (default 4); for basic blocks
        the output equals the width (default expansion 1). ResNeXt: ``groups`` and
        ``width_per_group`` scale the inner width as ``width × width_per_group/64 × groups``
        (X101-32x4d: groups 32, width_per_group 4).
        """
        if kind not in (BASIC, BOTTLENECK):
            raise SpecError(f"backbone: kind must be '{BASIC}' or '{BOTTLENECK}', got {kind!r}")
        if len(depths) != NUM_STAGES or len(widths) != NUM_STAGES:
            raise SpecError(f"backbone: depths and widths need {NUM_STAGES} values each")
        exp = expansion if expansion is not None else (4 if kind == BOTTLENECK else 1)
        stages = []
        for si, (d, w) in enumerate(zip(depths, widths, strict=True)):
            inner = w * width_per_group * groups // 64 if width_per_group else w
            out = w * exp
            chans = (inner, inner, out) if kind == BOTTLENECK else (inner, out)
            stages.append(
                Stage(tuple(Block(chans, groups) for _ in range(int(d))), DEFAULT_STRIDES[si])
            )
        return cls(tuple(stages), stem=stem, fpn=fpn)

    def with_fpn(self, fpn: int) -> BackboneArch:
        """The same backbone with FPN width ``fpn`` (validated: :class:`SpecError` if invalid)."""
        return replace(self, fpn=fpn)

    def with_strides(self, strides: Sequence[int]) -> BackboneArch:
        """The same blocks with stage ``i`` strided by ``strides[i]``."""
        stages = (replace(s, stride=int(v)) for s, v in zip(self.stages, strides, strict=True))
        return self.with_stages(tuple(stages))

    def with_stages(self, stages: Sequence[Stage]) -> BackboneArch:
        """The same stem and FPN width with ``stages`` (validated: :class:`SpecError` if
        invalid)."""
        return replace(self, stages=tuple(stages))


def _check_block(block: Block, position: str, kind: str | None) -> str:
    """Raise :class:`SpecError` unless ``block`` is valid in a backbone of ``kind`` (``None``:
    the first block); the backbone's kind."""
    if any(c > MAX_WIDTH for c in block.channels):
        big = max(block.channels)
        raise SpecError(
            f"backbone arch: {position}: width {_shown(big)} is more than {MAX_WIDTH} channels"
        )
    where = f"backbone arch: {position} {block.encode()}"
    if len(block.channels) not in (2, 3):
        raise SpecError(f"{where}: a block has 2 (basic) or 3 (bottleneck) conv widths")
    if any(c <= 0 for c in block.channels):
        raise SpecError(f"{where}: every conv needs at least one channel")
    if kind is not None and block.kind != kind:
        raise SpecError(f"{where}: {block.kind} block in a {kind} backbone")
    if block.groups < 1:
        raise SpecError(f"{where}: groups must be ≥ 1, got {block.groups}")
    if block.groups > 1:
        if block.kind != BOTTLENECK:
            raise SpecError(f"{where}: grouped convs need a bottleneck block")
        c1, c2 = block.channels[0], block.channels[1]
        if c1 % block.groups or c2 % block.groups:
            raise SpecError(
                f"{where}: widths {c1} and {c2} are not divisible by groups {block.groups}"
            )
    return block.kind
