"""RoI heads that record one training step for distillation: the student's sampled proposals,
their pooled features and predictions, and the transformed image batch, so the teacher sees the
same tensor. Off by default, then identical to torchvision's. Notes: ``docs/distillation.md``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads

__all__ = [
    "RecordingRoIHeads",
    "RoIRecord",
    "pop_record",
    "recording",
    "start_recording",
    "stop_recording",
]


@dataclass
class RoIRecord:
    """What the student's RoI heads computed in one training step (batch of ``B`` images).

    ``N`` is the total number of sampled proposals (concatenated over images, in image order),
    ``K`` the number of classes including background, ``C`` the FPN width, ``P`` the pool size.
    The three outputs carry the student's autograd graph; proposals and labels carry none.
    """

    images: Tensor  # (B, 3, H, W): the transformed, padded batch the backbone saw
    image_sizes: list[tuple[int, int]]  # per image, after resize, before padding
    proposals: list[Tensor]  # B × (N_b, 4) sampled proposals, xyxy in transformed pixels
    labels: list[Tensor]  # B × (N_b,) int64 sampled labels, 0 = background
    box_features: Tensor  # (N, C, P, P) RoIAligned FPN features, before the box head
    class_logits: Tensor  # (N, K)
    box_regression: Tensor  # (N, 4K) class-specific deltas (box-coder encoding)

    @property
    def num_proposals(self) -> int:
        """``N``: the number of sampled proposals."""
        return int(self.class_logits.shape[0])

    @property
    def positive(self) -> Tensor:
        """``(N,)`` bool mask of the proposals matched to an object (label > 0)."""
        return self.all_labels > 0

    @property
    def all_labels(self) -> Tensor:
        """All sampled labels as one ``(N,)`` tensor, in the order of the recorded outputs."""
        return torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.int64)


class _Pending:
    """The partial record of the step in progress (filled by the override and the hooks)."""

    def __init__(self, images: ImageList | None) -> None:
        self.images = images
        self.proposals: list[Tensor] | None = None
        self.labels: list[Tensor] | None = None
        self.box_features: Tensor | None = None
        self.class_logits: Tensor | None = None
        self.box_regression: Tensor | None = None


class RecordingRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` that can keep the sampled proposals and their outputs for a step.

    Build one from an existing ``RoIHeads`` with :meth:`from_heads` (same submodules, same
    parameters, same sampling/inference settings). The forward pass is torchvision's; this class
    only observes it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_recording_state()

    def _init_recording_state(self) -> None:
        # Plain attributes (not modules/buffers): invisible to state_dict and parameters().
        self._handles: list[RemovableHandle] = []
        self._images: ImageList | None = None
        self._pending: _Pending | None = None
        self._record: RoIRecord | None = None

    @classmethod
    def from_heads(cls, heads: RoIHeads) -> RecordingRoIHeads:
        """A recording copy of ``heads`` that *shares* its submodules (and so its parameters)."""
        if isinstance(heads, cls):
            return heads
        assert not heads.has_mask() and not heads.has_keypoint(), "only box heads are supported"
        new = cls(
            heads.box_roi_pool,
            heads.box_head,
            heads.box_predictor,
            fg_iou_thresh=heads.proposal_matcher.high_threshold,
            bg_iou_thresh=heads.proposal_matcher.low_threshold,
            batch_size_per_image=heads.fg_bg_sampler.batch_size_per_image,
            positive_fraction=heads.fg_bg_sampler.positive_fraction,
            bbox_reg_weights=heads.box_coder.weights,
            score_thresh=heads.score_thresh,
            nms_thresh=heads.nms_thresh,
            detections_per_img=heads.detections_per_img,
        )
        new.proposal_matcher.allow_low_quality_matches = (
            heads.proposal_matcher.allow_low_quality_matches
        )
        new.box_coder.bbox_xform_clip = heads.box_coder.bbox_xform_clip
        new.train(heads.training)
        return new

    # ------------------------------------------------------------------ switching
    @property
    def is_recording(self) -> bool:
        """Whether the recording hooks are installed."""
        return bool(self._handles)

    def _enable(self) -> None:
        if self._handles:
            return
        self._handles = [
            self.box_roi_pool.register_forward_hook(self._pooled_hook),
            self.box_predictor.register_forward_hook(self._predictor_hook),
        ]

    def _disable(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._init_recording_state()

    def pop_record(self) -> RoIRecord | None:
        """The latest recorded training step (``None`` if none since the last pop); forgets it."""
        record, self._record = self._record, None
        return record

    # ------------------------------------------------------------------ observation
    def _note_images(self, images: ImageList) -> None:
        self._images = images

    def _pooled_hook(self, module: nn.Module, args: Any, output: Tensor) -> None:
        if self._pending is not None:
            self._pending.box_features = output

    def _predictor_hook(self, module: nn.Module, args: Any, output: tuple[Tensor, Tensor]) -> None:
        if self._pending is not None:
            self._pending.class_logits, self._pending.box_regression = output

    def select_training_samples(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]] | None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """torchvision's proposal sampling; during a recorded step it also keeps the sampled
        proposals and labels."""
        sampled = super().select_training_samples(proposals, targets)
        if self._pending is not None:
            self._pending.proposals = list(sampled[0])
            self._pending.labels = list(sampled[2])
        return sampled

    def forward(  # type: ignore[override]
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """torchvision's forward; while recording in training mode it also keeps the step as a
        :class:`RoIRecord` for :meth:`pop_record`."""
        if not (self._handles and self.training):
            return super().forward(features, proposals, image_shapes, targets)
        pending = self._pending = _Pending(self._images)
        self._images = None
        self._record = None  # never hand over a stale step
        try:
            out = super().forward(features, proposals, image_shapes, targets)
        finally:
            self._pending = None
        assert pending.proposals is not None and pending.labels is not None
        assert pending.box_features is not None and pending.class_logits is not None
        assert pending.box_regression is not None
        assert pending.images is not None, "recording without the transform hook (start_recording)"
        self._record = RoIRecord(
            images=pending.images.tensors,
            image_sizes=[(int(h), int(w)) for h, w in image_shapes],
            proposals=pending.proposals,
            labels=pending.labels,
            box_features=pending.box_features,
            class_logits=pending.class_logits,
            box_regression=pending.box_regression,
        )
        return out


# ---------------------------------------------------------------------- detector-level switches
def _heads_of(detector: nn.Module) -> RecordingRoIHeads:
    heads = getattr(detector, "roi_heads", None)
    if not isinstance(heads, RecordingRoIHeads):
        raise TypeError(
            f"{type(detector).__name__}.roi_heads is {type(heads).__name__}, not RecordingRoIHeads; "
            "replace it with RecordingRoIHeads.from_heads(detector.roi_heads)"
        )
    return heads


def _transform_hook(heads: RecordingRoIHeads, module: nn.Module, args: Any, output: Any) -> None:
    if module.training and heads.is_recording:
        heads._note_images(output[0])


def start_recording(detector: nn.Module) -> None:
    """Make ``detector`` (a torchvision ``GeneralizedRCNN`` with :class:`RecordingRoIHeads`) keep
    each training step's images, sampled proposals and RoI outputs until :func:`pop_record`."""
    heads = _heads_of(detector)
    if heads.is_recording:
        return
    heads._enable()
    handle = detector.transform.register_forward_hook(functools.partial(_transform_hook, heads))
    heads._handles.append(handle)


def stop_recording(detector: nn.Module) -> None:
    """Remove every recording hook of ``detector`` and drop whatever was kept."""
    heads = getattr(detector, "roi_heads", None)
    if isinstance(heads, RecordingRoIHeads):
        heads._disable()


@contextlib.contextmanager
def recording(detector: nn.Module) -> Iterator[RecordingRoIHeads]:
    """``with recording(det) as heads: det(images, targets); rec = heads.pop_record()``."""
    heads = _heads_of(detector)
    was = heads.is_recording
    start_recording(detector)
    try:
        yield heads
    finally:
        if not was:
            stop_recording(detector)


def pop_record(detector: nn.Module) -> RoIRecord | None:
    """The detector's latest recorded training step, or ``None``; see :meth:`RecordingRoIHeads.pop_record`."""
    return _heads_of(detector).pop_record()
