"""Every use of torch's and torchvision's private names, in one place, each with why the public API
does not suffice (the rule: ``docs/architecture.md``, "Private names behind adapters").

Checked against the torch and torchvision versions ``pyproject.toml`` allows; the tests that build,
import and check detectors (``tests/test_import_torchvision.py``, ``tests/test_elastic.py``,
``tests/test_pool.py``, ``tests/test_flops.py``, ``tests/test_security.py``) fail first when one of
these changes.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import _utils as models_utils
from torchvision.models.detection import _utils as detection_utils

__all__ = [
    "BATCH_NORM_BASE",
    "INSTANCE_NORM_BASE",
    "BalancedPositiveNegativeSampler",
    "BoxCoder",
    "IntermediateLayerGetter",
    "Matcher",
    "check_input_dim",
    "conv_forward",
    "rpn_post_nms_top_n",
    "rpn_pre_nms_top_n",
    "skips_resize",
]

#: The base class of every torch batch norm (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, the lazy
#: ones): ``torch.nn.modules.batchnorm._BatchNorm``, private; torch has no public common base.
BATCH_NORM_BASE: type[nn.Module] = nn.modules.batchnorm._BatchNorm
#: The base class of every torch instance norm: ``torch.nn.modules.instancenorm._InstanceNorm``,
#: private, for the same reason.
INSTANCE_NORM_BASE: type[nn.Module] = nn.modules.instancenorm._InstanceNorm

#: The module torchvision's detection models wrap a ResNet in (``backbone.body``); it lives in the
#: private ``torchvision.models._utils`` and is exported nowhere else.
IntermediateLayerGetter = models_utils.IntermediateLayerGetter

#: The box coder, matcher and sampler of torchvision's RPN and RoI heads: classes of the private
#: ``torchvision.models.detection._utils``, exported nowhere else, which a pickled torchvision
#: Faster R-CNN names (the safe-unpickling list must name them too).
BoxCoder = detection_utils.BoxCoder
Matcher = detection_utils.Matcher
BalancedPositiveNegativeSampler = detection_utils.BalancedPositiveNegativeSampler


def conv_forward(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv`` applied with another ``weight`` and ``bias`` (slices of its own). ``Conv2d.forward``
    reads ``conv.weight``; the private ``_conv_forward`` is the one that takes them and honours
    ``padding_mode`` the way ``forward`` does."""
    return conv._conv_forward(x, weight, bias)


def check_input_dim(bn: nn.Module, x: Tensor) -> None:
    """Raise as ``bn``'s own ``forward`` does for an input of the wrong rank. The check is the
    private ``_check_input_dim`` of torch's batch norms; no public method runs it alone.

    Raises:
        ValueError: ``x`` has the wrong number of dimensions for ``bn``.
    """
    bn._check_input_dim(x)


def rpn_pre_nms_top_n(rpn: nn.Module) -> dict[str, int]:
    """A torchvision ``RegionProposalNetwork``'s pre-NMS top-n, ``{"training": n, "testing": n}``.
    The public ``rpn.pre_nms_top_n()`` gives only the value of the module's current mode; both at
    once are the private ``_pre_nms_top_n``."""
    return dict(rpn._pre_nms_top_n)


def rpn_post_nms_top_n(rpn: nn.Module) -> dict[str, int]:
    """A torchvision ``RegionProposalNetwork``'s post-NMS top-n, ``{"training": n, "testing": n}``
    (private ``_post_nms_top_n``, as for :func:`rpn_pre_nms_top_n`)."""
    return dict(rpn._post_nms_top_n)


def skips_resize(transform: nn.Module) -> bool:
    """Whether a torchvision ``GeneralizedRCNNTransform`` was built to leave images at their size
    (its ``_skip_resize``: a private constructor argument and attribute, with no public form)."""
    return bool(transform._skip_resize)
