"""Training loop: determinism, divergence, loss terms, dynamic resolution, schedule; it learns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from jdsearch.core.errors import DataError, SpecError
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import CocoDataset, ResolutionSampler, get_resolution
from jdsearch.data.synth import generate
from jdsearch.engine.evaluate import evaluate
from jdsearch.engine.train import StepInfo, TrainingDiverged, lr_factor, train
from jdsearch.models.detector import Detector, build_detector
from jdsearch.spec.detector import load_spec
from jdsearch.spec.settings import TrainConfig

RES = (Resolution(64, 48), Resolution(80, 64), Resolution(96, 72))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> CocoDataset:
    # Images of different sizes and aspect ratios in one batch.
    info = generate(tmp_path_factory.mktemp("synth"), images=8, seed=1, size=(40, 72))
    return CocoDataset(info.train_json, info.image_dir)


def _detector(num_classes: int, seed: int = 0) -> Detector:
    torch.manual_seed(seed)
    return build_detector(load_spec("tiny-r18-fpn"), num_classes)


def _config(**kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        max_iters=3, batch_size=2, lr=0.01, warmup_iters=2, resolutions=RES
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Recorder(nn.Module):
    """A loss term with a trainable parameter that also records what it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.sizes: list[tuple[int, int]] = []
        self.modes: list[bool] = []

    def forward(self, model: nn.Module) -> dict[str, Tensor]:
        self.sizes.append((int(model.transform.min_size[-1]), int(model.transform.max_size)))
        self.modes.append(self.training and model.training)
        return {"loss_w": (self.w - 3.0) ** 2}


class BNSparsity(nn.Module):
    """Holds the detector itself (like a BN-sparsity term): its params must not be added twice."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, model: nn.Module) -> dict[str, Tensor]:
        assert model is self.model
        gammas = [m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        return {"loss_bn_l1": 1e-5 * torch.stack(gammas).sum()}


class NaNAt(nn.Module):
    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, model: nn.Module) -> dict[str, Tensor]:
        self.calls += 1
        bad = torch.tensor(math.nan) if self.calls == self.at else torch.tensor(0.0)
        return {"loss_ok": torch.tensor(0.5), "loss_bad": bad}


# ---------------------------------------------------------------------- fast tests
def test_same_seed_same_weights_other_seed_differs(data: CocoDataset) -> None:
    runs = []
    for seed in (0, 0, 1):
        det = _detector(data.num_classes)
        rng_before = torch.get_rng_state()
        result = train(det, data, _config(seed=seed))
        assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
        runs.append((det, result))
    assert _same_weights(runs[0][0], runs[1][0])
    assert runs[0][1].loss_history == runs[1][1].loss_history
    assert not _same_weights(runs[0][0], runs[2][0])


def test_result_fields_and_epoch_length(data: CocoDataset) -> None:
    det = _detector(data.num_classes)
    det.eval()
    n_batches = math.ceil(len(data) / 3)
    result = train(det, data, _config(max_iters=None, epochs=1.5, batch_size=3, history_points=2))
    assert result.iterations == math.ceil(1.5 * n_batches)
    assert 0 < result.images <= result.iterations * 3
    assert result.seconds > 0 and result.images_per_s > 0
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(
        result.final_losses
    )
    assert len(result.loss_history) <= 2 and result.history_stride >= 2
    assert all(math.isfinite(v) for v in result.loss_history)
    assert result.resolutions == tuple(str(r) for r in RES)
    assert not det.training  # mode restored
    assert result.to_dict()["iterations"] == result.iterations


def test_non_finite_loss_raises_naming_iteration_and_term(data: CocoDataset) -> None:
    det = _detector(data.num_classes)
    with pytest.raises(TrainingDiverged, match=r"iteration 2/3.*loss_bad=nan") as exc:
        train(det, data, _config(), loss_terms=[NaNAt(2)])
    assert "loss_ok" not in str(exc.value)
    assert get_resolution(det) == Resolution(208, 128)  # restored on error too


def test_loss_term_params_are_trained_and_detector_params_not_doubled(data: CocoDataset) -> None:
    det = _detector(data.num_classes)
    rec = Recorder()
    infos: list[StepInfo] = []
    result = train(
        det,
        data,
        _config(max_iters=4, lr=0.1, warmup_iters=0),
        loss_terms=[rec, BNSparsity(det)],
        callback=infos.append,
    )
    assert float(rec.w.detach()) > 0.1  # gradient descent on (w - 3)^2 from w = 0
    assert all(rec.modes)  # term and model in train mode during steps
    assert {"loss_w", "loss_bn_l1"} <= set(result.final_losses)
    assert [i.iteration for i in infos] == [1, 2, 3, 4]
    assert all("loss_w" in i.losses for i in infos)
    assert infos[0].lr == pytest.approx(0.1)  # no warm-up; cosine starts at full lr
    assert infos[-1].lr < infos[0].lr


def test_dynamic_resolution_varies_per_iteration_and_is_restored(data: CocoDataset) -> None:
    det = _detector(data.num_classes)
    original = (det.transform.min_size, det.transform.max_size)
    rec = Recorder()
    inputs: list[tuple[int, int]] = []
    hook = det.backbone.register_forward_pre_hook(
        lambda m, a: inputs.append(tuple(a[0].shape[-2:]))
    )
    try:
        train(det, data, _config(max_iters=8, seed=5), loss_terms=[rec])
    finally:
        hook.remove()
    sampler = ResolutionSampler(RES, 5)
    expected = [sampler.next() for _ in range(8)]
    assert rec.sizes == [(r.short, r.long) for r in expected]
    assert len(set(rec.sizes)) > 1
    # the transform really resized: batch tensors differ in size with the sampled resolution
    assert len(set(inputs)) > 1
    for (h, w), r in zip(inputs, expected, strict=True):
        assert max(h, w) <= math.ceil(r.long / 32) * 32
    assert (det.transform.min_size, det.transform.max_size) == original


def test_fixed_resolution_when_none_given(data: CocoDataset) -> None:
    det = _detector(data.num_classes)
    rec = Recorder()
    train(det, data, _config(resolutions=()), loss_terms=[rec])
    assert set(rec.sizes) == {(128, 208)}


def test_grad_clip_and_step_schedule_run(data: CocoDataset) -> None:
    det = _detector(data.num_classes)
    result = train(det, data, _config(schedule="step", grad_clip=1.0, amp=True))  # amp off on CPU
    assert result.iterations == 3 and all(math.isfinite(v) for v in result.loss_history)


def test_hflip_moves_boxes_with_pixels() -> None:
    from jdsearch.engine.train import _hflip

    image = torch.zeros(3, 10, 20)
    image[:, 2:5, 1:4] = 1.0  # object at x 1..4, y 2..5
    target = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 5.0]]), "labels": torch.tensor([1])}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    gen = torch.Generator().manual_seed(0)
    images, targets = _hflip([image, image], [target, empty], 1.0, gen)
    x1, y1, x2, y2 = targets[0]["boxes"][0].tolist()
    assert (x1, y1, x2, y2) == (16.0, 2.0, 19.0, 5.0)
    assert images[0][:, 2:5, 16:19].eq(1).all() and images[0].sum() == image.sum()
    assert targets[1]["boxes"].shape == (0, 4)
    assert torch.equal(target["boxes"], torch.tensor([[1.0, 2.0, 4.0, 5.0]]))  # input untouched
    same, _ = _hflip([image], [target], 0.0, gen)
    assert same[0] is image


def test_lr_schedule() -> None:
    cos = TrainConfig(max_iters=100, lr=1.0, warmup_iters=10, warmup_factor=0.1)
    assert lr_factor(cos, 0, 100) == pytest.approx(0.1)
    assert lr_factor(cos, 5, 100) == pytest.approx(0.55 * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert lr_factor(cos, 50, 100) == pytest.approx(0.5)
    assert lr_factor(cos, 99, 100) < 0.01
    step = TrainConfig(
        max_iters=90, warmup_iters=0, schedule="step", milestones=(0.5, 0.8), gamma=0.1
    )
    assert [lr_factor(step, i, 90) for i in (0, 44, 45, 71, 72, 89)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )


def test_empty_dataset_is_a_data_error(data: CocoDataset) -> None:
    with pytest.raises(DataError, match="no images"):
        train(_detector(data.num_classes), data.subset([]), _config())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", 0.0),
        ("epochs", -1.0),
        ("max_iters", 0),
        ("batch_size", 0),
        ("schedule", "linear"),
        ("milestones", (0.8, 0.5)),
        ("warmup_factor", 0.0),
        ("grad_clip", -1.0),
        ("device", "gpu7"),
        ("resolutions", ("oops",)),
    ],
)
def test_config_validation(field: str, value: object) -> None:
    with pytest.raises(SpecError):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


# ---------------------------------------------------------------------- it learns
@pytest.mark.slow
def test_tiny_detector_learns_on_synthetic_shapes(tmp_path: Path) -> None:
    """tiny-r18-fpn from scratch, 300 iterations of 4 images at 128 px, then AP50 on unseen images.

    Measured on the shared 2-core machine (1 thread, 270 train / 90 val images, 128 px):
      untrained AP50 7e-6 (AP 8e-7);
      trained AP50 0.034 (seed 0, the one tested), 0.013 / 0.029 / 0.026 (seeds 1-3);
      training 38 s at 31 img/s on a quiet machine, up to ~90 s under load (test total 40-100 s);
      final loss_objectness 0.067-0.077 (≈ ln 2 = 0.69 at initialisation).
    From scratch the detector fits its training images fast (AP50 0.96 on 20 memorised images
    after 400 iterations) but generalises slowly: val AP50 ≈ 0.12 after 1000 iterations on 750
    images. So the threshold is modest: 2x below the worst seed, ~850x above untrained.
    """
    info = generate(tmp_path / "synth", images=360, seed=0, size=128, val_fraction=0.25)
    train_set = CocoDataset(info.train_json, info.image_dir)
    val_set = CocoDataset(info.val_json, info.image_dir)
    size = Resolution(128, 128)
    det = _detector(train_set.num_classes, seed=0)
    untrained = evaluate(det, val_set, [size])[str(size)]
    config = TrainConfig(
        max_iters=300,
        batch_size=4,
        lr=0.02,
        warmup_iters=50,
        warmup_factor=0.1,
        schedule="step",
        milestones=(0.8,),
        resolutions=(size,),
        seed=0,
    )
    result = train(det, train_set, config)
    trained = evaluate(det, val_set, [size])[str(size)]
    msg = (
        f"untrained AP50 {untrained.AP50:.4g}, trained {trained.AP50:.4g} ({result.seconds:.0f} s)"
    )
    assert untrained.AP50 < 0.002, msg
    assert trained.AP50 > 0.006, msg
    assert trained.AP50 > 100 * untrained.AP50, msg
    # the RPN learnt objectness: from ~ln 2 at initialisation to well below
    assert result.final_losses["loss_objectness"] < 0.3, result.final_losses
