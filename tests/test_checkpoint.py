"""Checkpoints: round trip, bytes variant, and every way a checkpoint file can be wrong."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from jdsearch.core.errors import CheckpointError
from jdsearch.models.detector import Detector, build_detector
from jdsearch.spec.arch import BackboneArch
from jdsearch.spec.detector import load_spec
from jdsearch.store.checkpoint import (
    META_HASH_KEY,
    META_KEY,
    checkpoint_from_bytes,
    checkpoint_to_bytes,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
    tensors_sha256,
)

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def detector() -> Detector:
    torch.manual_seed(0)
    det = build_detector(load_spec("tiny-r18-fpn"), NUM_CLASSES)
    # Non-default buffers too: running stats must travel with the weights.
    for name, buf in det.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_()
        elif name.endswith("num_batches_tracked"):
            buf.fill_(7)
    det.eval()
    return det


def _outputs(det: Detector) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    images = [torch.rand(3, 64, 80), torch.rand(3, 96, 64)]
    with torch.no_grad():
        feats = det.backbone(det.transform(images)[0].tensors)
        outs = det(images)
    return [dict(feats), *outs]


def _split(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    return st_load(data), meta


def _rebuild(tensors: dict[str, torch.Tensor], doc: dict, *, rehash: bool = True) -> bytes:
    text = json.dumps(doc, sort_keys=True)
    digest = read_hash(text) if rehash else "0" * 64
    return st_save(tensors, metadata={META_KEY: text, META_HASH_KEY: digest})


def read_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _assert_one_line_naming(exc: pytest.ExceptionInfo[CheckpointError], name: str) -> None:
    msg = str(exc.value)
    assert name in msg, msg
    assert "\n" not in msg


# ---------------------------------------------------------------------- round trip
def test_file_round_trip_gives_identical_outputs(detector: Detector, tmp_path: Path) -> None:
    path = save_checkpoint(
        tmp_path / "sub" / "det.safetensors",
        detector,
        class_names=["a", "b", "c"],
        extra={"trial": 3, "lineage": [0, 1], "metrics": {"AP": 0.25}},
    )
    ck = load_checkpoint(path)
    assert not ck.detector.training
    assert ck.num_classes == NUM_CLASSES
    assert ck.class_names == ("a", "b", "c")
    assert ck.extra == {"trial": 3, "lineage": [0, 1], "metrics": {"AP": 0.25}}
    assert ck.spec.arch == detector.spec.arch
    assert ck.spec.to_dict() == detector.spec.to_dict()
    sd0, sd1 = detector.state_dict(), ck.detector.state_dict()
    assert sd0.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    out0, out1 = _outputs(detector), _outputs(ck.detector)
    for a, b in zip(out0, out1, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    # no temporary file left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["det.safetensors"]


def test_bytes_round_trip_and_overwrite(detector: Detector, tmp_path: Path) -> None:
    data = checkpoint_to_bytes(detector)
    ck = checkpoint_from_bytes(data, source="db:trial-7")
    assert ck.class_names is None and ck.extra == {} and ck.source == "db:trial-7"
    assert tensors_sha256(ck.detector.state_dict()) == tensors_sha256(detector.state_dict())
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"old content")
    save_checkpoint(path, detector)
    assert load_checkpoint(path).num_classes == NUM_CLASSES
    meta = read_checkpoint_metadata(path)
    assert meta["format"] == "jdsearch-checkpoint" and meta["num_classes"] == NUM_CLASSES
    assert meta["spec"]["backbone"]["arch"] == detector.arch.to_dict()


def test_plain_safetensors_tools_can_read_it(detector: Detector) -> None:
    tensors, meta = _split(checkpoint_to_bytes(detector))
    assert set(tensors) == set(detector.state_dict())
    doc = json.loads(meta[META_KEY])
    assert doc["tensors_sha256"] == tensors_sha256(detector.state_dict())


def test_save_rejects_bad_inputs(detector: Detector, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "a.safetensors", detector, extra={"x": object()})
    with pytest.raises(CheckpointError, match="class names"):
        save_checkpoint(tmp_path / "a.safetensors", detector, class_names=["only-one"])
    with pytest.raises(CheckpointError, match="DetectorSpec"):
        checkpoint_to_bytes(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------- failures
def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="no such checkpoint") as exc:
        load_checkpoint(path)
    _assert_one_line_naming(exc, str(path))
    with pytest.raises(CheckpointError):
        read_checkpoint_metadata(path)


@pytest.mark.parametrize("cut", [0, 5, 8, 200, -1000, -1])
def test_truncated_file(detector: Detector, tmp_path: Path, cut: int) -> None:
    data = checkpoint_to_bytes(detector)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    _assert_one_line_naming(exc, str(path))


def test_garbage_and_pickle_files_are_refused_without_unpickling(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (pytest.fail, ("a checkpoint was unpickled",))

    for name, data in [
        ("garbage.safetensors", b"\xff" * 64),
        ("pickle.pt", pickle.dumps({"state": Boom()})),
        ("plain.safetensors", st_save({"w": torch.zeros(2)})),
        ("other-meta.safetensors", st_save({"w": torch.zeros(2)}, metadata={"format": "pt"})),
    ]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as exc:
            load_checkpoint(path)
        _assert_one_line_naming(exc, str(path))


def test_edited_metadata_is_detected(detector: Detector) -> None:
    data = checkpoint_to_bytes(detector, extra={"note": "aaaa"})
    at = data.index(b"aaaa")
    edited = data[:at] + b"bbbb" + data[at + 4 :]  # same length: still a valid safetensors file
    with pytest.raises(CheckpointError, match="metadata was modified") as exc:
        checkpoint_from_bytes(edited, source="edited.safetensors")
    _assert_one_line_naming(exc, "edited.safetensors")


def test_flipped_weight_byte_is_detected(detector: Detector) -> None:
    data = bytearray(checkpoint_to_bytes(detector))
    data[-3] ^= 0x55  # inside the tensor payload
    with pytest.raises(CheckpointError, match="sha256") as exc:
        checkpoint_from_bytes(bytes(data), source="flipped.safetensors")
    _assert_one_line_naming(exc, "flipped.safetensors")


def test_consistently_forged_hashes_still_need_matching_weights(detector: Detector) -> None:
    tensors, meta = _split(checkpoint_to_bytes(detector))
    doc = json.loads(meta[META_KEY])
    # 1. weights replaced, tensor hash left alone: payload hash mismatch
    forged = dict(tensors)
    forged["rpn.head.conv.0.0.weight"] = torch.zeros_like(forged["rpn.head.conv.0.0.weight"])
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint_from_bytes(_rebuild(forged, doc), source="w.safetensors")
    # 2. metadata changed without updating its own hash
    with pytest.raises(CheckpointError, match="modified"):
        checkpoint_from_bytes(
            _rebuild(tensors, {**doc, "num_classes": 5}, rehash=False), source="m"
        )


def test_weights_that_do_not_fit_the_spec(detector: Detector) -> None:
    tensors, meta = _split(checkpoint_to_bytes(detector))
    doc = json.loads(meta[META_KEY])
    # A wider first stage in the spec: every hash is consistent, but the shapes are not.
    arch = detector.arch
    widths = BackboneArch.resnet(
        (2, 2, 2, 2), kind="basic", widths=(24, 32, 64, 128), stem=16, fpn=32
    )
    other = detector.spec.with_arch(widths).to_dict()
    assert arch != widths
    with pytest.raises(CheckpointError, match="shape mismatch") as exc:
        checkpoint_from_bytes(_rebuild(tensors, {**doc, "spec": other}), source="arch.safetensors")
    _assert_one_line_naming(exc, "arch.safetensors")
    # More classes than the predictor has.
    with pytest.raises(CheckpointError, match="box_predictor"):
        checkpoint_from_bytes(_rebuild(tensors, {**doc, "num_classes": 9}), source="n")
    # A tensor missing (hash recomputed so only the fit check can object).
    fewer = {k: v for k, v in tensors.items() if not k.startswith("roi_heads.box_head.fc7")}
    with pytest.raises(CheckpointError, match=r"missing roi_heads\.box_head\.fc7"):
        checkpoint_from_bytes(
            _rebuild(fewer, {**doc, "tensors_sha256": tensors_sha256(fewer)}), source="f"
        )


def test_malformed_metadata_fields(detector: Detector) -> None:
    tensors, meta = _split(checkpoint_to_bytes(detector))
    doc = json.loads(meta[META_KEY])
    bad_docs = {
        "version": {**doc, "version": 99},
        "format": {**doc, "format": "something-else"},
        "spec": {**doc, "spec": {"name": "x"}},
        "num_classes": {**doc, "num_classes": "four"},
        "class_names": {**doc, "class_names": [1, 2]},
        "extra": {**doc, "extra": []},
    }
    for field, bad in bad_docs.items():
        with pytest.raises(CheckpointError) as exc:
            checkpoint_from_bytes(_rebuild(tensors, bad), source=f"bad-{field}.safetensors")
        _assert_one_line_naming(exc, f"bad-{field}.safetensors")
