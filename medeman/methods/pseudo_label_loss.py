"""The mean teacher's unsupervised loss: consistency with the teacher plus confidence-thresholded pseudo-labels.

Used by the mean-teacher family (:mod:`medeman.methods.mean_teacher`, and FixMatch's per-class
logging). ``ssl.consistency`` picks the soft consistency (MSE or KL of the softmaxes; Tarvainen &
Valpola, NeurIPS 2017); ``ssl.pseudo_label_threshold`` turns on hard pseudo-labels where the
teacher is that sure (Lee 2013; FixMatch, Sohn et al. 2020), with one fixed threshold or per-class
adaptive ones (``ssl.pseudo_label_threshold_mode: adaptive``, FreeMatch-style,
:class:`medeman.pseudo_labels.AdaptiveThresholds`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from medeman.losses import CONSISTENCY_LOSSES, masked_cross_entropy, masked_dice, voxel_pseudo_labels
from medeman.pseudo_labels import AdaptiveThresholds, kept_fraction_per_class
from medeman.typed_config import Config, as_config


def log_pseudo_label_classes(
    labels: torch.Tensor, mask: torch.Tensor, num_classes: int, logs: dict, thresholds: AdaptiveThresholds | None = None
) -> None:
    """Kept fraction of each class's pseudo-label voxels (classes the teacher predicts in the batch), and the adaptive thresholds.

    One device sync: call it on logging steps only.
    """
    for c, value in enumerate(kept_fraction_per_class(labels, mask, num_classes).tolist()):
        if not math.isnan(value):
            logs[f"ssl/pseudo_label_kept_class{c}"] = value
    if thresholds is not None:
        for c, value in enumerate(thresholds.thresholds().tolist()):
            logs[f"ssl/threshold_class{c}"] = value


class ConsistencyPseudoLabelLoss:
    """``consistency(student, teacher) + w_pl * pseudo-label loss`` as ``ssl.consistency`` and ``ssl.pseudo_label_*`` say.

    Args:
        cfg: resolved medeman config (a :class:`~medeman.typed_config.Config` or its dict).
        threshold_momentum: EMA momentum of the adaptive thresholds' statistics
            (:attr:`medeman.schedules.RunSchedule.threshold_momentum`).

    Attributes:
        adaptive_thresholds: the per-class thresholds (``None`` with a fixed threshold or no
            pseudo-labels); an ``nn.Module`` whose state the training module keeps in checkpoints.
    """

    def __init__(self, cfg: Config | dict[str, Any], threshold_momentum: float):
        cfg = as_config(cfg)
        ssl = cfg.ssl
        self.num_classes = cfg.data.num_classes
        self.consistency = CONSISTENCY_LOSSES.get(ssl.consistency)
        self.threshold = ssl.pseudo_label_threshold
        self.weight = ssl.pseudo_label_weight
        self.reduction = ssl.pseudo_label_reduction
        self.dice = ssl.pseudo_label_dice
        self.adaptive_thresholds: AdaptiveThresholds | None = None
        if ssl.pseudo_label_threshold_mode == "adaptive" and self.threshold is not None:
            self.adaptive_thresholds = AdaptiveThresholds(self.num_classes, threshold_momentum, cap=self.threshold)

    def __call__(
        self, strong_logits: torch.Tensor, teacher_probs: torch.Tensor, logs: dict, log_classes: bool = False
    ) -> torch.Tensor:
        """The loss of the student's strong-view logits against the teacher's probabilities; adds to ``logs``.

        Args:
            log_classes: also log per-class pseudo-label statistics (a device sync: logging steps only).
        """
        total = strong_logits.new_zeros((), dtype=torch.float32)
        if self.consistency is not None:
            consistency = self.consistency(strong_logits, teacher_probs)
            logs["loss/consistency"] = consistency.detach()
            total = total + consistency
        if self.threshold is not None:
            if self.adaptive_thresholds is not None:
                labels, mask = self.adaptive_thresholds(teacher_probs)
            else:
                labels, mask = voxel_pseudo_labels(teacher_probs, self.threshold)
            if log_classes:
                log_pseudo_label_classes(labels, mask, self.num_classes, logs, self.adaptive_thresholds)
            pseudo = masked_cross_entropy(strong_logits, labels, mask, self.reduction)
            if self.dice:
                pseudo = pseudo + masked_dice(strong_logits, labels, mask)
            logs["loss/pseudo_label"] = pseudo.detach()
            logs["ssl/pseudo_label_fraction"] = mask.float().mean()
            total = total + self.weight * pseudo
        return total
