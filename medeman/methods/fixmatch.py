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
With ``ssl.fixmatch_distribution_alignment`` the teacher's probabilities are first aligned to the
labeled class frequencies (ReMixMatch's distribution alignment,
:class:`~medeman.pseudo_labels.DistributionAlignment`), so a teacher that under-predicts a rare
class pseudo-labels more of it. With ``ssl.fixmatch_class_weighted`` each pseudo-label's
cross-entropy is weighted by its class's ``train.ce_class_weights``, as the labeled loss is. With
``ssl.fixmatch_paste_probability`` a labeled patch's lesions are pasted into unlabeled strong views
where the teacher sees their host organ, their ground truth the target there (object copy-paste,
:mod:`medeman.methods.lesion_paste`).
Where medeman differs from the paper: the loss is voxelwise with a masked Dice term (a small
structure's few kept voxels otherwise weigh nothing against the background's), and weak and strong
views share one spatial augmentation so their voxels align.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medeman.classes import lesion_classes, lesion_host_classes, no_lesion_classes
from medeman.config import ConfigError
from medeman.losses import (
    CONSISTENCY_LOSSES,
    class_weight_tensor,
    masked_cross_entropy,
    masked_dice,
    voxel_pseudo_labels,
)
from medeman.methods.lesion_paste import NOT_PASTED, paste_lesions
from medeman.methods.mean_teacher import MeanTeacher
from medeman.methods.pseudo_label_loss import log_pseudo_label_classes
from medeman.methods.options import option
from medeman.methods.registry import register_method
from medeman.pseudo_labels import DistributionAlignment

if TYPE_CHECKING:
    from medeman.typed_config import Config
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
    class_weighted: bool = option(
        False,
        "weigh each pseudo-label's cross-entropy by its class's train.ce_class_weights, as the labeled loss does "
        "(a rare class's few pseudo-labelled voxels otherwise weigh as little as its share of the volume)",
    )
    paste_probability: float = option(
        0.0,
        "probability that an unlabeled strong view gets a labeled patch's lesions (data.lesion_classes) pasted where the "
        "teacher confidently sees their host organ (data.lesion_host_classes), their ground truth the target there (object copy-paste, TumorCP, "
        "Yang et al. 2021); 0: off",
        rule=(lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1]"),
    )
    distribution_alignment: bool = option(
        False,
        "align the teacher's probabilities to the labeled class frequencies before thresholding (ReMixMatch's distribution "
        "alignment; the teacher's marginal from its periodic pass over the whole unlabeled scans, as often as "
        "data.unlabeled_focus_every_fraction / _steps say)",
    )


@register_method("fixmatch")
class FixMatch(MeanTeacher):
    """Confidence-thresholded hard pseudo-labels from the EMAN teacher's weak view on the student's strong view."""

    summary = "hard pseudo-labels of the EMAN teacher's weak view on the strong view: FixMatch-EMAN, Cai et al. 2021"
    option_type = FixMatchOptions
    own_options: FixMatchOptions

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        if cfg.ssl.fixmatch_class_weighted and cfg.train.ce_class_weights is None:
            raise ConfigError(
                "ssl.fixmatch_class_weighted weighs the pseudo-labels with train.ce_class_weights, which is null: "
                "set it (one weight per class) or turn the option off"
            )
        if cfg.ssl.fixmatch_paste_probability > 0:
            paste_classes(cfg)

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.class_weights = class_weight_tensor(
            self.cfg.train.ce_class_weights if self.own_options.class_weighted else None
        )
        self.alignment = (
            DistributionAlignment(self.cfg.data.num_classes) if self.own_options.distribution_alignment else None
        )
        self.pasted, self.hosts = paste_classes(self.cfg) if self.own_options.paste_probability > 0 else ([], [])

    def checkpointed_modules(self) -> dict[str, nn.Module]:
        modules = super().checkpointed_modules()
        if self.alignment is not None:
            modules["distribution_alignment"] = self.alignment  # a resume aligns as the last teacher pass said
        return modules

    def uses_unlabeled_frequencies(self) -> bool:
        return self.alignment is not None

    def set_unlabeled_frequencies(self, labeled: torch.Tensor, unlabeled: torch.Tensor) -> None:
        if self.alignment is not None:
            self.alignment.set_frequencies(labeled, unlabeled)

    def aligned_teacher_probs(self, module: SSLSegModule, weak: torch.Tensor) -> torch.Tensor:
        """The teacher's probabilities on the weak view, aligned when ``ssl.fixmatch_distribution_alignment`` says so."""
        with torch.no_grad():
            teacher_probs = module.teacher_probs(weak)
        return teacher_probs if self.alignment is None else self.alignment(teacher_probs)

    def strong_view(self, module: SSLSegModule, labeled: dict, unlabeled: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        """The strong views, with labeled lesions pasted into some when ``ssl.fixmatch_paste_probability`` > 0.

        Pasting needs the teacher's host organ first, so its probabilities are computed here once and
        handed on to :meth:`unsupervised_loss` with the pasted labels.
        """
        strong = unlabeled["strong"]
        if not self.pasted:
            return strong, {}
        teacher_probs = self.aligned_teacher_probs(module, unlabeled["weak"])
        labels, mask = voxel_pseudo_labels(teacher_probs, self.own_options.threshold)
        host = mask & torch.isin(labels, torch.as_tensor(self.hosts, device=labels.device))
        chosen = torch.rand(strong.shape[0]) < self.own_options.paste_probability
        pasted = paste_lesions(strong, host, labeled["image"], labeled["label"], self.pasted, self.hosts, chosen)
        return pasted.image, {"teacher_probs": teacher_probs, "pasted": pasted.label}

    def unsupervised_loss(
        self,
        module: SSLSegModule,
        strong_logits: torch.Tensor,
        weak: torch.Tensor,
        logs: dict,
        teacher_probs: torch.Tensor | None = None,
        pasted: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hard pseudo-labels of the teacher on ``weak`` (or its given ``teacher_probs``) train ``strong_logits``;
        ``pasted`` lesion labels (:meth:`strong_view`) replace them where they are not ``NOT_PASTED``."""
        if teacher_probs is None:
            teacher_probs = self.aligned_teacher_probs(module, weak)
        labels, mask = voxel_pseudo_labels(teacher_probs, self.own_options.threshold)
        if pasted is not None:
            where = pasted != NOT_PASTED
            labels, mask = torch.where(where, pasted, labels), mask | where
            logs["ssl/pasted_fraction"] = where.float().mean()
        if self.class_weights is not None and self.class_weights.device != strong_logits.device:
            self.class_weights = self.class_weights.to(strong_logits.device)  # once, not a copy per step
        ce = masked_cross_entropy(strong_logits, labels, mask, "all", self.class_weights)
        pseudo = ce + masked_dice(strong_logits, labels, mask)
        logs["loss/pseudo_label"] = pseudo.detach()
        logs["ssl/pseudo_label_fraction"] = mask.float().mean()
        if module.writes_training_logs():  # one device sync, at logging steps only
            log_pseudo_label_classes(labels, mask, module.num_classes, logs, self.pseudo_label_loss.adaptive_thresholds)
            if self.alignment is not None:
                for c, ratio in enumerate(self.alignment.ratios().tolist()):
                    logs[f"ssl/alignment_ratio_class{c}"] = ratio
        weight = self.own_options.consistency_weight
        consistency = CONSISTENCY_LOSSES.get(self.ssl.consistency)
        if weight > 0 and consistency is not None:
            soft = consistency(strong_logits, teacher_probs)
            logs["loss/consistency"] = soft.detach()
            pseudo = pseudo + weight * soft
        return pseudo


def paste_classes(cfg: Config) -> tuple[list[int], list[int]]:
    """The classes ``ssl.fixmatch_paste_probability`` pastes (``data.lesion_classes``) and their hosts.

    Raises:
        ConfigError: no lesion classes.
    """
    lesions = lesion_classes(cfg)
    if not lesions:
        raise ConfigError(no_lesion_classes("ssl.fixmatch_paste_probability"))
    return lesions, lesion_host_classes(cfg)
