"""FixMatch with an EMAN teacher: hard pseudo-labels of the weak view train the strong view.

EMAN (Cai et al., "Exponential Moving Average Normalization for Self-supervised and
Semi-supervised Learning", CVPR 2021) showed its semi-supervised gains with FixMatch (Sohn et al.,
NeurIPS 2020) whose pseudo-labels come from the EMAN teacher rather than from the student itself.
Voxelwise here, one training step::

    student(labeled image ++ strong view)   -> supervised Dice+CE on the labeled half
    teacher(weak view), no grad              -> p_t; pseudo-label argmax p_t where max p_t >= tau
    lambda(t) * [CE(student_strong, pseudo) averaged over all voxels (FixMatch) + masked Dice]
              (+ ssl.fixmatch_consistency_weight * ssl.consistency(student_strong, p_t), optional)

``tau`` is ``ssl.fixmatch_threshold``; ``lambda(t)`` is the ramp-up after the supervised warm-up
(at whose end the teacher restarts as the student, :class:`~medeman.methods.base.TeacherMethod`).
Where medeman differs from the paper: the loss is voxelwise with a masked Dice term (a small
structure's few kept voxels otherwise weigh nothing against the background's), and weak and strong
views share one spatial augmentation so their voxels align.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch

from medeman.losses import CONSISTENCY_LOSSES, masked_cross_entropy, masked_dice, voxel_pseudo_labels
from medeman.methods.mean_teacher import MeanTeacher
from medeman.methods.pseudo_label_loss import log_pseudo_label_classes
from medeman.methods.options import option
from medeman.methods.registry import register_method

if TYPE_CHECKING:
    from medeman.module import SSLSegModule


@dataclass(frozen=True)
class FixMatchOptions:
    """FixMatch's own options, the config keys ``ssl.fixmatch_<field>``."""

    threshold: float = option(
        0.9,
        "teacher confidence (weak view) above which a voxel's argmax is a hard pseudo-label for the strong view (FixMatch's tau)",
        rule=(lambda v: 0.0 < v <= 1.0, "a confidence in (0, 1]"),
    )
    consistency_weight: float = option(
        0.0,
        "weight of an added soft consistency loss (ssl.consistency) beside the pseudo-label loss; 0: pseudo-labels only, as FixMatch-EMAN",
        rule=(lambda v: v >= 0, "a non-negative weight"),
    )


@register_method("fixmatch")
class FixMatch(MeanTeacher):
    """Confidence-thresholded hard pseudo-labels from the EMAN teacher's weak view on the student's strong view."""

    summary = "hard pseudo-labels of the EMAN teacher's weak view on the strong view: FixMatch-EMAN, Cai et al. 2021"
    option_type = FixMatchOptions
    own_options: FixMatchOptions

    def unsupervised_loss(
        self, module: SSLSegModule, strong_logits: torch.Tensor, weak: torch.Tensor, logs: dict
    ) -> torch.Tensor:
        teacher_probs = module.teacher_probs(weak)
        labels, mask = voxel_pseudo_labels(teacher_probs, self.own_options.threshold)
        pseudo = masked_cross_entropy(strong_logits, labels, mask, "all") + masked_dice(strong_logits, labels, mask)
        logs["loss/pseudo_label"] = pseudo.detach()
        logs["ssl/pseudo_label_fraction"] = mask.float().mean()
        if module.writes_training_logs():  # one device sync, at logging steps only
            log_pseudo_label_classes(labels, mask, module.num_classes, logs, self.pseudo_label_loss.adaptive_thresholds)
        weight = self.own_options.consistency_weight
        consistency = CONSISTENCY_LOSSES.get(self.ssl.consistency)
        if weight > 0 and consistency is not None:
            soft = consistency(strong_logits, teacher_probs)
            logs["loss/consistency"] = soft.detach()
            pseudo = pseudo + weight * soft
        return pseudo
