"""Detector specs: presets load; every bad key/value gives one line naming the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jdsearch.core.errors import SpecError
from jdsearch.core.resolution import Resolution
from jdsearch.spec.arch import BackboneArch
from jdsearch.spec.detector import DETECTORS_DIR, load_spec, spec_from_dict

PRESETS = sorted(p.stem for p in DETECTORS_DIR.glob("*.yaml"))


def test_presets_exist() -> None:
    for name in (
        "r18-fpn",
        "r50-fpn",
        "r101-fpn",
        "x101-32x4d-fpn",
        "tiny-r18-fpn",
        "tiny-r50-fpn",
    ):
        assert name in PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_round_trips(name: str) -> None:
    spec = load_spec(name)
    assert spec.name == name
    again = spec_from_dict(spec.to_dict(), source="roundtrip")
    assert again.arch == spec.arch
    assert again.rpn == spec.rpn and again.roi == spec.roi and again.input == spec.input


def test_paper_presets_have_paper_shapes() -> None:
    assert load_spec("r101-fpn").arch.depths == (3, 4, 23, 3)
    x101 = load_spec("x101-32x4d-fpn").arch
    assert x101.stages[0].blocks[0].channels == (128, 128, 256)
    assert x101.stages[0].blocks[0].groups == 32
    r50 = load_spec("r50-fpn")
    assert r50.input.size == Resolution(1333, 800)
    assert [str(r) for r in r50.input.resolutions] == ["512x512", "800x600", "1080x720", "1333x800"]


def write(tmp_path: Path, data: object, name: str = "det.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


BASE = {"name": "t", "backbone": {"kind": "basic", "depths": [1, 1, 1, 1]}}


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        (
            {"backbone": {"kind": "basic", "depths": [1, 1, 1, 1], "widht": 3}},
            "backbone.widht: unknown key",
        ),
        ({"rpn": {"anchor_size": [1]}}, "rpn.anchor_size: unknown key"),
        ({"rpn": {"anchor_sizes": [8, 16, 32]}}, "rpn.anchor_sizes: expected 5 levels"),
        ({"rpn": {"nms_thresh": 1.5}}, "rpn.nms_thresh: must lie in"),
        (
            {"roi_heads": {"representation_size": "big"}},
            "roi_heads.representation_size: expected an integer, got 'big'",
        ),
        (
            {"roi_heads": {"batch_size_per_image": 0}},
            "roi_heads.batch_size_per_image: must be positive",
        ),
        ({"backbone": {"kind": "dense", "depths": [1, 1, 1, 1]}}, "backbone.kind: must be"),
        (
            {"backbone": {"kind": "basic", "depths": [1, 1, 1]}},
            "backbone.depths: expected 4 values",
        ),
        (
            {"backbone": {"kind": "basic", "depths": [1, 0, 1, 1]}},
            "backbone.depths: must be positive",
        ),
        ({"backbone": {"encoding": "[(8, 8)], [(8, 8)]"}}, "backbone.encoding: arch encoding"),
        ({"input": {"size": "big"}}, "input.size:"),
        ({"input": {"resolutions": ["64x64", "12y3"]}}, "input.resolutions:"),
        ({"fpn": {"channels": -1}}, "fpn.channels: must be positive"),
        ({"num_classes": 1}, "num_classes:"),
        ({"colour": "red"}, "colour: unknown key"),
    ],
)
def test_bad_specs_name_file_and_field(tmp_path: Path, patch: dict, needle: str) -> None:
    p = write(tmp_path, {**BASE, **patch})
    with pytest.raises(SpecError) as info:
        load_spec(p)
    msg = str(info.value)
    assert str(p) in msg and needle in msg, msg
    assert "\n" not in msg


def test_missing_fields_and_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="name: required field is missing"):
        load_spec(write(tmp_path, {"backbone": BASE["backbone"]}))
    with pytest.raises(SpecError, match="backbone: required field is missing"):
        load_spec(write(tmp_path, {"name": "x"}))
    with pytest.raises(SpecError, match="no such detector spec"):
        load_spec(tmp_path / "absent.yaml")
    with pytest.raises(SpecError, match="invalid YAML at line"):
        load_spec(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(write(tmp_path, "- just\n- a list\n"))


def test_encoding_and_arch_forms(tmp_path: Path) -> None:
    text = "[(8, 8)], [(16, 16)], [(32, 32)-(32, 32)], [(64, 64)]"
    spec = load_spec(
        write(
            tmp_path,
            {"name": "e", "backbone": {"encoding": text, "stem": 8}, "fpn": {"channels": 16}},
        )
    )
    assert spec.arch.encode() == text and spec.arch.stem == 8 and spec.arch.fpn == 16
    arch = BackboneArch.parse(text, stem=8, fpn=16)
    spec2 = load_spec(
        write(
            tmp_path,
            {"name": "a", "backbone": {"arch": arch.to_dict()}, "fpn": {"channels": 16}},
            "b.yaml",
        )
    )
    assert spec2.arch == arch
