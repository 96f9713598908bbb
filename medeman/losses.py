"""Semi-supervised losses and their schedules: consistency, voxelwise pseudo-labels, ramp-up.

All losses take the student's logits and the teacher's softmax probabilities on voxel-aligned
views, shaped ``(B, C, X, Y, Z)``, and are computed in float32 whatever the autocast precision.

References:
    Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017 (consistency,
    sigmoid ramp-up); Laine & Aila, "Temporal Ensembling", ICLR 2017 (ramp-up exp(-5(1-t)^2));
    Sohn et al., "FixMatch", NeurIPS 2020 (confidence-thresholded pseudo-labels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def sigmoid_rampup(step: float, rampup_steps: float) -> float:
    """The sigmoid-shaped ramp-up ``exp(-5 (1 - t)^2)`` with ``t = clip(step / rampup_steps, 0, 1)``.

    Returns 1 when ``rampup_steps`` is 0 (no ramp-up).
    """
    if rampup_steps <= 0:
        return 1.0
    t = min(max(step / rampup_steps, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def unsupervised_weight(step: int, weight: float, rampup_steps: int, warmup_steps: int = 0) -> float:
    """Weight of the unsupervised losses at optimizer step ``step``.

    ``0`` during the supervised-only warm-up, then ``weight * sigmoid_rampup(step - warmup_steps, rampup_steps)``.
    """
    if step < warmup_steps:
        return 0.0
    return float(weight) * sigmoid_rampup(step - warmup_steps, rampup_steps)


def softmax_mse(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's softmax and the teacher's probabilities.

    Reduction: mean over batch, classes and voxels, so the value does not depend on patch size.
    """
    return F.mse_loss(torch.softmax(student_logits.float(), dim=1), teacher_probs.float())


def softmax_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """KL divergence KL(teacher || student) of the class distributions.

    Reduction: mean over batch, classes and voxels of ``p_t (log p_t - log p_s)`` (so it equals the
    per-voxel KL divided by the number of classes), matching :func:`softmax_mse`'s reduction.
    """
    log_student = torch.log_softmax(student_logits.float(), dim=1)
    teacher_probs = teacher_probs.float()
    return (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_student).mean()


CONSISTENCY_LOSSES = {"mse": softmax_mse, "kl": softmax_kl}  # ssl.consistency: one of these, or none


def voxel_pseudo_labels(teacher_probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's argmax class per voxel and the mask of voxels whose max probability is ≥ ``threshold``.

    Returns:
        ``(labels, mask)``: ``labels`` int64 ``(B, X, Y, Z)``, ``mask`` bool of the same shape.
    """
    confidence, labels = teacher_probs.max(dim=1)
    return labels, confidence >= threshold


PSEUDO_LABEL_REDUCTIONS = ("all", "kept")


def class_weight_tensor(weights: Sequence[float] | None) -> torch.Tensor | None:
    """``train.ce_class_weights`` as a float tensor ``(C,)``, or ``None``: the supervised loss's weights, and the
    pseudo-labels' with ``ssl.fixmatch_class_weighted``."""
    return None if weights is None else torch.tensor([float(w) for w in weights])


def masked_cross_entropy(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    reduction: str = "all",
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the kept (masked) voxels.

    Args:
        reduction: ``"all"`` - ``(ce * mask).mean()`` over every voxel, as FixMatch (Sohn et al.
            2020) and EMAN write it: the loss grows with the fraction of confident voxels, so an
            unsure teacher pulls less. ``"kept"`` - the mean over the kept voxels only (0 when
            none is kept): a few confident voxels pull as hard as a whole patch.
        class_weights: ``(C,)``, each voxel's cross-entropy times the weight of its pseudo-label's
            class (as ``torch.nn.functional.cross_entropy``'s ``weight``); ``"kept"`` then divides by the
            kept voxels' summed weights (a weighted mean), ``"all"`` still by the number of voxels.
    """
    if reduction not in PSEUDO_LABEL_REDUCTIONS:
        raise ValueError(f"unknown pseudo-label reduction {reduction!r}: use 'all' or 'kept'")
    per_voxel = F.cross_entropy(student_logits.float(), labels, reduction="none")
    kept = mask.to(per_voxel.dtype)
    if class_weights is not None:
        kept = kept * class_weights.to(per_voxel)[labels]
    if reduction == "all":
        return (per_voxel * kept).mean()
    return (per_voxel * kept).sum() / kept.sum().clamp_min(1e-12)  # 0 when nothing (or only weight 0) is kept


def masked_dice(
    student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Soft Dice loss over the masked voxels, averaged over the classes present in the batch."""
    num_classes = student_logits.shape[1]
    probs = torch.softmax(student_logits.float(), dim=1)
    keep = mask.unsqueeze(1).to(probs.dtype)
    onehot = F.one_hot(labels, num_classes).movedim(-1, 1).to(probs.dtype) * keep
    probs = probs * keep
    dims = (0, 2, 3, 4)
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    present = (onehot.sum(dims) > 0).to(probs.dtype)
    dice = (2 * intersection + eps) / (denominator + eps)
    return ((1.0 - dice) * present).sum() / present.sum().clamp_min(1.0)
