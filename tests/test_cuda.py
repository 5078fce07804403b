"""Real CUDA tests (marker ``cuda``): the GPU path of what the rest of the suite checks on the CPU.

Every test here needs a CUDA device and is skipped, saying so, without one; ``bench/gpu_check.sh``
runs them on a GPU machine (``python -m pytest -m cuda tests/test_cuda.py``), where a skip counts
as a failure. They check that the detector computes the same on CUDA as on the CPU in float32,
that AMP training (float16 autocast + ``GradScaler``) runs and learns, that a KD step runs on
CUDA, that a detector trained on CUDA exports and is timed there, and that a tiny search runs
end to end with ``device: cuda`` and ``amp: true``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from torch import Tensor, nn

from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import CocoDataset, load_image, set_resolution
from jdsearch.data.synth import generate
from jdsearch.engine.latency import measure_latency
from jdsearch.engine.train import train
from jdsearch.methods.distill import make_distiller
from jdsearch.models.detector import Detector, build_detector
from jdsearch.spec.detector import load_spec
from jdsearch.spec.settings import TrainConfig

from .conftest import tiny_study_dict

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
        "bench/gpu_check.sh runs these on a GPU machine",
    ),
]

DEVICE = "cuda"
KD_NAMES = {"loss_kd_feat", "loss_kd_cls", "loss_kd_loc"}
#: CUDA against CPU in float32 (TF32 off): relative error ‖cuda − cpu‖ / ‖cpu‖ of each output and
#: of each gradient. Kernels differ in summation order (cuDNN's algorithms, atomics in RoIAlign's
#: backward), so a few 1e-6 are normal; a device-specific bug is off by far more.
FORWARD_RTOL, GRAD_RTOL = 2e-4, 2e-3


@pytest.fixture
def strict_fp32() -> Iterator[None]:
    """Full float32 on CUDA: no TF32 in cuDNN convolutions or matmuls, for a CPU comparison."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> CocoDataset:
    info = generate(tmp_path_factory.mktemp("cuda_synth"), images=16, seed=3, size=96)
    return CocoDataset(info.train_json, info.image_dir)


def on_device(t: Tensor) -> bool:
    return t.device.type == torch.device(DEVICE).type


def rel_err(got: Tensor, want: Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


# ---------------------------------------------------------------------- CUDA equals CPU
def network_pass(det: Detector, images: list[Tensor], boxes: list[Tensor]) -> dict[str, Tensor]:
    """Backbone + FPN, RPN head and the RoI box head on fixed proposals, in training mode (BN on
    batch statistics), then the backward of a fixed random projection of all their outputs.

    The sampling of anchors and proposals (random, and drawn from different generators on the
    two devices) is left out, so the pass is the same computation on either device. Returns every
    output and every parameter's gradient, by name."""
    det.train()
    det.transform.eval()  # the fixed resize size, not a random pick among several
    det.zero_grad(set_to_none=True)
    batch, _ = det.transform(images)
    feats = det.backbone(batch.tensors)
    objectness, deltas = det.rpn.head(list(feats.values()))
    pooled = det.roi_heads.box_roi_pool(feats, boxes, batch.image_sizes)
    cls, reg = det.roi_heads.box_predictor(det.roi_heads.box_head(pooled))
    outputs = {f"fpn.{k}": v for k, v in feats.items()}
    outputs |= {f"objectness.{i}": t for i, t in enumerate(objectness)}
    outputs |= {f"deltas.{i}": t for i, t in enumerate(deltas)}
    outputs |= {"cls": cls, "reg": reg}
    g = torch.Generator().manual_seed(0)
    loss = sum(
        (out * torch.randn(out.shape, generator=g).to(out.device)).sum() / out.numel()
        for out in outputs.values()
    )
    assert isinstance(loss, Tensor)
    loss.backward()
    grads = {f"grad.{n}": p.grad for n, p in det.named_parameters() if p.grad is not None}
    return {**outputs, **grads}


@pytest.mark.parametrize("preset", ["tiny-r18-fpn", "tiny-r50-fpn"])
def test_forward_backward_on_cuda_equals_cpu_in_fp32(preset: str, strict_fp32: None) -> None:
    cpu = build_detector(load_spec(preset), 6, seed=0)
    gpu = build_detector(load_spec(preset), 6, seed=0).to(DEVICE)
    for det in (cpu, gpu):
        set_resolution(det, Resolution(128, 96))
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 128, generator=g) for _ in range(2)]
    xy = torch.rand(2, 24, 2, generator=g) * torch.tensor([100.0, 70.0])
    boxes = [torch.cat([p, p + 8 + 20 * torch.rand(24, 2, generator=g)], 1) for p in xy]

    want = network_pass(cpu, images, boxes)
    got = network_pass(gpu, [im.to(DEVICE) for im in images], [b.to(DEVICE) for b in boxes])

    assert set(got) == set(want) and any(k.startswith("grad.backbone.body") for k in want)
    assert all(on_device(t) for t in got.values())
    errors = {k: rel_err(got[k], want[k]) for k in want}
    too_far = {
        k: e
        for k, e in errors.items()
        if not e <= (GRAD_RTOL if k.startswith("grad.") else FORWARD_RTOL)
    }
    assert not too_far, f"CUDA differs from the CPU beyond tolerance: {too_far}"


# ---------------------------------------------------------------------- AMP, KD
def float16_outputs_of_first_conv(det: nn.Module, seen: list[torch.dtype]) -> Any:
    conv = next(m for m in det.modules() if isinstance(m, nn.Conv2d))
    return conv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))


def test_amp_training_steps_give_finite_losses_and_update_the_weights(synth: CocoDataset) -> None:
    det = build_detector(load_spec("tiny-r18-fpn"), synth.num_classes, seed=0)
    before = {n: p.detach().clone() for n, p in det.named_parameters()}
    dtypes: list[torch.dtype] = []
    hook = float16_outputs_of_first_conv(det, dtypes)
    losses: list[float] = []
    # GradScaler starts at 2**16 and skips a step whose float16 gradients overflow, halving the
    # scale: a few steps make sure that some of them do update the weights.
    config = TrainConfig(
        max_iters=12, batch_size=2, lr=0.01, warmup_iters=0, device=DEVICE, amp=True, seed=0
    )
    result = train(det, synth, config, callback=lambda s: losses.append(s.loss))
    hook.remove()

    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert all(math.isfinite(v) for v in result.final_losses.values())
    assert torch.float16 in dtypes, f"autocast did not run the convolutions in float16: {dtypes}"
    params = dict(det.named_parameters())
    assert all(on_device(p) and p.dtype == torch.float32 for p in params.values())
    moved = [n for n, p in params.items() if not torch.equal(p.detach().cpu(), before[n])]
    assert "roi_heads.box_predictor.cls_score.weight" in moved and len(moved) > len(params) // 2


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_kd_step_on_cuda(synth: CocoDataset, amp: bool) -> None:
    teacher = build_detector(load_spec("tiny-r50-fpn"), synth.num_classes, seed=1)
    student = build_detector(load_spec("tiny-r18-fpn"), synth.num_classes, seed=0)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    kd = make_distiller(student, teacher)
    steps: list[dict[str, float]] = []
    config = TrainConfig(
        max_iters=10, batch_size=2, lr=0.01, warmup_iters=0, device=DEVICE, amp=amp, seed=0
    )
    train(student, synth, config, loss_terms=[kd], callback=lambda s: steps.append(s.losses))

    assert len(steps) == 10
    for step in steps:
        assert set(step) >= KD_NAMES and all(math.isfinite(v) for v in step.values()), step
    assert on_device(kd.adapter.weight) and all(on_device(p) for p in teacher.parameters())
    # the frozen teacher: no weight and no BN running statistic moved
    assert all(torch.equal(v.cpu(), teacher_state[k]) for k, v in teacher.state_dict().items())
    assert any(
        not torch.equal(p.detach().cpu(), student_before[n]) for n, p in student.named_parameters()
    )


# ---------------------------------------------------------------------- export, latency
def test_a_detector_trained_on_cuda_exports_and_is_timed_on_cuda(
    synth: CocoDataset, tmp_path: Path
) -> None:
    from jdsearch.cli import main
    from jdsearch.store.export import export_detector, load_detector

    det = build_detector(load_spec("tiny-r18-fpn"), synth.num_classes, seed=0)
    config = TrainConfig(max_iters=20, batch_size=4, lr=0.02, warmup_iters=2, device=DEVICE)
    train(det, synth, config)
    det.roi_heads.score_thresh = 0.01  # trained for seconds: keep its weak boxes to compare
    checks = [load_image(p) for p in sorted(Path(synth.image_dir).iterdir())[:2]]
    exported = export_detector(  # writes ONNX and checks it against PyTorch (on the CPU)
        det,
        tmp_path / "det",
        class_names=synth.class_names,
        category_ids=synth.category_ids,
        input_size="96x96",
        check_images=checks,
    )
    assert on_device(next(det.parameters()))  # exporting left the original alone
    loaded = load_detector(exported.path, device=DEVICE)
    assert on_device(next(loaded.parameters()))
    want = det.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())

    for amp in (False, True):
        lat = measure_latency(loaded, "96x96", device=DEVICE, warmup=2, repeats=5, amp=amp)
        assert lat.device == str(torch.device(DEVICE)) and lat.amp == amp
        assert 0 < lat.p10_ms <= lat.median_ms <= lat.p90_ms
    with torch.inference_mode():
        out = loaded([checks[0].to(DEVICE)])[0]
    assert on_device(out["boxes"]) and out["boxes"].shape[1] == 4
    argv = ["latency", str(exported.path), "tiny-r18-fpn", "--device", DEVICE, "--repeats", "3"]
    assert main([*argv, "--warmup", "1"]) == 0


# ---------------------------------------------------------------------- a search
def test_tiny_search_on_cuda_with_amp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jdsearch.search.run import run_search
    from jdsearch.spec.study import study_from_dict
    from jdsearch.store.checkpoint import checkpoint_from_bytes

    monkeypatch.chdir(tmp_path)  # runs/<name>/ caches land here
    raw = tiny_study_dict(tmp_path / "data", "cuda-search")
    raw["device"], raw["amp"] = DEVICE, True
    raw["pool"]["train"]["amp"] = True
    raw["search"].update({"n_trials": 3, "storage": f"sqlite:///{tmp_path / 'study.db'}"})
    spec = study_from_dict(raw, source="test_cuda")
    study = run_search(spec, progress=False)

    done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3 and all(t.value is not None and math.isfinite(t.value) for t in done)
    assert all(t.user_attrs["ap"] for t in done)
    # the trials' checkpoints load onto the GPU
    from jdsearch.search.record import TrialRecord
    from jdsearch.search.session import prepare

    _, ctx = prepare(spec, progress=False)
    with ctx.store.open_reader(TrialRecord.from_trial(done[-1]).checkpoint) as r:
        ckpt = checkpoint_from_bytes(r.read(), device=DEVICE)
    assert on_device(next(ckpt.detector.parameters()))
