"""Bidirectional copy-paste on 3D patches: the mixing and the mixed loss of BCP.

Bai, Chen, Li, Shen & Wang, "Bidirectional Copy-Paste for Semi-Supervised Medical Image
Segmentation", CVPR 2023. A box covering ``fraction`` of every side of the patch (the paper's
β = 2/3) is cut from one image and pasted into another, in both directions:

    inward   labeled image outside the box, unlabeled image inside it
             target: ground truth outside (weight 1), teacher pseudo-label inside (weight α)
    outward  unlabeled image outside the box, labeled image inside it
             target: pseudo-label outside (weight α), ground truth inside (weight 1)

The student is trained on both mixed patches with Dice + CE, each region of a mixed patch with
its own weight (α = 0.5 in the paper), so labeled and unlabeled voxels share one forward pass
and the low-level statistics of the two sources are learned symmetrically.

Where medeman differs from the paper: one box per sample (the paper draws one per batch), and
the outward patch takes its labeled box from the *next* labeled sample of the batch (the paper
draws two labeled and two unlabeled images at random), so each mixed patch pairs different scans
without a second sampling pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from medeman.losses import masked_dice


def random_boxes(
    batch_size: int,
    spatial_shape: Sequence[int],
    fraction: float = 2.0 / 3.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One random axis-aligned box per sample, as a boolean mask (True inside the box).

    Each side of the box is ``round(fraction * side)`` voxels (at least 1) and the box lies fully
    inside the patch, at a uniformly random position.

    Args:
        batch_size: number of boxes.
        spatial_shape: patch size ``(X, Y, Z)`` (any number of spatial dims).
        fraction: box side as a fraction of the patch side, in (0, 1].
        generator: torch generator (CPU) for reproducible positions.
        device: device of the returned mask.

    Returns:
        Bool tensor ``(batch_size, *spatial_shape)``.

    Examples:
        >>> box = random_boxes(2, (6, 6, 6), fraction=0.5, generator=torch.Generator().manual_seed(0))
        >>> box.shape, int(box[0].sum())
        (torch.Size([2, 6, 6, 6]), 27)
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"copy-paste box fraction must be in (0, 1], got {fraction}")
    mask = torch.ones((batch_size, *spatial_shape), dtype=torch.bool, device=device)
    for axis, side in enumerate(spatial_shape):
        length = max(1, round(fraction * side))
        start = torch.randint(0, side - length + 1, (batch_size,), generator=generator).to(device)
        coords = torch.arange(side, device=device)
        inside = (coords[None, :] >= start[:, None]) & (coords[None, :] < start[:, None] + length)
        view = [batch_size] + [1] * len(spatial_shape)
        view[axis + 1] = side
        mask &= inside.view(view)
    return mask


def paste_box(base: torch.Tensor, patch: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """``base`` outside ``box`` and ``patch`` inside it.

    Args:
        base: ``(B, ...)`` images ``(B, C, X, Y, Z)`` or label maps ``(B, X, Y, Z)``.
        patch: same shape as ``base``.
        box: bool ``(B, X, Y, Z)``, broadcast over the channel axis of images.
    """
    if base.shape != patch.shape:
        raise ValueError(f"copy-paste needs equal shapes, got {tuple(base.shape)} and {tuple(patch.shape)}")
    if base.dim() == box.dim() + 1:  # images carry a channel axis
        box = box.unsqueeze(1)
    return torch.where(box, patch, base)


@dataclass
class MixedBatch:
    """Mixed images, their targets, and which voxels carry ground truth (vs pseudo-labels).

    Each field stacks the inward patches first, then the outward ones (``2B`` samples).
    """

    image: torch.Tensor  # (2B, C, X, Y, Z)
    target: torch.Tensor  # (2B, X, Y, Z) int64 class indices
    from_labeled: torch.Tensor  # (2B, X, Y, Z) bool: True where the target is ground truth


def bidirectional_copy_paste(
    labeled_image: torch.Tensor,
    labeled_target: torch.Tensor,
    unlabeled_image: torch.Tensor,
    pseudo_target: torch.Tensor,
    box: torch.Tensor,
) -> MixedBatch:
    """BCP's two mixed batches (inward and outward), see the module docstring.

    Args:
        labeled_image: ``(B, C, X, Y, Z)``.
        labeled_target: ``(B, X, Y, Z)`` or ``(B, 1, X, Y, Z)`` ground-truth classes.
        unlabeled_image: ``(B, C, X, Y, Z)``.
        pseudo_target: ``(B, X, Y, Z)`` the teacher's classes for ``unlabeled_image``.
        box: bool ``(B, X, Y, Z)`` from :func:`random_boxes`.

    Returns:
        A :class:`MixedBatch` of ``2B`` samples: ``B`` inward, then ``B`` outward.
    """
    if labeled_target.dim() == labeled_image.dim():
        labeled_target = labeled_target[:, 0]
    labeled_target = labeled_target.long()
    pseudo_target = pseudo_target.long()
    if labeled_image.shape[0] != unlabeled_image.shape[0]:
        raise ValueError(
            f"copy-paste pairs labeled and unlabeled patches one to one: got {labeled_image.shape[0]} labeled "
            f"and {unlabeled_image.shape[0]} unlabeled (set data.batch_size_unlabeled = data.batch_size_labeled)"
        )
    # outward: the labeled box comes from the next labeled sample, so both mixes pair different scans
    other_image, other_target = labeled_image.roll(1, dims=0), labeled_target.roll(1, dims=0)
    inward_image = paste_box(labeled_image, unlabeled_image, box)
    outward_image = paste_box(unlabeled_image, other_image, box)
    inward_target = paste_box(labeled_target, pseudo_target, box)
    outward_target = paste_box(pseudo_target, other_target, box)
    return MixedBatch(
        image=torch.cat([inward_image, outward_image]),
        target=torch.cat([inward_target, outward_target]),
        from_labeled=torch.cat([~box, box]),
    )


def copy_paste_loss(logits: torch.Tensor, mixed: MixedBatch, pseudo_weight: float = 0.5) -> torch.Tensor:
    """BCP's weighted Dice + CE on mixed patches: ground-truth voxels weigh 1, pseudo-labeled ``pseudo_weight``.

    Each region (ground truth, pseudo-label) gets its own cross-entropy, averaged over that
    region's voxels, and its own soft Dice over that region (:func:`medeman.losses.masked_dice`)::

        loss = [CE_gt + Dice_gt] + α [CE_pl + Dice_pl]

    Args:
        logits: the student's ``(2B, C, X, Y, Z)`` output on ``mixed.image``.
        mixed: from :func:`bidirectional_copy_paste`.
        pseudo_weight: α, the weight of the pseudo-labeled region (0.5 in the paper).
    """
    per_voxel = F.cross_entropy(logits.float(), mixed.target, reduction="none")
    total = logits.new_zeros((), dtype=torch.float32)
    for region, weight in ((mixed.from_labeled, 1.0), (~mixed.from_labeled, float(pseudo_weight))):
        if weight == 0.0:
            continue
        kept = region.to(per_voxel.dtype)
        ce = (per_voxel * kept).sum() / kept.sum().clamp_min(1.0)
        total = total + weight * (ce + masked_dice(logits, mixed.target, region))
    return total
