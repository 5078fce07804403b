"""The anchor generator and RoI pooler behind the detector spec's detectron2-style options.

torchvision's ``AnchorGenerator`` rounds its cell anchors to whole pixels and places each level's
anchors at the padded image size over the feature size; detectron2's ``DefaultAnchorGenerator``
keeps them exact and places them at the level's stride (``rpn.round_anchors``,
``rpn.fixed_anchor_strides``). torchvision's ``MultiScaleRoIAlign`` pools without RoIAlign's
half-pixel alignment, detectron2's ``ROIAlignV2`` with it (``roi_heads.aligned``). A detector whose
spec leaves the options at their defaults is built with torchvision's own modules, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import MultiScaleRoIAlign, roi_align

__all__ = ["AlignedMultiScaleRoIAlign", "SpecAnchorGenerator"]


class SpecAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` with exact (unrounded) cell anchors when ``rounded`` is
    false, and anchors at the fixed ``strides`` (one per level) when they are given."""

    def __init__(
        self,
        sizes: tuple[tuple[int, ...], ...],
        aspect_ratios: tuple[tuple[float, ...], ...],
        *,
        rounded: bool = True,
        strides: Sequence[int] | None = None,
    ) -> None:
        self.rounded = rounded  # read by generate_anchors, which the base constructor calls
        super().__init__(sizes, aspect_ratios)
        self.fixed_strides = None if strides is None else [int(s) for s in strides]

    def generate_anchors(
        self,
        scales: list[int],
        aspect_ratios: list[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device("cpu"),  # noqa: B008 - the base class's signature
    ) -> Tensor:
        """Zero-centred cell anchors (width ``s/√r``, height ``s·√r``), computed in float64 and
        rounded to whole pixels only when ``rounded``."""
        if self.rounded:
            return super().generate_anchors(scales, aspect_ratios, dtype, device)
        s = torch.as_tensor(scales, dtype=torch.float64)
        r = torch.as_tensor(aspect_ratios, dtype=torch.float64)
        ws = (s[None, :] / torch.sqrt(r)[:, None]).reshape(-1)
        hs = (s[None, :] * torch.sqrt(r)[:, None]).reshape(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).to(dtype=dtype, device=device)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """The anchors of every image, as torchvision's, at the fixed strides when given."""
        if self.fixed_strides is None:
            return super().forward(image_list, feature_maps)
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        device = feature_maps[0].device
        strides = [
            [torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.fixed_strides
        ]
        self.set_cell_anchors(feature_maps[0].dtype, device)
        per_level = self.grid_anchors(grid_sizes, strides)
        return [torch.cat(per_level) for _ in image_list.image_sizes]


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` with ``aligned=True`` (detectron2's ``ROIAlignV2``):
    the same level assignment, every RoI shifted by half a pixel before sampling. Needs its
    ``scales`` and ``map_levels`` set up front (:func:`jdsearch.models.detector.fix_roi_scales`)."""

    def forward(
        self,
        x: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """Pooled features ``(N, C, P, P)`` of the RoIs ``boxes`` (per image, xyxy in input
        pixels), each from its FPN level."""
        assert self.scales is not None and self.map_levels is not None, "fix_roi_scales first"
        features = [x[name] for name in self.featmap_names]
        rois = torch.cat(
            [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)]
        )
        levels = self.map_levels(boxes)
        first = features[0]
        result = first.new_zeros((len(rois), first.shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales, strict=True)):
            index = torch.where(levels == level)[0]
            pooled = roi_align(
                feature,
                rois[index],
                output_size=self.output_size,
                spatial_scale=scale,
                sampling_ratio=self.sampling_ratio,
                aligned=True,
            )
            # out of place, so that the ONNX export traces it as a scatter
            result = result.index_copy(0, index, pooled.to(result.dtype))
        return result
