"""Start a super-net from the base detector by function-preserving expansion (``pool.init: base``).

The base is one sub-network of the pool's space (:meth:`~jdsearch.spec.pool.PoolSpec.base_config`),
so each of its tensors is a prefix of the super-net's. :func:`expand_base` writes the base into
those prefixes and makes everything the base lacks compute nothing that the base's channels read:

* **extra channels** (wider stages, inner widths, FPN, RPN conv): their incoming weights stay
  the fresh ones and their batch norm gets the base layer's mean ``|γ|``, zero ``β`` and fresh
  running statistics, so they carry activations of the base's scale; every weight that *reads* an
  extra channel (the next conv, the FPN lateral and output convs, the RPN convs, the box head's
  ``fc6``) is zero, so nothing they carry reaches the base's channels;
* **extra blocks** (deeper stages): identities, as ``add_layer`` makes them
  (:func:`jdsearch.methods.morph.init_identity_block`).

At step 0 the base-shaped sub-network is then exactly the base (same tensors), and the largest
sub-network computes the base's function (in eval mode; in training the batch statistics of an
identity block's first BN are the only difference, and its branch still outputs 0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from jdsearch.core.errors import SpecError
from jdsearch.methods.morph import init_identity_block

__all__ = ["expand_base"]


@torch.no_grad()
def expand_base(supernet: nn.Module, base: nn.Module) -> None:
    """Write ``base`` into ``supernet`` (plain or elastic, same module names) by function-preserving
    expansion, in place; see the module's notes. Every tensor of the super-net is either the
    base's, an extra of a module the base has, or part of a block the base lacks.

    Raises:
        SpecError: a tensor of the base that is not a prefix of the super-net's, or a module the
            base has and the super-net lacks.
    """
    base_modules = dict(base.named_modules())
    big_modules = dict(supernet.named_modules())
    missing = sorted(set(base_modules) - set(big_modules))
    if missing:
        raise SpecError(f"the base has {missing[0]}, which the super-net lacks")
    added: list[str] = []  # the blocks the base lacks
    for name, module in big_modules.items():
        small = base_modules.get(name)
        if any(name.startswith(f"{block}.") for block in added):
            continue
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if small is None and _is_block(name):
            init_identity_block(module)
            added.append(name)
        elif small is None and own:
            raise SpecError(f"the super-net's {name} is neither the base's nor an added block")
        elif isinstance(module, nn.Conv2d | nn.Linear):
            _expand_weights(name, module, small)
        elif isinstance(module, nn.BatchNorm2d):
            _expand_bn(name, module, small)
        elif own:
            raise SpecError(f"{name}: {type(module).__name__} cannot be expanded from the base")


def _is_block(name: str) -> bool:
    """Whether ``name`` is a whole block of the body (``backbone.body.stages.S.I``)."""
    parts = name.split(".")
    return len(parts) == 5 and name.startswith("backbone.body.stages.") and parts[4].isdigit()


def _prefix(big: Tensor, small: Tensor, name: str) -> tuple[slice, ...]:
    if big.dim() != small.dim() or any(b < s for b, s in zip(big.shape, small.shape, strict=True)):
        raise SpecError(
            f"{name}: the base's {tuple(small.shape)} is not a prefix of the super-net's "
            f"{tuple(big.shape)}"
        )
    return tuple(slice(0, n) for n in small.shape)


def _expand_weights(name: str, big: nn.Conv2d | nn.Linear, small: nn.Conv2d | nn.Linear) -> None:
    """The base's filters in the prefix; the columns that read an extra input channel zeroed
    (the box head's ``fc6`` reads its input channel-major: a prefix of columns is a prefix of
    channels)."""
    w = big.weight
    w[_prefix(w, small.weight, f"{name}.weight")] = small.weight
    w[:, small.weight.shape[1] :] = 0
    if big.bias is not None:
        assert small.bias is not None, name
        big.bias[_prefix(big.bias, small.bias, f"{name}.bias")] = small.bias


def _expand_bn(name: str, big: nn.BatchNorm2d, small: nn.BatchNorm2d) -> None:
    """The base's affine parameters and running statistics in the prefix; the extra channels
    normalised to the base layer's mean ``|γ|`` with ``β`` 0 and fresh statistics."""
    n = small.num_features
    if big.num_features < n:
        raise SpecError(f"{name}: the base has {n} channels, the super-net {big.num_features}")
    big.reset_running_stats()
    big.running_mean[:n] = small.running_mean
    big.running_var[:n] = small.running_var
    big.num_batches_tracked.copy_(small.num_batches_tracked)
    big.weight[:n] = small.weight
    big.weight[n:] = small.weight.abs().mean()
    big.bias[:n] = small.bias
    big.bias[n:] = 0
