"""The mean teacher (Tarvainen & Valpola, NeurIPS 2017) with an EMAN teacher (Cai et al., CVPR 2021).

One training step::

    student(labeled image ++ strong view)   -> supervised Dice+CE on the labeled half
    teacher(weak view), no grad              -> probabilities p_t
    lambda(t) * [consistency(student_strong, p_t) + w_pl * pseudo_label_loss(student_strong, p_t)]
    optimizer step, then the teacher's EMA update

``ssl.teacher_norm`` picks the teacher: ``eman`` (EMA'd BatchNorm statistics), ``bn`` (batch
statistics, the classic mean teacher) or ``ema`` (weight EMA only, for networks without BatchNorm).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

import torch

from medeman.losses import unsupervised_weight
from medeman.methods.base import TeacherMethod
from medeman.methods.pseudo_label_loss import ConsistencyPseudoLabelLoss
from medeman.methods.registry import register_method
from medeman.nets import main_output

if TYPE_CHECKING:
    from medeman.module import SSLSegModule


@register_method("mean_teacher")
class MeanTeacher(TeacherMethod):
    """Consistency and/or confidence-thresholded pseudo-labels from an EMA teacher on weak views."""

    summary = "consistency and/or pseudo-labels from an EMAN teacher, Tarvainen & Valpola 2017, Cai et al. 2021"
    unlabeled_views = ("weak", "strong")

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        self.pseudo_label_loss = ConsistencyPseudoLabelLoss(cfg, self.schedule.threshold_momentum)

    def checkpointed_modules(self) -> dict[str, nn.Module]:
        thresholds = self.pseudo_label_loss.adaptive_thresholds
        return (
            {} if thresholds is None else {"adaptive_thresholds": thresholds}
        )  # their EMA'd state travels in checkpoints

    def training_loss(self, module: SSLSegModule, batch: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        labeled = batch["labeled"]
        image, label = labeled["image"], labeled["label"]
        unlabeled = batch.get("unlabeled")
        weight = 0.0
        if unlabeled is not None:
            weight = unsupervised_weight(
                module.global_step,
                self.ssl.consistency_weight,
                self.schedule.rampup_steps,
                self.schedule.warmup_steps,
            )
        n_labeled = image.shape[0]
        if weight > 0.0:
            strong, extra = self.strong_view(module, labeled, unlabeled)
            logits = module.student(torch.cat([image, strong]))
            labeled_logits, strong_logits = logits[:n_labeled], main_output(logits[n_labeled:])
        else:  # supervised-only warm-up: skip the unlabeled passes entirely
            labeled_logits, strong_logits = module.student(image), None
        sup = module.supervised_loss_of(labeled_logits, label)
        loss = sup
        logs: dict[str, Any] = {"loss/sup": sup.detach()}
        if strong_logits is not None:
            unsup = self.unsupervised_loss(module, strong_logits, unlabeled["weak"], logs, **extra)
            loss = loss + weight * unsup
            logs["loss/unsup"] = unsup.detach()
        logs["loss/total"] = loss.detach()
        logs["ssl/weight"] = float(weight)
        return loss, logs

    def strong_view(self, module: SSLSegModule, labeled: dict, unlabeled: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        """The student's unlabeled input and keyword arguments for :meth:`unsupervised_loss`: here the strong view as drawn."""
        return unlabeled["strong"], {}

    def unsupervised_loss(
        self, module: SSLSegModule, strong_logits: torch.Tensor, weak: torch.Tensor, logs: dict
    ) -> torch.Tensor:
        """Consistency + pseudo-label loss of the student's strong-view logits against the teacher on the weak view."""
        with torch.no_grad():
            teacher_probs = module.teacher_probs(weak)
        return self.pseudo_label_loss(strong_logits, teacher_probs, logs, log_classes=module.writes_training_logs())
