"""torch.distributed for training: the process group, this process's place, global BatchNorm.

Under ``torchrun --nproc-per-node P -m nclab train ...`` rank r takes elements r, r+P, ...
of every global batch of B samples (the same batches as one process: full batches only);
the per-process loss is scaled so that DDP's gradient average equals the gradient of the
global-batch mean, and BatchNorm uses the statistics of the global batch (SyncBatchNorm on
CUDA, :class:`GlobalBatchNorm` on CPU/gloo), so P processes train the same network as one.

:func:`process_group` is the one place that creates and destroys the process group;
:func:`current` describes an existing one (or a single process).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all torch.distributed processes (any backend).

    Mean and (biased) variance come from two differentiable all-reduces of per-channel
    sums (the first also carries the sample count, in float64), so P processes with B/P
    samples each normalise exactly like one with B; running statistics use the unbiased
    variance and ``momentum`` (None: cumulative average), as nn.BatchNorm does. Outside
    training or without a process group it is an ordinary BatchNorm.
    """

    def _check_input_dim(self, x):
        if x.ndim < 2:
            raise ValueError(f"GlobalBatchNorm: expected (B, C, ...) input, got {tuple(x.shape)}")

    def forward(self, x):
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        return self.normalise(x, all_reduce)

    def normalise(self, x: torch.Tensor, all_reduce) -> torch.Tensor:
        """Training-mode output for x (B, C, ...), with ``all_reduce`` summing over processes.

        ``all_reduce``: a differentiable sum over processes (identity for one process).
        """
        dims = [0] + list(range(2, x.ndim))
        shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
        local = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)
        sums = all_reduce(torch.cat([x.sum(dims).double(), local]))  # (C + 1,): channel sums, count
        count = float(sums[-1].detach())
        mean = (sums[:-1] / count).to(x.dtype)
        centred = x - mean.view(shape)
        var = all_reduce(centred.square().sum(dims)) / count
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach() * count / max(count - 1, 1))
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased_var, factor)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d by a :class:`GlobalBatchNorm` with the same state."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module


@dataclass(frozen=True)
class Dist:
    """This process's place in torch.distributed (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1


def current() -> Dist:
    """This process's place in the existing process group; Dist() without one (or with one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def process_group(device: str):
    """Join torchrun's process group (env WORLD_SIZE > 1) for the block, then destroy it; yields a Dist.

    The backend is NCCL for a CUDA ``device``, else gloo. Without torchrun it yields Dist();
    when a group already exists it yields its Dist and leaves it to its owner.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        yield current()
        return
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, where: Dist) -> torch.Tensor:
    """``t`` summed over all processes in place (nothing to do for one process)."""
    if where.active:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t
