"""Data-parallel training across the ranks of one worker (``torchrun --nproc-per-node N``).

One worker of a study may be N processes started by ``torchrun``: they train every training of
the worker (the base detector, each pool phase, each trial) together, each rank on its share of
every batch, with :class:`~torch.nn.parallel.DistributedDataParallel` averaging the gradients and
batch norm synchronized over the ranks. Rank 0 alone talks to Optuna and the study's storage; the
others follow its commands (:mod:`jdsearch.search.ranks`).

Backends: gloo on CPU, NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``). Batch norm: torch's
``SyncBatchNorm`` runs on GPUs only, so the statistics are synchronized here by
:func:`synchronized_batch_norm` on every device, for every batch-norm layer (the pool's elastic
ones too): in training mode each layer normalizes with the mean and variance of the whole global
batch, and its backward pass all-reduces the two sums it needs, so the gradients are those of one
process that saw the concatenated batch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from jdsearch.core.config import env_number
from jdsearch.core.errors import JDSearchError, RanksOutOfStep

__all__ = [
    "RanksOutOfStep",
    "agree",
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "check_in_step",
    "init_from_env",
    "is_distributed",
    "is_main",
    "lockstep",
    "out_of_step",
    "rank",
    "settle",
    "shutdown",
    "synchronized_batch_norm",
    "world_size",
]

logger = logging.getLogger(__name__)

#: The longest wait ``JDSEARCH_DIST_TIMEOUT_S`` may set (30 days): a rank waits hours at most, and
#: a far larger figure overflows ``timedelta``.
MAX_DIST_TIMEOUT_S = 30 * 24 * 3600


def is_distributed() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str) -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment):
    gloo for a CPU ``device``, NCCL for CUDA (this rank then uses ``cuda:LOCAL_RANK``). Returns
    whether this process is one of several ranks. Without ``torchrun``, nothing happens."""
    if is_distributed():
        return True
    if env_number("WORLD_SIZE", 1, low=1, integer=True) <= 1:
        return False
    if not dist.is_available():
        raise JDSearchError("torchrun: torch.distributed is not available in this build of torch")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda and dev.index is not None:
        raise JDSearchError(
            f"device: {device!r} under torchrun: write 'cuda' (each rank uses cuda:LOCAL_RANK)"
        )
    if cuda:
        torch.cuda.set_device(int(env_number("LOCAL_RANK", 0, integer=True)))
    # The other ranks wait while rank 0 evaluates, uploads and asks for the next trial: at paper
    # scale that outlasts torch's default 10-30 minutes.
    wait = env_number("JDSEARCH_DIST_TIMEOUT_S", 6 * 3600, above=True, high=MAX_DIST_TIMEOUT_S)
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=wait))
    logger.info("rank %d of %d (%s)", rank(), world_size(), dist.get_backend())
    return True


def shutdown() -> None:
    """Leave the process group (after the last collective)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank. The objects travel pickled between the ranks of this one
    job (its own processes), never through a study or a file."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` with one process). Pickled
    between the ranks of this one job, as :func:`broadcast_object`'s."""
    if not is_distributed():
        return [obj]
    box: list[Any] = [None] * world_size()
    dist.all_gather_object(box, obj)
    return box


_UNSETTLED = {"section": ""}


@contextlib.contextmanager
def lockstep(what: str) -> Iterator[None]:
    """A section (``what``) that every rank runs together. An exception inside it leaves the
    ranks out of step (:func:`out_of_step`), unless every rank raised it at the same point and
    said so with :func:`settle`. Nothing with one process."""
    if not is_distributed():
        yield
        return
    _UNSETTLED["section"] = what
    yield  # no finally: an exception keeps the section unsettled
    _UNSETTLED["section"] = ""


def settle() -> None:
    """Every rank raises the same error at the same point (it was agreed): in step still."""
    _UNSETTLED["section"] = ""


def out_of_step() -> str:
    """The section a rank left by an error the others did not share (``""``: none)."""
    return _UNSETTLED["section"] if is_distributed() else ""


def check_in_step(error: BaseException) -> None:
    """Raise :class:`RanksOutOfStep` from ``error`` when it left the ranks out of step."""
    if out_of_step():
        raise RanksOutOfStep(
            f"rank {rank()} failed alone in {out_of_step()} ({type(error).__name__}: {error}); "
            "the other ranks cannot go on with it: this worker stops"
        ) from error


def agree(ok: bool) -> bool:
    """Whether every rank says ``ok`` (so that all go on together, or none does)."""
    if not is_distributed():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _SyncBatchNorm(torch.autograd.Function):
    """Training-mode batch norm over the channels of the global batch (every rank's share).

    The sums are taken in float64 and the normalization done in float32, whatever the input's
    dtype (float16 under AMP): the output and the input's gradient come back in that dtype."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running: tuple[Tensor | None, Tensor | None, float],
        eps: float,
    ) -> Tensor:
        dims = [0, *range(2, x.dim())]
        x32 = x.float()
        count = torch.full((x.shape[1],), x.numel() / x.shape[1], device=x.device)
        local = torch.stack(
            [
                x32.sum(dims, dtype=torch.float64),
                x32.square().sum(dims, dtype=torch.float64),
                count.double(),
            ]
        )
        dist.all_reduce(local)
        total, squares, n = local[0], local[1], local[2]
        mean = total / n
        var = (squares / n - mean**2).clamp_min(0)
        _update_running(running, mean, var, n[0])
        shape = [1, -1, *([1] * (x.dim() - 2))]
        invstd = (var + eps).rsqrt().float()
        xhat = (x32 - mean.float().view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.n, ctx.dtype = float(n[0]), x.dtype
        ctx.has = (weight is not None, bias is not None)
        out = xhat
        if weight is not None:
            out = out * weight.float().view(shape)
        if bias is not None:
            out = out + bias.float().view(shape)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xhat, weight, invstd = ctx.saved_tensors
        dims = [0, *range(2, grad.dim())]
        shape = [1, -1, *([1] * (grad.dim() - 2))]
        g = grad.float()
        grad_bias = g.sum(dims)
        grad_weight = (g * xhat).sum(dims)
        sums = torch.stack([grad_bias, grad_weight])
        dist.all_reduce(sums)  # the sums over the global batch, for the inputs' gradient
        scale = invstd if weight is None else invstd * weight.float()
        n = ctx.n
        grad_x = scale.view(shape) * (g - sums[0].view(shape) / n - xhat * sums[1].view(shape) / n)
        has_weight, has_bias = ctx.has
        return (
            grad_x.to(ctx.dtype),
            grad_weight.to(weight.dtype) if has_weight else None,
            grad_bias.to(weight.dtype if has_weight else ctx.dtype) if has_bias else None,
            None,
            None,
        )


def _update_running(
    running: tuple[Tensor | None, Tensor | None, float], mean: Tensor, var: Tensor, n: Tensor
) -> None:
    """Move the running statistics towards the global batch's (unbiased variance, as torch)."""
    running_mean, running_var, momentum = running
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = var * n / (n - 1).clamp_min(1)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


_PLAIN_BATCH_NORM = F.batch_norm


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    if not training or not is_distributed():  # eval mode, or one process: torch's own
        return _PLAIN_BATCH_NORM(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    return _SyncBatchNorm.apply(input, weight, bias, (running_mean, running_var, momentum), eps)


@contextlib.contextmanager
def synchronized_batch_norm() -> Iterator[None]:
    """Within the block, every training-mode ``F.batch_norm`` (``nn.BatchNorm*`` and the pool's
    elastic batch norm call it) normalizes with the statistics of the whole global batch when
    this process is one of several ranks. Outside it, or with one process, nothing changes."""
    if not is_distributed() or F.batch_norm is _batch_norm:
        yield
        return
    F.batch_norm = _batch_norm
    try:
        yield
    finally:
        F.batch_norm = _PLAIN_BATCH_NORM
