"""Per-class adaptive confidence thresholds for voxel pseudo-labels, so rare classes are not drowned.

With one fixed threshold (FixMatch), the confident large classes (background, big organs) pass
it early and a small structure, on which the teacher is less sure, almost never does: its
pseudo-labels vanish exactly where they are needed. FreeMatch (Wang et al., "FreeMatch:
Self-adaptive Thresholding for Semi-supervised Learning", ICLR 2023) lowers the threshold of the
classes the model has learned less well, from EMA'd confidence statistics; FlexMatch (Zhang et al.,
NeurIPS 2021) does the same from per-class learning status. :class:`AdaptiveThresholds` is
FreeMatch's rule on voxels::

    tau       <- m tau       + (1 - m) mean_voxels max_c p(c)                    (global, self-adaptive)
    p~(c)     <- m p~(c)     + (1 - m) mean_{voxels with argmax c} max_c p(c)     (per class)
    tau(c)     = min(cap, tau * p~(c) / max_c' p~(c'))

Where medeman differs from FreeMatch: its per-class statistic is the mean probability of class c
over all samples, which on voxels measures how *frequent* a class is (a class covering 0.1 % of a
scan would get a threshold near 0 and admit every voxel); here it is the teacher's mean confidence
on the voxels it assigns to c, which measures how *sure* it is of that class whatever its size.
And the thresholds are capped by the fixed ``ssl.pseudo_label_threshold``, so "adaptive" only ever
admits more voxels of the uncertain classes than the fixed rule would.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def class_confidence(teacher_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-batch statistics of the teacher: confidence sum over all voxels, and per class over its argmax voxels.

    Args:
        teacher_probs: ``(B, C, *spatial)`` probabilities.

    Returns:
        ``(stats, counts, labels)``: ``stats`` float32 ``(1 + C,)`` holds the sum of max-probabilities
        over all voxels, then per class over the voxels whose argmax is that class; ``counts`` the
        matching voxel counts; ``labels`` the argmax ``(B, *spatial)``.
    """
    num_classes = teacher_probs.shape[1]
    confidence, labels = teacher_probs.float().max(dim=1)
    # float32 sums (float64 is missing on some accelerators, e.g. MPS): the means need no more
    per_class = torch.zeros(num_classes, dtype=torch.float32, device=teacher_probs.device)
    per_class.index_add_(0, labels.flatten(), confidence.flatten())
    counts = torch.bincount(labels.flatten(), minlength=num_classes).float()
    stats = torch.cat([confidence.sum().reshape(1), per_class])
    counts = torch.cat([counts.sum().reshape(1), counts])
    return stats, counts, labels


def class_thresholds(
    global_confidence: torch.Tensor, class_confidences: torch.Tensor, cap: float = 1.0
) -> torch.Tensor:
    """FreeMatch's per-class thresholds ``min(cap, tau * p~(c) / max p~)`` (``MaxNorm`` of the class statistic)."""
    return (global_confidence * class_confidences / class_confidences.max().clamp_min(1e-12)).clamp(max=cap)


def kept_fraction_per_class(labels: torch.Tensor, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Share of each class's argmax voxels kept as pseudo-labels (NaN for a class with no voxel)."""
    total = torch.bincount(labels.flatten(), minlength=num_classes).float()
    kept = torch.bincount(labels[mask].flatten(), minlength=num_classes).float()
    return torch.where(total > 0, kept / total.clamp_min(1.0), torch.full_like(total, float("nan")))


class AdaptiveThresholds(nn.Module):
    """Per-class pseudo-label thresholds that follow the teacher's EMA'd confidence (FreeMatch-style).

    The statistics are buffers, so they are saved in (and restored from) Lightning checkpoints.
    Under DDP the batch statistics are summed over ranks before the update, so every rank keeps
    the same thresholds. A class with no argmax voxel in a batch keeps its statistic.

    Args:
        num_classes: classes including background.
        momentum: EMA momentum ``m`` (FreeMatch's lambda, 0.999).
        cap: upper bound of every threshold (the fixed ``ssl.pseudo_label_threshold``).

    Examples:
        >>> thresholds = AdaptiveThresholds(num_classes=3, momentum=0.999, cap=0.95)
        >>> labels, mask = thresholds(torch.softmax(torch.randn(2, 3, 8, 8, 8), dim=1))
        >>> thresholds.thresholds()  # (3,) per-class thresholds after one update
    """

    global_confidence: torch.Tensor
    class_confidence: torch.Tensor

    def __init__(self, num_classes: int, momentum: float = 0.999, cap: float = 1.0) -> None:
        super().__init__()
        self.num_classes, self.momentum, self.cap = int(num_classes), float(momentum), float(cap)
        # FreeMatch's initialisation: 1/C, an uninformed teacher's confidence
        self.register_buffer("global_confidence", torch.tensor(1.0 / num_classes))
        self.register_buffer("class_confidence", torch.full((num_classes,), 1.0 / num_classes))

    def thresholds(self) -> torch.Tensor:
        """The current per-class thresholds, ``(C,)``."""
        return class_thresholds(self.global_confidence, self.class_confidence, self.cap)

    @torch.no_grad()
    def update(self, teacher_probs: torch.Tensor) -> torch.Tensor:
        """EMA-update the statistics with one batch of teacher probabilities; return its argmax labels."""
        stats, counts, labels = class_confidence(teacher_probs)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            both = torch.stack([stats, counts])
            torch.distributed.all_reduce(both)
            stats, counts = both[0], both[1]
        means = (stats / counts.clamp_min(1.0)).to(self.class_confidence.dtype)
        seen = counts > 0
        m = self.momentum
        # torch.where, not `if`: no device-to-host sync in the training step
        current = torch.cat([self.global_confidence.reshape(1), self.class_confidence])
        current = torch.where(seen, m * current + (1 - m) * means, current)
        self.global_confidence.copy_(current[0])
        self.class_confidence.copy_(current[1:])
        return labels

    def forward(self, teacher_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Update with this batch, then pseudo-label it: ``(labels, mask)`` as :func:`medeman.losses.voxel_pseudo_labels`.

        A voxel is kept when its max probability reaches the threshold of its argmax class.
        """
        labels = self.update(teacher_probs)
        confidence = teacher_probs.float().max(dim=1).values
        return labels, confidence >= self.thresholds().to(confidence.device)[labels]


def class_shares(label_maps: Iterable[torch.Tensor], num_classes: int) -> torch.Tensor:
    """Share of each class among all voxels of ``label_maps`` (integer-valued maps, any shape): ``(C,)`` float32.

    The prior of :func:`align_distribution` (the labeled scans' class frequencies).
    """
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for label in label_maps:
        counts += torch.bincount(torch.as_tensor(label).round().long().flatten(), minlength=num_classes)[:num_classes]
    return (counts / counts.sum().clamp_min(1.0)).float()


def align_distribution(
    probs: torch.Tensor, prior: torch.Tensor, marginal: torch.Tensor, class_dim: int = 1
) -> torch.Tensor:
    """Distribution alignment (ReMixMatch): ``probs * prior / marginal`` per class, renormalised over classes.

    Berthelot et al., "ReMixMatch: Semi-Supervised Learning with Distribution Matching and
    Augmentation Anchoring", ICLR 2020.

    Args:
        probs: probabilities with the classes on ``class_dim``.
        prior: ``(C,)`` target class frequencies (the labeled scans').
        marginal: ``(C,)`` the model's mean probability per class over the data ``probs`` come from.
        class_dim: the class axis of ``probs``.
    """
    shape = [1] * probs.dim()
    shape[class_dim] = -1
    ratio = (prior / marginal.clamp_min(1e-12)).to(probs.dtype).reshape(shape)
    weighted = probs * ratio
    return weighted / weighted.sum(class_dim, keepdim=True).clamp_min(1e-12)


class DistributionAlignment(nn.Module):
    """The teacher's probabilities aligned to the labeled scans' class frequencies before pseudo-labelling.

    ReMixMatch (Berthelot et al., ICLR 2020) multiplies each prediction by ``prior / marginal``, the
    labeled class frequencies over the model's running mean prediction, and renormalises. A
    teacher blind to a small structure (a lesion it predicts in a tenth of the voxels the labels
    hold) then labels more of it. Where medeman differs from ReMixMatch: the marginal is not a
    running mean over training batches, whose crops are chosen (teacher-focused unlabeled patches
    are centred on the rare class and would inflate it), but the teacher's mean probability over
    the whole unlabeled volumes, and the prior the class frequencies of the whole labeled volumes,
    both at the training resolution; :class:`~medeman.teacher_focus.TeacherFocus` measures them
    with its periodic teacher pass (:meth:`set_frequencies`). Until then the alignment is the identity.

    Both vectors are buffers: a checkpoint restores the alignment of the last pass exactly.

    Args:
        num_classes: classes including background.
    """

    prior: torch.Tensor
    marginal: torch.Tensor

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("prior", torch.ones(num_classes))
        self.register_buffer("marginal", torch.ones(num_classes))

    @torch.no_grad()
    def set_frequencies(self, prior: torch.Tensor, marginal: torch.Tensor) -> None:
        """Align from now on to ``prior`` (labeled class frequencies) given the teacher's ``marginal``, both ``(C,)``."""
        self.prior.copy_(prior)
        self.marginal.copy_(marginal)

    def ratios(self) -> torch.Tensor:
        """``prior / marginal`` per class, ``(C,)``: how much each class's probability is scaled before renormalising."""
        return self.prior / self.marginal.clamp_min(1e-12)

    def forward(self, teacher_probs: torch.Tensor) -> torch.Tensor:
        """``teacher_probs`` ``(B, C, *spatial)`` aligned, still summing to 1 over classes."""
        return align_distribution(teacher_probs, self.prior, self.marginal, class_dim=1)
