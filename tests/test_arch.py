"""BackboneArch: the paper's appendix-B encoding, JSON, validation with named stage/block."""

from __future__ import annotations

import json

import pytest

from jdsearch.core.errors import SpecError
from jdsearch.spec.arch import BASIC, BOTTLENECK, BackboneArch, Block, Stage

# Verbatim from appendix B of the paper (including its missing outer brackets).
PAPER_R18 = "[(64, 64)], [(128, 128)-(128, 128)], [(256, 256)-(256, 256)], [(512, 512)-(512, 512)"
PAPER_R50 = (
    "(58, 59, 205)-(60, 64, 205)-(63, 62, 205)], [(127, 128, 314)-(109, 122, 314)-(127, 123, 314)-"
    "(125, 124, 314)], [(256, 255, 591)-(243, 245, 591)-(237, 247, 591)-(243, 246, 591)-"
    "(252, 244, 591)-(252, 254, 591)], [(509, 507, 1856)-(509, 506, 1856)-(508, 507, 1856)]"
)
PAPER_R101 = (
    "[(49, 62, 202)-(35, 33, 202)-(56, 62, 202)], [(123, 128, 300)-(57, 90, 300)-(117, 113, 300)-"
    "(124, 117, 300)], [(255, 254, 321)-(65, 127, 321)-(32, 47, 321)-(32, 63, 321)-(120, 161, 321)-"
    "(132, 181, 321)-(162, 232, 321)-(175, 241, 321)-(143, 237, 321)-(199, 246, 321)-(210, 238, 321)-"
    "(201, 225, 321)-(210, 215, 321)-(211, 222, 321)-(201, 208, 321)-(198, 206, 321)-(200, 213, 321)-"
    "(226, 221, 321)-(234, 221, 321)-(237, 222, 321)], [(249, 229, 321)-(245, 231, 321)-"
    "(511, 478, 2031)-(507, 503, 2031)-(491, 477, 2031)]"
)


def canonical(text: str) -> str:
    """The paper's strings with the dropped outer brackets restored."""
    text = text.strip()
    if not text.startswith("["):
        text = "[" + text
    if not text.endswith("]"):
        text += "]"
    return text


@pytest.mark.parametrize("text", [PAPER_R18, PAPER_R50, PAPER_R101], ids=["r18", "r50", "r101"])
def test_paper_encodings_round_trip(text: str) -> None:
    arch = BackboneArch.parse(text)
    assert arch.encode() == canonical(text)
    assert BackboneArch.parse(arch.encode()) == arch
    assert BackboneArch.from_dict(arch.to_dict()) == arch
    assert BackboneArch.from_json(arch.to_json()) == arch
    json.loads(arch.to_json())  # plain JSON


def test_paper_r50_student_structure() -> None:
    arch = BackboneArch.parse(PAPER_R50)
    assert arch.kind == BOTTLENECK
    assert arch.depths == (3, 4, 6, 3)
    assert arch.stage_out_channels == (205, 314, 591, 1856)
    assert arch.stages[1].blocks[1].channels == (109, 122, 314)


def test_paper_r101_student_mixed_widths_in_stage4() -> None:
    """Appendix B: two 321-wide blocks from stage 3 live at the start of stage 4."""
    arch = BackboneArch.parse(PAPER_R101)
    assert arch.depths == (3, 4, 20, 5)
    first, second, third = (arch.slot(3, i) for i in range(3))
    assert first.stride == 2 and first.in_channels == 321 and first.block.out_channels == 321
    assert first.has_projection  # strided: the one shortcut that cannot be identity
    assert not second.has_projection
    assert third.in_channels == 321 and third.block.out_channels == 2031 and third.has_projection
    assert arch.stage_out_channels[3] == 2031


def test_r18_student_basic_blocks() -> None:
    arch = BackboneArch.parse(PAPER_R18)
    assert arch.kind == BASIC
    assert arch.depths == (1, 2, 2, 2)
    assert not arch.slot(0, 0).has_projection  # stem 64 -> 64, stride 1
    assert arch.slot(1, 0).has_projection


def test_resnet_presets_match_torchvision_shapes() -> None:
    r50 = BackboneArch.resnet([3, 4, 6, 3])
    assert r50.stages[0].blocks[0].channels == (64, 64, 256)
    assert r50.stage_out_channels == (256, 512, 1024, 2048)
    r18 = BackboneArch.resnet([2, 2, 2, 2], kind=BASIC)
    assert r18.stage_out_channels == (64, 128, 256, 512)
    x101 = BackboneArch.resnet([3, 4, 23, 3], groups=32, width_per_group=4)
    assert x101.stages[0].blocks[0] == Block((128, 128, 256), groups=32)
    assert x101.stages[3].blocks[0] == Block((1024, 1024, 2048), groups=32)


def test_resnext_parse_with_group_width() -> None:
    text = "[(128, 128, 256)-(112, 112, 256)], [(256, 256, 512)], [(448, 448, 1024)], [(1024, 1024, 2048)]"
    arch = BackboneArch.parse(text, group_width=(4, 8, 16, 32))
    assert [b.groups for b in arch.stages[0].blocks] == [32, 28]
    assert arch.stages[2].blocks[0].groups == 28
    assert BackboneArch.from_dict(arch.to_dict()) == arch
    with pytest.raises(SpecError, match="stage 1 block 2"):
        BackboneArch.parse(text.replace("(112, 112", "(110, 110"), group_width=(4, 8, 16, 32))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[(64, 64)], [(128, 128)], [(256, 256)]", "expected 4 stages"),
        ("[(64, 64)], [(128, 0)], [(256, 256)], [(512, 512)]", "stage 2 block 1"),
        ("[(64, 64)], [(128, 128)-(128, 128, 512)], [(256, 256)], [(512, 512)]", "stage 2 block 2"),
        ("[(64, 64)], [(128)], [(256, 256)], [(512, 512)]", "stage 2 block 1"),
        ("[(64, 64)], [(128, x)], [(256, 256)], [(512, 512)]", "stage 2 block 1"),
        ("[(64, 64)], [], [(256, 256)], [(512, 512)]", "stage 2 block 1"),
        ("", "empty"),
    ],
)
def test_inconsistent_encodings_name_stage_and_block(text: str, needle: str) -> None:
    with pytest.raises(SpecError, match=needle) as info:
        BackboneArch.parse(text)
    assert "\n" not in str(info.value)


def test_validation_names_stage_and_block_for_direct_construction() -> None:
    good = BackboneArch.resnet([1, 1, 1, 1], kind=BASIC)
    stages = list(good.stages)
    stages[2] = Stage((Block((64, 64)), Block((64, 64, 256))), 2)
    with pytest.raises(SpecError, match="stage 3 block 2"):
        good.with_stages(stages)
    stages = list(good.stages)
    stages[3] = Stage((), 2)
    with pytest.raises(SpecError, match="stage 4 has no blocks"):
        good.with_stages(stages)
    stages = list(good.stages)
    stages[1] = Stage(stages[1].blocks, 3)
    with pytest.raises(SpecError, match="stage 2 stride"):
        good.with_stages(stages)
    with pytest.raises(SpecError, match=r"stage 1 block 1 .*grouped convs need a bottleneck"):
        BackboneArch.resnet([1, 1, 1, 1], kind=BASIC, groups=2)


def test_from_dict_rejects_unknown_keys_and_malformed_stages() -> None:
    d = BackboneArch.resnet([1, 1, 1, 1]).to_dict()
    with pytest.raises(SpecError, match="unknown key"):
        BackboneArch.from_dict({**d, "widht": 3})
    d["stages"][1] = {"blocks": [{"chans": [1, 2, 3]}]}
    with pytest.raises(SpecError, match="stage 2"):
        BackboneArch.from_dict(d)
    with pytest.raises(SpecError, match="invalid JSON"):
        BackboneArch.from_json("{not json")


def test_slots_track_input_widths_and_projections() -> None:
    arch = BackboneArch.resnet([2, 2, 2, 2], widths=(16, 32, 64, 128), stem=16)
    slots = list(arch.slots())
    assert len(slots) == arch.num_blocks() == 8
    assert [s.in_channels for s in slots[:3]] == [16, 64, 64]
    assert [s.has_projection for s in slots] == [True, False] * 4
    assert [s.stride for s in slots] == [1, 1, 2, 1, 2, 1, 2, 1]
