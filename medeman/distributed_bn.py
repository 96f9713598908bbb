"""BatchNorm running statistics pooled over the processes of a multi-process (DDP) run.

Plain BatchNorm under multi-process DDP (always the case on CPU, where PyTorch refuses
SyncBatchNorm) keeps per-process running statistics; pooling them keeps an EMAN teacher, which
averages the student's statistics, identical on every process. SyncBatchNorm layers are already
global and are left alone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def pool_statistics(means: torch.Tensor, variances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool per-rank BatchNorm statistics ``(ranks, channels)`` of equally many voxels per rank.

    The pooled mean is the mean of the means; the pooled variance is the mean of the variances
    plus the variance of the means (law of total variance): averaging the variances alone
    under-estimates it whenever the ranks' batches differ.
    """
    mean = means.mean(0)
    return mean, variances.mean(0) + (means - mean).square().mean(0)


def average_bn_statistics(network: nn.Module) -> None:
    """Replace ``network``'s BatchNorm running statistics by their pool over all processes, in place.

    Does nothing outside an initialized process group of more than one process. Every process
    must call it (it all-gathers).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world_size = torch.distributed.get_world_size()
    if world_size <= 1:
        return
    layers = [
        m
        for m in network.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and not isinstance(m, nn.SyncBatchNorm)
    ]
    if not layers:
        return
    means = torch.cat([m.running_mean.flatten() for m in layers])
    variances = torch.cat([m.running_var.flatten() for m in layers])
    gathered_means = [torch.empty_like(means) for _ in range(world_size)]
    gathered_variances = [torch.empty_like(variances) for _ in range(world_size)]
    torch.distributed.all_gather(gathered_means, means)
    torch.distributed.all_gather(gathered_variances, variances)
    mean, var = pool_statistics(torch.stack(gathered_means), torch.stack(gathered_variances))
    sizes = [m.running_mean.numel() for m in layers]
    torch._foreach_copy_([m.running_mean for m in layers], list(torch.split(mean, sizes)))
    torch._foreach_copy_([m.running_var for m in layers], list(torch.split(var, sizes)))
